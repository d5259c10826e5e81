"""The segmentation pipeline: geometry round trips, exactness against the network, DICOM folders, bad
input, the model search, atomic writing and bounded memory."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TernarySegmentationLib import pipeline
from TernarySegmentationLib.model_file import ModelFileError, read_model, write_model
from TernarySegmentationLib.network import Cancelled, TernaryNetwork, normalise_hu
from TernarySegmentationLib.pipeline import InputError, InputWarning

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct" / "example_ct_sm.nii.gz"
HU_WINDOW = (-200.0, 300.0)
METADATA = {"name": "test", "description": "test network", "variant": "ternary-tanh", "training_data": "none",
            "validation_dice": None, "code_version": "test", "created": "2026-01-01T00:00:00+00:00",
            "intended_use": "tests only"}
CLASSES = ["background", "pancreas"]


# ------------------------------------------------------------------------------------ test models

def write_random_model(path, spacing=4.0, base=8, seed=0):
    """A randomised TernaryUNet (random batch-norm statistics, as in test_export) exported to a file."""
    from tests._models import randomised_model
    from training.export import model_arrays

    model = randomised_model(base=base, seed=seed)
    graph, tensors = model_arrays(model)
    write_model(path, graph=graph, tensors=tensors, metadata=METADATA, classes=CLASSES,
                preprocessing={"model_spacing_mm": [spacing] * 3, "hu_window": list(HU_WINDOW),
                               "orientation": "LPS"})
    return path


def write_threshold_model(path, spacing=2.0, threshold_hu=100.0):
    """A two-node model whose label is exactly [HU > threshold_hu] at every model-grid voxel: a 1x1x1
    float conv with weight 1 and ternary threshold at the normalised threshold (never -1), and a
    classifier with logits (0.5, q). It makes the label a known function of position."""
    lo, hi = HU_WINDOW
    t = 2 * (threshold_hu - lo) / (hi - lo) - 1
    graph = [{"name": "threshold", "op": "float_conv3d", "inputs": ["image"], "in_channels": 1,
              "out_channels": 1, "kernel": [1, 1, 1], "stride": [1, 1, 1], "dilation": [1, 1, 1],
              "tensors": {"weight": "t.weight", "bias": "t.bias", "lo": "t.lo", "hi": "t.hi"}},
             {"name": "classifier", "op": "classifier", "inputs": ["threshold"], "in_channels": 1,
              "classes": 2, "tensors": {"weight": "c.weight", "bias": "c.bias"}}]
    tensors = {"t.weight": np.ones((1, 1, 1, 1, 1), np.float32), "t.bias": np.zeros(1, np.float32),
               "t.lo": np.full(1, -3e38, np.float32), "t.hi": np.full(1, t, np.float32),
               "c.weight": np.array([[0.0], [1.0]], np.float32), "c.bias": np.array([0.5, 0.0], np.float32)}
    write_model(path, graph=graph, tensors=tensors, metadata=METADATA, classes=CLASSES,
                preprocessing={"model_spacing_mm": [spacing] * 3, "hu_window": list(HU_WINDOW),
                               "orientation": "LPS"})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"random": read_model(write_random_model(folder / "random.tsm")),
            "threshold": read_model(write_threshold_model(folder / "threshold.tsm"))}


# ------------------------------------------------------------------------------------ images

def image_from_array(array, spacing, origin=(0.0, 0.0, 0.0), direction=pipeline.IDENTITY):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    return image


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = math.radians(degrees)
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


ORGAN_CENTRE, ORGAN_SEMI = np.array([28.0, -12.0, 8.0]), np.array([30.0, 22.0, 34.0])


def analytic_ct(size, spacing, direction, centre=(0.0, 0.0, 0.0)):
    """(int16 HU image, uint8 truth) on the grid of ``size`` / ``spacing`` / ``direction`` centred at
    ``centre``: air, an elliptic-cylinder body of 40 HU (semi-axes 80 x 60 mm), and an off-centre
    ellipsoid 'organ' of 300 HU whose mask is the truth. Geometry in physical space, so every grid
    shows the same anatomy."""
    size, spacing, direction = np.asarray(size), np.asarray(spacing, float), np.asarray(direction, float)
    origin = np.asarray(centre) - direction @ (spacing * (size - 1) / 2)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], -1) * spacing
    p = origin + index @ direction.T
    body = (p[..., 0] / 80) ** 2 + (p[..., 1] / 60) ** 2 < 1
    organ = (((p - ORGAN_CENTRE) / ORGAN_SEMI) ** 2).sum(-1) < 1
    hu = np.where(organ, 300, np.where(body, 40, -1000)).astype(np.int16)
    return image_from_array(hu, spacing, origin, direction), organ.astype(np.uint8)


def phantom_in_air(pad_x=18):
    """A 4 mm phantom (identity direction) with air added at both x ends, so the body crop matters."""
    from training.phantom import make_phantom

    p = make_phantom(3, shape=(48, 56, 64), spacing=(4.0, 4.0, 4.0))
    hu = np.full((48, 56, 64 + 2 * pad_x), -1024, np.int16)
    hu[:, :, pad_x:pad_x + 64] = p.image
    return image_from_array(hu, (4.0, 4.0, 4.0), origin=(-100.0, 20.0, 7.0))


def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def assert_same_grid(out, image):
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()


# ------------------------------------------------------------------------------------ exactness

def test_aligned_input_gives_exactly_the_network_labels(models):
    image = phantom_in_air()
    result = pipeline.segment(image, models["random"], threads=2)
    assert_same_grid(result.labels, image)
    assert result.labels.GetPixelID() == sitk.sitkUInt8
    region = result.region
    lo = np.round((np.array(region.origin) - image.GetOrigin()) / 4.0).astype(int)
    assert np.array_equal(lo * 4.0 + image.GetOrigin(), region.origin)  # on the input grid exactly
    hi = lo + region.size
    assert region.size[0] < image.GetSize()[0] and lo[0] > 0  # the crop removed air
    hu = sitk.GetArrayViewFromImage(image)[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    expected = TernaryNetwork(models["random"]).forward(normalise_hu(hu, HU_WINDOW)).argmax(-1)
    assert 0 < expected.sum() < expected.size  # both classes occur
    labels = sitk.GetArrayFromImage(result.labels)
    assert np.array_equal(labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]], expected)
    labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = 0
    assert not labels.any()  # outside the processed region: background


def test_flipped_and_permuted_inputs_give_the_same_labels(models):
    """The same voxels stored along flipped and permuted axes: resampling hits voxel centres, so the
    labels are identical, voxel for voxel, once mapped back."""
    image = phantom_in_air()
    reference = sitk.GetArrayFromImage(pipeline.segment(image, models["random"]).labels)
    hu = sitk.GetArrayFromImage(image)
    size = np.array(image.GetSize())
    cases = [((slice(None, None, -1), slice(None), slice(None, None, -1)), (0, 1, 2), np.diag([-1.0, 1, -1])),
             ((slice(None), slice(None, None, -1), slice(None)), (2, 0, 1), None)]
    for flip, axes, direction in cases:
        if direction is None:  # stored (k, j, i) = (x, z, flipped y): i runs along -y, j along z, k along x
            direction = np.zeros((3, 3))
            direction[1, 0], direction[2, 1], direction[0, 2] = -1.0, 1.0, 1.0
        stored = np.ascontiguousarray(hu[flip].transpose(axes))
        # origin: the physical point of the stored array's voxel [0, 0, 0]
        corner = np.array([n - 1 if s.step == -1 else 0 for s, n in zip(flip, hu.shape)])[::-1]
        origin = np.array(image.GetOrigin()) + corner * 4.0
        moved = image_from_array(stored, (4.0, 4.0, 4.0), origin, direction)
        assert np.allclose(moved.TransformIndexToPhysicalPoint([0, 0, 0]), origin)
        labels = sitk.GetArrayFromImage(pipeline.segment(moved, models["random"]).labels)
        back = labels.transpose(np.argsort(axes))[flip]
        assert back.shape == reference.shape
        assert np.array_equal(back, reference), f"direction {direction.ravel()}"
    assert size.prod() == reference.size


# ------------------------------------------------------------------------------------ geometry

@pytest.mark.parametrize("name, size, spacing, direction", [
    ("identity 2 mm", (90, 70, 60), (2.0, 2.0, 2.0), np.eye(3)),
    ("oblique 10 deg, 0.7 x 0.7 x 2.5 mm", (240, 190, 48), (0.7, 0.7, 2.5), rotation((1, 2, 0.5), 10)),
    ("RAS-stored, 3 mm", (60, 48, 40), (3.0, 3.0, 3.0), np.diag([-1.0, -1, 1])),
    ("feet first, flipped y, oblique", (130, 100, 70), (1.3, 1.4, 1.8),
     rotation((0, 0, 1), 10) @ np.diag([1.0, -1, -1])),
])
def test_output_is_on_the_exact_input_grid_and_in_the_right_place(models, name, size, spacing, direction):
    """With the threshold model the label is [HU > 100] on the model grid: the organ must come back
    on the input grid where it is (a mirrored or shifted placement would miss it)."""
    image, truth = analytic_ct(size, spacing, direction, centre=(3.0, -4.0, 5.0))
    result = pipeline.segment(image, models["threshold"])
    assert_same_grid(result.labels, image)
    labels = sitk.GetArrayViewFromImage(result.labels)
    assert dice(labels, truth) > 0.9, name
    mirrored = truth[:, :, ::-1]
    assert dice(labels, mirrored) < 0.5  # the test can tell a flip


def test_real_ct_round_trips_onto_its_grid(models):
    if not SHARED_CT.exists():
        pytest.skip(f"{SHARED_CT} not present")
    image = pipeline.read_image(SHARED_CT)
    result = pipeline.segment(image, models["random"], probabilities=True)
    assert_same_grid(result.labels, image)
    assert_same_grid(result.probability, image)
    assert result.warnings == []


def test_body_crop_keeps_the_body_and_a_margin(models, tmp_path):
    image, _ = analytic_ct((120, 100, 40), (2.0, 2.0, 2.0), np.eye(3))  # body x: +-80 mm, FOV 240 mm
    grid = pipeline.model_grid(image, (2.0, 2.0, 2.0))
    assert grid == pipeline.Grid(image.GetSize(), image.GetSpacing(), image.GetOrigin())  # aligned
    lo, hi = pipeline.body_box(image, grid)
    x_lo = grid.origin[0] + lo[0] * 2.0
    x_hi = grid.origin[0] + (hi[0] - 1) * 2.0
    assert -80 - 30 - 8 <= x_lo <= -80 - 30 + 2 and 80 + 30 - 2 <= x_hi <= 80 + 30 + 8
    noise = np.random.default_rng(0).integers(-1024, -900, (10, 10, 10)).astype(np.int16)
    air = image_from_array(noise, (2.0, 2.0, 2.0))
    assert pipeline.body_box(air, pipeline.model_grid(air, (2.0, 2.0, 2.0))) is None
    # no body at all: the whole image is processed, with warnings
    with pytest.warns(InputWarning, match="no soft tissue"):
        air = pipeline.read_image(_write(air, tmp_path / "air.nii"))
    result = pipeline.segment(air, models["threshold"])
    assert result.region.size == (10, 10, 10) and any("no body" in w for w in result.warnings)


def test_model_grid_covers_the_physical_extent():
    image, _ = analytic_ct((50, 40, 30), (0.7, 0.9, 2.5), rotation((1, 1, 1), 25))
    grid = pipeline.model_grid(image, (2.0, 2.0, 2.0))
    lo, hi = pipeline.physical_bounds(image)
    g_lo = np.array(grid.origin) - 1.0
    g_hi = np.array(grid.origin) + (np.array(grid.size) - 0.5) * 2.0
    assert np.all(g_lo <= lo + 1e-9) and np.all(g_hi >= hi - 1e-9)
    assert np.all(g_hi - g_lo - (hi - lo) < 2.0 + 1e-9)  # the fewest voxels


# ------------------------------------------------------------------------------------ options

def test_progress_cancel_largest_component_and_probabilities(models):
    image, _ = analytic_ct((50, 40, 30), (4.0, 4.0, 4.0), np.eye(3))  # on the random model's grid
    calls = []
    result = pipeline.segment(image, models["random"], progress=lambda f, s: calls.append((f, s)),
                              probabilities=True)
    fractions, stages = [c[0] for c in calls], [c[1] for c in calls]
    nodes = [node["name"] for node in models["random"].graph]
    assert stages[0] == "preprocess" and stages[-1] == "postprocess" and fractions[-1] == 1.0
    assert [s for s in stages if s in nodes] == nodes
    assert fractions == sorted(fractions) and fractions[0] == 0.0

    # probabilities: float32 in [0, 1]; on an aligned image exactly the labels' argmax (p > 1/2)
    p = sitk.GetArrayViewFromImage(result.probability)
    assert result.probability.GetPixelID() == sitk.sitkFloat32 and 0 <= p.min() and p.max() <= 1
    assert_same_grid(result.probability, image)
    assert np.array_equal(p > 0.5, sitk.GetArrayViewFromImage(result.labels) == 1)

    polls = []
    with pytest.raises(Cancelled):
        pipeline.segment(image, models["random"], cancel=lambda: polls.append(1) or len(polls) > 3)
    assert len(polls) == 4

    two, _ = analytic_ct((60, 50, 40), (2.0, 2.0, 2.0), np.eye(3))
    hu = sitk.GetArrayFromImage(two)
    hu[5:9, 5:9, 10:14] = 500  # a second, smaller bright blob in the body
    two = image_from_array(hu, (2.0, 2.0, 2.0))
    labels = sitk.GetArrayFromImage(pipeline.segment(two, models["threshold"]).labels)
    largest = sitk.GetArrayFromImage(pipeline.segment(two, models["threshold"],
                                                          largest_component=True).labels)
    count = sitk.ConnectedComponentImageFilter()
    count.Execute(sitk.GetImageFromArray(labels.copy()))
    assert count.GetObjectCount() == 2
    count.Execute(sitk.GetImageFromArray(largest.copy()))
    assert count.GetObjectCount() == 1
    assert np.all(largest <= labels) and largest[6, 6, 11] == 0 and largest.sum() > 1000


def test_foreground_probability_is_stable():
    logits = np.array([[0.0, 0.0], [100.0, -100.0], [-100.0, 100.0], [1.0, 3.0]], np.float32)
    p = pipeline.foreground_probability(logits)
    assert p.dtype == np.float32
    assert p[0] == 0.5 and p[1] == 0 and p[2] == 1 and abs(p[3] - 1 / (1 + math.exp(-2))) < 1e-6


# ------------------------------------------------------------------------------------ reading

def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def test_reads_nifti_nrrd_mha_identically(tmp_path):
    image, _ = analytic_ct((40, 36, 16), (5.0, 4.5, 2.5), rotation((0, 1, 0), 10))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        back = pipeline.read_image(_write(image, tmp_path / f"ct{suffix}"))
        assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
        assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
        assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    # ITK alone would read ct.nii for ct.nii.gz now that both exist
    other = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) + np.int16(1))
    other.CopyInformation(image)
    _write(other, tmp_path / "ct.nii.gz")
    assert sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "ct.nii.gz"))).max() == 300  # the quirk
    back = pipeline.read_image(tmp_path / "ct.nii.gz")
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(other))
    assert np.array_equal(sitk.GetArrayViewFromImage(pipeline.read_image(tmp_path / "ct.nii")),
                          sitk.GetArrayViewFromImage(image))


def _bad_inputs(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "missing.nii.gz", "no such file")
    text = tmp_path / "text.nii.gz"
    text.write_text("this is not an image\n")
    cases["text"] = (text, "cannot read it as an image")
    flat = sitk.GetImageFromArray(np.linspace(-1000, 500, 64 * 64).reshape(64, 64).astype(np.int16))
    cases["2d"] = (_write(flat, tmp_path / "flat.nii.gz"), "2D image")
    one_slice = sitk.GetImageFromArray(np.linspace(-1000, 500, 64 * 64).reshape(1, 64, 64).astype(np.int16))
    cases["one slice"] = (_write(one_slice, tmp_path / "slice.nrrd"), "2D image")
    volume = sitk.GetImageFromArray(np.linspace(-1000, 500, 8 * 9 * 10).reshape(8, 9, 10).astype(np.int16))
    cases["4d"] = (_write(sitk.JoinSeries([volume, volume]), tmp_path / "4d.nii.gz"), "4D image")
    cases["vector"] = (_write(sitk.Compose([volume] * 3), tmp_path / "rgb.mha"), "3 components per voxel")
    nan = sitk.GetArrayFromImage(volume).astype(np.float32)
    nan[3, 4, 5] = np.nan
    # (NIfTI cannot carry NaN through ITK: its reader turns non-finite floats into 0)
    cases["nan"] = (_write(sitk.GetImageFromArray(nan), tmp_path / "nan.nrrd"), "1 NaN or infinite voxel")
    constant = sitk.GetImageFromArray(np.full((8, 9, 10), -1000, np.int16))
    cases["constant"] = (_write(constant, tmp_path / "constant.nrrd"), "the value -1000 everywhere")
    data = _write(volume, tmp_path / "whole.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[:len(data) // 2])
    cases["truncated nii.gz"] = (truncated, "truncated")
    data = _write(volume, tmp_path / "whole.nii").read_bytes()
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(data[:-100])
    cases["truncated nii"] = (truncated, "truncated")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty folder"] = (empty, "no DICOM series")
    return cases


def test_bad_inputs_raise_one_line_input_errors(tmp_path):
    for name, (path, message) in _bad_inputs(tmp_path).items():
        with pytest.raises(InputError) as error:
            pipeline.read_image(path)
            pytest.fail(f"{name}: no error")
        text = str(error.value)
        assert message in text and str(path) in text and "\n" not in text, (name, text)


def test_in_memory_images_are_checked_too(models):
    with pytest.raises(InputError, match="NaN"):
        pipeline.segment(image_from_array(np.full((4, 5, 6), np.nan, np.float32), (1, 1, 1)),
                         models["threshold"])
    with pytest.raises(InputError, match="components"):
        pipeline.segment(sitk.Compose([image_from_array(np.zeros((4, 5, 6), np.int16), (1, 1, 1))] * 2),
                         models["threshold"])
    with pytest.raises(InputError, match="SimpleITK image"):
        pipeline.check_image(np.zeros((4, 5, 6)))
    huge, _ = analytic_ct((20, 20, 20), (1.0, 1.0, 1.0), np.eye(3))
    huge.SetSpacing((1.0, 1.0, 1e7))  # a header error: 200 km of slices
    with pytest.raises(InputError, match="far more than any CT"):
        pipeline.segment(huge, models["threshold"])


def test_images_that_do_not_look_like_ct_warn(tmp_path, models):
    mr = image_from_array(np.linspace(0, 900, 20 * 21 * 22).reshape(20, 21, 22).astype(np.int16), (2, 2, 2))
    with pytest.warns(InputWarning, match="no air"):
        image = pipeline.read_image(_write(mr, tmp_path / "mr.nii.gz"))
    assert any("no air" in w for w in pipeline.segment(image, models["threshold"]).warnings)
    mask = image_from_array((np.arange(20 * 21 * 22) % 2).reshape(20, 21, 22).astype(np.uint8), (2, 2, 2))
    found = pipeline.check_image(mask)
    assert any("maximum is 1 HU" in w for w in found) and any("no air" in w for w in found)
    ct, _ = analytic_ct((50, 40, 20), (4.0, 4.0, 4.0), np.eye(3))
    assert pipeline.check_image(ct) == []


# ------------------------------------------------------------------------------------ DICOM

def write_dicom_series(folder, image, series_uid, description, prefix="slice"):
    """One file per slice with the position, orientation and series tags (as in SimpleITK's
    DicomSeriesFromArray example)."""
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    shared = [("0008|0060", "CT"), ("0008|0008", "DERIVED\\SECONDARY"), ("0010|0010", "Phantom^Test"),
              ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.1"), ("0020|000e", series_uid),
              ("0008|103e", description),
              ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])))]
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in shared:
            plane.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in position))
        plane.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(plane)


def test_dicom_series_folders(tmp_path):
    first, _ = analytic_ct((40, 36, 12), (4.2, 4.5, 2.5), np.eye(3), centre=(10, 0, 0))
    second, _ = analytic_ct((30, 30, 9), (6.0, 6.0, 3.0), np.eye(3))
    folder = tmp_path / "dicom"
    write_dicom_series(folder, first, "1.2.826.0.1.3680043.2.1125.1.2", "portal venous")
    back = pipeline.read_image(folder)
    assert back.GetSize() == first.GetSize()
    assert np.allclose(back.GetSpacing(), first.GetSpacing(), atol=1e-4)
    assert np.allclose(back.GetOrigin(), first.GetOrigin(), atol=1e-3)
    assert np.allclose(back.GetDirection(), first.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(first))

    write_dicom_series(folder, second, "1.2.826.0.1.3680043.2.1125.1.3", "arterial", prefix="other")
    with pytest.raises(InputError) as error:
        pipeline.read_image(folder)
    text = str(error.value)
    assert "2 DICOM series" in text and "\n" not in text
    for uid, n, description in (("1.2.826.0.1.3680043.2.1125.1.2", 12, "portal venous"),
                                ("1.2.826.0.1.3680043.2.1125.1.3", 9, "arterial")):
        assert f"{uid} ({n} files, 'CT {description}')" in text
        assert pipeline.read_image(folder, series=uid).GetSize()[2] == n
    with pytest.raises(InputError, match="no DICOM series with UID '1.2.3'"):
        pipeline.read_image(folder, series="1.2.3")
    with pytest.raises(InputError, match="only selects a series in a DICOM folder"):
        pipeline.read_image(folder / "slice000.dcm", series="1.2.3")
    with pytest.raises(InputError, match="give the folder of the series"):
        pipeline.read_image(folder / "slice000.dcm")
    single = tmp_path / "single"
    write_dicom_series(single, first[:, :, :1], "1.2.826.0.1.3680043.2.1125.1.4", "one")
    with pytest.raises(InputError, match="single slice"):
        pipeline.read_image(single)
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "series").mkdir()
    with pytest.raises(InputError, match="1 subfolders, which are not searched"):
        pipeline.read_image(nested)


# ------------------------------------------------------------------------------------ model

def test_default_model_search(tmp_path, models):
    lib = Path(pipeline.__file__).resolve().parent
    assert pipeline.model_search_dirs() == [lib / "Models", lib.parent / "Resources" / "Models"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    with pytest.raises(FileNotFoundError, match=f"not in {a} or {b}"):
        pipeline.default_model_path([a, b])
    write_threshold_model(b / pipeline.MODEL_FILE_NAME)
    assert pipeline.default_model_path([a, b]) == b / pipeline.MODEL_FILE_NAME
    write_threshold_model(a / pipeline.MODEL_FILE_NAME, spacing=3.0)
    assert pipeline.default_model_path([a, b]) == a / pipeline.MODEL_FILE_NAME  # first place wins
    assert pipeline.load_model(search_dirs=[a, b]).preprocessing["model_spacing_mm"] == [3.0] * 3
    with pytest.raises(FileNotFoundError, match="no such file"):
        pipeline.load_model(tmp_path / "missing.tsm")
    (tmp_path / "bad.tsm").write_bytes(b"TSEGMDL\0" + b"\0" * 100)
    with pytest.raises(ModelFileError):
        pipeline.load_model(tmp_path / "bad.tsm")


# ------------------------------------------------------------------------------------ writing

def test_write_image_atomic(tmp_path, monkeypatch):
    image, truth = analytic_ct((30, 28, 20), (1.5, 1.5, 2.5), rotation((0, 0, 1), 10))
    labels = image_from_array(truth, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"):
        path = tmp_path / f"mask{suffix}"  # (mask.nii beside mask.nii.gz: the reader reads the right one)
        pipeline.write_image_atomic(labels, path)
        back = sitk.ReadImage(str(path))
        assert np.array_equal(sitk.GetArrayViewFromImage(back), truth), suffix
        with pytest.raises(FileExistsError, match="already exists"):
            pipeline.write_image_atomic(labels, path)
    zeros = sitk.Cast(labels * 0, sitk.sitkUInt8)
    pipeline.write_image_atomic(zeros, tmp_path / "mask.nii.gz", overwrite=True)
    assert not sitk.GetArrayFromImage(pipeline.read_image(tmp_path / "mask.nii.gz", check=False)).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"mask{s}" for s in (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"))  # no temporary files

    meta = sitk.ReadImage(str(tmp_path / "mask.seg.nrrd"))
    x, y, z = np.nonzero(truth.transpose(2, 1, 0))
    expected = {"Segment0_ID": "Pancreas", "Segment0_Name": "Pancreas", "Segment0_LabelValue": "1",
                "Segment0_Layer": "0", "Segment0_Color": "0.976471 0.705882 0.435294",
                "Segment0_Extent": f"{x.min()} {x.max()} {y.min()} {y.max()} {z.min()} {z.max()}",
                "Segment0_Tags": f"TerminologyEntry:{pipeline.PANCREAS_TERMINOLOGY}|",
                "Segmentation_MasterRepresentation": "Binary labelmap"}
    for key, value in expected.items():
        assert meta.GetMetaData(key) == value, key
    assert "SCT^15776009^Pancreas" in meta.GetMetaData("Segment0_Tags")

    with pytest.raises(InputError, match="unknown output format"):
        pipeline.write_image_atomic(labels, tmp_path / "mask.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.write_image_atomic(labels, tmp_path / "missing" / "mask.nii.gz")
    with pytest.raises(InputError, match="uint8 labelmap"):
        pipeline.write_image_atomic(image, tmp_path / "ct.seg.nrrd")

    class FailingWriter(sitk.ImageFileWriter):
        def Execute(self, image):  # noqa: N802 - SimpleITK's name
            Path(self.GetFileName()).write_bytes(b"half a file")
            raise RuntimeError("sitk::ERROR: disk full")

    before = (tmp_path / "mask.nrrd").read_bytes()
    monkeypatch.setattr(pipeline.sitk, "ImageFileWriter", FailingWriter)
    with pytest.raises(OSError, match="cannot write .*mask.nrrd: disk full"):
        pipeline.write_image_atomic(labels, tmp_path / "mask.nrrd", overwrite=True)
    assert (tmp_path / "mask.nrrd").read_bytes() == before  # untouched, and no temporary left behind
    assert len(list(tmp_path.iterdir())) == 5


# ------------------------------------------------------------------------------------ memory

def test_ct_sized_volume_in_bounded_memory(tmp_path):
    """A 512 x 512 x 600 int16 CT (315 MB) segmented at 2 mm in a fresh process: peak RSS < 2 GB."""
    model = write_random_model(tmp_path / "m.tsm", spacing=2.0, base=4)
    out = subprocess.run([sys.executable, "-m", "TernarySegmentationLib.pipeline", "--memory-check",
                          "--model", str(model), "--threads", "2"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["size"] == [512, 512, 600]
    assert report["region"][0] < 205 and report["region"][1] < 205  # the body crop took effect
    assert report["peak_rss_mb"] < 2048, report
    print(report)


@pytest.mark.parametrize("seed", range(12))
def test_fast_label_placement_equals_simpleitk_nearest_neighbour(seed):
    """The numpy per-axis placement of labels (diagonal directions) picks exactly the voxels that
    SimpleITK's nearest-neighbour resampler picks, including flipped axes, odd spacings and a box
    that covers only part of the image."""
    rng = np.random.default_rng(seed)
    size = tuple(int(n) for n in rng.integers(5, 40, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.3, 5.0, 3))
    flips = rng.choice([-1.0, 1.0], 3)
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(float(o) for o in rng.uniform(-50, 50, 3)))
    image.SetDirection(tuple(float(v) for v in np.diag(flips).ravel()))
    grid = pipeline.model_grid(image, tuple(float(s) for s in rng.uniform(1.0, 4.0, 3)))
    lo = rng.integers(0, np.maximum(1, np.array(grid.size) // 3))
    hi = np.minimum(grid.size, lo + rng.integers(1, np.array(grid.size) + 1))
    region = grid.box(tuple(int(v) for v in lo), tuple(int(v) for v in hi))
    labels = rng.integers(0, 3, region.shape).astype(np.uint8)
    got = pipeline._labels_to_input_grid(labels, region, image, threads=1)
    expected = pipeline._to_input_grid(pipeline._on_grid(labels, region), image, sitk.sitkNearestNeighbor,
                                       sitk.sitkUInt8, 1)
    assert np.array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected))
    assert got.GetSize() == image.GetSize() and got.GetDirection() == image.GetDirection()
    assert got.GetOrigin() == image.GetOrigin() and got.GetSpacing() == image.GetSpacing()


def test_class_labels_equal_argmax_with_ties():
    rng = np.random.default_rng(5)
    for classes in (2, 3):
        logits = rng.integers(-2, 3, (4, 5, 6, classes)).astype(np.float32)   # many exact ties
        labels = pipeline.class_labels(logits)
        assert labels.dtype == np.uint8
        assert np.array_equal(labels, logits.argmax(axis=-1))


def test_checks_already_made_are_not_repeated(models, monkeypatch):
    """segment(image_warnings=check_image(image)) gives the same result without checking again."""
    image = phantom_in_air()
    found = pipeline.check_image(image) + ["a warning of the caller's"]
    expected = pipeline.segment(image, models["random"], threads=2)

    def checked_twice(_image):
        raise AssertionError("check_image ran again")
    monkeypatch.setattr(pipeline, "check_image", checked_twice)
    result = pipeline.segment(image, models["random"], threads=2, image_warnings=found)
    assert np.array_equal(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(expected.labels))
    assert result.warnings[:len(found)] == found
