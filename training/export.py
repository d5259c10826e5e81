"""Export a trained run to the packed model file the engine reads (docs/model-format.md).

    python -m training.export runs/NAME -o model.tsm [--checkpoint best|last] [--overwrite]

Batch-norm is folded into per-channel thresholds: for a ternary convolution with filter scale alpha
and batch-norm scale s = gamma / sqrt(var + eps) and shift t = beta - s * mean, the pre-activation is
y = a * acc + b with a = s * alpha, b = t, acc the integer popcount sum; hard ternary activation at
+-1/2 becomes acc > hi = floor((1/2 - b) / a) -> +1 and acc < lo = ceil((-1/2 - b) / a) -> -1
(derivation in kernels/src/tk_conv.c). a < 0 flips the filter; a = 0 is a constant channel.
"""

import argparse
import datetime
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .network import TernaryUNet, graph_spec
from .ternary import binarize, twn_ternarize

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
FLOAT_BIG = float(np.finfo(np.float32).max)
INTENDED_USE_PHANTOM = ("Research and demonstration only. Trained on synthetic abdominal CT phantoms, "
                        "not on patient data: NOT for clinical use. Retrain on real CT (see README) "
                        "before any research use on patients.")


def _bn_affine(bn):
    """(s, t) with bn(y) = s * y + t in eval mode, float64."""
    var = bn.running_var.detach().double()
    s = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
    t = bn.bias.detach().double() - s * bn.running_mean.detach().double()
    return s.numpy(), t.numpy()


def _clamp_int32(v):
    return int(min(max(v, INT32_MIN), INT32_MAX))


def integer_thresholds(a, b, binary=False):
    """Per-channel (lo, hi) int32 and sign flips for y = a * acc + b.

    ternary: +1 if y > 1/2, -1 if y < -1/2; binary: +1 if y >= 0, else -1. Returns (lo, hi, flip)
    where flip[c] means the filter must be negated (a < 0) so that the folded a is positive.
    """
    lo, hi, flip = [], [], []
    for ac, bc in zip(a, b):
        f = ac < 0
        ac = -ac if f else ac
        flip.append(f)
        if ac == 0:  # constant channel y = b
            if binary:
                value = 1 if bc >= 0 else -1
            else:
                value = 1 if bc > 0.5 else (-1 if bc < -0.5 else 0)
            lo.append({1: INT32_MIN, -1: INT32_MAX, 0: INT32_MIN}[value])
            hi.append({1: INT32_MIN, -1: INT32_MAX, 0: INT32_MAX}[value])
            continue
        if binary:  # y >= 0  <=>  acc >= -b/a  <=>  acc > ceil(-b/a) - 1
            h = math.ceil(-bc / ac) - 1
            hi.append(_clamp_int32(h))
            lo.append(_clamp_int32(h + 1))
        else:
            hi.append(_clamp_int32(math.floor((0.5 - bc) / ac)))
            lo.append(_clamp_int32(math.ceil((-0.5 - bc) / ac)))
    return np.array(lo, np.int32), np.array(hi, np.int32), np.array(flip)


def float_thresholds(s, t, binary=False):
    """For the float first layer: y = s * acc + t. Returns (lo, hi, flip) float32 thresholds on acc
    (filter negated where s < 0): ternary +1 if acc > (1/2 - t)/s, -1 if acc < (-1/2 - t)/s;
    binary +1 if acc >= -t/s, else -1."""
    lo, hi, flip = [], [], []
    for sc, tc in zip(s, t):
        f = sc < 0
        sc = -sc if f else sc
        flip.append(f)
        if sc == 0:
            value = (1 if tc >= 0 else -1) if binary else (1 if tc > 0.5 else (-1 if tc < -0.5 else 0))
            lo.append({1: -FLOAT_BIG, -1: FLOAT_BIG, 0: -FLOAT_BIG}[value])
            hi.append({1: -FLOAT_BIG, -1: FLOAT_BIG, 0: FLOAT_BIG}[value])
            continue
        if binary:
            edge = np.float32(-tc / sc)
            hi.append(float(np.nextafter(edge, np.float32(-np.inf))))
            lo.append(float(edge))
        else:
            hi.append((0.5 - tc) / sc)
            lo.append((-0.5 - tc) / sc)
    lo = np.clip(np.array(lo), -FLOAT_BIG, FLOAT_BIG).astype(np.float32)
    hi = np.clip(np.array(hi), -FLOAT_BIG, FLOAT_BIG).astype(np.float32)
    return lo, hi, np.array(flip)


def model_arrays(model):
    """(graph, tensors) of a TernaryUNet in eval semantics, in the model file's vocabulary."""
    variant = model.config.variant
    if variant == "fp32":
        raise ValueError("the fp32 variant has no ternary form to export; train binary or ternary-* variants")
    binary = variant == "binary"
    graph, tensors = [], {}
    for name, op, inputs, attrs in graph_spec(model.config):
        node = {"name": name, "op": op, "inputs": list(inputs), **attrs}
        block = model.blocks[name] if name in model.blocks else None
        if op == "float_conv3d":
            s, t = _bn_affine(block.bn)
            lo, hi, flip = float_thresholds(s, t, binary)
            w = block.weight.detach().double().numpy().copy()
            w[flip] *= -1
            tensors.update({f"{name}.weight": w.astype(np.float32),
                            f"{name}.bias": np.zeros(len(s), np.float32),
                            f"{name}.lo": lo, f"{name}.hi": hi})
            node["tensors"] = {k: f"{name}.{k}" for k in ("weight", "bias", "lo", "hi")}
        elif op == "ternary_conv3d":
            ternary, alpha = (binarize if binary else twn_ternarize)(block.weight.detach())
            s, t = _bn_affine(block.bn)
            lo, hi, flip = integer_thresholds(s * alpha.double().numpy(), t, binary)
            q = ternary.numpy().astype(np.int8)
            q[flip] *= -1
            tensors.update({f"{name}.weight": q, f"{name}.lo": lo, f"{name}.hi": hi})
            node["tensors"] = {k: f"{name}.{k}" for k in ("weight", "lo", "hi")}
        elif op == "classifier":
            tensors[f"{name}.weight"] = block.weight.detach().numpy()[:, :, 0, 0, 0].astype(np.float32).copy()
            tensors[f"{name}.bias"] = block.bias.detach().numpy().astype(np.float32).copy()
            node["tensors"] = {"weight": f"{name}.weight", "bias": f"{name}.bias"}
        graph.append(node)
    return graph, tensors


def code_version():
    from TernarySegmentationLib import __version__

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__


def load_run(run, checkpoint="best"):
    """(model in eval mode, run config dict, checkpoint state) of a run folder."""
    run = Path(run)
    path = run / f"{checkpoint}.pt"
    if not path.exists():
        raise SystemExit(f"{path} does not exist (is {run} a training run folder?)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    from .train import TrainConfig

    cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in state["config"].items()})
    model = TernaryUNet(cfg.network())
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, state


def export(run, output, checkpoint="best", overwrite=False, validation_dice=None, name=None, extra=None):
    """Write the model file of a run; ``extra`` adds metadata keys (e.g. a held-out test Dice)."""
    from TernarySegmentationLib.model_file import write_model

    model, cfg, state = load_run(run, checkpoint)
    graph, tensors = model_arrays(model)
    history = state.get("history") or []
    if validation_dice is None and history:
        validation_dice = max(h["val_dice"] for h in history if not math.isnan(h["val_dice"]))
    phantom = cfg.data == "phantom"
    metadata = {
        "name": name or f"ternaryseg-{cfg.variant}-{Path(run).name}",
        "description": "Ternary 3D U-Net for pancreas segmentation in abdominal CT (TernaryNet-style: "
                       "ternary weights and activations, popcount inference).",
        "variant": cfg.variant,
        "training_data": (f"synthetic abdominal CT phantoms (training/phantom.py), {cfg.train_cases} cases, "
                          f"seeds 0..{cfg.train_cases - 1}" if phantom else f"{cfg.data} ({cfg.train_cases} cases)"),
        "validation_dice": None if validation_dice is None else round(float(validation_dice), 4),
        "validation_data": (f"{cfg.val_cases} held-out phantoms" if phantom else f"{cfg.val_cases} held-out cases"),
        "training": {"epochs": len(history), "checkpoint": checkpoint, "base_channels": cfg.base_channels,
                     "patch": list(cfg.patch), "seed": cfg.seed},
        "code_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "intended_use": INTENDED_USE_PHANTOM if phantom else
        "Research use only; not a medical device; not for clinical decisions.",
    }
    metadata.update(extra or {})
    preprocessing = {"model_spacing_mm": [float(v) for v in cfg.spacing],
                     "hu_window": [float(v) for v in cfg.hu_window], "orientation": "LPS"}
    return write_model(output, graph=graph, tensors=tensors, metadata=metadata,
                       preprocessing=preprocessing, classes=["background", "pancreas"], overwrite=overwrite)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("run", help="training run folder (holds config and best.pt / last.pt)")
    p.add_argument("-o", "--output", required=True, help="model file to write (e.g. model.tsm)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--validation-dice", type=float, default=None,
                   help="Dice to record in the metadata (default: best validation Dice of the run)")
    p.add_argument("--name", default=None, help="model name in the metadata")
    a = p.parse_args(argv)
    try:
        size = export(a.run, a.output, a.checkpoint, a.overwrite, a.validation_dice, a.name)
    except (FileExistsError, ValueError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 1
    print(f"wrote {a.output} ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
