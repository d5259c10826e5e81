"""``ternaryseg demo``: the three files, Dice and timings printed, never overwriting without
--overwrite, the figure and its PNG encoder (decoded here with zlib), and ``demo --kernels``."""

import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from TernarySegmentationLib import cli, demo, pipeline
from TernarySegmentationLib.png import encode_png, write_png
from test_pipeline import write_random_model

# A small phantom grid for speed: 5 x 5 x 8 mm over the demo's field of view (320 x 320 x 192 mm).
SMALL = ["--phantom-shape", "24", "64", "64", "--phantom-spacing", "5", "5", "8"]
SHIPPED = Path(__file__).resolve().parents[1] / "TernarySegmentation" / "Resources" / "Models" / \
    pipeline.MODEL_FILE_NAME


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("demo-model") / "random.tsm", spacing=4.0, base=8)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def decode_png(data):
    """(pixels uint8 (H, W) or (H, W, 3)) of an 8-bit greyscale or RGB PNG with filter 0 only,
    checking the signature, every chunk's CRC and the chunk order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, []
    while position < len(data):
        length, = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        crc, = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        position += 12 + length
    assert position == len(data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, compression, filtering, interlace) == (8, 0, 0, 0) and colour in (0, 2)
    channels = 3 if colour == 2 else 1
    raw = np.frombuffer(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")), np.uint8)
    rows = raw.reshape(height, 1 + width * channels)
    assert not rows[:, 0].any()  # filter type 0 on every row
    pixels = rows[:, 1:].reshape(height, width, channels)
    return pixels[:, :, 0] if channels == 1 else pixels


# ------------------------------------------------------------------------------------ PNG

@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (120, 31, 3), (5, 9)])
def test_png_round_trip(shape):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(pixels)), pixels)


def test_png_rejects_bad_pixels_and_never_overwrites(tmp_path):
    for bad in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4), np.uint8),
                np.zeros(5, np.uint8)):
        with pytest.raises(ValueError):
            encode_png(bad)
    path = tmp_path / "a.png"
    write_png(path, np.zeros((2, 3), np.uint8))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_png(path, np.full((2, 3), 255, np.uint8))
    assert decode_png(path.read_bytes()).max() == 0
    write_png(path, np.full((2, 3), 255, np.uint8), overwrite=True)
    assert decode_png(path.read_bytes()).min() == 255
    assert os.listdir(tmp_path) == ["a.png"]


# ------------------------------------------------------------------------------------ figure

def test_figure_views_contours_and_square_pixels():
    ct = np.full((10, 40, 50), -1000, np.int16)
    ct[:, 5:35, 5:45] = 40
    truth = np.zeros(ct.shape, bool)
    truth[3:7, 10:20, 10:30] = True
    network = np.zeros(ct.shape, bool)
    network[3:7, 12:22, 10:30] = True
    image = demo.figure(ct, truth, network, (1.0, 1.0, 2.5), demo.pancreas_centre(truth, network))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    # axial 40 x 50, coronal 25 x 50, sagittal 25 x 40 (2.5 mm slices as 2.5 pixels), 2 gaps
    assert image.shape[:2] == (40, 50 + 50 + 40 + 2 * demo.PANEL_GAP)
    axial = image[:, :50]
    is_colour = {name: np.all(axial == rgb, axis=-1) for name, rgb in
                 (("truth", demo.TRUTH_RGB), ("network", demo.NETWORK_RGB))}
    k = 5
    assert is_colour["network"].any() and is_colour["truth"].any()
    assert not (is_colour["truth"] & truth[k]).any()        # the truth's contour lies outside it
    assert (is_colour["network"] <= network[k]).all()       # the network's inside its mask
    assert axial[0, 0].tolist() == [0, 0, 0] and axial[25, 40].tolist() == [122, 122, 122]  # window


# ------------------------------------------------------------------------------------ command

def test_demo_writes_three_files_and_prints_dice(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "demo", "--model", model, "--threads", "2", *SMALL)
    assert code == 0, err
    folder = tmp_path / demo.DEFAULT_OUT                    # the default --out, in the current folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([demo.CT_NAME, demo.MASK_NAME, demo.PNG_NAME])
    ct, mask = (sitk.ReadImage(str(folder / name)) for name in (demo.CT_NAME, demo.MASK_NAME))
    assert ct.GetSize() == (64, 64, 24) and ct.GetPixelID() == sitk.sitkInt16
    assert np.allclose(ct.GetSpacing(), (5, 5, 8))
    assert mask.GetSize() == ct.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(mask.GetOrigin(), ct.GetOrigin()) and np.allclose(mask.GetSpacing(), ct.GetSpacing())
    png = decode_png((folder / demo.PNG_NAME).read_bytes())
    assert png.ndim == 3 and png.shape[0] == 64 * 5 // 5  # axial: 64 rows of 5 mm at 5 mm pixels
    dice = float(re.search(r"Dice against the phantom's truth: ([0-9.]+)", out).group(1))
    assert 0.0 <= dice <= 1.0
    for stage in ("make phantom", "read", "preprocess", "network", "postprocess", "write", "figure",
                  "segmenting", "total", "peak memory (RSS)"):
        assert stage in out, stage
    assert "segmenting [" in out and "Traceback" not in err


def test_demo_never_overwrites_without_overwrite(model, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert run(capsys, "demo", "--out", out_dir, "--model", model, *SMALL)[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    code, out, err = run(capsys, "demo", "--out", out_dir, "--model", model, "--seed", "7", *SMALL)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ternaryseg: error: ") and "Traceback" not in err
    assert "already exist" in lines[0] and "--overwrite" in lines[0] and demo.CT_NAME in lines[0]
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    (out_dir / demo.MASK_NAME).unlink()  # one file is enough to refuse
    assert run(capsys, "demo", "--out", out_dir, "--model", model, *SMALL)[0] == 1
    code, _, err = run(capsys, "demo", "--out", out_dir, "--model", model, "--seed", "7", "--overwrite",
                       *SMALL)
    assert code == 0, err
    assert (out_dir / demo.CT_NAME).read_bytes() != before[demo.CT_NAME]  # another case
    assert sorted(os.listdir(out_dir)) == sorted(before)  # no temporary files left


def test_demo_bad_model_or_out_fails_before_any_work(model, tmp_path, capsys):
    code, _, err = run(capsys, "demo", "--out", tmp_path / "a", "--model", tmp_path / "nope.tsm", *SMALL)
    assert code == 1 and "nope.tsm" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "file", "--model", model, *SMALL)
    assert code == 1 and "needs a folder" in err


def test_demo_argument_errors(capsys):
    for argv, needle in ((["demo", "--size", "12"], "go with --kernels"),
                         (["demo", "--kernels", "--model", "m.tsm"], "does not go with --kernels"),
                         (["demo", "--threads", "0"], "must be an integer >= 1"),
                         (["demo", "--seed", "-1"], "must be an integer >= 0")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        assert needle in capsys.readouterr().err


def test_demo_kernels_checks_every_path_against_the_reference(capsys):
    from TernarySegmentationLib import kernels

    code, out, err = run(capsys, "demo", "--kernels", "--size", "12", "--channels", "8", "--threads", "2")
    assert code == 0, err
    for path in kernels.available_paths():
        assert re.search(rf"^  {path} .*bit-identical to the numpy reference$", out, re.M), (path, out)


@pytest.mark.skipif(not SHIPPED.exists(), reason=f"{SHIPPED} not present")
def test_demo_with_the_shipped_model_finds_the_pancreas(tmp_path, capsys):
    """The default model on an anisotropic grid (1.6 x 1.6 x 3 mm over 320 x 320 x 180 mm)."""
    code, out, err = run(capsys, "demo", "--out", tmp_path, "--threads", "2",
                         "--phantom-shape", "60", "200", "200", "--phantom-spacing", "1.6", "1.6", "3")
    assert code == 0, err
    assert float(re.search(r"Dice against the phantom's truth: ([0-9.]+)", out).group(1)) > 0.5
