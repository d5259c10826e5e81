"""Train the ternary U-Net.

    python -m training.train --data phantom --variant ternary-tanh --out runs/NAME
    torchrun --nproc_per_node 2 -m training.train --data msd:/data/Task07_Pancreas --out runs/NAME

Single process on the CPU by default; under ``torchrun`` every process trains on its own patches
with DistributedDataParallel (gloo on CPUs, NCCL on GPUs) and process 0 validates and writes. The run
folder gets config.json, history.json/.csv, curves.png, last.pt and best.pt (PyTorch checkpoints,
for resuming and export — the model file the engine reads is made by training.export).
"""

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import (DEFAULT_HU_WINDOW, PHANTOM_SHAPE, VALIDATION_SEED_OFFSET, batch_of_patches,
                   count_cases, dice, load_volumes)
from .network import NetworkConfig, TernaryUNet
from .ternary import VARIANTS, BetaSchedule, set_beta


@dataclass
class TrainConfig:
    data: str = "phantom"
    variant: str = "ternary-tanh"
    out: str = "runs/default"
    base_channels: int = 16
    epochs: int = 40
    iters_per_epoch: int = 150
    batch_size: int = 2
    patch: tuple = (48, 48, 48)
    lr: float = 0.0025
    lr_decay: float = 0.9
    class_weights: tuple = (0.5, 2.5)
    dice_loss: float = 0.0
    beta_start: float = 3.0
    beta_end: float = 8.0
    train_cases: int = 40
    val_cases: int = 4
    spacing: tuple = (2.0, 2.0, 2.0)
    hu_window: tuple = DEFAULT_HU_WINDOW
    phantom_shape: tuple = PHANTOM_SHAPE
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    resume: bool = False
    extra: dict = field(default_factory=dict)

    def network(self):
        return NetworkConfig(variant=self.variant, base_channels=self.base_channels, classes=2)


def parse_args(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=d.data, help="phantom | msd:PATH | nih:PATH (default phantom)")
    p.add_argument("--variant", default=d.variant, choices=VARIANTS)
    p.add_argument("--out", default=d.out, help="run folder (must not hold another run unless --resume)")
    p.add_argument("--base-channels", type=int, default=d.base_channels)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--iters-per-epoch", type=int, default=d.iters_per_epoch)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="patches per step and process")
    p.add_argument("--patch", type=int, nargs=3, default=d.patch, metavar=("Z", "Y", "X"))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-decay", type=float, default=d.lr_decay, help="learning-rate factor per epoch")
    p.add_argument("--class-weights", type=float, nargs=2, default=d.class_weights, metavar=("BG", "FG"))
    p.add_argument("--dice-loss", type=float, default=d.dice_loss, help="weight of a soft Dice loss term")
    p.add_argument("--beta-start", type=float, default=d.beta_start)
    p.add_argument("--beta-end", type=float, default=d.beta_end)
    p.add_argument("--train-cases", type=int, default=d.train_cases,
                   help="phantoms (seeds 0..N-1) or real cases used for training")
    p.add_argument("--val-cases", type=int, default=d.val_cases, help="held-out cases validated per epoch")
    p.add_argument("--spacing", type=float, nargs=3, default=d.spacing, metavar=("X", "Y", "Z"),
                   help="model voxel spacing in mm")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=d.phantom_shape, metavar=("Z", "Y", "X"),
                   help="phantom grid in voxels at the model spacing (default 128 128 128)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    a = p.parse_args(argv)
    cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(a).items()})
    problems = [name for name, ok in [("--epochs", cfg.epochs >= 1), ("--iters-per-epoch", cfg.iters_per_epoch >= 1),
                                      ("--batch-size", cfg.batch_size >= 1), ("--patch", min(cfg.patch) >= 4),
                                      ("--lr", cfg.lr > 0), ("--train-cases", cfg.train_cases >= 1),
                                      ("--val-cases", cfg.val_cases >= 0),
                                      ("--spacing", min(cfg.spacing) > 0),
                                      ("--phantom-shape", min(cfg.phantom_shape) >= 8)] if not ok]
    if problems:
        p.error(f"invalid value for {', '.join(problems)}")
    if cfg.data != "phantom" and not (cfg.data.startswith("msd:") or cfg.data.startswith("nih:")):
        p.error(f"--data must be phantom, msd:PATH or nih:PATH, got {cfg.data!r}")
    return cfg


class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total, label, enabled=True):
        self.total, self.label, self.enabled = total, label, enabled
        self.start = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, done, info=""):
        if not self.enabled or (not self.tty and done not in (self.total,) and done % max(1, self.total // 4)):
            return
        frac = done / self.total
        bar = "#" * int(24 * frac)
        eta = (time.time() - self.start) / max(frac, 1e-9) * (1 - frac)
        end = "\r" if self.tty and done < self.total else "\n"
        sys.stderr.write(f"{self.label} [{bar:<24}] {done}/{self.total} {info} eta {eta:4.0f}s{end}")
        sys.stderr.flush()


def loss_fn(logits, labels, class_weights, dice_weight):
    loss = F.cross_entropy(logits, labels, weight=class_weights)
    if dice_weight > 0:
        prob = torch.softmax(logits, dim=1)[:, 1]
        fg = (labels == 1).to(prob.dtype)
        soft_dice = (2 * (prob * fg).sum() + 1) / (prob.sum() + fg.sum() + 1)
        loss = loss + dice_weight * (1 - soft_dice)
    return loss


@torch.no_grad()
def predict_volume(model, image, device):
    """Labels of a whole normalised volume (z, y, x) with the model in eval mode."""
    was_training = model.training
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    labels = model(x).argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
    model.train(was_training)
    return labels


def split_cases(cfg):
    """(train indices, validation indices): phantom seeds, or a seeded split of a real dataset."""
    if cfg.data == "phantom":
        return (list(range(cfg.train_cases)),
                list(range(VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + cfg.val_cases)))
    n = count_cases(cfg.data)
    order = np.random.default_rng(cfg.seed).permutation(n).tolist()
    val = order[:cfg.val_cases]
    train = order[cfg.val_cases:cfg.val_cases + cfg.train_cases]
    if not train:
        raise SystemExit(f"{cfg.data}: {n} cases leave none for training after {cfg.val_cases} validation cases")
    return train, val


def _distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _prepare_run_folder(cfg, rank):
    out = Path(cfg.out)
    if rank == 0:
        if out.exists() and any(out.iterdir()) and not cfg.resume:
            raise SystemExit(f"run folder {out} already holds files; choose another --out or pass --resume")
        if cfg.resume and not (out / "last.pt").exists():
            raise SystemExit(f"--resume: {out / 'last.pt'} does not exist")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out


def train(cfg):
    rank, world = _distributed()
    out = _prepare_run_folder(cfg, rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.manual_seed(cfg.seed + rank)
    rng = np.random.default_rng(cfg.seed * 1000 + rank)

    train_idx, val_idx = split_cases(cfg)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    say(f"data {cfg.data}: {len(train_idx)} training / {len(val_idx)} validation cases, "
        f"spacing {cfg.spacing} mm, variant {cfg.variant}, {world} process(es) on {device}")
    loading = Progress(len(train_idx), "loading", enabled=rank == 0)
    volumes = load_volumes(cfg.data, train_idx, cfg.spacing, cfg.hu_window, cfg.phantom_shape,
                           progress=lambda done, total: loading.update(done))
    val_volumes = load_volumes(cfg.data, val_idx, cfg.spacing, cfg.hu_window, cfg.phantom_shape) if rank == 0 else []

    model = TernaryUNet(cfg.network()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    history, start_epoch, best = [], 0, -1.0
    if cfg.resume:
        state = torch.load(out / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch, best = state["history"], state["epoch"] + 1, state["best_dice"]
        rng = np.random.default_rng(cfg.seed * 1000 + rank + 7919 * start_epoch)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    class_weights = torch.tensor(cfg.class_weights, dtype=torch.float32, device=device)
    schedule = BetaSchedule(cfg.beta_start, cfg.beta_end)

    for epoch in range(start_epoch, cfg.epochs):
        beta = schedule(epoch, cfg.epochs)
        set_beta(model, beta)
        model.train()
        t0, losses = time.time(), []
        bar = Progress(cfg.iters_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", enabled=rank == 0)
        for it in range(cfg.iters_per_epoch):
            images, labels = batch_of_patches(volumes, cfg.batch_size, cfg.patch, rng)
            logits = net(torch.from_numpy(images).to(device))
            loss = loss_fn(logits, torch.from_numpy(labels).to(device), class_weights, cfg.dice_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(it + 1, f"loss {np.mean(losses[-20:]):.4f}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if rank == 0:
            dices = [dice(predict_volume(model, v.image, device), v.label) for v in val_volumes]
            val_dice = float(np.mean(dices)) if dices else float("nan")
            row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": val_dice, "beta": beta,
                   "lr": lr, "seconds": time.time() - t0}
            history.append(row)
            say(f"epoch {epoch + 1}: loss {row['loss']:.4f}  val Dice {val_dice:.3f}  beta {beta:.2f}  "
                f"lr {lr:.2e}  {row['seconds']:.0f}s")
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                     "best_dice": max(best, val_dice if not math.isnan(val_dice) else -1.0),
                     "config": asdict(cfg)}
            torch.save(state, out / "last.pt.tmp")
            os.replace(out / "last.pt.tmp", out / "last.pt")
            if not math.isnan(val_dice) and val_dice > best or not (out / "best.pt").exists():
                best = max(best, val_dice if not math.isnan(val_dice) else -1.0)
                torch.save(state, out / "best.pt.tmp")
                os.replace(out / "best.pt.tmp", out / "best.pt")
            write_history(out, history)
        if world > 1:
            torch.distributed.barrier()
    if world > 1:
        torch.distributed.destroy_process_group()
    return history


def write_history(out, history):
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, [h["loss"] for h in history])
    axes[0].set_title("training loss")
    axes[1].plot(epochs, [h["val_dice"] for h in history])
    axes[1].set_title("validation Dice")
    axes[2].plot(epochs, [h["beta"] for h in history])
    axes[2].set_title("beta")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)


def main(argv=None):
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
