"""``ternaryseg demo``: a synthetic abdominal CT as a user would have it, segmented like any CT file.

1. A phantom CT (``phantom.make_phantom``; seed DEMO_SEED, a case used neither for training nor
   for validation) on a clinical grid: 0.8 x 0.8 mm pixels over a 333 mm field, 2 mm slices over
   200 mm, int16 HU, identity direction; written to DIR/phantom_ct.nii.gz.
2. That file read back and segmented exactly as ``ternaryseg phantom_ct.nii.gz -o MASK`` does it
   (``pipeline.read_image``, ``pipeline.load_model``, ``pipeline.segment``,
   ``pipeline.write_image_atomic``): resampled to the model's grid, the network on the body's box,
   labels back on the CT's 0.8 x 0.8 x 2 mm grid; written to DIR/pancreas_mask.nii.gz.
3. DIR/demo.png: axial, coronal and sagittal slices through the centre of the phantom's pancreas,
   window [-200, 300] HU, square pixels of the finest spacing, radiological convention (patient's
   right on the left, anterior and head up); the network's contour drawn just inside its mask, the
   phantom's truth just outside the truth, so both stay visible where they agree.
4. Dice of the mask against the phantom's truth, time per stage and peak memory (RSS) while
   segmenting (Linux: the peak is reset after the phantom is made; elsewhere it is the process's).

Nothing here needs more than numpy, cffi and SimpleITK; the PNG is written by ``png``.
"""

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .phantom import draw_anatomy, make_phantom
from .png import write_png

DEMO_SEED = 200_000                  # training uses seeds 0.., validation 100000..
DEMO_SHAPE = (100, 416, 416)         # (z, y, x): 200 mm of slices, a 333 mm field of view
DEMO_SPACING = (0.8, 0.8, 2.0)       # (x, y, z) mm
DEFAULT_OUT = "ternaryseg-demo"
CT_NAME, MASK_NAME, PNG_NAME = "phantom_ct.nii.gz", "pancreas_mask.nii.gz", "demo.png"
WINDOW_HU = (-200.0, 300.0)
NETWORK_RGB = (255, 150, 0)          # orange: the network's contour (orange / blue: colour-blind safe)
TRUTH_RGB = (40, 170, 255)           # blue: the phantom's truth
PANEL_GAP = 8                        # pixels of black between the three views


@dataclass
class DemoResult:
    """What ``run_demo`` did: the files written, Dice and volumes, the time per stage (phantom
    stages first, then the stages of ``ternaryseg CT -o MASK``, then the figure) and peak RSS."""

    paths: dict
    seed: int
    phase: str
    shape: tuple
    spacing: tuple
    model_name: str
    dice: float
    network_ml: float
    truth_ml: float
    timings: dict
    segment_seconds: float           # read .. write mask: what `ternaryseg CT -o MASK` takes
    total_seconds: float
    peak_rss_bytes: object           # None where unknown
    peak_rss_scope: str              # 'segmenting' or 'process'
    centre: tuple                    # (k, j, i) voxel the three slices go through
    warnings: list = field(default_factory=list)


def output_paths(out_dir):
    """The three files the demo writes in ``out_dir``: {'ct', 'mask', 'png'} -> Path."""
    out_dir = Path(out_dir)
    return {"ct": out_dir / CT_NAME, "mask": out_dir / MASK_NAME, "png": out_dir / PNG_NAME}


def check_outputs(out_dir, overwrite=False):
    """Raise before any work if the demo cannot write into ``out_dir``: a file in the way of the
    folder (NotADirectoryError) or existing outputs without ``overwrite`` (FileExistsError, naming
    them). Returns ``output_paths(out_dir)``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file; --out needs a folder (created if missing)")
    paths = output_paths(out_dir)
    existing = [str(p) for p in paths.values() if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                              "the demo replaces its files only with --overwrite (or give another "
                              "folder with --out DIR)")
    return paths


def run_demo(out_dir=DEFAULT_OUT, model=None, threads=None, seed=DEMO_SEED, shape=DEMO_SHAPE,
             spacing=DEMO_SPACING, overwrite=False, progress=None, log=None):
    """Make the phantom CT, segment it, write the three files; returns a DemoResult.

    ``model``: a model file path (default: the shipped model). ``threads``: for the network and
    the resampling (default: all cores). ``shape`` (z, y, x) and ``spacing`` (x, y, z) mm: the
    phantom's grid. ``progress(fraction, stage)``: as in ``pipeline.segment``. ``log(text)``: called
    with a line of news before the slow steps. Raises FileExistsError (outputs exist and not
    ``overwrite``), FileNotFoundError / ModelFileError (model), OSError (writing).
    """
    from . import pipeline  # SimpleITK: imported when used, so that `ternaryseg --help` needs none

    log = log or (lambda text: None)
    started = time.perf_counter()
    paths = check_outputs(out_dir, overwrite)
    timings = {}

    start = time.perf_counter()
    model = pipeline.load_model(model)  # first: a missing model fails before the phantom is made
    load_seconds = time.perf_counter() - start
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    phase = draw_anatomy(seed).phase
    log(f"making a phantom CT: seed {seed} ({phase} phase), {' x '.join(map(str, shape[::-1]))} voxels "
        f"at {' x '.join(f'{s:g}' for s in spacing)} mm")
    start = time.perf_counter()
    phantom = make_phantom(seed, shape=shape, spacing=spacing)
    ct_image = phantom.to_sitk()[0]
    truth = phantom.label > 0
    del phantom  # the figure shows the CT as read back
    timings["make phantom"] = time.perf_counter() - start
    start = time.perf_counter()
    pipeline.write_image_atomic(ct_image, paths["ct"], overwrite=overwrite)
    timings["write CT"] = time.perf_counter() - start
    del ct_image

    # From here on, what `ternaryseg phantom_ct.nii.gz -o pancreas_mask.nii.gz` does.
    scope = "segmenting" if _reset_peak_rss() else "process"
    segment_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pipeline.InputWarning)
        image = pipeline.read_image(paths["ct"])
    timings["read"] = time.perf_counter() - segment_start
    timings["load model"] = load_seconds
    result = pipeline.segment(image, model, threads=threads, progress=progress)
    timings.update(result.timings)
    start = time.perf_counter()
    pipeline.write_image_atomic(result.labels, paths["mask"], overwrite=overwrite, classes=model.classes)
    timings["write"] = time.perf_counter() - start
    segment_seconds = time.perf_counter() - segment_start + load_seconds
    peak = pipeline.peak_rss_bytes()

    start = time.perf_counter()
    network = pipeline.sitk.GetArrayViewFromImage(result.labels) > 0
    centre = pancreas_centre(truth, network)
    ct = pipeline.sitk.GetArrayViewFromImage(image)  # (z, y, x): identity direction, as written
    write_png(paths["png"], figure(ct, truth, network, spacing, centre), overwrite=overwrite)
    del ct, image
    timings["figure"] = time.perf_counter() - start

    voxel_ml = float(np.prod(spacing)) / 1000
    found = [str(w.message) for w in caught] + [m for m in result.warnings
                                                 if not any(m in str(w.message) for w in caught)]
    return DemoResult(paths=paths, seed=seed, phase=phase, shape=tuple(shape), spacing=tuple(spacing),
                      model_name=str(model.metadata.get("name", "")), dice=dice(network, truth),
                      network_ml=float(np.count_nonzero(network)) * voxel_ml,
                      truth_ml=float(np.count_nonzero(truth)) * voxel_ml, timings=timings,
                      segment_seconds=segment_seconds, total_seconds=time.perf_counter() - started,
                      peak_rss_bytes=peak, peak_rss_scope=scope, centre=centre, warnings=found)


def _reset_peak_rss():
    """Reset this process's peak RSS (Linux >= 4.0: VmHWM, and with it ru_maxrss) so that the peak
    of what follows can be read; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def dice(a, b):
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def pancreas_centre(truth, network):
    """(k, j, i) voxel nearest the centroid of the truth (else of the network's mask, else the
    middle of the volume)."""
    for mask in (truth, network):
        if mask.any():
            return tuple(int(round(float(np.mean(axis)))) for axis in np.nonzero(mask))
    return tuple(n // 2 for n in truth.shape)


# ------------------------------------------------------------------------------------ figure

def figure(ct, truth, network, spacing, centre, window=WINDOW_HU):
    """uint8 (H, W, 3): axial, coronal and sagittal slices of the (z, y, x) arrays through voxel
    ``centre`` (k, j, i), side by side, with the network's and the truth's contours."""
    sx, sy, sz = (float(s) for s in spacing)
    k, j, i = centre
    views = [(ct[k], truth[k], network[k], (sy, sx)),                                   # axial
             (ct[::-1, j], truth[::-1, j], network[::-1, j], (sz, sx)),                 # coronal
             (ct[::-1, :, i], truth[::-1, :, i], network[::-1, :, i], (sz, sy))]        # sagittal
    pixel = min(sx, sy, sz)
    panels = [view_rgb(*view, pixel, window) for view in views]
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + PANEL_GAP * (len(panels) - 1)
    out = np.zeros((height, width, 3), np.uint8)
    x = 0
    for panel in panels:
        top = (height - panel.shape[0]) // 2
        out[top:top + panel.shape[0], x:x + panel.shape[1]] = panel
        x += panel.shape[1] + PANEL_GAP
    return out


def view_rgb(hu, truth, network, mm, pixel, window=WINDOW_HU):
    """One 2D view: ``hu`` (rows, cols) with row and column spacing ``mm``, resampled (nearest) to
    square pixels of ``pixel`` mm, grey in ``window``, truth contour just outside the truth and the
    network's just inside its mask."""
    rows = _nearest_index(hu.shape[0], mm[0], pixel)
    cols = _nearest_index(hu.shape[1], mm[1], pixel)
    pick = np.ix_(rows, cols)
    lo, hi = window
    grey = np.clip((hu[pick].astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    t, n = truth[pick], network[pick]
    rgb[_grow(t) & ~t] = TRUTH_RGB
    rgb[n & ~_shrink(n)] = NETWORK_RGB
    return rgb


def _nearest_index(n, spacing, pixel):
    """Source indices of ``round(n * spacing / pixel)`` output pixels of ``pixel`` mm (nearest)."""
    count = max(1, int(round(n * spacing / pixel)))
    return np.minimum(((np.arange(count) + 0.5) * (pixel / spacing)).astype(np.intp), n - 1)


def _grow(mask):
    """4-neighbourhood dilation of a 2D boolean mask."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def _shrink(mask):
    """4-neighbourhood erosion of a 2D boolean mask (outside the image counts as outside it)."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


__all__ = ["DemoResult", "run_demo", "check_outputs", "output_paths", "figure", "view_rgb", "dice",
           "pancreas_centre", "DEMO_SEED", "DEMO_SHAPE", "DEMO_SPACING", "DEFAULT_OUT"]
