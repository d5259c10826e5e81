"""Dice of a trained run or an exported model file on held-out cases.

    python -m training.evaluate runs/NAME            --data phantom --cases 20   (PyTorch, eval mode)
    python -m training.evaluate model.tsm            --data phantom --cases 20   (the popcount engine)

Phantom test cases use seeds from TEST_SEED_OFFSET on, disjoint from the training seeds (0..N-1)
and the validation seeds (VALIDATION_SEED_OFFSET on). Prints Dice per case and mean ± sd, and
writes them as JSON with --out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .data import DEFAULT_HU_WINDOW, PHANTOM_SHAPE, dice, load_volumes

TEST_SEED_OFFSET = 200_000


class TorchPredictor:
    def __init__(self, run, checkpoint="best", threads=0):
        import torch

        from .export import load_run
        from .train import predict_volume

        if threads:
            torch.set_num_threads(threads)
        self.model, self.cfg, _ = load_run(run, checkpoint)
        self._predict = predict_volume
        self.spacing, self.hu_window = tuple(self.cfg.spacing), tuple(self.cfg.hu_window)
        self.description = f"{run} ({checkpoint}.pt, PyTorch eval mode)"

    def __call__(self, image):
        import torch

        return self._predict(self.model, image, torch.device("cpu"))


class EnginePredictor:
    def __init__(self, path, threads=0, ops="kernels"):
        from TernarySegmentationLib import kernels, reference
        from TernarySegmentationLib.model_file import read_model
        from TernarySegmentationLib.network import TernaryNetwork

        model = read_model(path)
        self.network = TernaryNetwork(model)
        self.ops = kernels if ops == "kernels" else reference
        self.threads = threads or None
        self.spacing = tuple(model.preprocessing["model_spacing_mm"])
        self.hu_window = tuple(model.preprocessing["hu_window"])
        self.description = f"{path} ({ops} engine)"

    def __call__(self, image):
        logits = self.network.forward(image, ops=self.ops, threads=self.threads)
        return logits.argmax(axis=-1).astype(np.uint8)


def predictor_for(path, checkpoint="best", threads=0, engine="kernels"):
    path = Path(path)
    if path.is_dir():
        return TorchPredictor(path, checkpoint, threads)
    if path.is_file():
        return EnginePredictor(path, threads, engine)
    raise SystemExit(f"{path}: neither a run folder nor a model file")


def evaluate(predictor, data="phantom", cases=20, first=TEST_SEED_OFFSET, phantom_shape=PHANTOM_SHAPE,
             verbose=True):
    if data == "phantom":
        indices = list(range(first, first + cases))
    else:
        indices = list(range(cases))
    results = []
    for index in indices:
        (volume,) = load_volumes(data, [index], predictor.spacing, predictor.hu_window or DEFAULT_HU_WINDOW,
                                 phantom_shape)
        start = time.time()
        d = dice(predictor(volume.image), volume.label)
        results.append({"case": volume.name, "dice": d, "seconds": time.time() - start})
        if verbose:
            print(f"  {volume.name:24s} Dice {d:.4f}  ({results[-1]['seconds']:.2f} s)", flush=True)
    values = np.array([r["dice"] for r in results])
    return {"cases": results, "mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a training run folder (PyTorch) or an exported model file (engine)")
    p.add_argument("--data", default="phantom", help="phantom | msd:PATH | nih:PATH")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--first", type=int, default=TEST_SEED_OFFSET, help="first phantom seed (default %(default)s)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=PHANTOM_SHAPE)
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--engine", choices=("kernels", "reference"), default="kernels",
                   help="for model files: the C kernels or the numpy reference")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args(argv)
    if a.cases < 1:
        p.error("--cases must be >= 1")
    predictor = predictor_for(a.model, a.checkpoint, a.threads, a.engine)
    print(f"evaluating {predictor.description} on {a.cases} {a.data} cases")
    result = evaluate(predictor, a.data, a.cases, a.first, tuple(a.phantom_shape))
    print(f"Dice {result['mean']:.4f} ± {result['sd']:.4f} (n = {result['n']})")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
