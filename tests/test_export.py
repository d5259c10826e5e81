"""Export: a PyTorch model in eval mode and the engine running its exported file agree."""

import numpy as np
import pytest
import torch

from TernarySegmentationLib import kernels, reference
from TernarySegmentationLib.model_file import model_sizes, read_model, write_model
from TernarySegmentationLib.network import TernaryNetwork
from training.data import normalise_hu
from training.export import model_arrays
from training.phantom import make_phantom

from tests._models import randomised_model


@pytest.fixture(scope="module")
def phantom_crop():
    p = make_phantom(3, shape=(64, 64, 64), spacing=(4.0, 4.0, 4.0))
    return np.ascontiguousarray(normalise_hu(p.image)[5:36, 11:50, 7:44])  # odd sizes


def write(tmp_path, model, name="m.tsm"):
    graph, tensors = model_arrays(model)
    path = tmp_path / name
    metadata = {"name": "test", "description": "randomised test network", "variant": model.config.variant,
                "training_data": "none", "validation_dice": None, "code_version": "test",
                "created": "2026-01-01T00:00:00+00:00", "intended_use": "tests only"}
    write_model(path, graph=graph, tensors=tensors, metadata=metadata,
                preprocessing={"model_spacing_mm": [4.0, 4.0, 4.0], "hu_window": [-200.0, 300.0],
                               "orientation": "LPS"}, classes=["background", "pancreas"])
    return path


@pytest.mark.parametrize("variant", ["ternary-tanh", "ternary-ste", "binary"])
def test_engine_labels_equal_torch_eval(tmp_path, phantom_crop, variant):
    model = randomised_model(variant)
    with torch.no_grad():
        logits_torch = model(torch.from_numpy(phantom_crop)[None, None])[0].permute(1, 2, 3, 0).numpy()
    network = TernaryNetwork(read_model(write(tmp_path, model)))
    logits_c = network.forward(phantom_crop, ops=kernels, threads=2)
    logits_ref = network.forward(phantom_crop, ops=reference)
    assert np.array_equal(logits_c, logits_ref)
    labels_torch = logits_torch.argmax(-1)
    assert 0 < labels_torch.sum() < labels_torch.size  # the test means something: both classes occur
    assert np.array_equal(logits_c.argmax(-1), labels_torch)
    np.testing.assert_allclose(logits_c, logits_torch, rtol=1e-4, atol=1e-3)


def test_fp32_variant_cannot_be_exported():
    with pytest.raises(ValueError, match="fp32"):
        model_arrays(randomised_model("fp32"))


def test_ternary_layers_are_over_90_percent_smaller(tmp_path):
    model = randomised_model("ternary-tanh", base=16)
    sizes = model_sizes(read_model(write(tmp_path, model)))
    assert sizes["ternary_layers_bytes"] <= 0.1 * sizes["ternary_layers_fp32_bytes"]
    assert sizes["file_bytes"] < 0.2 * sizes["fp32_bytes"]
