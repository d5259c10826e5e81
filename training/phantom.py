"""The synthetic abdominal CT phantom, re-exported from the Slicer-free core.

The generator lives in TernarySegmentation/TernarySegmentationLib/phantom.py (numpy only), so that
the installed package can make phantoms (``ternaryseg demo``); this module keeps the training-side
path and command working:

    python -m training.phantom --montage docs/phantom_montage.png
    python -m training.phantom --nifti /tmp/phantoms --seeds 0 1 2
"""

import sys

from TernarySegmentationLib.phantom import *  # noqa: F401,F403  (the whole public namespace)
from TernarySegmentationLib.phantom import (  # noqa: F401  (named: what training and tests use)
    CONTRAST_PHASES, HU_MAX, HU_MIN, IDENTITY_DIRECTION, TISSUE_HU, Anatomy, Grid, Phantom, Tissue,
    draw_anatomy, main, make_phantom, montage_seeds, random_direction, rasterise, render, save_montage)

if __name__ == "__main__":
    sys.exit(main())
