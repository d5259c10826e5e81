"""The ``ternaryseg`` command line: segmenting files and DICOM folders, exit codes, one-line errors
without tracebacks, never overwriting without --overwrite, atomic outputs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from TernarySegmentationLib import cli, pipeline
from test_pipeline import analytic_ct, rotation, write_dicom_series, write_random_model, write_threshold_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    ct, truth = analytic_ct((70, 60, 24), (2.2, 2.4, 5.0), rotation((0, 0, 1), 10) @ np.diag([-1.0, -1, 1]))
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"))
    return {"folder": folder, "ct": folder / "ct.nii.gz", "truth": truth,
            "threshold": write_threshold_model(folder / "threshold.tsm"),
            "random": write_random_model(folder / "random.tsm")}


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ternaryseg: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_segments_a_file_in_both_forms(files, tmp_path, capsys):
    for argv in ([files["ct"], "-o", tmp_path / "a.nii.gz"],
                 ["segment", files["ct"], "-o", tmp_path / "b.nii.gz"]):
        code, out, err = run(capsys, *argv, "--model", files["threshold"])
        assert code == 0, err
        assert out.startswith(f"wrote {argv[-1]}: pancreas ") and " ml" in out
        assert "segmenting [" in err and "] " in err  # the progress bar, on stderr
        mask = sitk.ReadImage(str(argv[-1]))
        ct = sitk.ReadImage(str(files["ct"]))
        assert mask.GetSize() == ct.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
        assert np.allclose(mask.GetOrigin(), ct.GetOrigin())
        assert np.allclose(mask.GetDirection(), ct.GetDirection())
        labels = sitk.GetArrayViewFromImage(mask)
        overlap = np.count_nonzero(labels & files["truth"])
        assert 2 * overlap / (np.count_nonzero(labels) + np.count_nonzero(files["truth"])) > 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]  # no temporary files


def test_never_overwrites_without_overwrite(files, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"the user's file")
    code, _, err = run(capsys, files["ct"], "-o", out, "--model", files["threshold"])
    assert_one_line_error(code, err, str(out), "already exists", "--overwrite")
    assert out.read_bytes() == b"the user's file"
    code, _, err = run(capsys, files["ct"], "-o", out, "--model", files["threshold"], "--overwrite", "-q")
    assert code == 0 and err == ""
    assert sitk.ReadImage(str(out)).GetSize() == (70, 60, 24)
    assert os.listdir(tmp_path) == ["mask.nii.gz"]


def test_probabilities_and_seg_nrrd(files, tmp_path, capsys):
    seg, prob = tmp_path / "mask.seg.nrrd", tmp_path / "p.nrrd"
    code, out, err = run(capsys, files["ct"], "-o", seg, "--probabilities", prob, "--model", files["random"],
                         "--largest-component", "--threads", "2")
    assert code == 0, err
    p = sitk.ReadImage(str(prob))
    assert p.GetPixelID() == sitk.sitkFloat32 and p.GetSize() == (70, 60, 24)
    values = sitk.GetArrayViewFromImage(p)
    assert values.min() >= 0 and values.max() <= 1 and values.max() > values.min()
    mask = sitk.ReadImage(str(seg))
    assert mask.GetMetaData("Segment0_Name") == "Pancreas" and mask.GetMetaData("Segment0_LabelValue") == "1"
    assert mask.GetMetaData("Segment0_Color") == "0.976471 0.705882 0.435294"
    assert "SCT^15776009^Pancreas" in mask.GetMetaData("Segment0_Tags")
    code, _, err = run(capsys, files["ct"], "-o", tmp_path / "m2.nii", "--probabilities",
                       tmp_path / "p.seg.nrrd", "--model", files["random"])
    assert_one_line_error(code, err, "not a segmentation")
    assert sorted(os.listdir(tmp_path)) == ["mask.seg.nrrd", "p.nrrd"]


def test_verbose_and_quiet(files, tmp_path, capsys):
    code, out, err = run(capsys, files["ct"], "-o", tmp_path / "v.nrrd", "--model", files["threshold"], "-v")
    assert code == 0
    for stage in ("read", "preprocess", "network", "postprocess", "write", "total", "peak memory (RSS)"):
        assert stage in err, stage
    code, out, err = run(capsys, files["ct"], "-o", tmp_path / "q.nrrd", "--model", files["threshold"],
                         "--quiet")
    assert code == 0 and out == "" and err == ""


def test_bad_inputs_give_one_line_errors(files, tmp_path, capsys):
    model = ["--model", files["threshold"]]
    out = tmp_path / "out.nii.gz"
    (tmp_path / "notes.nii.gz").write_text("not an image")
    (tmp_path / "bad.tsm").write_bytes(b"not a model")
    cases = [
        ([tmp_path / "missing.nii.gz", "-o", out, *model], ["missing.nii.gz", "no such file"]),
        ([tmp_path / "notes.nii.gz", "-o", out, *model], ["notes.nii.gz", "cannot read it as an image"]),
        ([files["ct"], "-o", out, "--model", tmp_path / "bad.tsm"], ["bad.tsm"]),
        ([files["ct"], "-o", out, "--model", tmp_path / "nope.tsm"], ["nope.tsm", "no such file"]),
        ([files["ct"], "-o", tmp_path / "out.png", *model], ["unknown output format"]),
        ([files["ct"], "-o", tmp_path / "no" / "out.nii", *model], ["does not exist"]),
        ([files["ct"], "-o", out, "--series", "1.2.3", *model], ["only selects a series in a DICOM folder"]),
        ([files["ct"], "-o", files["ct"], "--overwrite", *model], ["is the input CT"]),
    ]
    for argv, needles in cases:
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, *needles)
    assert sorted(os.listdir(tmp_path)) == ["bad.tsm", "notes.nii.gz"]


def test_usage_errors_exit_2(files, capsys):
    for argv, needle in (([files["ct"]], "-o/--output"), ([files["ct"], "-o", "x.nii", "--threads", "0"],
                                                          "must be an integer >= 1")):
        with pytest.raises(SystemExit) as exit_:
            cli.main([str(a) for a in argv])
        assert exit_.value.code == 2
        assert needle in capsys.readouterr().err


def test_dicom_folder_with_two_series(files, tmp_path, capsys):
    first, _ = analytic_ct((40, 36, 10), (4.2, 4.5, 5.0), np.eye(3))
    second, _ = analytic_ct((30, 30, 8), (6.0, 6.0, 6.0), np.eye(3))
    folder = tmp_path / "dicom"
    write_dicom_series(folder, first, "1.2.826.0.1.3680043.2.1125.9.1", "venous")
    write_dicom_series(folder, second, "1.2.826.0.1.3680043.2.1125.9.2", "arterial", prefix="b")
    out = tmp_path / "mask.nii.gz"
    code, _, err = run(capsys, folder, "-o", out, "--model", files["threshold"])
    assert_one_line_error(code, err, "2 DICOM series", "--series UID", "1.2.826.0.1.3680043.2.1125.9.1",
                          "1.2.826.0.1.3680043.2.1125.9.2", "'CT arterial'")
    code, _, err = run(capsys, folder, "-o", out, "--model", files["threshold"], "--series",
                       "1.2.826.0.1.3680043.2.1125.9.2")
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetSize() == (30, 30, 8)


def test_warns_about_images_that_are_not_ct(files, tmp_path, capsys):
    mr = sitk.GetImageFromArray(np.linspace(0, 900, 20 * 21 * 22).reshape(20, 21, 22).astype(np.int16))
    sitk.WriteImage(mr, str(tmp_path / "mr.nii.gz"))
    code, _, err = run(capsys, tmp_path / "mr.nii.gz", "-o", tmp_path / "m.nii.gz", "--model",
                       files["threshold"])
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("ternaryseg: warning:")]
    assert len(warnings) == 1 and "no air" in warnings[0]  # once, not again from segment()


def test_real_process_exit_codes_and_no_traceback(files, tmp_path):
    command = [sys.executable, "-m", "TernarySegmentationLib.cli"]
    ok = subprocess.run(command + [str(files["ct"]), "-o", str(tmp_path / "m.nii.gz"), "--model",
                                   str(files["threshold"])], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(command + [str(tmp_path / "nothing.nii"), "-o", str(tmp_path / "x.nii.gz")],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip() == f"ternaryseg: error: {tmp_path / 'nothing.nii'}: no such file or folder"


def test_default_model_is_searched_when_no_model_is_given(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "model_search_dirs", lambda: [tmp_path / "none"])
    code, _, err = run(capsys, files["ct"], "-o", tmp_path / "m.nii.gz")
    assert_one_line_error(code, err, pipeline.MODEL_FILE_NAME, "--model FILE")
    (tmp_path / "none").mkdir()
    os.link(files["threshold"], tmp_path / "none" / pipeline.MODEL_FILE_NAME)
    code, _, err = run(capsys, files["ct"], "-o", tmp_path / "m.nii.gz")
    assert code == 0, err
