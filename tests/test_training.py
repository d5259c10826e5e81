"""Training smoke tests: the loss falls, runs are reproducible and resumable, export and evaluation
run from the command line, and DistributedDataParallel works with 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.train import main as train_main
from training.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
# tiny phantoms: 32^3 voxels at 8 mm still span the 256 mm abdomen
TINY = ["--phantom-shape", "32", "32", "32", "--spacing", "8", "8", "8", "--patch", "16", "16", "16",
        "--train-cases", "3", "--val-cases", "1", "--base-channels", "8", "--threads", "2"]


def history(run):
    return json.loads((Path(run) / "history.json").read_text())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "smoke"
    train_main(["--out", str(run), "--epochs", "4", "--iters-per-epoch", "8", "--batch-size", "2",
                "--lr", "0.005", *TINY])
    return run


def test_loss_falls_and_beta_rises(trained_run):
    h = history(trained_run)
    assert len(h) == 4
    assert h[-1]["loss"] < 0.8 * h[0]["loss"], [e["loss"] for e in h]
    assert [e["beta"] for e in h] == sorted(e["beta"] for e in h) and h[0]["beta"] == 3.0 and h[-1]["beta"] == 8.0
    for name in ("config.json", "history.csv", "best.pt", "last.pt"):
        assert (trained_run / name).exists(), name


def test_refuses_to_overwrite_a_run(trained_run):
    with pytest.raises(SystemExit, match="already holds files"):
        train_main(["--out", str(trained_run), "--epochs", "1", *TINY])


def test_resume_continues_the_history(tmp_path):
    run = tmp_path / "r"
    train_main(["--out", str(run), "--epochs", "1", "--iters-per-epoch", "2", *TINY])
    train_main(["--out", str(run), "--epochs", "2", "--iters-per-epoch", "2", "--resume", *TINY])
    assert [e["epoch"] for e in history(run)] == [1, 2]


def test_same_seed_same_result(tmp_path):
    for name in ("a", "b"):
        train_main(["--out", str(tmp_path / name), "--epochs", "1", "--iters-per-epoch", "3", *TINY])
    assert history(tmp_path / "a")[0]["loss"] == history(tmp_path / "b")[0]["loss"]


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--data", "kaggle:/x"])


def test_export_and_evaluate_cli(trained_run, tmp_path):
    model = tmp_path / "model.tsm"
    cmd = [sys.executable, "-m", "training.export", str(trained_run), "-o", str(model)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert again.returncode != 0 and "exist" in again.stderr  # never overwrites without --overwrite
    from TernarySegmentationLib.model_file import read_model

    meta = read_model(model).metadata
    assert "phantom" in meta["training_data"] and "not for clinical use" in meta["intended_use"].lower()
    out = tmp_path / "eval.json"
    for target in (trained_run, model):
        done = subprocess.run([sys.executable, "-m", "training.evaluate", str(target), "--cases", "2",
                               "--phantom-shape", "32", "32", "32", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
        assert done.returncode == 0, done.stderr
        result = json.loads(out.read_text())
        assert result["n"] == 2 and 0.0 <= result["mean"] <= 1.0


def test_distributed_data_parallel_two_cpu_processes(tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train", "--out", str(run), "--epochs", "1", "--iters-per-epoch", "2", *TINY]
    cmd[cmd.index("--threads") + 1] = "1"  # one thread per process on the 2 cores
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 process(es)" in done.stdout
    assert len(history(run)) == 1 and np.isfinite(history(run)[0]["loss"])
