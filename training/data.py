"""Training data: synthetic phantoms or real datasets, normalised and cut into random patches.

A data source is named by a string: ``phantom`` (synthetic abdominal phantoms, generated from seeds
on the model grid), ``msd:PATH`` (Medical Segmentation Decathlon Task07_Pancreas layout) or
``nih:PATH`` (NIH Pancreas-CT converted to NIfTI); see training/datasets.py for the real layouts.
"""

from dataclasses import dataclass

import numpy as np

from TernarySegmentationLib.network import normalise_hu as _normalise_hu

DEFAULT_HU_WINDOW = (-200.0, 300.0)
PHANTOM_SHAPE = (128, 128, 128)       # (z, y, x) voxels at the model spacing: 256 mm at 2 mm
VALIDATION_SEED_OFFSET = 100_000       # phantom seeds of held-out cases start here


def normalise_hu(hu, hu_window=DEFAULT_HU_WINDOW):
    """HU -> float32 in [-1, 1], the model file's rule (the engine's own function, so training and
    inference see bit-identical inputs)."""
    return _normalise_hu(hu, hu_window)


@dataclass
class Volume:
    """One case on the model grid: normalised image and 0/1 label, arrays (z, y, x)."""

    name: str
    image: np.ndarray
    label: np.ndarray


def phantom_volume(seed, spacing=(2.0, 2.0, 2.0), shape=PHANTOM_SHAPE, hu_window=DEFAULT_HU_WINDOW):
    from .phantom import make_phantom

    p = make_phantom(int(seed), shape=shape, spacing=tuple(spacing))
    return Volume(f"phantom-{seed}", normalise_hu(p.image, hu_window), p.label.astype(np.uint8))


def load_volumes(source, indices, spacing=(2.0, 2.0, 2.0), hu_window=DEFAULT_HU_WINDOW,
                 phantom_shape=PHANTOM_SHAPE, progress=None):
    """Volumes of a data source: phantom seeds ``indices``, or the cases at ``indices`` of a real
    dataset (sorted by name)."""
    volumes = []
    if source == "phantom":
        for n, seed in enumerate(indices):
            volumes.append(phantom_volume(seed, spacing, phantom_shape, hu_window))
            if progress:
                progress(n + 1, len(indices))
        return volumes
    from .datasets import load_case

    cases = _real_cases(source)
    for n, index in enumerate(indices):
        case = load_case(*cases[index], spacing=tuple(spacing))
        volumes.append(Volume(case.name, normalise_hu(case.image, hu_window), case.label))
        if progress:
            progress(n + 1, len(indices))
    return volumes


def count_cases(source):
    """Number of cases of a real dataset (phantoms are unlimited: None)."""
    if source == "phantom":
        return None
    return len(_real_cases(source))


def _real_cases(source):
    """[(name, image path, label path)] of ``msd:PATH`` or ``nih:PATH``, sorted by name."""
    from .datasets import list_msd_cases, list_nih_cases

    scheme, _, path = source.partition(":")
    listers = {"msd": list_msd_cases, "nih": list_nih_cases}
    if scheme not in listers or not path:
        raise ValueError(f"data source must be 'phantom', 'msd:PATH' or 'nih:PATH', got {source!r}")
    return sorted(listers[scheme](path))


def sample_patch(volume, patch, rng, foreground_fraction=0.67):
    """A random (image, label) patch of ``patch`` (z, y, x) voxels; with probability
    ``foreground_fraction`` centred near a random pancreas voxel. Volumes smaller than the patch are
    padded (image with its minimum, label with 0)."""
    image, label = volume.image, volume.label
    pads = [(0, max(0, p - s)) for p, s in zip(patch, image.shape)]
    if any(after for _, after in pads):
        image = np.pad(image, pads, constant_values=float(image.min()))
        label = np.pad(label, pads)
    if rng.random() < foreground_fraction and label.any():
        fg = np.argwhere(label)
        centre = fg[rng.integers(len(fg))] + rng.integers(-8, 9, size=3)
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, image.shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, image.shape)]
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    return image[sl], label[sl]


def batch_of_patches(volumes, batch_size, patch, rng, foreground_fraction=0.67):
    """(images (N, 1, z, y, x) float32, labels (N, z, y, x) int64) as numpy arrays."""
    images, labels = [], []
    for _ in range(batch_size):
        v = volumes[int(rng.integers(len(volumes)))]
        im, lab = sample_patch(v, patch, rng, foreground_fraction)
        images.append(im[None])
        labels.append(lab.astype(np.int64))
    return np.stack(images), np.stack(labels)


def dice(prediction, truth):
    """Dice of two binary arrays (1.0 when both are empty)."""
    p, t = np.asarray(prediction) > 0, np.asarray(truth) > 0
    denominator = p.sum() + t.sum()
    return 1.0 if denominator == 0 else float(2.0 * np.logical_and(p, t).sum() / denominator)
