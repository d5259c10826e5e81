"""The model file shipped with the module: readable, honest metadata, and it segments a phantom."""

from pathlib import Path

from TernarySegmentationLib.model_file import model_sizes, read_model
from TernarySegmentationLib.network import TernaryNetwork, normalise_hu

MODEL = Path(__file__).resolve().parents[1] / "TernarySegmentation" / "Resources" / "Models" / "pancreas-phantom-ternary.tsm"


def test_shipped_model_reads_and_says_what_it_is():
    model = read_model(MODEL)
    meta = model.metadata
    assert meta["variant"] == "ternary-ste"
    assert "phantom" in meta["training_data"]
    assert "not for clinical use" in meta["intended_use"].lower()
    assert 0.0 < meta["validation_dice"] <= 1.0
    assert model.classes == ("background", "pancreas")
    sizes = model_sizes(model)
    assert sizes["ternary_layers_bytes"] <= 0.1 * sizes["ternary_layers_fp32_bytes"]
    assert MODEL.stat().st_size < 200_000


def test_shipped_model_finds_the_pancreas_of_a_held_out_phantom():
    from training.data import dice
    from training.phantom import make_phantom

    model = read_model(MODEL)
    p = make_phantom(300_001, spacing=tuple(model.preprocessing["model_spacing_mm"]))
    image = normalise_hu(p.image, model.preprocessing["hu_window"])
    labels = TernaryNetwork(model).forward(image, threads=2).argmax(-1)
    assert dice(labels, p.label) > 0.5
