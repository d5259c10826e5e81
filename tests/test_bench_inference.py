"""Exactness of the inference engine on the real CT of ../shared/data/ct (skipped when absent): its
logits equal the numpy reference executor's bit for bit, and its labels equal a PyTorch evaluation
of the same exported model (bench/torch_network.py); and ``python -m bench.inference --quick``
runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from TernarySegmentationLib import reference
from TernarySegmentationLib.model_file import read_model
from TernarySegmentationLib.network import TernaryNetwork
from test_pipeline import SHARED_CT, write_random_model

torch = pytest.importorskip("torch")
from bench.inference import network_input  # noqa: E402  (after the torch check)
from bench.torch_network import TorchNetwork, torch_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "TernarySegmentation" / "Resources" / "Models" / "pancreas-phantom-ternary.tsm"
needs_ct = pytest.mark.skipif(not SHARED_CT.exists(), reason=f"{SHARED_CT} not present")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A randomised ternary U-Net exported at 4 mm (the numpy reference runs the whole CT)."""
    return write_random_model(tmp_path_factory.mktemp("oracle") / "random.tsm", spacing=4.0, base=8)


@pytest.fixture(autouse=True)
def two_torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@needs_ct
def test_engine_equals_reference_and_torch_on_the_real_ct(random_model):
    model = read_model(random_model)
    x, logits, result = network_input(SHARED_CT, model, threads=2)  # what pipeline.segment feeds it
    assert x.shape == tuple(result.region.shape)
    assert np.array_equal(logits, TernaryNetwork(model).forward(x, ops=reference))
    labels = logits.argmax(-1)
    assert 0 < labels.sum() < labels.size
    for layout in (False, True):
        oracle = torch_logits(TorchNetwork(model, channels_last=layout, exact_first_layer=True), x)
        assert np.array_equal(oracle.argmax(-1), labels)
        np.testing.assert_allclose(oracle, logits, rtol=1e-5, atol=1e-4)
    plain = torch_logits(TorchNetwork(model), x)  # F.conv3d first layer: its own rounding
    np.testing.assert_allclose(plain, logits, rtol=1e-5, atol=1e-4)  # small enough to flip nothing here


@needs_ct
@pytest.mark.skipif(not SHIPPED.exists(), reason=f"{SHIPPED} not present")
def test_shipped_model_equals_reference_and_torch_on_the_real_ct():
    """The shipped model at 2 mm: the whole network input against torch, a block of it against the
    numpy reference (slow)."""
    model = read_model(SHIPPED)
    x, logits, _ = network_input(SHARED_CT, model, threads=2)
    oracle = torch_logits(TorchNetwork(model, exact_first_layer=True), x)
    assert np.array_equal(oracle.argmax(-1), logits.argmax(-1))
    block = np.ascontiguousarray(x[x.shape[0] // 2 - 12:x.shape[0] // 2 + 12, 40:88, 40:104])
    engine = TernaryNetwork(model)
    assert np.array_equal(engine.forward(block, threads=2), engine.forward(block, ops=reference))


def test_torch_network_matches_the_engine_op_by_op_on_odd_shapes(random_model):
    """Odd sizes (ceil pooling, cropped upsampling) and both memory formats, on a small volume."""
    model = read_model(random_model)
    rng = np.random.default_rng(1)
    x = np.clip(rng.normal(0, 0.6, (11, 14, 17)), -1, 1).astype(np.float32)
    logits = TernaryNetwork(model).forward(x, threads=2)
    for layout in (False, True):
        oracle = torch_logits(TorchNetwork(model, channels_last=layout, exact_first_layer=True), x)
        assert np.array_equal(oracle.argmax(-1), logits.argmax(-1))
        np.testing.assert_allclose(oracle, logits, rtol=1e-5, atol=1e-4)


def test_bench_inference_quick_runs(random_model, tmp_path):
    out = tmp_path / "inference_quick.json"
    done = subprocess.run([sys.executable, "-m", "bench.inference", "--quick", "--model", str(random_model),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["checks_passed"] and report["exactness"]["labels_equal_torch_engine_order"]
    assert set(report["end_to_end"]["stages_median_s"]) == {"read", "load model", "preprocess", "network",
                                                             "postprocess", "write"}
    assert report["end_to_end"]["peak_rss_max_mb"] > 10 and not report["end_to_end"]["child_imported_torch"]
    assert report["network"]["engine"]["ratio_torch_fp32"] > 0
    assert 0 < report["model"]["fraction_of_fp32"] < 1
    assert out.with_suffix(".md").read_text().startswith("| measure | measured | target |")
