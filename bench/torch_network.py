"""PyTorch fp32 execution of a model file's graph: the comparison for the inference benchmark and a
second oracle for the tests. torch is imported here (bench/ and tests/ only), never by
TernarySegmentationLib.

The module runs the graph of a validated ``model_file.Model`` with the file's own (dequantised)
numbers, op by op with the semantics of ``network.TernaryNetwork`` (docs/model-format.md):

* ``float_conv3d``: ``F.conv3d`` of the normalised CT with the float weights (zero 'same' padding,
  stride, dilation), then the bias, then the hard ternary step on the float thresholds: +1 where
  y > hi, -1 where y < lo (and not y > hi), else 0.
* ``ternary_conv3d``: ``F.conv3d`` of the ternary map held as float -1 / 0 / +1 with the weights as
  float in {-1, 0, +1}; every partial sum is an integer of magnitude at most Cin * taps (far below
  2**24), so the accumulator is exact in fp32, and the integer thresholds step it as above.
* ``max_pool``: 2x2x2, stride 2, ceil mode (windows clipped at the far border);
  ``upsample``: nearest x2, cropped to the spatial size of the second input (the skip);
  ``concat``: channels of the first input, then of the second; ``classifier``: a 1x1x1 float conv.

Only the float first layer and the classifier can round differently from the engine, which sums in
a fixed order (reference.float_conv3d, network.classify). With ``F.conv3d`` (torch's own order, the
fair fp32 speed) a first-layer value within one rounding of its threshold can flip a ternary
activation, and in a ternary network one flip moves later accumulators by whole units, so it can
spread to a few labels downstream. ``exact_first_layer=True`` sums the first layer in the engine's
order (tap by tap, channel by channel, float32, then the bias): every ternary map is then identical
to the engine's and the labels too, with logits equal to ~1e-5 (only the classifier's order differs).
"""

import numpy as np
import torch
import torch.nn.functional as F

from TernarySegmentationLib.model_file import GRAPH_INPUT


def ternary_step(y, lo, hi):
    """In place: +1 where y > hi, else -1 where y < lo, else 0 (NaN -> 0), per channel (dim 1);
    returns y. In place with one boolean temporary: fresh full-size float tensors cost torch more
    (page faults) than the comparisons themselves."""
    positive = torch.gt(y, hi)
    y.lt_(lo)                        # 1 where y < lo, else 0
    y.neg_()                         # -1 or (-)0
    y.masked_fill_(positive, 1.0)    # +1 wins where both hold (lo > hi + 1)
    return y


class TorchNetwork(torch.nn.Module):
    """fp32 PyTorch module of a model file; ``forward``: (N, 1, D, H, W) normalised CT -> logits
    (N, classes, D, H, W). ``channels_last``: run the convolutions in channels_last_3d memory format
    (faster for some shapes on CPU). ``exact_first_layer``: the float first layer summed in the
    engine's order instead of by ``F.conv3d`` (slow; for exactness checks)."""

    def __init__(self, model, channels_last=False, exact_first_layer=False):
        super().__init__()
        self.graph = [dict(node) for node in model.graph]
        self.exact_first_layer = exact_first_layer
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        for node in self.graph:
            for role, name in node.get("tensors", {}).items():
                array = np.asarray(model.tensors[name])
                if role == "weight" and node["op"] == "classifier":
                    array = array.reshape(array.shape + (1, 1, 1))
                tensor = torch.from_numpy(array.astype(np.float32))  # int8 / int32 -> exact floats
                if role in ("lo", "hi", "bias") and node["op"] != "classifier":
                    tensor = tensor.reshape(1, -1, 1, 1, 1)
                if tensor.ndim == 5 and role == "weight":
                    tensor = tensor.contiguous(memory_format=self.memory_format)
                self.register_buffer(self._buffer(node["name"], role), tensor)

    @staticmethod
    def _buffer(node, role):
        return f"{node}__{role}".replace(".", "_")

    def _tensor(self, node, role):
        return getattr(self, self._buffer(node["name"], role))

    def forward(self, image):
        values = {GRAPH_INPUT: image.contiguous(memory_format=self.memory_format)}
        last_use = {}
        for index, node in enumerate(self.graph):
            for source in node["inputs"]:
                last_use[source] = index
        for index, node in enumerate(self.graph):
            inputs = [values[source] for source in node["inputs"]]
            op = node["op"]
            if op == "float_conv3d" and self.exact_first_layer:
                y = float_conv3d_in_engine_order(inputs[0], self._tensor(node, "weight"), node["stride"],
                                                 node["dilation"]) + self._tensor(node, "bias")
                out = ternary_step(y, self._tensor(node, "lo"), self._tensor(node, "hi"))
                del y
            elif op in ("float_conv3d", "ternary_conv3d"):
                dilation = tuple(node["dilation"])
                padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, node["kernel"]))
                y = F.conv3d(inputs[0], self._tensor(node, "weight"), stride=tuple(node["stride"]),
                             padding=padding, dilation=dilation)
                if op == "float_conv3d":
                    y = y + self._tensor(node, "bias")
                out = ternary_step(y, self._tensor(node, "lo"), self._tensor(node, "hi"))
                del y
            elif op == "max_pool":
                out = F.max_pool3d(inputs[0], kernel_size=2, stride=2, ceil_mode=True)
            elif op == "upsample":
                x, like = inputs
                d, h, w = like.shape[2:]
                out = F.interpolate(x, scale_factor=2, mode="nearest")[:, :, :d, :h, :w]
                out = out.contiguous(memory_format=self.memory_format)
            elif op == "concat":
                out = torch.cat(inputs, dim=1)
            elif op == "classifier":
                out = F.conv3d(inputs[0], self._tensor(node, "weight"), self._tensor(node, "bias"))
            else:
                raise ValueError(f"unknown op {op!r}")
            del inputs
            for source in set(node["inputs"]):
                if last_use[source] == index:
                    del values[source]  # free maps as the engine does
            values[node["name"]] = out
            del out
        return values[self.graph[-1]["name"]]


def float_conv3d_in_engine_order(x, weight, stride, dilation):
    """Zero 'same'-padded convolution of x (N, Cin, D, H, W) with weight (Cout, Cin, kd, kh, kw),
    accumulated in float32 tap by tap (kd, kh, kw order), channel by channel, each product rounded
    before it is added: the order of reference.float_conv3d and the C kernel, so bit-identical."""
    kernel = weight.shape[2:]
    pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    xs = F.pad(x, [p for pair in reversed(pads) for p in pair])  # F.pad lists the last axis first
    out_shape = [-(-n // s) for n, s in zip(x.shape[2:], stride)]
    acc = torch.zeros((x.shape[0], weight.shape[0], *out_shape), dtype=torch.float32)
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            for c in range(kernel[2]):
                window = tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in
                               zip((a, b, c), dilation, out_shape, stride))
                for ci in range(x.shape[1]):
                    product = xs[(slice(None), slice(ci, ci + 1)) + window] * \
                        weight[:, ci, a, b, c].reshape(1, -1, 1, 1, 1)
                    acc += product  # a separate multiply and add: no fused multiply-add
                    del product
    return acc


def torch_logits(network, volume):
    """float32 (D, H, W) normalised CT -> float32 logits (D, H, W, classes) of a TorchNetwork."""
    x = torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None]
    with torch.inference_mode():
        logits = network(x)
    return logits[0].permute(1, 2, 3, 0).contiguous().numpy()


__all__ = ["TorchNetwork", "torch_logits", "ternary_step", "float_conv3d_in_engine_order"]
