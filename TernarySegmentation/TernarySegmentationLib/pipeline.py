"""The segmentation pipeline: read a CT, segment it with a model file, write the mask.

One code path for the command line (``ternaryseg CT -o MASK``), the Slicer module and batch runs:

    image = read_image("ct.nii.gz")                  # or a DICOM series folder (series=UID)
    result = segment(image, load_model())            # labels on the exact input grid
    write_image_atomic(result.labels, "mask.seg.nrrd")

``segment`` works in physical space, so any orientation and spacing is handled the same way:

1. **Model grid.** The identity-direction (LPS) grid at the model's spacing that covers the image's
   physical bounding box (its 8 corners). An image that already has identity direction and the model
   spacing *is* its own model grid, and is cropped without interpolation (bit-exact input).
2. **Body crop.** The image is sampled on a coarse version of that grid (about 8 mm), thresholded at
   -500 HU, and the box of its largest connected component (plus any other component at least a tenth
   of its size) is grown by 30 mm: only that box of the model grid is computed. Outside it the labels
   are background.
3. **Resampling** of the cropped box only, with linear interpolation straight from the stored pixel type
   into float32 (SimpleITK; the full-resolution volume is never copied to float), air (-1024 HU) outside
   the image. Then ``network.normalise_hu`` with the model's HU window and the network on the kernels.
4. **Postprocessing** on the model grid: labels = argmax of the logits, optionally the largest connected
   component, optionally the foreground probability (1 - softmax of the background class); then
   resampled onto the exact input grid: labels with nearest neighbour, probability linearly.

Memory: a 512 x 512 x 600 int16 CT (315 MB) needs its own pixels, the cropped float32 input at model
spacing, the network's packed maps, and the uint8 label image at full resolution (157 MB); the
probability adds 4 bytes per input voxel only when asked for. ``python -m
TernarySegmentationLib.pipeline --memory-check`` measures the peak.

Untrusted input is normal: files that cannot be used raise ``InputError`` (a ValueError) with a one-line
message naming the file and the problem; images that are readable but do not look like CT in Hounsfield
units give warnings (``InputWarning`` from ``read_image``, ``Result.warnings`` from ``segment``).
Outputs are written atomically and never replace an existing file unless asked to.
"""

import contextlib
import gzip
import math
import os
import struct
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import _atomic
from .model_file import ModelFileError, read_model  # ModelFileError: re-exported for callers
from .network import Cancelled, TernaryNetwork, normalise_hu

MODEL_FILE_NAME = "pancreas-phantom-ternary.tsm"
AIR_HU = -1024.0
BODY_THRESHOLD_HU = -500.0       # air below, everything of the patient (fat -100) above
BODY_SEARCH_MM = 8.0             # spacing of the coarse grid the body is looked for on
BODY_MARGIN_MM = 30.0            # kept around the body's box
BODY_COMPONENT_FRACTION = 0.1    # other components kept if at least this fraction of the largest
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
ALIGN_TOLERANCE = 1e-6           # direction elements and relative spacing: "already on the model grid"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
OUTPUT_SUFFIXES = (".seg.nrrd",) + IMAGE_SUFFIXES
MAX_GRID_VOXELS = 1 << 28         # 268 M voxels at model spacing: far beyond any CT (a header error)
_SLAB_VOXELS = 1 << 22           # full-resolution checks walk the array 4 M voxels at a time
_SAMPLE_VOXELS = 1 << 20         # percentiles from a strided sample of about 1 M voxels
_SCALAR_TYPES = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
    sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64}

# Slicer segmentation metadata (Libs/MRML/Core/vtkMRMLSegmentationStorageNode.cxx, vtkSegment.cxx)
PANCREAS_COLOR = (249 / 255, 180 / 255, 111 / 255)
PANCREAS_TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical "
                        "Structure~SCT^15776009^Pancreas~^^~Anatomic codes - DICOM master list~^^~^^")
GENERIC_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^"
                       "Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^")


class InputError(ValueError):
    """An input (image file, DICOM folder, image, output path) that cannot be used; the message says
    which and why, in one line."""


class InputWarning(UserWarning):
    """A readable image that does not look like CT in Hounsfield units."""


@dataclass(frozen=True)
class Grid:
    """An identity-direction (LPS) voxel grid: size, spacing and origin in SimpleITK (x, y, z) order."""

    size: tuple
    spacing: tuple
    origin: tuple

    @property
    def shape(self):
        """The (z, y, x) shape of a numpy array on this grid."""
        return tuple(self.size[::-1])

    def box(self, lo, hi):
        """The sub-grid of voxel indices lo <= index < hi, (x, y, z)."""
        return Grid(tuple(int(h - l) for l, h in zip(lo, hi)), self.spacing,
                    tuple(o + l * s for o, l, s in zip(self.origin, lo, self.spacing)))


@dataclass
class Result:
    """What ``segment`` returns. ``labels``: uint8 class index per voxel on the input's exact grid
    (0 = background, outside the processed region too); ``probability``: float32 foreground
    probability in [0, 1] on the same grid, or None; ``timings``: stage -> seconds; ``warnings``: the
    image's CT plausibility warnings; ``region``: the model-grid box the network ran on."""

    labels: sitk.Image
    probability: object
    timings: dict
    warnings: list
    region: Grid


# ------------------------------------------------------------------------------------ reading

def read_image(path, series=None, check=True):
    """A NIfTI (.nii, .nii.gz), NRRD or MHA file, or a DICOM series folder, as a 3D SimpleITK image.

    ``series``: the Series Instance UID to read from a folder with several series. Raises InputError
    for a missing or unreadable file, a folder with no or several DICOM series, a 2D, 4D or vector
    image, and (``check``, see ``check_image``) an image with NaN or one value everywhere. An image
    that does not look like CT in Hounsfield units gives an ``InputWarning`` per problem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        image = _read_dicom_series(path, series)
    else:
        if series is not None:
            raise InputError(f"{path}: a series UID only selects a series in a DICOM folder, but this "
                             "is a file")
        image = _read_file(path)
    if not check:
        return image
    try:
        found = check_image(image)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    for message in found:
        warnings.warn(f"{path}: {message}", InputWarning, stacklevel=2)
    return image


def _read_file(path):
    if path.lower().endswith(".nii.gz") and os.path.exists(path[:-3]):
        # ITK's NIfTI reader (nifti_clib) silently reads x.nii when asked for x.nii.gz and both exist:
        # read the .nii.gz through a link of its own in an empty folder instead
        with tempfile.TemporaryDirectory(prefix="ternaryseg-") as folder:
            link = os.path.join(folder, "image.nii.gz")
            try:
                os.symlink(os.path.abspath(path), link)
            except OSError:
                raise InputError(f"{path}: {os.path.basename(path[:-3])} beside it would be read instead "
                                 "(an ITK quirk); rename one of them") from None
            try:
                return _read_file(link)
            except InputError as error:
                raise InputError(str(error).replace(link, path)) from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot read it as an image ({_sitk_message(error)}); readable "
                         f"formats: NIfTI, NRRD, MHA, or a DICOM series folder") from None
    _check_header(path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), is_file=True)
    _check_nifti_length(path)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot read its voxels ({_sitk_message(error)})") from None


def _check_header(where, dimension, size, components, is_file=False):
    if components != 1:
        raise InputError(f"{where}: {components} components per voxel (a colour or vector image); a "
                         "scalar 3D CT is required")
    if dimension == 2 or (dimension == 3 and min(size) == 1):
        hint = ""
        if is_file and _looks_like_dicom(where):
            hint = "; for DICOM give the folder of the series, not one file"
        raise InputError(f"{where}: a 2D image (size {tuple(size)}); a 3D CT volume is required{hint}")
    if dimension != 3:
        raise InputError(f"{where}: a {dimension}D image (size {tuple(size)}); a 3D CT volume is required")


def _looks_like_dicom(path):
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM" or path.lower().endswith((".dcm", ".ima"))
    except OSError:
        return False


def _sitk_message(error):
    """The useful line of a SimpleITK exception (the rest is the C++ source location)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "sitk::ERROR:" in line:
            return line.split("sitk::ERROR:", 1)[1].strip()
    for line in reversed(lines):
        if "not read completely" in line or "expected" in line:
            return line
    return lines[-1] if lines else type(error).__name__


def nifti_truncation(path):
    """ITK reads a truncated .nii or .nii.gz without complaint (missing voxels become 0), so the length
    is checked against the header: for .nii.gz the gzip trailer holds it (mod 2**32); only when that
    disagrees is the stream decompressed and counted. Returns None when the file is complete (or not
    a single-file NIfTI), else (bytes present, bytes expected, compressed). Read errors propagate
    (OSError, EOFError, zlib.error). Files are recognised by content: ITK reads a misnamed one too."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    with opener(path, "rb") as f:
        expected = _nifti_data_end(f.read(544))
    if expected is None:
        return None
    if not compressed:
        actual = os.path.getsize(path)
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if struct.unpack("<I", f.read(4))[0] == expected % (1 << 32):
                return None
        actual = 0
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                actual += len(chunk)
    return (actual, expected, compressed) if actual < expected else None


def _check_nifti_length(path):
    if not path.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        truncated = nifti_truncation(path)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: cannot read it ({error})") from None
    if truncated:
        actual, expected, compressed = truncated
        raise InputError(f"{path}: the file is truncated ({actual} of {expected} bytes"
                         f"{' uncompressed' if compressed else ''})")


def _nifti_data_end(header):
    """Offset of the end of the voxel data of a single-file NIfTI-1 or -2 from its header, or None."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            if header[344:347] != b"n+1":
                return None
            dim = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = max(352, int(struct.unpack(order + "f", header[108:112])[0]))
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            if header[4:7] != b"n+2":
                return None
            dim = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = max(544, struct.unpack(order + "q", header[168:176])[0])
            break
    else:
        return None
    if not 1 <= dim[0] <= 7 or min(dim[1:dim[0] + 1]) < 1 or bitpix < 1:
        return None
    return offset + math.prod(dim[1:dim[0] + 1]) * bitpix // 8


def list_dicom_series(folder):
    """[(series UID, number of files, description)] of the DICOM series directly in ``folder``."""
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(os.fspath(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(os.fspath(folder), uid)
        series.append((uid, len(files), _dicom_description(files[0]) if files else ""))
    return series


def _dicom_description(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        parts = [reader.GetMetaData(tag).strip() for tag in ("0008|0060", "0008|103e")
                 if reader.HasMetaDataKey(tag)]
    except RuntimeError:
        return ""
    return " ".join(p for p in parts if p)


def _describe_series(series):
    return "; ".join(f"{uid} ({n} file{'s' if n != 1 else ''}{', ' + repr(d) if d else ''})"
                     for uid, n, d in series)


def _read_dicom_series(folder, uid):
    try:
        series = list_dicom_series(folder)
    except RuntimeError as error:
        raise InputError(f"{folder}: cannot list its DICOM series ({_sitk_message(error)})") from None
    if not series:
        entries = os.listdir(folder)
        subfolders = sum(os.path.isdir(os.path.join(folder, e)) for e in entries)
        raise InputError(f"{folder}: no DICOM series in this folder ({len(entries) - subfolders} files"
                         f"{f', {subfolders} subfolders, which are not searched' if subfolders else ''});"
                         " give the folder that holds the series' files, or a NIfTI, NRRD or MHA file")
    if uid is None and len(series) > 1:
        raise InputError(f"{folder}: {len(series)} DICOM series in this folder; choose one by its UID "
                         f"(series=UID, ternaryseg --series UID): {_describe_series(series)}")
    if uid is not None and uid not in [s[0] for s in series]:
        raise InputError(f"{folder}: no DICOM series with UID {uid!r} in this folder; it holds "
                         f"{_describe_series(series)}")
    uid = series[0][0] if uid is None else uid
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
    where = f"{folder} (DICOM series {uid})"
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    try:
        first.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{where}: cannot read {files[0]} ({_sitk_message(error)})") from None
    if first.GetNumberOfComponents() != 1:
        raise InputError(f"{where}: {first.GetNumberOfComponents()} components per voxel (a colour "
                         "image); a scalar 3D CT is required")
    if len(files) < 2:
        raise InputError(f"{where}: a single slice; a 3D CT volume (a series of slices) is required")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{where}: cannot read the series ({_sitk_message(error)})") from None
    _check_header(where, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    return image


# ------------------------------------------------------------------------------------ checks

def check_image(image):
    """Raise InputError if ``image`` cannot be segmented; return a list of warnings (strings) if it does
    not look like CT in Hounsfield units. Reads the voxels in slabs: no full-size copy.

    (NaN cannot reach here from a NIfTI file: ITK's NIfTI reader turns non-finite floats into 0.)"""
    if not isinstance(image, sitk.Image):
        raise InputError(f"the image must be a SimpleITK image, got {type(image).__name__}")
    _check_header("the image", image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    if image.GetPixelID() not in _SCALAR_TYPES:
        raise InputError(f"the image has voxels of type {image.GetPixelIDTypeAsString()}; a real-valued "
                         "scalar CT is required")
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"the image has spacing {tuple(spacing)}; spacings must be positive")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not (np.isfinite(direction).all() and abs(abs(np.linalg.det(direction)) - 1) < 1e-3):
        raise InputError(f"the image has direction {tuple(image.GetDirection())}, not a rotation matrix")
    if not all(math.isfinite(o) for o in image.GetOrigin()):
        raise InputError(f"the image has origin {tuple(image.GetOrigin())}")
    view = sitk.GetArrayViewFromImage(image)
    if view.dtype.kind == "f":
        slab = max(1, _SLAB_VOXELS // (view.shape[1] * view.shape[2]))
        bad = sum(int(np.count_nonzero(~np.isfinite(view[z:z + slab])))
                  for z in range(0, view.shape[0], slab))
        if bad:
            raise InputError(f"the image has {bad} NaN or infinite voxel{'s' if bad > 1 else ''}")
    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(image)
    low, high = statistics.GetMinimum(), statistics.GetMaximum()
    if low == high:
        raise InputError(f"the image has the value {low:g} everywhere: nothing to segment")
    step = max(1, round((view.size / _SAMPLE_VOXELS) ** (1 / 3)))
    p1, p50, p99 = np.percentile(view[::step, ::step, ::step], [1, 50, 99])
    found = []
    hint = "is it a CT in Hounsfield units?"
    if high < 100:
        found.append(f"the maximum is {high:g} HU: no soft tissue or bone; {hint}")
    if low > -500:
        found.append(f"the minimum is {low:g} HU: no air; {hint} (e.g. a rescale intercept not applied)")
    if p99 > 4000 or p1 < -2000 or not -1100 <= p50 <= 1500:
        found.append(f"implausible HU percentiles (1 %: {p1:g}, 50 %: {p50:g}, 99 %: {p99:g}); {hint}")
    return found


# ------------------------------------------------------------------------------------ model

def model_search_dirs():
    """Where the shipped model is looked for: ``<Lib>/Models`` (pip install) and ``<Lib>/../Resources/
    Models`` (the repository and the Slicer module)."""
    lib = Path(__file__).resolve().parent
    return [lib / "Models", lib.parent / "Resources" / "Models"]


def default_model_path(search_dirs=None):
    """The shipped model file; FileNotFoundError naming the places looked in if it is in none."""
    dirs = model_search_dirs() if search_dirs is None else [Path(d) for d in search_dirs]
    for folder in dirs:
        candidate = folder / MODEL_FILE_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the shipped model {MODEL_FILE_NAME} is not in {' or '.join(map(str, dirs))}; "
                            "give a model file (--model FILE)")


def load_model(path=None, search_dirs=None):
    """Read and validate a model file (default: the shipped model, see ``default_model_path``).

    Raises ModelFileError for a malformed file and OSError (FileNotFoundError) for a missing one.
    """
    path = default_model_path(search_dirs) if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path}: no such file")
    return read_model(path)


# ------------------------------------------------------------------------------------ geometry

def physical_bounds(image):
    """(lo, hi) physical corners of the box holding every voxel of ``image`` (its 8 outer corners)."""
    size = image.GetSize()
    direction = np.array(image.GetDirection(), np.float64).reshape(3, 3)
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
                        for k in (-0.5, size[2] - 0.5)])
    points = np.asarray(image.GetOrigin()) + (corners * np.asarray(image.GetSpacing())) @ direction.T
    return points.min(axis=0), points.max(axis=0)


def is_aligned(image, spacing):
    """True if ``image`` has identity direction and ``spacing``: it is its own model grid."""
    return (np.allclose(image.GetDirection(), IDENTITY, rtol=0, atol=ALIGN_TOLERANCE)
            and np.allclose(image.GetSpacing(), spacing, rtol=ALIGN_TOLERANCE, atol=0))


def model_grid(image, spacing):
    """The identity-direction grid at ``spacing`` (x, y, z mm) covering the image's physical extent,
    centred on it with the fewest voxels; the image's own grid if it is aligned (``is_aligned``)."""
    if is_aligned(image, spacing):
        return Grid(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()))
    spacing = np.asarray(spacing, np.float64)
    lo, hi = physical_bounds(image)
    # 1e-6 voxel of slack: an extent that is an exact multiple of the spacing is not rounded up
    size = np.maximum(1, np.ceil((hi - lo) / spacing - 1e-6)).astype(int)
    if np.prod(size.astype(float)) > MAX_GRID_VOXELS:
        raise InputError(f"the image covers {' x '.join(f'{e:.0f}' for e in hi - lo)} mm (size "
                         f"{tuple(image.GetSize())}, spacing {tuple(image.GetSpacing())} mm), far more than "
                         "any CT: is its spacing right?")
    origin = (lo + hi) / 2 - (size - 1) / 2 * spacing
    return Grid(tuple(int(n) for n in size), tuple(float(s) for s in spacing),
                tuple(float(o) for o in origin))


def _resample(image, grid, interpolator, default, pixel_type, threads):
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in grid.size])
    resampler.SetOutputSpacing([float(s) for s in grid.spacing])
    resampler.SetOutputOrigin([float(o) for o in grid.origin])
    resampler.SetOutputDirection(IDENTITY)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(float(default))
    resampler.SetOutputPixelType(pixel_type)  # interpolates from the stored type: no full-size cast
    if threads:
        resampler.SetNumberOfThreads(int(threads))
    return resampler.Execute(image)


def _to_input_grid(small, image, interpolator, pixel_type, threads):
    """A model-grid image resampled onto ``image``'s exact grid, 0 outside."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(image)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(pixel_type)
    if threads:
        resampler.SetNumberOfThreads(int(threads))
    out = resampler.Execute(small)
    out.CopyInformation(image)  # the exact size, spacing, origin and direction of the input
    return out


def _labels_to_input_grid(labels, region, image, threads):
    """uint8 labels on the model-grid box ``region`` -> a label image on ``image``'s exact grid, by
    nearest neighbour, 0 outside the box. For an image whose direction is diagonal (+1 or -1: every
    axis-aligned scan, RAS- or LPS-stored) the voxels are picked per axis with numpy, exactly as
    SimpleITK's resampler picks them (continuous index rounded half up, inside iff -0.5 <= index <
    n - 0.5), several times faster; other directions go through SimpleITK."""
    direction = np.array(image.GetDirection(), np.float64).reshape(3, 3)
    if not np.array_equal(np.abs(direction), np.eye(3)):
        return _to_input_grid(_on_grid(labels, region), image, sitk.sitkNearestNeighbor, sitk.sitkUInt8,
                              threads)
    picks = []
    for axis in range(3):  # x, y, z
        size, spacing, origin = image.GetSize()[axis], image.GetSpacing()[axis], image.GetOrigin()[axis]
        position = origin + np.arange(size) * (spacing * direction[axis, axis])
        index = np.floor((position - region.origin[axis]) / region.spacing[axis] + 0.5).astype(np.intp)
        inside = (index >= 0) & (index < region.size[axis])
        picks.append((np.where(inside, index, 0), inside))
    (ix, inside_x), (iy, inside_y), (iz, inside_z) = picks
    out = np.take(np.take(np.take(labels, ix, axis=2), iy, axis=1), iz, axis=0)  # x first: cheapest
    out[~inside_z] = 0
    out[:, ~inside_y] = 0
    out[:, :, ~inside_x] = 0
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def class_labels(logits):
    """uint8 index of the largest logit per voxel (the first on a tie, as numpy.argmax); for two
    classes a single comparison, several times faster than argmax."""
    if logits.shape[-1] == 2:
        return (logits[..., 1] > logits[..., 0]).view(np.uint8)
    return logits.argmax(axis=-1).astype(np.uint8)


def _on_grid(array, grid):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(IDENTITY)
    return image


def body_box(image, grid, threads=None):
    """(lo, hi) voxel indices (x, y, z; hi exclusive) of the part of ``grid`` that holds the body, with a
    margin of BODY_MARGIN_MM; None if no voxel is above BODY_THRESHOLD_HU.

    Found on a coarse grid (about BODY_SEARCH_MM) over the same extent: voxels above the threshold, the
    largest 6-connected component and any other at least BODY_COMPONENT_FRACTION of its size.
    """
    spacing, size = np.asarray(grid.spacing), np.asarray(grid.size)
    factor = np.maximum(1, np.floor(BODY_SEARCH_MM / spacing)).astype(int)
    coarse = Grid(tuple(int(n) for n in -(-size // factor)), tuple(spacing * factor),
                  tuple(np.asarray(grid.origin) + (factor - 1) / 2 * spacing))
    sampled = _resample(image, coarse, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32, threads)
    mask = (sitk.GetArrayViewFromImage(sampled) > BODY_THRESHOLD_HU).astype(np.uint8)
    del sampled
    if not mask.any():
        return None
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask)),
                                       sortByObjectSize=True)
    labels = sitk.GetArrayViewFromImage(components)
    counts = np.bincount(labels.ravel())
    keep = np.flatnonzero(counts[1:] >= BODY_COMPONENT_FRACTION * counts[1]) + 1
    zyx = np.nonzero(np.isin(labels, keep))
    lo = np.array([zyx[2].min(), zyx[1].min(), zyx[0].min()]) * factor
    hi = (np.array([zyx[2].max(), zyx[1].max(), zyx[0].max()]) + 1) * factor
    margin = np.ceil(BODY_MARGIN_MM / spacing).astype(int)
    return (tuple(int(v) for v in np.maximum(lo - margin, 0)),
            tuple(int(v) for v in np.minimum(hi + margin, size)))


# ------------------------------------------------------------------------------------ segmenting

PREPROCESS_SHARE, NETWORK_SHARE = 0.1, 0.8  # of the progress bar; postprocessing gets the rest


def segment(image, model, threads=None, progress=None, cancel=None, largest_component=False,
            probabilities=False, image_warnings=None):
    """Segment ``image`` (a 3D SimpleITK CT in HU) with ``model`` (a model_file.Model, or a
    network.TernaryNetwork to reuse its packed weights); returns a ``Result``.

    ``threads``: threads for the network and the resampling (default: all cores).
    ``progress(fraction, stage)``: called with the overall fraction done and the stage: 'preprocess',
    then each network node's name, then 'postprocess'. ``cancel()``: polled between stages and before
    every network node; when it returns True, network.Cancelled is raised.
    ``largest_component``: keep only the largest 6-connected foreground component (off by default,
    as in the paper). ``probabilities``: also return the foreground probability map.
    ``image_warnings``: what ``check_image(image)`` returned, when the caller has already checked
    this very image (the checks are then not repeated).
    """
    network = model if isinstance(model, TernaryNetwork) else TernaryNetwork(model)
    model = network.model
    spacing = tuple(float(s) for s in model.preprocessing["model_spacing_mm"])
    hu_window = model.preprocessing["hu_window"]
    timings = {}

    def report(fraction, stage):
        if progress is not None:
            progress(fraction, stage)

    def check_cancel(where):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled {where}")

    start = time.perf_counter()
    check_cancel("before preprocessing")
    report(0.0, "preprocess")
    found = check_image(image) if image_warnings is None else list(image_warnings)
    grid = model_grid(image, spacing)
    box = body_box(image, grid, threads)
    if box is None:
        found.append(f"no voxel above {BODY_THRESHOLD_HU:g} HU (no body): the whole image is processed")
        box = ((0, 0, 0), grid.size)
    region = grid.box(*box)
    if is_aligned(image, spacing):
        (x0, y0, z0), (x1, y1, z1) = box
        x = normalise_hu(sitk.GetArrayViewFromImage(image)[z0:z1, y0:y1, x0:x1], hu_window)  # exact
    else:
        # the view is used while its image is alive (a SimpleITK view does not keep it alive)
        resampled = _resample(image, region, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32, threads)
        x = normalise_hu(sitk.GetArrayViewFromImage(resampled), hu_window)
        del resampled
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    report(PREPROCESS_SHARE, "preprocess")
    check_cancel("before the network")
    logits = network.forward(x, threads=threads, cancel=cancel,
                             progress=lambda f, stage: report(PREPROCESS_SHARE + NETWORK_SHARE * f, stage))
    del x
    timings["network"] = time.perf_counter() - start

    start = time.perf_counter()
    check_cancel("before postprocessing")
    report(PREPROCESS_SHARE + NETWORK_SHARE, "postprocess")
    labels = class_labels(logits)
    if largest_component:
        labels = keep_largest_component(labels)
    probability = None
    if probabilities:
        probability = foreground_probability(logits)  # the network's, also with largest_component
    del logits
    labels_image = _labels_to_input_grid(labels, region, image, threads)
    if probability is not None:
        probability = _to_input_grid(_on_grid(probability, region), image, sitk.sitkLinear,
                                     sitk.sitkFloat32, threads)
    timings["postprocess"] = time.perf_counter() - start
    report(1.0, "postprocess")
    return Result(labels=labels_image, probability=probability, timings=timings, warnings=found,
                  region=region)


def keep_largest_component(labels):
    """uint8 labels with every foreground voxel outside the largest 6-connected foreground component
    set to 0 (background)."""
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(
        (labels > 0).astype(np.uint8))), sortByObjectSize=True)
    return np.where(sitk.GetArrayViewFromImage(components) == 1, labels, np.uint8(0))


def foreground_probability(logits):
    """float32 1 - softmax(logits)[..., 0]: the probability of any non-background class, computed as
    sum(exp(l_k - max), k >= 1) / sum(exp(l_k - max)) so that it is exact near 0 and never exceeds 1."""
    peak = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - peak)
    return np.clip(e[..., 1:].sum(axis=-1) / e.sum(axis=-1), 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------ writing

def output_suffix(path):
    """The recognised output suffix of ``path`` (lower case), or InputError."""
    name = os.path.basename(os.fspath(path)).lower()
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise InputError(f"{path}: unknown output format; use a file name ending in "
                     f"{', '.join(OUTPUT_SUFFIXES)}")


def check_output_path(path, overwrite=False):
    """Raise before any work if ``path`` cannot be written: unknown suffix (InputError), missing folder
    (FileNotFoundError), an existing folder, or an existing file without ``overwrite``
    (FileExistsError). Returns the suffix."""
    path = os.fspath(path)
    suffix = output_suffix(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise _atomic.exists_error(path)
    return suffix


def segment_metadata(labels, classes=("background", "pancreas")):
    """The metadata of a Slicer .seg.nrrd for a labelmap with one segment per foreground class
    (label value = class index, layer 0); a class named 'pancreas' gets the SNOMED CT terminology and
    colour of the pancreas."""
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(labels)
    present = set(shape.GetLabels())
    meta = {"Segmentation_MasterRepresentation": "Binary labelmap",
            "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
            "Segmentation_ReferenceImageExtentOffset": "0 0 0"}
    for index, name in enumerate(classes[1:]):
        value = index + 1
        if value in present:
            x, y, z, sx, sy, sz = shape.GetBoundingBox(value)
            extent = f"{x} {x + sx - 1} {y} {y + sy - 1} {z} {z + sz - 1}"
        else:
            extent = "0 -1 0 -1 0 -1"
        title, color, terminology = segment_style(index, name)
        key = f"Segment{index}_"
        meta.update({
            key + "ID": title,
            key + "Name": title,
            key + "NameAutoGenerated": "0",
            key + "Color": " ".join(f"{c:.6g}" for c in color),
            key + "ColorAutoGenerated": "0",
            key + "LabelValue": str(value),
            key + "Layer": "0",
            key + "Extent": extent,
            key + "Tags": f"TerminologyEntry:{terminology}|",
        })
    return meta


def segment_style(index, name):
    """(segment name, RGB colour in [0, 1], Slicer terminology string) of foreground class number
    ``index`` (0 = the first class after background) called ``name``: the pancreas gets 'Pancreas',
    its SNOMED CT code and Slicer's pancreas colour; other classes keep their name, get the generic
    'Tissue' terminology and a colour of a small palette."""
    if name.lower() == "pancreas":
        return "Pancreas", PANCREAS_COLOR, PANCREAS_TERMINOLOGY
    palette = ((0.5, 0.68, 0.5), (0.94, 0.84, 0.57), (0.69, 0.48, 0.4), (0.44, 0.72, 0.82))
    return name, palette[index % len(palette)], GENERIC_TERMINOLOGY


def write_image_atomic(image, path, overwrite=False, classes=("background", "pancreas")):
    """Write ``image`` to ``path`` (.nii, .nii.gz, .nrrd, .mha compressed; .seg.nrrd a Slicer
    segmentation: a labelmap NRRD with one segment per foreground class of ``classes``).

    The image is written to a temporary file in the same folder and moved into place, so no reader
    ever sees a partial file and a failure leaves nothing behind. An existing file is never replaced
    unless ``overwrite`` (FileExistsError), also if it appears while writing (published with a hard
    link where the file system has them). OSError if the file cannot be written.
    """
    path = os.fspath(path)
    suffix = check_output_path(path, overwrite)
    if suffix == ".seg.nrrd":
        if image.GetPixelID() != sitk.sitkUInt8:
            raise InputError(f"{path}: a .seg.nrrd holds a uint8 labelmap, got "
                             f"{image.GetPixelIDTypeAsString()}")
        image = sitk.Image(image)  # a copy to carry the metadata
        for key, value in segment_metadata(image, classes).items():
            image.SetMetaData(key, value)
    temporary = _atomic.temporary_path(path, suffix)
    try:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(temporary)
        writer.SetUseCompression(True)
        try:
            writer.Execute(image)
        except RuntimeError as error:
            raise OSError(f"cannot write {path}: {_sitk_message(error)}") from None
        fd = os.open(temporary, os.O_RDWR | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _atomic.publish(temporary, path, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return path


# ------------------------------------------------------------------------------------ memory check

def peak_rss_bytes():
    """Peak resident set size of this process, in bytes: VmHWM where /proc has it (Linux, where
    ``ru_maxrss`` also holds the peak of the process this one was forked from), else ``ru_maxrss``
    (None where neither exists)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def synthetic_ct(size=(512, 512, 600), spacing=(0.8, 0.8, 1.0)):
    """A cheap CT-sized int16 test volume: an elliptic body of 40 HU in air (-1000 HU) with an
    ellipsoid of 150 HU inside. Slices are shared between planes (the ellipsoid's cross-section in 16
    steps), so building it needs one full-size buffer."""
    nx, ny, nz = size
    y, x = np.mgrid[:ny, :nx]
    body = (((x - nx / 2) / (0.42 * nx)) ** 2 + ((y - ny / 2) / (0.32 * ny)) ** 2) < 1
    planes = {}

    def plane(step):
        if step not in planes:
            values = np.full((ny, nx), -1000, np.int16)
            values[body] = 40
            if step < 16:
                r2 = 1 - (step / 16) ** 2
                values[(((x - 0.55 * nx) / (0.1 * nx)) ** 2 + ((y - 0.5 * ny) / (0.06 * ny)) ** 2) < r2] = 150
            planes[step] = sitk.GetImageFromArray(values)
        return planes[step]

    image = sitk.JoinSeries([plane(min(16, int(abs(k - nz / 2) / (0.2 * nz) * 16))) for k in range(nz)])
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def memory_check(model_path=None, size=(512, 512, 600), spacing=(0.8, 0.8, 1.0), threads=None,
                 probabilities=False):
    """Segment ``synthetic_ct(size, spacing)``; returns a dict of times and peak RSS."""
    start = time.perf_counter()
    model = load_model(model_path)
    image = synthetic_ct(size, spacing)
    built = time.perf_counter() - start
    rss_input = peak_rss_bytes()
    start = time.perf_counter()
    result = segment(image, model, threads=threads, probabilities=probabilities)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"size": list(size), "spacing_mm": list(spacing), "probabilities": probabilities,
            "model_spacing_mm": list(model.preprocessing["model_spacing_mm"]),
            "region": list(result.region.size),
            "build_seconds": round(built, 3), "segment_seconds": round(seconds, 3),
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "foreground_voxels": int(np.count_nonzero(sitk.GetArrayViewFromImage(result.labels))),
            "peak_rss_after_input_mb": None if rss_input is None else round(rss_input / 2**20, 1),
            "peak_rss_mb": None if peak is None else round(peak / 2**20, 1)}


def _main(argv=None):
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m TernarySegmentationLib.pipeline",
                                     description="Pipeline checks.")
    parser.add_argument("--memory-check", action="store_true", required=True,
                        help="segment a synthetic CT-sized volume; print time and peak RSS as JSON")
    parser.add_argument("--model", help="model file (default: the shipped model)")
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 600], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0], metavar=("X", "Y", "Z"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--probabilities", action="store_true", help="also compute the probability map")
    args = parser.parse_args(argv)
    print(json.dumps(memory_check(args.model, tuple(args.size), tuple(args.spacing), args.threads,
                                  args.probabilities)))
    return 0


__all__ = ["InputError", "InputWarning", "Cancelled", "Grid", "Result", "read_image", "check_image",
           "list_dicom_series", "load_model", "default_model_path", "model_search_dirs", "model_grid",
           "body_box", "segment", "keep_largest_component", "foreground_probability",
           "check_output_path", "write_image_atomic", "segment_metadata", "ModelFileError"]

if __name__ == "__main__":
    sys.exit(_main())
