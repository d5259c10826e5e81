"""Synthetic abdominal CT phantoms with a pancreas label, deterministic from a seed.

The anatomy is drawn once per seed (``draw_anatomy``) in physical millimetres, in patient LPS
coordinates (x to the patient's left, y to the back, z to the head) whose origin is the centre of the
requested volume. It is then rasterised on the requested grid: a tissue map is painted organ by
organ in priority order (later organs cover earlier ones, so touching organs share a boundary), and
turned into Hounsfield units by a per-case tissue table (contrast phase), smooth random textures,
correlated noise and a partial-volume blur. The label is the pancreas of the tissue map, before the
blur. The same seed therefore gives the same anatomy on any grid: 2 mm isotropic, 0.7 x 0.7 x 2.5 mm,
or a rotated and flipped direction (``oriented=True``); only texture and noise depend on the grid.

The pancreas is a lobulated tube along a random spline (head in the duodenal C-loop, neck in front of
the portal-splenic confluence, body in front of the aorta and the superior mesenteric artery, tail at
the splenic hilum) with the splenic vein along its back. Its HU overlaps liver, spleen, bowel wall,
veins and muscle, so no HU interval segments it: shape and context do.

    python -m TernarySegmentationLib.phantom --montage docs/phantom_montage.png
    python -m TernarySegmentationLib.phantom --nifti /tmp/phantoms --seeds 0 1 2

(``python -m training.phantom`` from the repository root is the same: training/phantom.py re-exports
this module.) It lives in the Slicer-free core so that the installed package can make phantoms
(``ternaryseg demo``). Only numpy is needed; ``Phantom.to_sitk`` imports SimpleITK and the montage
matplotlib, each when called.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass
from enum import IntEnum
from functools import partial

import numpy as np

HU_MIN, HU_MAX = -1024, 3071
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------ result

@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic case. Arrays are (k, j, i) = (z, y, x), C-order; geometry in SimpleITK order."""

    image: np.ndarray      # int16 Hounsfield units
    label: np.ndarray      # uint8, 1 = pancreas
    spacing: tuple         # (sx, sy, sz) mm
    origin: tuple          # (ox, oy, oz) mm, LPS, physical position of voxel (0, 0, 0)
    direction: tuple       # 9 floats, row-major 3x3, columns = directions of the i, j, k axes
    seed: int

    def to_sitk(self):
        """(image, label) as SimpleITK images with this geometry."""
        import SimpleITK as sitk

        images = []
        for array in (self.image, self.label):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(self.spacing)
            image.SetOrigin(self.origin)
            image.SetDirection(self.direction)
            images.append(image)
        return tuple(images)


# ------------------------------------------------------------------------------------ tissues

class Tissue(IntEnum):
    AIR = 0
    TABLE = 1
    FAT = 2
    MUSCLE = 3
    LUNG = 4
    CORTICAL_BONE = 5
    CANCELLOUS_BONE = 6
    DISC = 7
    CSF = 8
    LIVER = 9
    GALLBLADDER = 10
    SPLEEN = 11
    KIDNEY_CORTEX = 12
    KIDNEY_MEDULLA = 13
    RENAL_SINUS = 14
    GI_WALL = 15
    GI_FLUID = 16
    GI_FOOD = 17
    GI_GAS = 18
    GI_CONTRAST = 19
    FECES = 20
    ARTERY = 21
    PORTAL_VEIN = 22        # portal, superior mesenteric and splenic veins
    SYSTEMIC_VEIN = 23      # inferior vena cava, renal and iliac veins
    PANCREAS = 24
    HEART = 25


# HU = unenhanced + arterial * a + portal-venous * v, with (a, v) the case's contrast phase; then
# smooth random texture of the given amplitudes (coarse ~10 mm, fine ~4 mm) and a per-case jitter.
#                          unenh.  art.  venous  coarse  fine  jitter
TISSUE_HU = {
    Tissue.AIR:             (-1000,    0,    0,     0,    0,    0),
    Tissue.TABLE:           (  200,    0,    0,     0,   20,   60),
    Tissue.FAT:             ( -100,    0,    0,     6,    8,   12),
    Tissue.MUSCLE:          (   50,    5,   10,     4,    6,    8),
    Tissue.LUNG:            ( -860,    0,    0,    30,   40,   30),
    Tissue.CORTICAL_BONE:   (  750,    0,    0,    40,   60,  150),
    Tissue.CANCELLOUS_BONE: (  230,    0,    0,    20,   45,   70),
    Tissue.DISC:            (   85,    0,    0,     5,    6,   10),
    Tissue.CSF:             (   12,    0,    0,     2,    3,    5),
    Tissue.LIVER:           (   55,   15,   55,     7,    5,   12),
    Tissue.GALLBLADDER:     (   12,    0,    0,     2,    3,    8),
    Tissue.SPLEEN:          (   45,   75,   65,     8,    5,   12),
    Tissue.KIDNEY_CORTEX:   (   35,  165,  110,     5,    5,   20),
    Tissue.KIDNEY_MEDULLA:  (   35,   35,  100,     5,    5,   20),
    Tissue.RENAL_SINUS:     (  -60,    0,    0,    15,   25,   20),
    Tissue.GI_WALL:         (   40,   70,   45,     6,    8,   12),
    Tissue.GI_FLUID:        (   12,    0,    0,     4,    4,   10),
    Tissue.GI_FOOD:         (   35,    0,    0,    20,   35,   20),
    Tissue.GI_GAS:          ( -990,    0,    0,     0,    0,    0),
    Tissue.GI_CONTRAST:     (  260,    0,    0,    40,   30,   80),
    Tissue.FECES:           (  -40,    0,    0,    30,   60,   25),
    Tissue.ARTERY:          (   40,  210,   90,     3,    4,   25),
    Tissue.PORTAL_VEIN:     (   40,   30,  140,     4,    4,   20),
    Tissue.SYSTEMIC_VEIN:   (   40,   15,  110,    12,    5,   20),
    Tissue.PANCREAS:        (   40,   85,   45,     5,   14,    0),   # own offset: draw_contrast
    Tissue.HEART:           (   40,  150,  110,    10,    5,   20),
}

# name: (probability, arterial a, venous v)
CONTRAST_PHASES = {
    "portal venous": (0.45, 0.35, 1.0),
    "pancreatic": (0.25, 0.8, 0.55),
    "arterial": (0.15, 1.0, 0.15),
    "unenhanced": (0.15, 0.0, 0.0),
}


# ------------------------------------------------------------------------------------ shapes

def rotation(yaw_deg=0.0, tilt_deg=0.0, roll_deg=0.0):
    """Rotation matrix Rz(yaw) @ Ry(tilt) @ Rx(roll); its columns are the local axes in LPS."""
    a, b, c = np.radians([yaw_deg, tilt_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


@dataclass(frozen=True, eq=False)
class Ellipsoid:
    centre: np.ndarray       # (3,) mm
    semi: np.ndarray         # (3,) semi-axes along the local axes, mm
    axes: np.ndarray         # (3, 3) rotation, columns = local axes

    def q(self, X, Y, Z):
        """Normalised squared radius (< 1 inside). Zero rotation terms are skipped, so that an
        axis-aligned or yaw-only ellipsoid stays cheap on broadcast coordinate grids."""
        d = (X - self.centre[0], Y - self.centre[1], Z - self.centre[2])
        q = 0.0
        for m in range(3):
            u = 0.0
            for r in range(3):
                if abs(self.axes[r, m]) > 1e-12:
                    u = u + d[r] * float(self.axes[r, m] / self.semi[m])
            q = q + u * u
        return q

    def bbox(self):
        half = np.sqrt(((self.axes * self.semi) ** 2).sum(1))
        return self.centre - half, self.centre + half

    def local_point(self, u):
        """Physical position of local offsets ``u`` (in units of the semi-axes)."""
        return self.centre + self.axes @ (np.asarray(u, float) * self.semi)


def ellipsoid(centre, semi, **angles):
    return Ellipsoid(np.asarray(centre, float), np.asarray(semi, float), rotation(**angles))


@dataclass(frozen=True, eq=False)
class Tube:
    """A tube: a union of spheres along a curve. With ``wall_mm`` it is a wall of ``tissue`` around
    a lumen whose content varies along the tube (``lumen``: one tissue per sphere); lumen in front
    of ``gas_y`` (y < gas_y: the upper side of a supine patient) is gas, an air-fluid level."""

    centres: np.ndarray              # (N, 3) mm
    radii: np.ndarray                # (N,) mm
    tissue: int
    wall_mm: float = 0.0
    lumen: np.ndarray | None = None  # (N,) Tissue values
    gas_y: np.ndarray | None = None  # (N,) mm, NaN = no gas
    z_scale: float = 1.0             # spheres stretched along z


def catmull_rom(points, samples_per_segment=24):
    """Smooth curve through the rows of ``points`` (uniform Catmull-Rom, ends mirrored)."""
    p = np.asarray(points, float)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0, 1, samples_per_segment, endpoint=False)[:, None]
    out = []
    for s in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[s - 1], p[s], p[s + 1], p[s + 2]
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
    out.append(p[-2][None])
    return np.vstack(out)


def spline_tube(control, radii, tissue, step_fraction=0.5, **kw):
    """A tube through control points, radius interpolated between them, spheres every
    ``step_fraction`` x radius along the arc (0.5: the surface ripples by ~3 % of the radius)."""
    control = np.asarray(control, float)
    curve = catmull_rom(control)
    n = len(control)
    r = np.interp(np.linspace(0, n - 1, len(curve)), np.arange(n), np.asarray(radii, float))
    ds = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    # Arc length measured in steps of step_fraction * local radius; a sphere at every whole step.
    steps = np.concatenate([[0], np.cumsum(ds / (step_fraction * np.maximum(0.5 * (r[1:] + r[:-1]), 0.5)))])
    at = np.append(np.arange(0, steps[-1], 1.0), steps[-1])
    centres = np.stack([np.interp(at, steps, curve[:, a]) for a in range(3)], 1)
    return Tube(centres, np.interp(at, steps, r), tissue, **kw)


def random_walk(rng, start, region, n_steps, step):
    """A tortuous path: a persistent random walk steered back into the ellipsoid ``region``."""
    centre, semi = region
    p = np.array(start, float)
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    path = [p.copy()]
    for _ in range(n_steps):
        q = (p - centre) / semi
        if q @ q > 0.6:
            d -= 0.6 * (q / semi) / np.linalg.norm(q / semi)        # steer back inside
        d += rng.normal(0, 0.4, 3)
        d /= np.linalg.norm(d)
        p = p + step * d
        path.append(p.copy())
    return np.array(path)


def walled_tube(rng, tube, contents, wall_mm, segment_mm=50.0, gas_chance=0.3):
    """A gut segment: wall around a lumen whose content changes every ~segment_mm; some segments
    have gas above an air-fluid level."""
    n = len(tube.radii)
    spacing = np.linalg.norm(np.diff(tube.centres, axis=0), axis=1).mean() if n > 1 else 1.0
    per = max(1, int(segment_mm / max(spacing, 1e-3)))
    lumen = np.empty(n, np.uint8)
    gas_y = np.full(n, np.nan)
    for s in range(0, n, per):
        part = slice(s, min(n, s + per))
        lumen[part] = contents[int(rng.integers(len(contents)))]
        if rng.random() < gas_chance:
            top = float(np.min(tube.centres[part, 1] - tube.radii[part]))
            gas_y[part] = top + float(np.mean(tube.radii[part])) * rng.uniform(0.3, 1.0)
    return Tube(tube.centres, tube.radii, tube.tissue, wall_mm, lumen, gas_y)


# ------------------------------------------------------------------------------------ anatomy

@dataclass(frozen=True)
class Body:
    """Skin outline (an ellipse, flat at the back where the patient lies on the table), wall
    layers, and the two reference levels: the body axis (x, y) and the pancreas level z0."""

    centre: tuple            # (x, y) mm
    z0: float                # mm
    semi: tuple              # lateral and antero-posterior semi-axes, mm
    back_y: float            # mm
    taper: float             # relative change of the outline per 100 mm of z
    fat_mm: float            # subcutaneous fat
    muscle_mm: float         # abdominal wall muscle

    @property
    def cavity_semi(self):
        inset = self.fat_mm + self.muscle_mm
        return self.semi[0] - inset, self.semi[1] - inset

    def inside(self, X, Y, Z, inset=0.0):
        """Inside the outline shrunk by ``inset`` mm (a convex region)."""
        (ax, ay), (cx, cy) = self.semi, self.centre
        q = ((X - cx) / (ax - inset)) ** 2 + ((Y - cy) / (ay - inset)) ** 2
        scale = 1.0 + self.taper * (Z - self.z0) / 100.0
        return (q < scale * scale) & (Y < self.back_y - inset)

    def inside_cavity(self, X, Y, Z):
        return self.inside(X, Y, Z, self.fat_mm + self.muscle_mm)


@dataclass(frozen=True)
class Spine:
    """Lumbar vertebrae repeating along z: body (ellipse), disc, canal and arch behind."""

    x: float
    y: float                 # centre of the vertebral bodies
    semi: tuple              # (lateral, antero-posterior) semi-axes of a vertebral body
    period: float            # vertebra + disc height, mm
    disc: float
    phase: float
    canal_y: float
    canal_r: float

    @property
    def front(self):
        return self.y - self.semi[1]


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Everything random about one case, in LPS millimetres; independent of the voxel grid."""

    seed: int
    body: Body
    spine: Spine
    psoas_top: float
    liver: tuple                 # Ellipsoids, united
    gallbladder: Ellipsoid | None
    spleen: Ellipsoid
    spleen_hilum: Ellipsoid      # cut out of the spleen: its medial concavity
    kidneys: tuple               # (left, right)
    diaphragm: tuple             # (left, right) dome tops, mm
    heart: Ellipsoid
    pancreas: tuple              # Tubes: the main tube and its surface lobules
    fat_planes: tuple            # Tubes of fat cut out of the pancreas: clefts, behind the splenic vein
    veins: tuple                 # Tubes
    arteries: tuple              # Tubes
    stomach: Tube
    duodenum: Tube
    small_bowel: tuple           # Tubes
    colon: Tube
    ribs: tuple                  # Tubes
    phase: str                   # contrast phase, one of CONTRAST_PHASES
    hu: np.ndarray               # (n_tissues,) mean HU of each tissue in this case
    texture_coarse: np.ndarray   # (n_tissues,) HU amplitude of the ~10 mm texture
    texture_fine: np.ndarray     # (n_tissues,) HU amplitude of the ~4 mm texture
    noise_hu: float              # standard deviation of the image noise
    psf_mm: float                # scanner blur (Gaussian sigma) before voxel averaging


def draw_anatomy(seed: int) -> Anatomy:
    """Random anatomy of case ``seed``, every size and position drawn from default_rng(seed)."""
    rng = np.random.default_rng(seed)
    body = draw_body(rng)
    spine = draw_spine(rng, body)
    # The pancreatico-duodenal complex and the portal veins move together, a little, relative to
    # the body axis and the front of the spine (the great vessels lie there, behind the pancreas).
    anchor = np.array([body.centre[0], spine.front - 13, body.z0])
    anchor += rng.uniform([-6, -5, -6], [6, 4, 6])
    organs = draw_solid_organs(rng, body, spine, anchor)
    pancreas, clefts, centreline = draw_pancreas(rng, anchor)
    veins, arteries, behind_vein = draw_vessels(rng, body, spine, anchor, organs, centreline)
    gut = draw_gut(rng, body, anchor, centreline)
    ribs = draw_ribs(rng, body, spine)
    contrast = draw_contrast(rng)
    return Anatomy(seed=seed, body=body, spine=spine, psoas_top=body.z0 + rng.uniform(0, 20),
                   pancreas=pancreas, fat_planes=(clefts, behind_vein), veins=veins,
                   arteries=arteries, ribs=ribs, **organs, **gut, **contrast)


def draw_body(rng):
    ax, ay = rng.uniform(130, 165), rng.uniform(98, 125)
    cy = rng.uniform(-10, 10)
    return Body(centre=(rng.uniform(-12, 12), cy), z0=rng.uniform(-20, 20), semi=(ax, ay),
                back_y=cy + ay * rng.uniform(0.84, 0.92), taper=rng.uniform(-0.05, 0.03),
                fat_mm=rng.uniform(8, 35), muscle_mm=rng.uniform(7, 13))


def draw_spine(rng, body):
    semi = (rng.uniform(20, 25), rng.uniform(15, 18))
    cav_back = body.back_y - body.fat_mm - body.muscle_mm
    y = min(body.centre[1] + rng.uniform(25, 35), cav_back - 40)
    return Spine(x=body.centre[0] + rng.uniform(-3, 3), y=y, semi=semi, period=rng.uniform(33, 40),
                 disc=rng.uniform(7, 10), phase=rng.uniform(0, 40), canal_y=y + semi[1] + 10,
                 canal_r=rng.uniform(8, 10))


def draw_solid_organs(rng, body, spine, anchor):
    """Liver (three united ellipsoids), gallbladder, spleen, kidneys, diaphragm domes, heart."""
    U = rng.uniform
    (cx, cy), z0 = body.centre, body.z0
    cav_x, _ = body.cavity_semi
    s_liver = U(0.85, 1.12)
    liver = (
        ellipsoid([cx - 80, cy + 5, z0 + 62], np.array([66, 80, 72]) * s_liver, yaw_deg=U(-8, 8)),
        ellipsoid([cx - 95, cy + 10, z0 + 8 + U(-10, 10)], np.array([36, 50, 45]) * U(0.7, 1.15)),
        ellipsoid([cx - 5, cy - 55, z0 + 70], np.array([65, 36, 32]) * s_liver, yaw_deg=U(-20, 0)),
    )
    gallbladder = None
    if rng.random() < 0.8:
        gallbladder = ellipsoid([cx - 52 + U(-6, 6), cy - 40 + U(-6, 6), z0 + 20 + U(-6, 6)],
                                np.array([14, 14, 30]) * U(0.7, 1.15), roll_deg=U(20, 45))
    # Spleen along the postero-lateral wall (local x: outward), hilum facing the pancreatic tail.
    spleen_semi = np.array([22, 50, 48]) * U(0.75, 1.2)
    spleen = ellipsoid([cx + cav_x - 25, spine.y + 10, anchor[2] + 40], spleen_semi, yaw_deg=U(30, 45))
    hilum = Ellipsoid(spleen.local_point([-1.5, 0, 0]), spleen_semi * [0.9, 0.4, 0.45], spleen.axes)
    # Kidneys beside the spine (hilum turned forwards and inwards, upper pole inwards), the right
    # one lower (under the liver).
    kidney_semi = np.array([27, 22, 55]) * U(0.85, 1.12)
    kx = min(68.0, cav_x - 32)
    kidneys = (
        ellipsoid([spine.x + kx, spine.y + 25, z0 - 10 + U(-8, 8)], kidney_semi, yaw_deg=U(20, 40),
                  tilt_deg=-U(5, 15)),
        ellipsoid([spine.x - kx, spine.y + 27, z0 - 30 + U(-8, 8)], kidney_semi, yaw_deg=-U(20, 40),
                  tilt_deg=U(5, 15)),
    )
    diaphragm = (z0 + U(95, 125), z0 + U(105, 135))
    heart = ellipsoid([cx + 15, cy - 25, max(diaphragm) + 55], [65, 55, 60], yaw_deg=U(-30, -10))
    return dict(liver=liver, gallbladder=gallbladder, spleen=spleen, spleen_hilum=hilum,
                kidneys=kidneys, diaphragm=diaphragm, heart=heart)


# Pancreas centreline relative to its anchor: x, y, z, radius (mm).
PANCREAS_SHAPE = np.array([
    [-14, -16, -32, 6.5],   # uncinate process, behind the superior mesenteric vein
    [-32, -18, -24, 11],    # head, lower part
    [-36, -22, -8, 13],     # head
    [-26, -32, 2, 11],      # head, upper part
    [-6, -38, 6, 8],        # neck, in front of the portal confluence
    [22, -34, 10, 10],      # body, in front of the aorta and the superior mesenteric artery
    [48, -20, 14, 10],      # body
    [66, 0, 18, 9],         # tail
    [78, 18, 22, 7],        # tail end, at the splenic hilum
])
NECK = 4


def draw_pancreas(rng, anchor):
    """Lobulated tube along a jittered spline: (main tube, lobules), fat clefts, centreline dict."""
    U = rng.uniform
    shape = PANCREAS_SHAPE.copy()
    shape[:, :3] += U(-4, 4, (len(shape), 3))
    shape[7:, 2] += U(-6, 14)                                       # tail level varies most
    shape[8, :2] += (shape[8, :2] - shape[7, :2]) * U(-0.3, 0.3)    # tail length
    shape[:, 3] *= U(0.85, 1.25) * U(0.85, 1.15, len(shape))
    control = shape[:, :3] + anchor
    main = spline_tube(control, shape[:, 3], Tissue.PANCREAS, step_fraction=0.4, z_scale=U(1.1, 1.3))
    # Lobulation: a smooth radius wobble along the tube, lobules bulging from its surface, and fat
    # clefts notching it from outside (centred beyond the lobules, so that they stay open).
    n = len(main.radii)
    wobble = np.interp(np.arange(n), np.linspace(0, n - 1, 16), U(-0.2, 0.2, 16))
    radii = main.radii * (1 + wobble)
    main = Tube(main.centres, radii, main.tissue, z_scale=main.z_scale)

    def surface_spheres(count, depth, size):
        at = rng.integers(0, n, count)
        direction = rng.normal(size=(count, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        direction[:, 2] *= main.z_scale
        offset = radii[at] * U(*depth, count)
        return main.centres[at] + direction * offset[:, None], radii[at] * U(*size, count)
    lobules = Tube(*surface_spheres(int(n * U(2, 3)), (0.8, 1.0), (0.3, 0.5)), Tissue.PANCREAS)
    clefts = Tube(*surface_spheres(int(n * U(1, 2)), (1.5, 1.7), (0.5, 0.7)), Tissue.FAT)
    neck = int(np.argmin(np.linalg.norm(main.centres - control[NECK], axis=1)))
    centreline = dict(control=control, head_r=shape[2, 3], body_tail=main.centres[neck:],
                      body_tail_r=radii[neck:], z_scale=main.z_scale)
    return (main, lobules), clefts, centreline


def draw_vessels(rng, body, spine, anchor, organs, centreline):
    """Aorta with its branches (coeliac, splenic, hepatic, superior mesenteric, renal, iliac) and
    veins (portal confluence, superior mesenteric, splenic along the back of the pancreas, portal
    into the liver, inferior vena cava, renal, iliac). Returns (veins, arteries, the fat plane
    behind the splenic vein)."""
    U = rng.uniform
    (cx, cy), z0, P = body.centre, body.z0, anchor
    ra, ri = U(9, 12.5), U(9, 12.5)
    ax, ay = spine.x + U(6, 15), spine.front - ra - U(1, 4)          # aorta
    ix, iy = spine.x - U(20, 28), spine.front - ri + U(-1, 4)         # inferior vena cava
    spleen_hilum = organs["spleen"].local_point([-0.9, 0, -0.2])
    left_hilum = organs["kidneys"][0].local_point([-0.9, 0, 0])
    right_hilum = organs["kidneys"][1].local_point([-0.9, 0, 0])

    # Splenic vein along the back of the body and tail (axial normal pointing backwards).
    bt, bt_r = centreline["body_tail"], centreline["body_tail_r"]
    tangent = np.gradient(bt, axis=0)
    back = np.stack([-tangent[:, 1], tangent[:, 0], np.zeros(len(bt))], 1)
    back *= np.sign(back[:, 1:2] + 1e-9) / (np.linalg.norm(back, axis=1, keepdims=True) + 1e-9)
    confluence = P + [-4, -24, 6] + U(-2, 2, 3)
    r_splenic = U(3.5, 5)
    groove = bt + back * (bt_r[:, None] + 0.6 * r_splenic) + [0, 0, -2]      # partly sunk in
    splenic = np.vstack([confluence, groove[2::4], spleen_hilum])
    # No parenchyma behind the vein (lobules would wrap it): a fat plane there.
    behind = Tube(groove + back * 1.5 * r_splenic, np.full(len(groove), 1.5 * r_splenic), Tissue.FAT)
    rp = U(5.5, 7.5)                                                  # portal vein radius
    lrv_z = left_hilum[2] + 5

    def vein(points, radii, tissue=Tissue.PORTAL_VEIN):
        return spline_tube(points, radii, tissue)

    def systemic(points, radii):
        return spline_tube(points, radii, Tissue.SYSTEMIC_VEIN)

    def artery(points, radii):
        return spline_tube(points, radii, Tissue.ARTERY)

    veins = (
        vein([confluence, P + [-22, -16, 25], P + [-42, -8, 45], [cx - 75, cy - 5, z0 + 62]],
             [rp, rp, rp * 0.8, 4]),                                  # portal vein into the liver
        vein([P + [-42, -8, 45], P + [-25, -28, 60], [cx - 5, cy - 50, z0 + 72]], [4, 3.5, 3]),
        vein([confluence, P + [-5, -30, -20], P + [-8, -42, -60], P + [-15, -52, -110]],
             [rp * 0.85, 5.5, 4.5, 4]),                               # superior mesenteric vein
        vein(splenic, np.full(len(splenic), r_splenic)),
        systemic([[ix, iy, z0 - 105], [ix, iy, z0 - 20], [ix - 2, iy - 2, z0 + 60],
                  [ix - 8, iy - 18, z0 + 160]], [ri, ri, ri, ri * 1.1]),  # inferior vena cava
        systemic([[ix, iy, z0 - 100], [ix - 30, iy + 10, z0 - 180]], [ri * 0.8] * 2),
        systemic([[ix, iy, z0 - 100], [ax + 30, iy + 15, z0 - 180]], [ri * 0.8] * 2),
        systemic([left_hilum, [ax + 15, ay - ra - 3, lrv_z], [ax, ay - ra - 5, lrv_z + 1], [ix, iy, lrv_z]],
                 [4.5, 4.5, 4, 5]),                                   # left renal vein, across the aorta
        systemic([right_hilum, [ix, iy, right_hilum[2] + 5]], [4.5, 5]),
    )
    sma_z = P[2] + U(10, 20)
    celiac_z = sma_z + U(12, 18)
    front = ay - ra                                                   # front wall of the aorta
    # Splenic artery: tortuous along the upper border of body and tail.
    r_sa = U(2.5, 3.5)
    upper = (bt + [0, 0, 1.0] * (bt_r[:, None] * centreline["z_scale"] + r_sa + 1.5))[::3]
    upper = upper + rng.normal(0, 2.5, upper.shape)
    arteries = (
        artery([[ax, ay + 8, z0 + 170], [ax, ay, z0 + 60], [ax + 2, ay, z0 - 30], [ax + 3, ay - 2, z0 - 95]],
               [ra, ra, ra * 0.95, ra * 0.85]),                       # aorta
        artery([[ax + 3, ay, z0 - 95], [ax - 35, ay + 5, z0 - 180]], [ra * 0.6] * 2),
        artery([[ax + 3, ay, z0 - 95], [ax + 40, ay + 5, z0 - 180]], [ra * 0.6] * 2),
        artery([[ax, front + 3, sma_z], [ax - 3, front - 16, sma_z - 14], [ax - 5, front - 30, z0 - 30],
                [ax - 8, front - 38, z0 - 70], [ax - 12, front - 42, z0 - 120]],
               [4.5, 4.2, 4, 3.5, 3]),                                # superior mesenteric artery
        artery(np.vstack([[ax, front + 3, celiac_z], [ax, front - 12, celiac_z + 3], upper,
                          spleen_hilum + [0, -4, 6]]), np.full(len(upper) + 3, r_sa)),
        artery([[ax, front - 12, celiac_z + 3], P + [-30, -28, 32], P + [-45, -12, 45]],
               [3, 3, 2.5]),                                          # common hepatic artery
        artery([[ax, ay, left_hilum[2] - 4], left_hilum + [0, 4, -4]], [3, 3]),
        artery([[ax, ay, right_hilum[2] + 6], [ix, iy + ri + 3, right_hilum[2] + 2],
                right_hilum + [0, 4, -4]], [3, 3, 3]),                # right renal, behind the cava
    )
    return veins, arteries, behind


def draw_gut(rng, body, anchor, centreline):
    """Stomach (left upper, gas at its front), duodenal C-loop around the pancreatic head, small
    bowel loops (random walks) and the colon frame."""
    U = rng.uniform
    (cx, cy), z0, P = body.centre, body.z0, anchor
    cav_x, cav_y = body.cavity_semi
    oral_contrast = rng.random() < 0.3
    contents = [Tissue.GI_FLUID, Tissue.GI_FOOD, Tissue.GI_FLUID]
    if oral_contrast:
        contents += [Tissue.GI_CONTRAST] * 2

    pylorus = P + [-15, -50, 28] + U(-4, 4, 3)
    dist = U(0.75, 1.15)
    stomach = spline_tube([[cx + 70, cy + 15, z0 + 100], [cx + 62, cy - 18, z0 + 72],
                           [cx + 45, cy - 45, z0 + 48], [cx + 15, cy - 60, P[2] + 32], pylorus],
                          np.array([40, 38, 32, 22, 11]) * [dist, dist, dist, 1, 1], Tissue.GI_WALL)
    content = Tissue.GI_FOOD if rng.random() < 0.5 else contents[int(rng.integers(len(contents)))]
    gas_y = float(np.min(stomach.centres[:, 1] - stomach.radii)) + U(6, 35)
    n = len(stomach.radii)
    stomach = Tube(stomach.centres, stomach.radii, Tissue.GI_WALL, 4.0, np.full(n, content),
                   np.full(n, gas_y))

    head = centreline["control"][2]
    d2_x = head[0] - centreline["head_r"] - U(12, 15) - 1.5
    control = np.array([
        pylorus, P + [-40, -40, 26], [d2_x + 4, head[1] - 2, P[2] + 15], [d2_x, head[1] + 4, P[2] - 10],
        [d2_x + 6, head[1] + 8, P[2] - 38], P + [-30, -12, -52], P + [0, -20, -56], P + [25, -22, -46],
        P + [32, -26, -22]])
    control[1:] += U(-3, 3, (8, 3))
    duodenum = walled_tube(rng, spline_tube(control, np.full(9, U(10, 13)), Tissue.GI_WALL), contents, 3.0)

    small_bowel = []
    region = (np.array([cx, cy - 0.25 * cav_y, z0 - 80]), np.array([cav_x - 28, 0.55 * cav_y, 62]))
    jejunum = (P + [45, -20, -20], np.array([32, 28, 22]))      # next to the duodenojejunal flexure
    start = control[-1]
    for loop in range(int(rng.integers(5, 8))):
        if loop > 0:
            start = region[0] + region[1] * U(-0.7, 0.7, 3)
        path = random_walk(rng, start, jejunum if loop == 0 else region, int(rng.integers(30, 55)), 6.0)
        tube = Tube(path, np.full(len(path), U(9, 13)), Tissue.GI_WALL)
        small_bowel.append(walled_tube(rng, tube, contents, 2.5, gas_chance=0.2))

    sag = U(0, 45)
    control = np.array([
        [cx - cav_x + 30, cy + 5, z0 - 150], [cx - cav_x + 28, cy + 8, z0 - 60],
        [cx - cav_x + 35, cy - 10, z0 - 15], [cx - 60, cy - cav_y + 35, z0 - 5],
        [cx - 10, cy - cav_y + 25, z0 - 30 - sag], [cx + 40, cy - cav_y + 30, z0 - 25 - sag / 2],
        [cx + cav_x - 30, cy - 20, P[2] + 35], [cx + cav_x - 22, cy + 20, z0 - 20],
        [cx + cav_x - 22, cy + 15, z0 - 150]]) + U(-5, 5, (9, 3))
    colon = spline_tube(control, [24, 24, 22, 20, 20, 20, 18, 16, 16], Tissue.GI_WALL, step_fraction=0.35)
    along = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(colon.centres, axis=0), axis=1))])
    haustra = 1 + 0.12 * np.sin(2 * np.pi * along / U(28, 40))
    colon = Tube(colon.centres, colon.radii * haustra * U(0.8, 1.15), Tissue.GI_WALL)
    colon = walled_tube(rng, colon, [Tissue.FECES, Tissue.FECES, Tissue.GI_FLUID], 2.5, gas_chance=0.5)
    return dict(stomach=stomach, duodenum=duodenum, small_bowel=tuple(small_bowel), colon=colon)


def draw_ribs(rng, body, spine):
    """Ribs 9-12 each side: from the transverse process along the body wall, descending forwards."""
    (cx, cy), (ax, ay) = body.centre, body.semi
    depth = body.fat_mm + 0.6 * body.muscle_mm
    ribs = []
    for side in (1, -1):
        for n, end_deg in enumerate((75, 105, 135, 155)):
            z_head = body.z0 + spine.period * (0.7 + n) + rng.uniform(-5, 5)
            phi = np.radians(np.linspace(30, end_deg, 8))
            pts = np.stack([cx + side * (ax - depth) * np.sin(phi),
                            np.minimum(cy + (ay - depth) * np.cos(phi), body.back_y - depth),
                            z_head - rng.uniform(35, 55) * np.linspace(0, 1, 8) ** 1.3], 1)
            pts = np.vstack([[spine.x + side * 28, spine.canal_y, z_head + 6], pts])
            ribs.append(spline_tube(pts, np.full(len(pts), rng.uniform(4, 5.5)), Tissue.CORTICAL_BONE,
                                    step_fraction=0.7))
    return tuple(ribs)


def draw_contrast(rng):
    """Contrast phase, the case's tissue table (HU, texture amplitudes), noise and blur."""
    U = rng.uniform
    names = list(CONTRAST_PHASES)
    phase = names[rng.choice(len(names), p=[CONTRAST_PHASES[k][0] for k in names])]
    _, a, v = CONTRAST_PHASES[phase]
    a, v = a * U(0.85, 1.1), v * U(0.85, 1.1)
    table = np.array([TISSUE_HU[t] for t in Tissue], float)
    hu = table[:, 0] + a * table[:, 1] + v * table[:, 2] + table[:, 5] * U(-1, 1, len(table))
    hu[[Tissue.CORTICAL_BONE, Tissue.CANCELLOUS_BONE]] *= U(0.65, 1.15)      # bone density
    hu[Tissue.PANCREAS] += U(-25, 10)                                      # fatty or dense
    coarse, fine = table[:, 3].copy(), table[:, 4].copy()
    coarse[Tissue.SPLEEN] += 25 * a                                        # arterial-phase spleen
    fine[Tissue.PANCREAS] = U(8, 25)                                       # lobular texture
    return dict(phase=phase, hu=hu, texture_coarse=coarse, texture_fine=fine,
                noise_hu=U(10, 25), psf_mm=U(0.7, 1.2))


# ------------------------------------------------------------------------------------ rasterising

class Grid:
    """The voxel grid in physical space: point(i, j, k) = origin + D @ (spacing * (i, j, k))."""

    def __init__(self, shape, spacing, origin, direction):
        self.shape = tuple(int(n) for n in shape)                 # (z, y, x)
        self.size = np.array(self.shape[::-1])                    # (x, y, z) = along (i, j, k)
        self.spacing = np.asarray(spacing, float)
        self.origin = np.asarray(origin, float)
        self.direction = np.asarray(direction, float).reshape(3, 3)
        self.to_index = self.direction.T / self.spacing[:, None]  # index = to_index @ (p - origin)
        self.abs_to_index = np.abs(self.to_index)
        # Physical bounding box of the grid: unbounded boxes are clipped to it first (with a
        # rotated direction, a long box would otherwise cover every voxel).
        corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in self.size])))
        physical = self.origin + (corners * self.spacing) @ self.direction.T
        self.physical_lo, self.physical_hi = physical.min(0), physical.max(0)
        # Physical coordinate r as a sum of terms, one per index axis it depends on (origin folded
        # into the first), each a ramp shaped to broadcast along its array axis.
        step = self.direction * self.spacing
        self.terms = []
        for r in range(3):
            terms = []
            for a in range(3):                   # index axis a (i, j, k) is array axis 2 - a
                if abs(step[r, a]) > 1e-9:
                    shape = [1, 1, 1]
                    shape[2 - a] = self.size[a]
                    ramp = step[r, a] * np.arange(self.size[a]) + (0.0 if terms else self.origin[r])
                    terms.append((2 - a, ramp.astype(np.float32).reshape(shape)))
            self.terms.append(terms)

    def block(self, lo, hi):
        """(slices, X, Y, Z) for the voxels around the physical box [lo, hi], or None if it misses
        the grid. X, Y, Z are float32 coordinates broadcastable to the block (views for an
        identity direction)."""
        lo = np.maximum(np.asarray(lo, float), self.physical_lo)
        hi = np.minimum(np.asarray(hi, float), self.physical_hi)
        if np.any(hi < lo):
            return None
        centre = self.to_index @ ((lo + hi) * 0.5 - self.origin)
        half = self.abs_to_index @ ((hi - lo) * 0.5)
        first = np.maximum(np.floor(centre - half), 0).astype(int)
        last = np.minimum(np.ceil(centre + half) + 1, self.size).astype(int)
        if np.any(last <= first):
            return None
        slices = tuple(slice(first[a], last[a]) for a in (2, 1, 0))
        coords = []
        for terms in self.terms:
            c = None
            for axis, ramp in terms:
                index = [slice(None)] * 3
                index[axis] = slices[axis]
                c = ramp[tuple(index)] if c is None else c + ramp[tuple(index)]
            coords.append(c)
        return (slices, *coords)


def spheres_mask(X, Y, Z, centres, radii, z_scale=1.0, levels=None):
    """Union of spheres (stretched by z_scale along z); a sphere with a level keeps only y < level."""
    mask = None
    for n, (c, r) in enumerate(zip(centres, radii)):
        m = (X - c[0]) ** 2 + (Y - c[1]) ** 2 + ((Z - c[2]) * (1.0 / z_scale)) ** 2 < r * r
        if levels is not None:
            m = m & (Y < levels[n])
        mask = m if mask is None else mask | m
    return mask


class Painter:
    """Paints tissue labels into a uint8 tissue map, one region at a time; later paint covers
    earlier paint."""

    def __init__(self, grid):
        self.grid = grid
        self.tissue = np.zeros(grid.shape, np.uint8)

    def region(self, lo, hi, inside, tissue, within=None, over=None):
        """Voxels in the box [lo, hi] (mm) where inside(X, Y, Z) (and within(X, Y, Z), a convex
        region, skipped when it holds the whole box) get ``tissue``; with ``over``, only voxels
        that are that tissue now."""
        block = self.grid.block(lo, hi)
        if block is None:
            return
        slices, X, Y, Z = block
        mask = inside(X, Y, Z)
        if within is not None and not box_inside(within, lo, hi):
            mask = mask & within(X, Y, Z)
        view = self.tissue[slices]
        mask = np.broadcast_to(mask, view.shape)
        if over is not None:
            mask = mask & (view == over)
        view[mask] = tissue

    def ellipsoid(self, e, tissue, within=None):
        self.region(*e.bbox(), lambda X, Y, Z: e.q(X, Y, Z) < 1.0, tissue, within)

    def spheres(self, centres, radii, tissue, z_scale=1.0, within=None, gas_y=None, over=None):
        """Union of spheres, painted in chunks of neighbours (fewer, larger blocks)."""
        centres, radii = np.asarray(centres, float), np.asarray(radii, float)
        if gas_y is not None:
            keep = ~np.isnan(gas_y)
            centres, radii, gas_y = centres[keep], radii[keep], gas_y[keep]
        half = np.stack([radii, radii, radii * z_scale], 1)
        lo_all, hi_all = (centres - half).tolist(), (centres + half).tolist()
        start, n = 0, len(radii)
        while start < n:
            lo, hi, end = list(lo_all[start]), list(hi_all[start]), start + 1
            r_max = radii[start]
            while end < n and end - start < 12:
                r_max = max(r_max, radii[end])
                new_lo = [min(a, b) for a, b in zip(lo, lo_all[end])]
                new_hi = [max(a, b) for a, b in zip(hi, hi_all[end])]
                if max(b - a for a, b in zip(new_lo, new_hi)) > 6 * r_max:
                    break
                lo, hi, end = new_lo, new_hi, end + 1
            part = slice(start, end)
            levels = None if gas_y is None else gas_y[part]
            inside = partial(spheres_mask, centres=centres[part], radii=radii[part], z_scale=z_scale,
                             levels=levels)
            self.region(lo, hi, inside, tissue, within, over)
            start = end

    def tube(self, t, within=None):
        """Solid tube, or wall, then lumen (per content), then gas above the air-fluid levels."""
        self.spheres(t.centres, t.radii, t.tissue, t.z_scale, within)
        if not t.wall_mm:
            return
        inner = np.maximum(t.radii - t.wall_mm, 0.5)
        for content in np.unique(t.lumen):
            part = t.lumen == content
            self.spheres(t.centres[part], inner[part], int(content), t.z_scale, within)
        if t.gas_y is not None:
            self.spheres(t.centres, inner, Tissue.GI_GAS, t.z_scale, within, gas_y=t.gas_y)


def box_inside(region, lo, hi):
    """Whether the convex ``region`` holds the box [lo, hi]: all 8 corners inside it."""
    x, y, z = np.array(list(itertools.product(*zip(lo, hi)))).T
    return bool(np.all(region(x, y, z)))


BIG = 1e4   # mm: an unbounded extent


def paint_body(p, body):
    """Table, skin outline with subcutaneous fat, abdominal wall muscle, visceral fat."""
    (cx, cy), (ax, ay), top = body.centre, body.semi, body.back_y + 4
    p.region([cx - 1.6 * ax, top - 10, -BIG], [cx + 1.6 * ax, top + 10, BIG],
             lambda X, Y, Z: np.abs(Y - top + 8 * ((X - cx) / ax) ** 2 - 4) < 4, Tissue.TABLE)
    grow = 1 + 3 * max(abs(body.taper), 0.05)
    lo, hi = [cx - ax * grow, cy - ay * grow, -BIG], [cx + ax * grow, body.back_y, BIG]
    p.region(lo, hi, body.inside, Tissue.FAT)
    p.region(lo, hi, lambda X, Y, Z: body.inside(X, Y, Z, body.fat_mm), Tissue.MUSCLE)
    p.region(lo, hi, body.inside_cavity, Tissue.FAT)


def paint_back_muscles(p, anat):
    """Paraspinal and quadratus lumborum muscles behind the spine; psoas muscles beside it,
    growing towards the pelvis."""
    s, body = anat.spine, anat.body
    for side in (1, -1):
        x, y = s.x + side * 33, s.canal_y + 18
        p.region([x - 27, y - 22, -BIG], [x + 27, y + 22, BIG],
                 lambda X, Y, Z, x=x, y=y: ((X - x) / 27) ** 2 + ((Y - y) / 22) ** 2 < 1,
                 Tissue.MUSCLE, lambda X, Y, Z: body.inside(X, Y, Z, 0.5 * body.fat_mm))
        quadratus = ellipsoid([s.x + side * 62, s.canal_y + 2, body.z0 - 100], [17, 11, 130])
        p.ellipsoid(quadratus, Tissue.MUSCLE)
        top, x_side = anat.psoas_top, s.x + side * s.semi[0]

        def psoas(X, Y, Z, x_side=x_side, side=side):
            r = np.clip(0.14 * (top - Z), 0, 22)
            return (X - x_side - side * 0.7 * r) ** 2 + (Y - s.y - 2) ** 2 < r * r
        p.region([x_side - 45, s.y - 30, -BIG], [x_side + 45, s.y + 30, top], psoas, Tissue.MUSCLE)


def paint_spine(p, s):
    """Vertebral bodies (cancellous core, cortical shell and endplates) with discs; arch, canal,
    spinous and transverse processes."""
    (a, b) = s.semi

    def level(Z):                      # height within the vertebra + disc period
        return np.mod(Z - s.phase, s.period)

    def q_body(X, Y):
        return ((X - s.x) / a) ** 2 + ((Y - s.y) / b) ** 2

    lo, hi = [s.x - a, s.y - b, -BIG], [s.x + a, s.y + b, BIG]
    p.region(lo, hi, lambda X, Y, Z: q_body(X, Y) < 1, Tissue.CORTICAL_BONE)
    p.region(lo, hi, lambda X, Y, Z: (q_body(X, Y) < (1 - 2.5 / b) ** 2)
             & (level(Z) > s.disc + 1.5) & (level(Z) < s.period - 1.5), Tissue.CANCELLOUS_BONE)
    p.region(lo, hi, lambda X, Y, Z: (q_body(X, Y) < 1) & (level(Z) < s.disc), Tissue.DISC)
    yc, rc = s.canal_y, s.canal_r
    lo, hi = [s.x - 40, yc - rc - 8, -BIG], [s.x + 40, yc + 45, BIG]
    p.region(lo, hi, lambda X, Y, Z: ((X - s.x) ** 2 + (Y - yc) ** 2 < (rc + 5) ** 2) & (Y > yc - rc - 2)
             & (level(Z) > 0.5 * s.disc), Tissue.CORTICAL_BONE)
    p.region(lo, hi, lambda X, Y, Z: (np.abs(X - s.x) < 3 + 0.1 * (Y - yc)) & (Y > yc) & (Y < yc + rc + 24)
             & (level(Z) > s.disc + 4) & (level(Z) < s.period - 6), Tissue.CANCELLOUS_BONE)
    p.region(lo, hi, lambda X, Y, Z: (np.abs(X - s.x) < 30) & (np.abs(Y - yc + 0.15 * np.abs(X - s.x)) < 3)
             & (np.abs(level(Z) - s.disc - 12) < 3), Tissue.CORTICAL_BONE)
    p.region(lo, hi, lambda X, Y, Z: (X - s.x) ** 2 + (Y - yc) ** 2 < rc * rc, Tissue.CSF)


def paint_liver(p, anat):
    """Right and left lobes (united ellipsoids) inside the cavity and off the spine; the
    gallbladder in its lower surface."""
    lo = np.min([e.bbox()[0] for e in anat.liver], axis=0)
    hi = np.max([e.bbox()[1] for e in anat.liver], axis=0)
    s = anat.spine

    def inside(X, Y, Z):
        q = anat.liver[0].q(X, Y, Z)
        for e in anat.liver[1:]:
            q = np.minimum(q, e.q(X, Y, Z))
        return (q < 1) & ~((X > s.x - 30) & (Y > s.front - 8))
    p.region(lo, hi, inside, Tissue.LIVER, anat.body.inside_cavity)
    if anat.gallbladder is not None:
        p.ellipsoid(anat.gallbladder, Tissue.GALLBLADDER, anat.body.inside_cavity)


def paint_spleen(p, anat):
    p.region(*anat.spleen.bbox(),
             lambda X, Y, Z: (anat.spleen.q(X, Y, Z) < 1) & (anat.spleen_hilum.q(X, Y, Z) > 1),
             Tissue.SPLEEN, anat.body.inside_cavity)


def paint_kidneys(p, anat):
    """Cortex around medulla, and a fatty sinus at the medial hilum."""
    for k in anat.kidneys:
        p.ellipsoid(k, Tissue.KIDNEY_CORTEX)
        p.ellipsoid(Ellipsoid(k.centre, k.semi - 7.0, k.axes), Tissue.KIDNEY_MEDULLA)
        p.ellipsoid(Ellipsoid(k.local_point([-0.6, 0, 0]), k.semi * [0.45, 0.35, 0.4], k.axes),
                    Tissue.RENAL_SINUS)


def paint_chest(p, anat):
    """Lung bases above the diaphragm domes (lower at the back: the costophrenic recesses), the
    heart on the central tendon."""
    body = anat.body
    (cx, cy), ax = body.centre, body.semi[0]
    for side, top in zip((1, -1), anat.diaphragm):
        xc = cx + side * 0.5 * ax

        def above_dome(X, Y, Z, xc=xc, top=top):
            return Z > top - ((X - xc) ** 2 + (Y - cy) ** 2) / 260.0 - 0.25 * np.maximum(Y - cy, 0)
        lo = [cx if side > 0 else cx - 2 * ax, -BIG, top - 150]
        hi = [cx + 2 * ax if side > 0 else cx, BIG, BIG]
        p.region(lo, hi, above_dome, Tissue.LUNG, body.inside_cavity)
    p.ellipsoid(anat.heart, Tissue.HEART, body.inside_cavity)


def rasterise(anat, grid):
    """The tissue map of ``anat`` on ``grid``, painted in priority order: gut loops fill the gaps,
    solid organs cover them, the pancreas covers the duodenum it indents, vessels and bone cover
    everything."""
    p = Painter(grid)
    cavity = anat.body.inside_cavity
    paint_body(p, anat.body)
    paint_back_muscles(p, anat)
    p.tube(anat.colon, cavity)
    for loop in anat.small_bowel:
        p.tube(loop, cavity)
    paint_liver(p, anat)
    paint_spleen(p, anat)
    p.tube(anat.stomach, cavity)
    paint_kidneys(p, anat)
    p.tube(anat.duodenum, cavity)
    for part in anat.pancreas:
        p.tube(part)
    for plane in anat.fat_planes:
        p.spheres(plane.centres, plane.radii, Tissue.FAT, over=Tissue.PANCREAS)
    paint_chest(p, anat)
    for vessel in anat.veins + anat.arteries:
        p.tube(vessel)
    paint_spine(p, anat.spine)
    for rib in anat.ribs:
        p.tube(rib)
    return p.tissue


# ------------------------------------------------------------------------------------ image

def smooth_field(rng, shape, spacing_zyx, node_mm):
    """Unit-variance smooth random field: white noise on a lattice of nodes every ``node_mm`` mm,
    linearly interpolated one axis at a time, and rescaled so that the variance is 1 everywhere
    (no matrix products: BLAS threads stall when the cores are shared)."""
    sizes = [int(n * sp // node_mm) + 2 for n, sp in zip(shape, spacing_zyx)]
    field = rng.standard_normal(sizes, dtype=np.float32)
    for axis in (2, 1, 0):
        u = np.arange(shape[axis]) * (spacing_zyx[axis] / node_mm)
        below = u.astype(int)
        f = u - below
        norm = 1.0 / np.sqrt((1 - f) ** 2 + f ** 2)
        broadcast = [1, 1, 1]
        broadcast[axis] = -1
        w0 = ((1 - f) * norm).astype(np.float32).reshape(broadcast)
        w1 = (f * norm).astype(np.float32).reshape(broadcast)
        field = np.take(field, below, axis) * w0 + np.take(field, below + 1, axis) * w1
    return field


def gaussian_kernel(sigma_vox):
    radius = int(math.ceil(2.5 * sigma_vox)) if sigma_vox > 0.1 else 0
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / max(sigma_vox, 1e-6)) ** 2)
    return (w / w.sum()).astype(np.float32)


def gaussian_blur(volume, sigmas_vox):
    """Separable Gaussian blur along each array axis, edges replicated (numpy only)."""
    out = volume
    for axis, sigma in enumerate(sigmas_vox):
        w = gaussian_kernel(sigma)
        r = len(w) // 2
        if r == 0:
            continue
        n = out.shape[axis]
        padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in range(3)], mode="edge")

        def shifted(o):
            index = [slice(None)] * 3
            index[axis] = slice(r + o, r + o + n)
            return padded[tuple(index)]
        result = shifted(0) * w[r]
        pair = np.empty_like(result)
        for o in range(1, r + 1):
            np.add(shifted(-o), shifted(o), out=pair)
            pair *= w[r + o]
            result += pair
        out = result
    return out


def render(anat, tissue, grid, rng, noise_hu):
    """HU image from the tissue map: tissue table, textures, correlated noise, partial-volume blur."""
    spacing_zyx = grid.spacing[::-1]
    image = anat.hu.astype(np.float32)[tissue]
    coarse = smooth_field(rng, grid.shape, spacing_zyx, 10.0)
    image += anat.texture_coarse.astype(np.float32)[tissue] * coarse
    fine = smooth_field(rng, grid.shape, spacing_zyx, 4.0)
    image += anat.texture_fine.astype(np.float32)[tissue] * fine
    image[(tissue == Tissue.FECES) & (fine > 1.1)] = anat.hu[Tissue.GI_GAS]      # gas bubbles
    # Blur: scanner PSF and voxel averaging (a one-voxel box has sigma 0.29 voxel; 0.4 allows for
    # the reconstruction kernel).
    sigmas = [math.hypot(anat.psf_mm / sp, 0.4) for sp in spacing_zyx]
    # Noise is added before the blur, so it is correlated like CT noise; its amplitude is set so
    # that the standard deviation after the blur is noise_hu.
    gain = math.sqrt(math.prod(float((gaussian_kernel(s) ** 2).sum()) for s in sigmas))
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise *= np.float32(noise_hu / gain)
    image += noise
    image = gaussian_blur(image, sigmas)
    np.rint(image, out=image)
    np.clip(image, HU_MIN, HU_MAX, out=image)
    return image.astype(np.int16)


# ------------------------------------------------------------------------------------ entry point

def random_direction(seed):
    """A seed-determined direction: a rotation of 3-15 degrees about a random axis, with random
    axis flips (as in scans stored RAS-wise or feet first)."""
    rng = np.random.default_rng([seed, 2])
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(3, 15))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
    flips = np.where(rng.random(3) < 0.35, -1.0, 1.0)
    return rot @ np.diag(flips)


def make_phantom(seed: int, shape=(128, 128, 128), spacing=(2.0, 2.0, 2.0), *, oriented: bool = False,
                 noise_hu: float | None = None) -> Phantom:
    """Synthetic abdominal CT with pancreas label for case ``seed`` (an integer >= 0).

    shape: array shape (z, y, x); spacing: (sx, sy, sz) mm. The volume's centre is the physical
    point (0, 0, 0). oriented: use a seed-determined rotated/flipped direction instead of identity.
    noise_hu: standard deviation of the image noise (default: drawn per seed, 10-25 HU)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise ValueError(f"shape must be 3 positive integers (z, y, x), got {shape!r}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (sx, sy, sz) in mm, got {spacing!r}")
    if noise_hu is not None and not (noise_hu >= 0 and math.isfinite(noise_hu)):
        raise ValueError(f"noise_hu must be a number >= 0 or None, got {noise_hu!r}")
    seed = int(seed)

    direction = random_direction(seed) if oriented else np.eye(3)
    size = np.array(shape[::-1])
    origin = -direction @ (np.array(spacing) * (size - 1) / 2)      # volume centre at (0, 0, 0)
    grid = Grid(shape, spacing, origin, direction)

    anat = draw_anatomy(seed)
    tissue = rasterise(anat, grid)
    image = render(anat, tissue, grid, np.random.default_rng([seed, 1]),
                   anat.noise_hu if noise_hu is None else float(noise_hu))
    label = (tissue == Tissue.PANCREAS).view(np.uint8)
    return Phantom(image=image, label=label, spacing=spacing, origin=tuple(float(o) for o in origin),
                   direction=tuple(float(d) for d in direction.ravel()), seed=seed)


# ------------------------------------------------------------------------------------ CLI

def montage_seeds():
    """The first seed of each contrast phase."""
    first = {}
    seed = 0
    while len(first) < len(CONTRAST_PHASES):
        first.setdefault(draw_anatomy(seed).phase, seed)
        seed += 1
    return sorted(first.values())


def save_montage(path, seeds=None, window=(-200, 300)):
    """PNG: for each seed an axial and a coronal slice through the pancreas, label contour in red
    (default seeds: the first of each contrast phase)."""
    seeds = montage_seeds() if seeds is None else seeds
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(seeds), figsize=(4.2 * len(seeds), 8.6), facecolor="black", squeeze=False)
    for col, seed in enumerate(seeds):
        t0 = time.perf_counter()
        ph = make_phantom(seed)
        dt = time.perf_counter() - t0
        anat = draw_anatomy(seed)
        sx, sy, sz = ph.spacing
        volume_ml = ph.label.sum() * sx * sy * sz / 1000
        k = int(np.argmax(ph.label.sum((1, 2))))
        j = int(np.argmax(ph.label.sum((0, 2))))
        views = [(ph.image[k], ph.label[k], sy / sx, f"axial k={k}"),
                 (ph.image[::-1, j], ph.label[::-1, j], sz / sx, f"coronal j={j}")]
        for row, (img, lab, aspect, name) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect,
                      interpolation="nearest")
            ax.contour(lab, levels=[0.5], colors=["#ff2a2a"], linewidths=1.0)
            ax.set_axis_off()
            ax.set_title(f"seed {seed} {name}" + (f"\n{anat.phase}, noise {anat.noise_hu:.0f} HU, "
                         f"pancreas {volume_ml:.0f} ml" if row == 0 else ""), color="white", fontsize=9)
        print(f"seed {seed}: {dt:.2f} s, phase {anat.phase}, pancreas {volume_ml:.1f} ml")
    fig.suptitle("Synthetic abdominal CT phantoms (TernarySegmentationLib/phantom.py), window "
                 "[-200, 300] HU; red: pancreas label. Image left = patient right, top = anterior / head.",
                 color="white", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, facecolor="black")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--montage", metavar="PNG", help="write a montage of a few cases")
    ap.add_argument("--nifti", metavar="DIR", help="write image_SEED.nii.gz / label_SEED.nii.gz")
    ap.add_argument("--seeds", type=int, nargs="+", help="default: montage: the first seed of each "
                    "contrast phase; nifti: 0 1 2 3")
    ap.add_argument("--oriented", action="store_true", help="--nifti: random rotated/flipped directions")
    args = ap.parse_args(argv)
    if not (args.montage or args.nifti):
        ap.error("nothing to do: give --montage and/or --nifti")
    if args.montage:
        save_montage(args.montage, args.seeds)
        print(f"wrote {args.montage}")
    if args.nifti:
        import os

        import SimpleITK as sitk

        os.makedirs(args.nifti, exist_ok=True)
        for seed in args.seeds or [0, 1, 2, 3]:
            image, label = make_phantom(seed, oriented=args.oriented).to_sitk()
            sitk.WriteImage(image, os.path.join(args.nifti, f"image_{seed}.nii.gz"))
            sitk.WriteImage(label, os.path.join(args.nifti, f"label_{seed}.nii.gz"))


if __name__ == "__main__":
    main()
