"""training.datasets on tiny synthetic datasets written with SimpleITK into tmp_path: pairing in the
Decathlon and NIH layouts, resampling onto the model grid (physical placement checked through a box
"pancreas", also for flipped and rotated directions), label merging, and every DatasetError."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from training import datasets as D
from training.datasets import DatasetError

SHAPE = (16, 24, 20)        # array (z, y, x) -> SimpleITK size (20, 24, 16)
BOX = (slice(5, 11), slice(8, 16), slice(6, 13))
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def write(path, array, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=IDENTITY):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def box_case(image_path, label_path, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
             direction=IDENTITY, label_value=1, label_geometry=None):
    """A soft-tissue body at 40 HU in air with a 200 HU box; the label marks the box."""
    image = np.full(SHAPE, -1000, np.int16)
    image[2:-2, 2:-2, 2:-2] = 40
    image[BOX] = 200
    label = np.zeros(SHAPE, np.uint8)
    label[BOX] = label_value
    write(image_path, image, spacing, origin, direction)
    geometry = dict(spacing=spacing, origin=origin, direction=direction)
    geometry.update(label_geometry or {})
    write(label_path, label, **geometry)
    return image_path, label_path


def physical_centroid(mask, spacing, origin, direction):
    """Mean physical (x, y, z) of a (z, y, x) mask's voxels."""
    index = np.argwhere(mask > 0).mean(axis=0)[::-1]
    d = np.asarray(direction).reshape(3, 3)
    return np.asarray(origin) + d @ (index * np.asarray(spacing))


def rotation_z(degrees, flip_x=False):
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    r = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    if flip_x:
        r = r @ np.diag([-1.0, 1.0, 1.0])
    return tuple(r.ravel())


def msd_folder(tmp_path, names=("pancreas_001", "pancreas_004")):
    root = tmp_path / "Task07_Pancreas"
    for name in names:
        box_case(root / "imagesTr" / f"{name}.nii.gz", root / "labelsTr" / f"{name}.nii.gz")
    return root


# ------------------------------------------------------------------------------------ listing

def test_msd_pairs_by_file_name_and_ignores_hidden_files(tmp_path):
    root = msd_folder(tmp_path)
    for sub in ("imagesTr", "labelsTr"):    # AppleDouble files as in the official tarball
        (root / sub / "._pancreas_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 not nifti")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "pancreas",
                                                              "2": "cancer"}}))
    (root / "imagesTs").mkdir()
    cases = D.list_msd_cases(root)
    assert [c[0] for c in cases] == ["pancreas_001", "pancreas_004"]
    for name, image, label in cases:
        assert image == root / "imagesTr" / f"{name}.nii.gz"
        assert label == root / "labelsTr" / f"{name}.nii.gz"


def test_msd_nnunet_channel_suffix_pairs(tmp_path):
    root = tmp_path / "Dataset007"
    box_case(root / "imagesTr" / "pancreas_010_0000.nii.gz", root / "labelsTr" / "pancreas_010.nii.gz")
    assert [c[0] for c in D.list_msd_cases(root)] == ["pancreas_010"]


def test_msd_unpaired_files_are_reported(tmp_path):
    root = msd_folder(tmp_path, names=("pancreas_001",))
    write(root / "imagesTr" / "pancreas_002.nii.gz", np.zeros(SHAPE, np.int16))
    write(root / "labelsTr" / "pancreas_003.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DatasetError) as info:
        D.list_msd_cases(root)
    message = str(info.value)
    assert "images without a label: case pancreas_002" in message and "pancreas_002.nii.gz" in message
    assert "labels without an image: case pancreas_003" in message and "pancreas_003.nii.gz" in message
    assert "pancreas_001" not in message


def test_msd_empty_or_missing_folders(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DatasetError, match="labelsTr"):
        D.list_msd_cases(tmp_path)
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "._pancreas_001.nii.gz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="empty dataset"):
        D.list_msd_cases(tmp_path)


@pytest.mark.parametrize("image_dir, image_name, label_dir", [
    ("", "PANCREAS_{:04d}.nii.gz", ""),                                      # one folder
    ("images", "image{:04d}.nii.gz", "labels"),                              # images/ + labels/
    ("Pancreas-CT", "PANCREAS_{:04d}.nii", "TCIA_pancreas_labels-02-05-2017"),  # TCIA label folder
])
def test_nih_pairs_by_case_id(tmp_path, image_dir, image_name, label_dir):
    for case_id in (2, 1, 10):
        box_case(tmp_path / image_dir / image_name.format(case_id),
                 tmp_path / label_dir / f"label{case_id:04d}.nii.gz")
    (tmp_path / image_dir / "README.txt").write_text("not an image")
    (tmp_path / label_dir / "._label0001.nii.gz").write_bytes(b"junk")
    cases = D.list_nih_cases(tmp_path)
    stem = image_name.split("{")[0]
    assert [c[0] for c in cases] == [f"{stem}{i:04d}" for i in (1, 2, 10)]
    for name, image, label in cases:
        assert image.parent == tmp_path / image_dir and label.parent == tmp_path / label_dir
        assert image.name.startswith(name) and label.name[5:9] == name[-4:]


def test_nih_ids_compare_as_numbers(tmp_path):
    box_case(tmp_path / "PANCREAS_0007.nii.gz", tmp_path / "label07.nii.gz")
    assert [c[0] for c in D.list_nih_cases(tmp_path)] == ["PANCREAS_0007"]


def test_nih_custom_patterns(tmp_path):
    box_case(tmp_path / "ct" / "ct_case7_v2.nii.gz", tmp_path / "seg" / "seg_case7_v2.nii.gz")
    box_case(tmp_path / "ct" / "ct_caseB_v2.nii.gz", tmp_path / "seg" / "seg_caseB_v2.nii.gz")
    cases = D.list_nih_cases(tmp_path, image_glob="ct_*.nii.gz", label_glob=["seg_*.nii.gz"],
                             id_regex=r"case(?P<id>\w+?)_v")
    assert [c[0] for c in cases] == ["ct_case7_v2", "ct_caseB_v2"]
    assert cases[1][2].name == "seg_caseB_v2.nii.gz"


def test_nih_unpaired_duplicate_and_unparseable(tmp_path):
    box_case(tmp_path / "PANCREAS_0001.nii.gz", tmp_path / "label0001.nii.gz")
    write(tmp_path / "PANCREAS_0002.nii.gz", np.zeros(SHAPE, np.int16))
    write(tmp_path / "labels" / "label0003.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DatasetError) as info:
        D.list_nih_cases(tmp_path)
    assert "case PANCREAS_0002" in str(info.value) and "PANCREAS_0002.nii.gz" in str(info.value)
    assert "case 3" in str(info.value) and "label0003.nii.gz" in str(info.value)

    write(tmp_path / "images" / "image0001.nii.gz", np.zeros(SHAPE, np.int16))
    with pytest.raises(DatasetError, match=r"case 1: two image files.*PANCREAS_0001.*image0001"):
        D.list_nih_cases(tmp_path)

    (tmp_path / "images" / "image0001.nii.gz").rename(tmp_path / "images" / "image_final.nii.gz")
    with pytest.raises(DatasetError, match="no case id in file name .*image_final.nii.gz"):
        D.list_nih_cases(tmp_path)


def test_nih_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match="empty dataset"):
        D.list_nih_cases(tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        D.list_nih_cases(tmp_path / "missing")


# ------------------------------------------------------------------------------------ resampling

def test_load_case_on_model_grid_is_identity(tmp_path):
    image_path, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", origin=(5.0, -3.0, 7.0))
    case = D.load_case("c1", image_path, label_path)
    assert case.name == "c1" and case.spacing == (2.0, 2.0, 2.0) and case.source_spacing == (2.0, 2.0, 2.0)
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.image.shape == case.label.shape == SHAPE
    np.testing.assert_allclose(case.origin, (5.0, -3.0, 7.0), atol=1e-9)
    np.testing.assert_array_equal(case.image, sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))))
    expected = np.zeros(SHAPE, np.uint8)
    expected[BOX] = 1
    np.testing.assert_array_equal(case.label, expected)


def test_flipped_x_reverses_the_array(tmp_path):
    # direction diag(-1, 1, 1): array x runs towards -x; the identity-direction grid reverses it exactly
    image_path, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz",
                                      direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    case = D.load_case("flip", image_path, label_path)
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
    np.testing.assert_array_equal(case.image, original[:, :, ::-1])
    np.testing.assert_allclose(case.origin, (-2.0 * (SHAPE[2] - 1), 0.0, 0.0), atol=1e-9)


@pytest.mark.parametrize("spacing, direction", [
    ((0.7, 0.7, 2.5), IDENTITY),
    ((0.7, 0.7, 2.5), rotation_z(10.0, flip_x=True)),
    ((1.3, 0.9, 3.0), tuple(np.diag([1.0, -1.0, -1.0]).ravel())),
])
def test_resampled_label_stays_in_place(tmp_path, spacing, direction):
    origin = (31.0, -12.5, 240.0)
    image_path, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz",
                                      spacing=spacing, origin=origin, direction=direction)
    case = D.load_case("c", image_path, label_path, spacing=(2.0, 2.0, 2.0))
    assert case.source_spacing == pytest.approx(spacing)

    # the grid covers the whole physical extent and no more than one extra voxel per axis
    lo, hi = D.physical_bounding_box(SHAPE[::-1], spacing, origin, direction)
    first = np.asarray(case.origin) - 1.0
    last = np.asarray(case.origin) + 2.0 * (np.array(case.image.shape[::-1]) - 1) + 1.0
    assert np.all(first <= lo + 1e-6) and np.all(last >= hi - 1e-6)
    assert np.all((last - first) - (hi - lo) < 2.0 + 1e-6)

    # the box is at the same physical place (within one output voxel), in the label and in the image
    before = np.zeros(SHAPE, np.uint8)
    before[BOX] = 1
    expected = physical_centroid(before, spacing, origin, direction)
    found = physical_centroid(case.label, case.spacing, case.origin, IDENTITY)
    assert np.linalg.norm(found - expected) < 2.0, (found, expected)
    bright = physical_centroid(case.image > 120, case.spacing, case.origin, IDENTITY)
    assert np.linalg.norm(bright - expected) < 2.0, (bright, expected)
    # and keeps its volume (nearest neighbour: within the voxels along its surface)
    box_mm3 = before.sum() * np.prod(spacing)
    assert case.label.sum() * 8.0 == pytest.approx(box_mm3, rel=0.5)
    # outside the scanned volume is air
    assert case.image.min() >= -1024.0 and case.image.max() <= 200.0
    if direction != IDENTITY and not np.allclose(np.abs(direction), np.eye(3).ravel()):
        assert case.image[0, 0, 0] == D.AIR_HU     # rotated: the grid's corner lies outside the scan


def test_resample_to_spacing_helper(tmp_path):
    image = sitk.GetImageFromArray(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE))
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetDirection(rotation_z(10.0, flip_x=True))
    out = D.resample_to_spacing(image, (2.0, 2.0, 2.0), sitk.sitkLinear, pixel_type=sitk.sitkFloat32)
    assert out.GetDirection() == IDENTITY and out.GetSpacing() == (2.0, 2.0, 2.0)
    assert out.GetPixelID() == sitk.sitkFloat32
    assert D.resample_to_spacing(image, 2.0 * np.ones(3), sitk.sitkNearestNeighbor).GetPixelID() == sitk.sitkInt16
    with pytest.raises(ValueError, match="spacing"):
        D.resample_to_spacing(image, (2.0, 0.0, 2.0), sitk.sitkLinear)


# ------------------------------------------------------------------------------------ labels

def test_msd_tumour_merges_into_pancreas(tmp_path):
    root = msd_folder(tmp_path, names=("pancreas_001",))
    label = np.zeros(SHAPE, np.uint8)
    label[BOX] = 1
    label[6:8, 9:11, 7:9] = 2       # tumour inside the pancreas
    write(root / "labelsTr" / "pancreas_001.nii.gz", label)
    (case,) = D.load_dataset(f"msd:{root}")
    assert case.name == "pancreas_001"
    assert set(np.unique(case.label)) == {0, 1} and case.label.sum() == (label > 0).sum()


def test_load_dataset_nih(tmp_path):
    box_case(tmp_path / "PANCREAS_0001.nii.gz", tmp_path / "label0001.nii.gz", spacing=(0.7, 0.7, 2.5))
    (case,) = D.load_dataset(f"nih:{tmp_path}", spacing=(1.5, 1.5, 3.0))
    assert case.name == "PANCREAS_0001" and case.spacing == (1.5, 1.5, 3.0)
    assert case.label.max() == 1


def test_nih_rejects_tumour_label_and_default_accepts_any_positive(tmp_path):
    box_case(tmp_path / "PANCREAS_0001.nii.gz", tmp_path / "label0001.nii.gz", label_value=2)
    with pytest.raises(DatasetError, match=r"case PANCREAS_0001: label file .*label0001.nii.gz has values "
                                           r"\[2\] outside the allowed set \[0, 1\]"):
        D.load_dataset(f"nih:{tmp_path}")
    case = D.load_case("any", tmp_path / "PANCREAS_0001.nii.gz", tmp_path / "label0001.nii.gz")
    assert set(np.unique(case.label)) == {0, 1}


@pytest.mark.parametrize("values, dtype, match", [
    ((1, 3), np.uint8, r"values \[3\] outside the allowed set \[0, 1, 2\]"),
    ((1, 300), np.uint16, r"values \[300\] outside the allowed set \[0, 1, 2\]"),
    ((1, -1), np.int16, "negative value -1"),
    ((1.0, 0.5), np.float32, "non-integer values such as 0.5"),
])
def test_label_values_outside_the_allowed_set(tmp_path, values, dtype, match):
    image_path, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    label = np.zeros(SHAPE, dtype)
    label[BOX] = values[0]
    label[0, 0, 0] = values[1]      # one stray voxel, lost by resampling at 4 mm, still found
    write(label_path, label)
    with pytest.raises(DatasetError, match=match) as info:
        D.load_case("bad_labels", image_path, label_path, spacing=(4.0, 4.0, 4.0),
                    label_map=D.MSD_LABEL_MAP)
    assert "case bad_labels" in str(info.value) and str(label_path) in str(info.value)


def test_float_label_with_integer_values_is_accepted(tmp_path):
    image_path, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    label = np.zeros(SHAPE, np.float32)
    label[BOX] = 2.0
    write(label_path, label)
    case = D.load_case("float", image_path, label_path, label_map=D.MSD_LABEL_MAP)
    assert case.label.dtype == np.uint8 and case.label.sum() == label.astype(bool).sum()


def test_bad_label_map_argument(tmp_path):
    image_path, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    with pytest.raises(ValueError, match="label_map"):
        D.load_case("c", image_path, label_path, label_map={1: 2})


# ------------------------------------------------------------------------------------ file errors

def test_unreadable_file_names_case_and_file(tmp_path):
    image_path, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    label_path.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(DatasetError, match=r"case broken: cannot read label file .*l.nii.gz"):
        D.load_case("broken", image_path, label_path)
    with pytest.raises(DatasetError, match=r"case gone: cannot read image file .*missing.nii.gz"):
        D.load_case("gone", tmp_path / "missing.nii.gz", label_path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_file(tmp_path, suffix):
    # ITK reads a truncated NIfTI without complaint (zeros for the missing voxels): it must not pass
    image_path, label_path = tmp_path / f"i{suffix}", tmp_path / "l.nii.gz"
    noise = np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(np.int16)  # incompressible
    write(image_path, noise)
    write(label_path, np.zeros(SHAPE, np.uint8))
    data = image_path.read_bytes()
    image_path.write_bytes(data[:len(data) * 3 // 4])     # header intact, voxels cut short
    with pytest.raises(DatasetError, match=rf"case cut: cannot read image file .*i{suffix}"):
        D.load_case("cut", image_path, label_path)


def test_uncompressed_file_named_nii_gz_is_read(tmp_path):
    image_path, label_path = box_case(tmp_path / "i.nii", tmp_path / "l.nii.gz")
    misnamed = image_path.rename(tmp_path / "plain.nii.gz")
    assert D.load_case("plain", misnamed, label_path).label.sum() == 6 * 8 * 7


@pytest.mark.parametrize("kind", ["2d", "4d", "vector"])
def test_non_3d_image(tmp_path, kind):
    _, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    image_path = tmp_path / f"{kind}.nii.gz"
    if kind == "2d":
        image = sitk.Image([20, 24], sitk.sitkInt16)
        match = "is 2D"
    elif kind == "4d":
        image = sitk.Image([20, 24, 16, 3], sitk.sitkInt16)
        match = "is 4D"
    else:
        image = sitk.Image([20, 24, 16], sitk.sitkVectorInt16, 3)
        match = "has 3 components per voxel"
    sitk.WriteImage(image, str(image_path))
    with pytest.raises(DatasetError, match=f"case odd: image file .*{kind}.nii.gz {match}"):
        D.load_case("odd", image_path, label_path)
    with pytest.raises(DatasetError, match=f"case odd: label file .*{kind}.nii.gz {match}"):
        D.load_case("odd", label_path.with_name("i.nii.gz"), image_path)


@pytest.mark.parametrize("what, label_geometry, expected", [
    ("size", None, "(20, 24, 16) vs (20, 24, 15)"),
    ("spacing", {"spacing": (2.0, 2.0, 2.1)}, "(2, 2, 2) vs (2, 2, 2.1) mm"),
    ("origin", {"origin": (0.0, 0.5, 0.0)}, "(0, 0, 0) vs (0, 0.5, 0) mm"),
    ("direction", {"direction": (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}, "(1, 0, 0, 0, 1, 0, 0, 0, 1) vs (-1, 0, 0, 0, 1, 0, 0, 0, 1)"),
])
def test_geometry_mismatch(tmp_path, what, label_geometry, expected):
    image_path, label_path = box_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz",
                                      label_geometry=label_geometry)
    if what == "size":
        write(label_path, np.zeros((15, 24, 20), np.uint8))
    with pytest.raises(DatasetError) as info:
        D.load_case("mismatch", image_path, label_path)
    message = str(info.value)
    assert message.startswith(f"case mismatch: {what} differs: ") and expected in message, message
    assert str(image_path) in message and str(label_path) in message


def test_geometry_within_tolerance(tmp_path):
    image_path, label_path = box_case(
        tmp_path / "i.nii.gz", tmp_path / "l.nii.gz",
        label_geometry={"spacing": (2.0, 2.0002, 2.0), "origin": (0.0, 1e-3, -1e-3)})
    assert D.load_case("close", image_path, label_path).label.sum() > 0


# ------------------------------------------------------------------------------------ specs

@pytest.mark.parametrize("spec", ["decathlon:/data", "/data/Task07", "msd:", "NIH"])
def test_unknown_spec(spec):
    with pytest.raises(ValueError, match=r"dataset spec must be 'msd:PATH' or 'nih:PATH', got"):
        D.load_dataset(spec)


def test_iter_dataset_streams(tmp_path):
    root = msd_folder(tmp_path)
    cases = D.iter_dataset(f"msd:{root}", spacing=(4.0, 4.0, 4.0))
    first = next(cases)
    assert first.name == "pancreas_001" and first.image.shape == (8, 12, 10)
    assert [c.name for c in cases] == ["pancreas_004"]
