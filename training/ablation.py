"""The paper's comparison on phantoms: the same network and budget trained as fp32, ternary-tanh,
ternary-ste and binary, evaluated on held-out phantoms; writes the table and curves of
docs/results.md.

    python -m training.ablation --out runs/ablation --epochs 8 --iters-per-epoch 100 --seeds 0 1

Runs that already finished in --out are reused (so an interrupted ablation continues).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .evaluate import TorchPredictor, evaluate
from .ternary import VARIANTS
from .train import TrainConfig, train


def run_variant(out, variant, seed, args):
    run = Path(out) / f"{variant}-seed{seed}"
    history = run / "history.json"
    if history.exists() and len(json.loads(history.read_text())) >= args.epochs:
        print(f"{run}: finished earlier, reused")
        return run
    cfg = TrainConfig(data="phantom", variant=variant, out=str(run), epochs=args.epochs,
                      iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size,
                      patch=tuple(args.patch), train_cases=args.train_cases, val_cases=args.val_cases,
                      base_channels=args.base_channels, seed=seed, threads=args.threads,
                      resume=(run / "last.pt").exists())
    print(f"== training {variant}, seed {seed} -> {run}", flush=True)
    train(cfg)
    return run


def weight_sizes(run):
    """(fp32 bytes of all conv/classifier weights, bytes as the engine stores them)."""
    from .export import load_run

    model, cfg, _ = load_run(run)
    fp32 = stored = 0
    for name, module in model.blocks.items():
        n = module.weight.numel()
        fp32 += 4 * n
        ternary_layer = name != "enc1_0" and name != "classifier"
        stored += 4 * n if (cfg.variant == "fp32" or not ternary_layer) else -(-n // 4)
    return fp32, stored


def write_results(path, rows, args, curves_png):
    lines = [
        "# Results",
        "",
        "## Ablation on synthetic phantoms",
        "",
        "Reproduce with:",
        "",
        "```bash",
        f"python -m training.ablation --out {args.out} --epochs {args.epochs} --iters-per-epoch "
        f"{args.iters_per_epoch} --seeds {' '.join(map(str, args.seeds))} --test-cases {args.test_cases}",
        "```",
        "",
        f"Same network (base {args.base_channels} channels), same budget for every variant: {args.epochs} epochs "
        f"× {args.iters_per_epoch} steps × {args.batch_size} patches of {'×'.join(map(str, args.patch))} voxels "
        f"(2 mm), Adam 0.0025 × 0.9 per epoch, weighted cross-entropy 0.5 / 2.5, {args.train_cases} training "
        f"phantoms. Dice on {args.test_cases} held-out phantoms (seeds from 200000), best validation "
        "checkpoint, PyTorch eval mode (hard activations) — for the ternary variants identical to the "
        "exported engine.",
        "",
        "| variant | Dice mean ± sd | per seed | weights (fp32) | weights as stored | ratio |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{m:.3f}" for m in r["seed_means"])
        lines.append(f"| {r['variant']} | {r['mean']:.3f} ± {r['sd']:.3f} | {per_seed} | "
                     f"{r['fp32_bytes'] / 1024:.0f} KiB | {r['stored_bytes'] / 1024:.1f} KiB | "
                     f"{r['stored_bytes'] / r['fp32_bytes']:.3f} |")
    lines += ["", f"![validation Dice per epoch]({curves_png.name})", ""]
    path.write_text("\n".join(lines) + "\n")


def plot_curves(rows, png):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for r in rows:
        for run in r["runs"]:
            h = json.loads((Path(run) / "history.json").read_text())
            epochs = [e["epoch"] for e in h]
            axes[0].plot(epochs, [e["loss"] for e in h], label=f"{r['variant']} ({Path(run).name[-5:]})")
            axes[1].plot(epochs, [e["val_dice"] for e in h], label=f"{r['variant']} ({Path(run).name[-5:]})")
    axes[0].set_title("training loss")
    axes[1].set_title("validation Dice")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.ablation", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--iters-per-epoch", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch", type=int, nargs=3, default=[48, 48, 48])
    p.add_argument("--train-cases", type=int, default=40)
    p.add_argument("--val-cases", type=int, default=2)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--test-cases", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--results", default="docs/results.md")
    args = p.parse_args(argv)
    rows = []
    for variant in args.variants:
        runs, dices, seed_means = [], [], []
        for seed in args.seeds:
            run = run_variant(args.out, variant, seed, args)
            result = evaluate(TorchPredictor(run, threads=args.threads), "phantom", args.test_cases, verbose=False)
            (Path(run) / "test.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"{variant} seed {seed}: Dice {result['mean']:.4f} ± {result['sd']:.4f}", flush=True)
            runs.append(str(run))
            dices += [c["dice"] for c in result["cases"]]
            seed_means.append(result["mean"])
        fp32, stored = weight_sizes(runs[0])
        rows.append({"variant": variant, "mean": float(np.mean(dices)), "sd": float(np.std(dices, ddof=1)),
                     "seed_means": seed_means, "runs": runs, "fp32_bytes": fp32, "stored_bytes": stored})
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    curves = results.parent / "ablation_curves.png"
    plot_curves(rows, curves)
    write_results(results, rows, args, curves)
    (Path(args.out) / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
