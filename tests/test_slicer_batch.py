"""The batch script (TernarySegmentationLib/batch.py) under the slicer-core Python: argument
handling, one case, a folder of cases with a bad one, and outputs equal to ``ternaryseg``'s."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.test_pipeline import write_dicom_series
from TernarySegmentationLib import batch, cli
from TernarySegmentationLib.phantom import make_phantom

# the installed package's copy (the repository's, in an editable install): it has the built kernels
SCRIPT = Path(batch.__file__)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """A folder of cases: two phantom CT files, a DICOM series folder, a broken file, a note."""
    folder = tmp_path_factory.mktemp("cases")
    for seed, name in ((200_004, "case_a.nii.gz"), (200_005, "case_b.nrrd")):
        image = make_phantom(seed, shape=(40, 80, 80), spacing=(3.5, 3.5, 4.0)).to_sitk()[0]
        sitk.WriteImage(image, str(folder / name))
    dicom = folder / "case_c"
    dicom.mkdir()
    write_dicom_series(dicom, make_phantom(200_006, shape=(24, 64, 64), spacing=(4.0, 4.0, 5.0)).to_sitk()[0],
                       "1.2.826.0.1.3680043.2.1125.99.1", "phantom")
    (folder / "case_broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (folder / "notes.txt").write_text("not a case\n")
    return folder


def run_script(*args, module=False):
    command = [sys.executable] + (["-m", "TernarySegmentationLib.batch"] if module else [str(SCRIPT)])
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir())


def ternaryseg_labels(source, tmp_path):
    out = tmp_path / f"reference-{os.path.basename(source)}.seg.nrrd"
    assert cli.main([str(source), "-o", str(out), "-q"]) == 0
    return sitk.ReadImage(str(out))


def assert_same_segmentation(path, reference):
    """The Slicer-written .seg.nrrd holds the same labels on the same grid as ternaryseg's."""
    got = sitk.ReadImage(str(path))
    assert got.GetSize() == reference.GetSize()
    np.testing.assert_allclose(got.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(got.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    labels = sitk.GetArrayFromImage(reference)
    assert np.count_nonzero(labels) > 50
    assert np.array_equal(sitk.GetArrayFromImage(got), labels)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    keys = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    assert keys["Segment0_Name"] == "Pancreas"
    assert "SCT^15776009^Pancreas" in keys["Segment0_Tags"]


def test_one_case_as_a_script(cases, tmp_path):
    out = tmp_path / "a.seg.nrrd"
    done = run_script("--input", cases / "case_a.nii.gz", "--output", out, "--threads", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("[1/1] case_a: Pancreas ") and lines[0].endswith(" s)")
    assert lines[-1].startswith("1 case: 1 segmented;")
    assert_same_segmentation(out, ternaryseg_labels(cases / "case_a.nii.gz", tmp_path))

    before = out.read_bytes()
    again = run_script("--input", cases / "case_a.nii.gz", "--output", out)
    assert again.returncode == 1
    assert "already exists" in again.stdout and "--overwrite" in again.stdout
    assert out.read_bytes() == before                      # never overwritten without --overwrite
    assert run_script("--input", cases / "case_a.nii.gz", "--output", out, "--overwrite",
                      module=True).returncode == 0


def test_folder_continues_past_a_bad_case(cases, tmp_path):
    out = tmp_path / "out" / "nested"                      # created
    done = run_script("--input-dir", cases, "--output-dir", out)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == \
        ["[1/4] case_a", "[2/4] case_b", "[3/4] case_broken", "[4/4] case_c"]
    assert "FAILED" in lines[2] and "case_broken.nii.gz" in lines[2]
    assert all("FAILED" not in line for line in lines[:2] + lines[3:-1])
    assert lines[-1].startswith("4 cases: 3 segmented, 1 FAILED (case_broken);")
    assert sorted(os.listdir(out)) == ["case_a.seg.nrrd", "case_b.seg.nrrd", "case_c.seg.nrrd"]
    for name, source in (("case_b", cases / "case_b.nrrd"), ("case_c", cases / "case_c")):
        assert_same_segmentation(out / f"{name}.seg.nrrd", ternaryseg_labels(source, tmp_path))

    (cases / "case_broken.nii.gz").rename(tmp_path / "moved.nii.gz")
    try:
        rerun = run_script("--input-dir", cases, "--output-dir", out, "--skip-existing")
    finally:
        (tmp_path / "moved.nii.gz").rename(cases / "case_broken.nii.gz")
    assert rerun.returncode == 0, rerun.stdout
    assert rerun.stdout.count("skipped") >= 3 and "3 skipped" in rerun.stdout


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to do"),
    (["--input", "ct.nii.gz"], "--input and --output go together"),
    (["--input-dir", "."], "--input-dir and --output-dir go together"),
    (["--input", "a.nii.gz", "--output", "b.seg.nrrd", "--input-dir", ".", "--output-dir", "o"], "not both"),
    (["--input", "a.nii.gz", "--output", "b.nii.gz"], "must name a .seg.nrrd file"),
    (["--input", "a.nii.gz", "--output", "b.seg.nrrd", "--threads", "0"], "must be a whole number >= 1"),
    (["--input", "a.nii.gz", "--output", "b.seg.nrrd", "--model", "missing.tsm"], "missing.tsm: no such file"),
    (["--input-dir", "missing-folder", "--output-dir", "o"], "not a folder"),
    (["--input-dir", ".", "--output-dir", "o", "--overwrite", "--skip-existing"], "contradict"),
    (["--bogus"], "unrecognized arguments"),
    (["--input-dir", ".", "--output-dir", "o", "--series", "1.2.3"], "--series goes with --input"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert batch.main(argv) == batch.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_help_and_empty_folder(tmp_path, capsys):
    assert batch.main(["--help"]) == batch.EXIT_OK
    assert "--input-dir" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert batch.main(["--input-dir", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o")]) == \
        batch.EXIT_FAILED
    assert "no cases in" in capsys.readouterr().out


def test_find_cases(tmp_path):
    for name in ("b.nii.gz", "a.NRRD", "c.mha", "d.seg.nrrd", ".hidden.nii", "e.txt", "f.nii"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "series").mkdir()
    assert [name for name, _ in batch.find_cases(tmp_path)] == ["a", "b", "c", "f", "series"]


def test_an_unexpected_error_still_exits_with_status_1(monkeypatch, capsys):
    """Slicer's --python-script does not quit on an uncaught error: the script must always exit."""
    def broken(argv=None):
        raise PermissionError("cannot list the folder")
    monkeypatch.setattr(batch, "main", broken)
    with pytest.raises(SystemExit) as stop:
        batch.run_and_exit([])
    assert stop.value.code == batch.EXIT_FAILED
    assert "PermissionError: cannot list the folder" in capsys.readouterr().err


def test_series_selects_one_of_several_in_a_dicom_folder(tmp_path):
    folder = tmp_path / "two_series"
    for seed, uid in ((200_008, "1.2.826.0.1.3680043.2.1125.99.2"), (200_009, "1.2.826.0.1.3680043.2.1125.99.3")):
        image = make_phantom(seed, shape=(20, 56, 56), spacing=(4.5, 4.5, 6.0)).to_sitk()[0]
        write_dicom_series(folder, image, uid, f"phantom {seed}", prefix=f"s{seed}_")
    out = tmp_path / "out.seg.nrrd"
    ambiguous = run_script("--input", folder, "--output", out)
    assert ambiguous.returncode == 1 and "series" in ambiguous.stdout and not out.exists()
    chosen = run_script("--input", folder, "--output", out, "--series", "1.2.826.0.1.3680043.2.1125.99.3")
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    assert_same_segmentation(out, ternaryseg_labels_args(
        [str(folder), "--series", "1.2.826.0.1.3680043.2.1125.99.3"], tmp_path))


def ternaryseg_labels_args(args, tmp_path):
    out = tmp_path / "reference-series.seg.nrrd"
    assert cli.main(args[:1] + ["-o", str(out), "-q"] + args[1:]) == 0
    return sitk.ReadImage(str(out))
