"""The network executor: runs a validated Model's graph on a normalised CT volume.

Every node is one op of the kernels binding (C, the default) or of the numpy reference, called by the
same name with the same arguments, so both give bit-identical ternary maps and identical logits
(the float classifier adds the same float32 table entries in the same order in both). Nothing here
imports the C kernels unless they are used, and nothing imports torch.
"""

import math
import threading

import numpy as np

from .model_file import GRAPH_INPUT, Model
from .packed import TernaryMap, conv_out_size
from .reference import classifier as classify  # the numpy classifier (kept under its old name)
from .reference import classifier_tables


class Cancelled(Exception):
    """Raised by TernaryNetwork.forward when its cancel() callback returned True."""


def normalise_hu(volume, hu_window):
    """CT in Hounsfield units -> float32 network input 2 * (clip(HU, lo, hi) - lo) / (hi - lo) - 1.

    Computed in float32 in exactly this order, with lo, hi and hi - lo rounded to float32 first, so lo
    maps to -1 and hi to +1 exactly; NaN stays NaN.
    """
    lo, hi = (float(v) for v in hu_window)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"hu_window must be [lo, hi] with finite lo < hi, got {list(hu_window)}")
    volume = np.asarray(volume)
    if volume.dtype.kind not in "biuf":
        raise ValueError(f"volume must be a numeric array, got dtype {volume.dtype}")
    out = np.empty(volume.shape, np.float32)
    out[...] = volume
    lo, hi = np.float32(lo), np.float32(hi)
    np.clip(out, lo, hi, out=out)
    out -= lo
    out *= np.float32(2)
    out /= hi - lo
    out -= np.float32(1)
    return out


class _Node:
    """A graph node with its attributes as tuples and its tensors as arrays."""

    __slots__ = ("name", "op", "inputs", "cin", "cout", "kernel", "stride", "dilation", "tensors")

    def __init__(self, node, tensors):
        self.name, self.op, self.inputs = node["name"], node["op"], tuple(node["inputs"])
        self.cin, self.cout = node.get("in_channels"), node.get("out_channels", node.get("classes"))
        self.kernel, self.stride, self.dilation = (tuple(node[a]) if a in node else None
                                                   for a in ("kernel", "stride", "dilation"))
        self.tensors = {role: tensors[name] for role, name in node.get("tensors", {}).items()}


class TernaryNetwork:
    """Runs a Model. ``forward`` may be called from several threads at once (weights are read-only)."""

    def __init__(self, model):
        if not isinstance(model, Model):
            raise TypeError(f"TernaryNetwork needs a model_file.Model, got {type(model).__name__}")
        self.model = model
        self.classes = model.classes
        self._nodes = [_Node(node, model.tensors) for node in model.graph]
        # value name -> index of the last node that reads it, so each map is freed right after
        self._last_use = {}
        for index, node in enumerate(self._nodes):
            for source in node.inputs:
                self._last_use[source] = index
        self._packed = {}  # ops module -> {node name: weights packed by that module's pack_weights}
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------- running

    def forward(self, image, ops=None, threads=None, progress=None, cancel=None):
        """float32 (D, H, W) or (D, H, W, 1) normalised CT -> float32 logits (D, H, W, classes).

        ``ops``: the kernels module (default) or the reference module. ``progress(fraction, stage)`` is
        called after each node with the fraction of multiply-accumulates done (reaching 1.0) and the
        node's name; ``cancel()`` is polled before each node and raises Cancelled when it returns True.
        """
        if ops is None:
            from . import kernels as ops
        x = self._check_image(image)
        macs = self.macs(x.shape[:3])
        total, done = sum(macs.values()), 0
        weights = self._weights_for(ops)
        values = {GRAPH_INPUT: x}
        del x
        for index, node in enumerate(self._nodes):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled before node {node.name!r}")
            inputs = [values[source] for source in node.inputs]
            output = self._run(node, inputs, ops, weights, threads)
            del inputs
            for source in set(node.inputs):
                if self._last_use[source] == index:
                    del values[source]  # bounded memory: only maps still to be read stay alive
            values[node.name] = output
            del output
            done += macs[node.name]
            if progress is not None:
                progress(1.0 if index == len(self._nodes) - 1 else done / total, node.name)
        return values[self._nodes[-1].name]

    @staticmethod
    def _check_image(image):
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
        if image.dtype.kind != "f":
            raise ValueError(f"image must be a float array (normalised CT), got dtype {image.dtype}")
        if image.ndim == 3:
            image = image[..., None]
        if image.ndim != 4 or image.shape[3] != 1 or min(image.shape) < 1:
            raise ValueError(f"image must have shape (D, H, W) or (D, H, W, 1) with D, H, W >= 1, "
                             f"got {image.shape}")
        return np.ascontiguousarray(image, np.float32)

    def _weights_for(self, ops):
        """Ternary conv weights packed once per ops module (lazily: the reference never needs C),
        and the classifier's byte tables (the same for every module)."""
        with self._lock:
            packed = self._packed.get(ops)
            if packed is None:
                packed = {node.name: ops.pack_weights(node.tensors["weight"])
                          for node in self._nodes if node.op == "ternary_conv3d"}
                packed.update({node.name: classifier_tables(node.tensors["weight"])
                               for node in self._nodes if node.op == "classifier"})
                self._packed[ops] = packed
            return packed

    def _run(self, node, inputs, ops, weights, threads):
        t = node.tensors
        if node.op == "float_conv3d":
            return ops.float_conv3d(inputs[0], t["weight"], t["bias"], stride=node.stride,
                                    dilation=node.dilation, epilogue="ternary", lo=t["lo"], hi=t["hi"],
                                    threads=threads)
        if node.op == "ternary_conv3d":
            return ops.ternary_conv3d(inputs[0], weights[node.name], stride=node.stride,
                                      dilation=node.dilation, epilogue="ternary", lo=t["lo"], hi=t["hi"],
                                      threads=threads)
        if node.op == "max_pool":
            return ops.max_pool(inputs[0], threads=threads)
        if node.op == "upsample":
            x, like = inputs
            return ops.upsample(x, _spatial_shape(like), threads=threads)
        if node.op == "concat":
            return ops.concat(inputs[0], inputs[1], threads=threads)
        if node.op == "classifier":
            return ops.classifier(inputs[0], t["weight"], t["bias"], tables=weights[node.name],
                                  threads=threads)
        raise AssertionError(f"unvalidated op {node.op!r}")  # the reader rejects unknown ops

    # -------------------------------------------------------------------------------- sizes

    def macs(self, shape):
        """Multiply-accumulates per node (name -> int, in execution order) for an input of spatial
        shape (D, H, W); pooling, upsampling and concatenation count 0."""
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be 3 positive sizes (D, H, W), got {shape}")
        shapes, macs = {GRAPH_INPUT: shape}, {}
        for node in self._nodes:
            s = shapes[node.inputs[0]]
            if node.op in ("float_conv3d", "ternary_conv3d"):
                out = conv_out_size(s, node.stride)
                count = math.prod(out) * node.cout * node.cin * math.prod(node.kernel)
            elif node.op == "max_pool":
                out, count = conv_out_size(s, (2, 2, 2)), 0
            elif node.op == "upsample":
                out, count = shapes[node.inputs[1]], 0
            elif node.op == "classifier":
                out, count = s, math.prod(s) * node.cin * node.cout
            else:
                out, count = s, 0
            shapes[node.name], macs[node.name] = out, count
        return macs


def _spatial_shape(value):
    return value.shape if isinstance(value, TernaryMap) else value.shape[:3]


__all__ = ["Cancelled", "TernaryNetwork", "normalise_hu", "classify"]
