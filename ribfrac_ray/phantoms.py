"""Seeded synthetic chest-CT phantoms with rib fractures, written in the RibFrac layout.

Each phantom is an int16 volume in Hounsfield units with air, a body of soft tissue
under a fat layer, two lungs, a heart, a spine, a sternum and up to 12 pairs of
ribs. The ribs are tubes with a bright cortex and darker marrow that follow the
chest wall and slope down toward the front. A fracture is a break across a rib
filled with soft tissue. Its label is a compact blob: the voxels of the rib, widened
by a few millimetres, within a sphere around the break.

Coordinates: arrays are canonical (x, y, z) voxels (RAS+, so +x is the patient's
right, +y anterior, +z superior). Anatomy is placed in millimetres relative to the
volume centre, so the same seed gives the same anatomy at any voxel size, apart
from the chest scaling down to fit a small field of view. The files use the
orientation of DICOM-derived RibFrac scans, affine diag(-sx, -sy, sz): the file's
x and y axes point to the patient's left and posterior.

All randomness comes from ``numpy.random.default_rng([seed, scan number])``, so the
same config writes byte-identical arrays.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from ribfrac_ray.config import ConfigError, PhantomConfig, config_to_dict
from ribfrac_ray.io.atomic import atomic_write_text, remove_stale_temporaries
from ribfrac_ray.io.nifti import VolumeGeometry, save_like

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Written into the output folder; --overwrite only replaces a folder that has it,
# so it can never delete a real RibFrac download.
MARKER_FILE = "phantoms.json"
_PHANTOM_FILE = re.compile(r"^RibFrac\d+-(image|label)\.nii(\.gz)?$")

# Hounsfield units of the tissues.
AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 45.0
MEDIASTINUM_HU = 35.0
LUNG_HU = -850.0
HEART_HU = 40.0
CSF_HU = 10.0
# Blood and soft tissue filling a break.
HEMATOMA_HU = 60.0
DISC_HU = 90.0
HU_MIN, HU_MAX = -1024, 3071

# Label codes of the RibFrac info CSV.
DISPLACED, NON_DISPLACED, BUCKLE, SEGMENTAL, IGNORE = 1, 2, 3, 4, -1
CODE_PROBABILITIES = {DISPLACED: 0.25, NON_DISPLACED: 0.35, BUCKLE: 0.17, SEGMENTAL: 0.15, IGNORE: 0.08}

MAX_RIB_PAIRS = 12
# The fracture label is the rib widened by this much (mm), within the label sphere.
LABEL_DILATION_MM = 3.0
# Scanner blur (Gaussian sigma, mm) applied before the noise.
BLUR_SIGMA_MM = 0.7
# At coarse spacing a break a few mm wide vanishes in partial-volume blur and a
# label blob shrinks to a handful of voxels, so gaps are widened to at least this
# many in-plane voxels and label spheres to at least this radius in voxels. At the
# RibFrac spacing (about 0.7 mm) the sizes in mm below apply unchanged.
MIN_GAP_VOXELS = 3.0
MIN_LABEL_RADIUS_VOXELS = 4.5
_PLACEMENT_ATTEMPTS = 200


@dataclass(frozen=True)
class _Grid:
    """Voxel centres in mm relative to the volume centre, one array per axis."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @classmethod
    def build(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> "_Grid":
        axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
        return cls(tuple(shape), tuple(spacing), axes[0], axes[1], axes[2])

    def extent(self, axis: int) -> float:
        return self.shape[axis] * self.spacing[axis]


@dataclass(frozen=True)
class _Anatomy:
    """Per-scan anatomy; lengths in mm, angles in radians, intensities in HU."""

    centre_x: float
    centre_y: float
    body_a: float  # half width of the body ellipse
    body_b: float  # half depth
    fat: float
    rib_a: float  # half axes of the ellipse the rib centre lines follow
    rib_b: float
    rib_half_thickness: float  # radial
    rib_half_height: float  # along z
    cortex: float
    cortex_hu: float
    marrow_hu: float
    rib_pitch: float
    rib_drop: float  # how much lower the front end of a rib lies than its back end
    angle_front: float  # rib span, measured from anterior
    angle_back: float
    top_rib_z: float
    vertebra_radius: float
    vertebra_hu: float
    vertebra_cortex_hu: float
    lung_apex_z: float
    lung_base_z: float
    dome_height: float
    noise_hu: float


@dataclass(frozen=True)
class _Rib:
    side: int  # +1 right (+x), -1 left
    index: int  # 0 is the top rib
    z_mid: float  # z of the centre line halfway along the rib


@dataclass(frozen=True)
class _Fracture:
    """One break: where it is, how it looks, and how far its label reaches."""

    label_id: int
    code: int
    kind: int  # the code whose look is drawn; IGNORE fractures look like another kind
    rib: _Rib
    angle: float
    centre: np.ndarray  # mm, shape (3,)
    tangent: np.ndarray  # unit vector along the rib, shape (3,)
    gap: float
    gap_offsets: tuple[float, ...]  # along-rib positions of the breaks relative to the centre
    shift: tuple[float, float]  # displacement of the far segment (radial, z) in mm
    shift_side: int
    shift_length: float
    label_radius: float


def generate_phantom(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    max_fractures: int,
    allow_empty: bool,
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Generate one phantom scan.

    ``shape`` is in voxels and ``spacing`` in mm, both (x, y, z). The number of
    fractures is drawn uniformly from 1..max_fractures, or from 0..max_fractures
    when ``allow_empty`` is True. When the ribs in view have no room for that many,
    fewer are placed and a warning is logged. If none fit and ``allow_empty`` is
    False, ValueError is raised.

    Returns the int16 image (HU), the uint8 instance label (0 background, 1..n) and
    the label code of each instance id, all arrays of shape ``shape``.
    """
    _check_geometry(shape, spacing)
    if max_fractures < 0 or (max_fractures == 0 and not allow_empty):
        raise ValueError(f"max_fractures must be >= 1 unless allow_empty is True, got {max_fractures}")

    grid = _Grid.build(shape, spacing)
    anatomy = _sample_anatomy(grid, rng)
    requested = int(rng.integers(0 if allow_empty else 1, max_fractures + 1))

    image = _render_soft_tissue(grid, anatomy)
    _render_spine(image, grid, anatomy)
    _render_sternum(image, grid, anatomy)

    ribs = _ribs_in_view(grid, anatomy)
    fractures = _place_fractures(ribs, grid, anatomy, rng, requested)
    if len(fractures) < requested:
        logger.warning("placed %d of %d fractures: the ribs in a %s volume at %s mm have no room for more",
                       len(fractures), requested, shape, spacing)
    if not fractures and not allow_empty:
        raise ValueError(f"no fracture fits in a {shape} volume at {spacing} mm; use a larger field of view")

    label = np.zeros(shape, dtype=np.uint8)
    _render_ribs(image, label, ribs, fractures, grid, anatomy)
    codes = {fracture.label_id: fracture.code for fracture in fractures}
    return _finish_image(image, grid, anatomy, rng), label, codes


def phantom_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Return a DICOM-like voxel-to-world affine (RAS+ mm): diag(-sx, -sy, sz) plus an origin.

    As in DICOM's LPS voxel order, the file's first voxel is the patient's
    right-anterior corner of the lowest slice. The volume is centred near world
    x = 0 and y = 0, and its lowest slice lies 150-400 mm below z = 0.
    """
    sx, sy, sz = spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[0, 3] = sx * (shape[0] - 1) / 2 + rng.uniform(-5.0, 5.0)
    affine[1, 3] = sy * (shape[1] - 1) / 2 + rng.uniform(-30.0, 10.0)
    affine[2, 3] = -rng.uniform(150.0, 400.0)
    return affine


def make_phantoms(config: PhantomConfig) -> dict[str, list[str]]:
    """Write the phantom data set in the RibFrac layout and return the public ids per split.

    Layout under ``config.out``: ``ribfrac-<split>-images/RibFracN-image.nii.gz``,
    ``ribfrac-<split>-labels/RibFracN-label.nii.gz`` and ``ribfrac-<split>-info.csv``
    for the splits train, val and test, numbered RibFrac1..N across splits. The real
    RibFrac test split has no labels; the phantoms' test split has them, so that a
    demo can score its predictions.

    A share ``config.no_fracture_fraction`` of each split (rounded) has no fracture.
    Existing files raise FileExistsError unless ``config.overwrite`` is set.
    """
    _check_config(config)
    out = Path(config.out)
    plan = _plan_splits(config)
    _prepare_output(out, plan, config.overwrite)

    written: dict[str, list[str]] = {split: [] for split in SPLITS}
    with tqdm(total=sum(len(cases) for cases in plan.values()), desc="phantoms", unit="scan") as progress:
        for split, cases in plan.items():
            rows = []
            for number, empty in cases:
                public_id = f"RibFrac{number}"
                codes = _write_scan(out, split, public_id, number, empty, config)
                rows.append((public_id, 0, 0))
                rows.extend((public_id, label_id, code) for label_id, code in sorted(codes.items()))
                written[split].append(public_id)
                progress.update(1)
            if cases:
                table = pd.DataFrame(rows, columns=["public_id", "label_id", "label_code"])
                atomic_write_text(out / f"ribfrac-{split}-info.csv", table.to_csv(index=False))

    marker = {"config": config_to_dict(config), "public_ids": written}
    atomic_write_text(out / MARKER_FILE, json.dumps(marker, indent=2) + "\n")
    logger.info("wrote %d phantom scans to %s", sum(len(ids) for ids in written.values()), out)
    return written


def find_existing_phantoms(config: PhantomConfig) -> dict[str, list[str]] | None:
    """Return the ids per split if ``config.out`` already holds this exact phantom set, else None.

    The set is the same when the marker's settings equal ``config`` (``out`` and
    ``overwrite`` aside) and every listed image and label file exists.
    """
    out = Path(config.out)
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ignored = ("out", "overwrite")
    wanted = {k: v for k, v in config_to_dict(config).items() if k not in ignored}
    stored = {k: v for k, v in marker.get("config", {}).items() if k not in ignored}
    if wanted != stored:
        return None
    public_ids = marker.get("public_ids", {})
    for split, ids in public_ids.items():
        for public_id in ids:
            for kind in ("image", "label"):
                if not (out / f"ribfrac-{split}-{kind}s" / f"{public_id}-{kind}.nii.gz").is_file():
                    return None
    return public_ids


# ----------------------------------------------------------------------------- writing


def _write_scan(out: Path, split: str, public_id: str, number: int, empty: bool, config: PhantomConfig) -> dict[int, int]:
    """Generate one scan and write its image and label; return its label codes."""
    started = time.perf_counter()
    rng = np.random.default_rng([config.seed, number])
    image, label, codes = generate_phantom(
        config.shape, config.spacing, rng,
        max_fractures=0 if empty else config.max_fractures,
        allow_empty=empty or config.max_fractures == 0,
    )

    geometry = VolumeGeometry.from_affine(config.shape, phantom_affine(config.shape, config.spacing, rng))
    save_like(image, geometry, out / f"ribfrac-{split}-images" / f"{public_id}-image.nii.gz", dtype=np.int16)
    save_like(label, geometry, out / f"ribfrac-{split}-labels" / f"{public_id}-label.nii.gz", dtype=np.uint8)
    logger.info("%s (%s): %d fracture(s), codes %s, %.2f s", public_id, split, len(codes),
                sorted(codes.values()), time.perf_counter() - started)
    return codes


def _plan_splits(config: PhantomConfig) -> dict[str, list[tuple[int, bool]]]:
    """Return, per split, the scan numbers and whether each scan has no fracture."""
    plan: dict[str, list[tuple[int, bool]]] = {}
    next_number = 1
    for split_index, (split, count) in enumerate(zip(SPLITS, (config.n_train, config.n_val, config.n_test))):
        n_empty = int(round(config.no_fracture_fraction * count))
        # The tag 1 keeps this stream apart from the per-scan streams [seed, number].
        chooser = np.random.default_rng([config.seed, 1, split_index])
        empty = set(chooser.choice(count, size=n_empty, replace=False).tolist()) if n_empty else set()
        plan[split] = [(next_number + i, i in empty) for i in range(count)]
        next_number += count
    return plan


def _prepare_output(out: Path, plan: dict[str, list[tuple[int, bool]]], overwrite: bool) -> None:
    """Raise if earlier files are in the way; with ``overwrite``, remove stale phantom scans."""
    folders = [out / f"ribfrac-{split}-{kind}" for split in SPLITS for kind in ("images", "labels")]
    existing = [path for folder in folders if folder.is_dir() for path in sorted(folder.iterdir())
                if path.name.endswith((".nii", ".nii.gz")) and not path.name.startswith(".")]
    existing += [path for split in SPLITS if (path := out / f"ribfrac-{split}-info.csv").exists()]
    if not existing:
        return

    if not overwrite:
        raise FileExistsError(
            f"{existing[0].parent} already contains {existing[0].name} ({len(existing)} existing files "
            f"under {out}); pass --overwrite to replace the phantom data set, or choose another --out"
        )
    if not (out / MARKER_FILE).is_file():
        raise FileExistsError(
            f"{out} contains RibFrac files but no {MARKER_FILE}, so it is not a phantom data set; "
            "--overwrite only replaces phantoms, so choose another --out"
        )

    keep = {split: {f"RibFrac{number}" for number, _ in cases} for split, cases in plan.items()}
    stale = [path for path in existing
             if _PHANTOM_FILE.match(path.name) and path.name.split("-")[0] not in keep[_split_of(path.parent)]]
    stale += [path for split, cases in plan.items()
              if not cases and (path := out / f"ribfrac-{split}-info.csv").exists()]
    for path in stale:
        path.unlink()
    for folder in folders:
        remove_stale_temporaries(folder)
    if stale:
        logger.info("removed %d phantom files of an earlier, larger data set in %s", len(stale), out)


def _split_of(folder: Path) -> str:
    """Return the split of a ``ribfrac-<split>-images`` or ``-labels`` folder."""
    return folder.name.split("-")[1]


def _check_config(config: PhantomConfig) -> None:
    _check_geometry(config.shape, config.spacing)
    for name in ("n_train", "n_val", "n_test", "max_fractures", "seed"):
        if getattr(config, name) < 0:
            raise ConfigError(f"phantoms.{name} must be >= 0, got {getattr(config, name)}")
    if config.max_fractures > 255:
        raise ConfigError(f"phantoms.max_fractures must be <= 255 (uint8 labels), got {config.max_fractures}")
    if not 0.0 <= config.no_fracture_fraction <= 1.0:
        raise ConfigError(f"phantoms.no_fracture_fraction must be in [0, 1], got {config.no_fracture_fraction}")


def _check_geometry(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    if len(shape) != 3 or any(int(n) < 16 for n in shape):
        raise ConfigError(f"phantom shape must be three sizes of at least 16 voxels, got {shape}")
    if len(spacing) != 3 or any(not 0.1 <= float(s) <= 10.0 for s in spacing):
        raise ConfigError(f"phantom spacing must be three values in [0.1, 10] mm, got {spacing}")


# ----------------------------------------------------------------------------- anatomy


def _sample_anatomy(grid: _Grid, rng: np.random.Generator) -> _Anatomy:
    """Draw one patient's anatomy in mm.

    The chest is scaled down in-plane when the field of view is narrower than about
    2.2 body half-widths (256-294 mm); rib size and spacing along z are not scaled.
    """
    body_a = rng.uniform(118.0, 135.0)
    body_b = rng.uniform(85.0, 100.0)
    scale = min(1.0, 0.46 * grid.extent(0) / body_a, 0.46 * grid.extent(1) / body_b)
    body_a, body_b = body_a * scale, body_b * scale
    fat = rng.uniform(6.0, 14.0) * scale
    muscle = rng.uniform(8.0, 12.0) * scale
    half_thickness = rng.uniform(3.5, 4.5)
    half_height = rng.uniform(5.0, 6.5)

    pitch = rng.uniform(19.0, 23.0)
    drop = rng.uniform(20.0, 30.0)
    top_rib_z = float(grid.z[-1]) - drop / 2 - half_height - rng.uniform(3.0, 10.0)
    # A chest taller than the field of view is centred; a shorter one is cut at the bottom.
    cage_height = (MAX_RIB_PAIRS - 1) * pitch + drop
    top_rib_z = min(top_rib_z, cage_height / 2)
    lung_apex_z = top_rib_z + rng.uniform(8.0, 15.0)
    lung_base_z = top_rib_z - rng.uniform(8.5, 9.5) * pitch

    return _Anatomy(
        centre_x=rng.uniform(-6.0, 6.0) * scale,
        centre_y=rng.uniform(-6.0, 6.0) * scale,
        body_a=body_a,
        body_b=body_b,
        fat=fat,
        rib_a=body_a - fat - muscle - half_thickness,
        rib_b=body_b - fat - muscle - half_thickness,
        rib_half_thickness=half_thickness,
        rib_half_height=half_height,
        cortex=rng.uniform(1.5, 2.2),
        cortex_hu=rng.uniform(750.0, 1100.0),
        marrow_hu=rng.uniform(200.0, 300.0),
        rib_pitch=pitch,
        rib_drop=drop,
        angle_front=math.radians(rng.uniform(22.0, 30.0)),
        angle_back=math.radians(rng.uniform(158.0, 165.0)),
        top_rib_z=top_rib_z,
        vertebra_radius=rng.uniform(15.0, 19.0) * scale,
        vertebra_hu=rng.uniform(220.0, 300.0),
        vertebra_cortex_hu=rng.uniform(550.0, 700.0),
        lung_apex_z=lung_apex_z,
        lung_base_z=lung_base_z,
        dome_height=rng.uniform(25.0, 40.0),
        noise_hu=rng.uniform(20.0, 35.0),
    )


def _plane(grid: _Grid, anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Return in-plane coordinates (mm, shape (nx, ny)) relative to the chest centre."""
    x = (grid.x - anatomy.centre_x)[:, None]
    y = (grid.y - anatomy.centre_y)[None, :]
    return np.broadcast_to(x, (grid.shape[0], grid.shape[1])), np.broadcast_to(y, (grid.shape[0], grid.shape[1]))


def _render_soft_tissue(grid: _Grid, anatomy: _Anatomy) -> np.ndarray:
    """Return a float32 volume with air, fat, muscle, mediastinum, lungs and heart."""
    x, y = _plane(grid, anatomy)
    body = (x / anatomy.body_a) ** 2 + (y / anatomy.body_b) ** 2 <= 1
    inner_a, inner_b = anatomy.body_a - anatomy.fat, anatomy.body_b - anatomy.fat
    muscle = (x / inner_a) ** 2 + (y / inner_b) ** 2 <= 1
    cavity_a = anatomy.rib_a - anatomy.rib_half_thickness - 3.0
    cavity_b = anatomy.rib_b - anatomy.rib_half_thickness - 3.0
    cavity = (x / cavity_a) ** 2 + (y / cavity_b) ** 2 <= 1

    plane = np.full(body.shape, AIR_HU, dtype=np.float32)
    plane[body] = FAT_HU
    plane[muscle] = MUSCLE_HU
    plane[cavity] = MEDIASTINUM_HU
    image = np.empty(grid.shape, dtype=np.float32)
    image[...] = plane[:, :, None]

    for side in (1, -1):
        _render_lung(image, grid, anatomy, x, y, cavity, side)
    _render_heart(image, grid, anatomy, x, y, cavity_a, cavity_b)
    return image


def _render_lung(image: np.ndarray, grid: _Grid, anatomy: _Anatomy, x: np.ndarray, y: np.ndarray,
                 cavity: np.ndarray, side: int) -> None:
    """Fill one lung: an ellipse clipped by the rib cage, with a pointed apex and a domed base."""
    cavity_a = anatomy.rib_a - anatomy.rib_half_thickness - 3.0
    centre = side * 0.5 * cavity_a
    radius_sq = ((x - centre) / (0.62 * cavity_a)) ** 2 + (y / (1.05 * anatomy.rib_b)) ** 2
    mediastinum = 0.14 * cavity_a + 4.0
    footprint = cavity & (radius_sq <= 1) & (side * x > mediastinum)

    z_lo = anatomy.lung_base_z
    z_hi = anatomy.lung_apex_z
    slab = np.flatnonzero((grid.z >= z_lo) & (grid.z <= z_hi))
    if slab.size == 0 or not footprint.any():
        return
    z = grid.z[slab]
    shoulder = z_hi - 60.0
    taper = np.where(z > shoulder, 1 - ((z - shoulder) / (z_hi - shoulder)) ** 2, 1.0)
    diaphragm = z_lo + anatomy.dome_height * (1 - np.minimum(radius_sq, 1.0))

    inside = (radius_sq[:, :, None] <= taper[None, None, :]) & (z[None, None, :] >= diaphragm[:, :, None])
    inside &= footprint[:, :, None]
    view = image[:, :, slab[0]:slab[-1] + 1]
    view[inside] = LUNG_HU


def _render_heart(image: np.ndarray, grid: _Grid, anatomy: _Anatomy, x: np.ndarray, y: np.ndarray,
                  cavity_a: float, cavity_b: float) -> None:
    """Fill the heart: an ellipsoid left of centre and in front, resting on the diaphragm."""
    centre_z = anatomy.lung_base_z + anatomy.dome_height + 25.0
    half_z = 50.0
    slab = np.flatnonzero(np.abs(grid.z - centre_z) <= half_z)
    if slab.size == 0:
        return
    radius_sq = ((x + 0.22 * cavity_a) / (0.42 * cavity_a)) ** 2 + ((y - 0.2 * cavity_b) / (0.55 * cavity_b)) ** 2
    z_term = ((grid.z[slab] - centre_z) / half_z) ** 2
    inside = radius_sq[:, :, None] + z_term[None, None, :] <= 1
    view = image[:, :, slab[0]:slab[-1] + 1]
    view[inside] = HEART_HU


def _render_spine(image: np.ndarray, grid: _Grid, anatomy: _Anatomy) -> None:
    """Draw vertebral bodies with discs, the spinal canal and the posterior arch."""
    x, y = _plane(grid, anatomy)
    radius = anatomy.vertebra_radius
    body_y = -anatomy.rib_b + radius + 10.0
    canal_radius = 0.45 * radius
    canal_y = body_y - radius - canal_radius - 2.0
    distance_body = np.hypot(x, y - body_y)
    distance_canal = np.hypot(x, y - canal_y)

    body = distance_body <= radius
    shell = body & (distance_body > radius - 2.0)
    arch = (distance_canal <= canal_radius + 4.0) & (y < canal_y + canal_radius)
    spinous = (np.abs(x) <= 4.0) & (y <= canal_y) & (y >= canal_y - canal_radius - 14.0)
    transverse = (np.abs(y - canal_y) <= 4.0) & (np.abs(x) <= 2.2 * radius)
    bone = (arch | spinous | transverse) & ~body
    canal = distance_canal <= canal_radius

    # Discs repeat once per rib level, 5 mm thick.
    disc = np.mod(grid.z - anatomy.top_rib_z, anatomy.rib_pitch) < 5.0
    for k in range(grid.shape[2]):
        section = image[:, :, k]
        section[bone] = anatomy.vertebra_cortex_hu - 100.0
        section[body] = DISC_HU if disc[k] else anatomy.vertebra_hu
        if not disc[k]:
            section[shell] = anatomy.vertebra_cortex_hu
        section[canal] = CSF_HU


def _render_sternum(image: np.ndarray, grid: _Grid, anatomy: _Anatomy) -> None:
    """Draw the sternum in front, from the lung apex down about seven rib levels."""
    x, y = _plane(grid, anatomy)
    centre_y = anatomy.rib_b - 2.0
    outer = (x / 14.0) ** 2 + ((y - centre_y) / 6.0) ** 2 <= 1
    inner = (x / 12.0) ** 2 + ((y - centre_y) / 4.0) ** 2 <= 1
    top = anatomy.lung_apex_z - 10.0
    bottom = anatomy.top_rib_z - 7 * anatomy.rib_pitch
    for k in np.flatnonzero((grid.z <= top) & (grid.z >= bottom)):
        section = image[:, :, k]
        section[outer] = anatomy.cortex_hu * 0.7
        section[inner] = anatomy.marrow_hu


def _finish_image(image: np.ndarray, grid: _Grid, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Blur, add Gaussian noise and round to int16 HU, in blocks of x to bound memory."""
    sigma = [BLUR_SIGMA_MM / s for s in grid.spacing]
    blurred = ndimage.gaussian_filter(image, sigma=sigma, truncate=3.0, output=np.float32)
    del image

    result = np.empty(grid.shape, dtype=np.int16)
    block = 32
    for start in range(0, grid.shape[0], block):
        stop = min(start + block, grid.shape[0])
        part = blurred[start:stop]
        part += rng.standard_normal(part.shape, dtype=np.float32) * np.float32(anatomy.noise_hu)
        np.rint(part, out=part)
        np.clip(part, HU_MIN, HU_MAX, out=part)
        result[start:stop] = part
    return result


# ----------------------------------------------------------------------------- ribs


def _rib_centre_z(rib: _Rib, angle: np.ndarray | float, anatomy: _Anatomy) -> np.ndarray | float:
    """Return the z (mm) of a rib's centre line at parametric angle ``angle`` (0 = front)."""
    span = anatomy.angle_back - anatomy.angle_front
    middle = (anatomy.angle_back + anatomy.angle_front) / 2
    return rib.z_mid + anatomy.rib_drop * (angle - middle) / span


def _rib_point(rib: _Rib, angle: float, anatomy: _Anatomy) -> np.ndarray:
    """Return the mm position (x, y, z) of a rib's centre line at ``angle``."""
    return np.array([
        anatomy.centre_x + rib.side * anatomy.rib_a * math.sin(angle),
        anatomy.centre_y + anatomy.rib_b * math.cos(angle),
        _rib_centre_z(rib, angle, anatomy),
    ])


def _rib_tangent(rib: _Rib, angle: float, anatomy: _Anatomy) -> np.ndarray:
    span = anatomy.angle_back - anatomy.angle_front
    tangent = np.array([
        rib.side * anatomy.rib_a * math.cos(angle),
        -anatomy.rib_b * math.sin(angle),
        anatomy.rib_drop / span,
    ])
    return tangent / np.linalg.norm(tangent)


def _ribs_in_view(grid: _Grid, anatomy: _Anatomy) -> list[_Rib]:
    """Return the ribs that reach into the volume, top rib first, right before left."""
    reach = anatomy.rib_drop / 2 + anatomy.rib_half_height
    ribs = []
    for index in range(MAX_RIB_PAIRS):
        z_mid = anatomy.top_rib_z - index * anatomy.rib_pitch
        if z_mid + reach < grid.z[0]:
            break
        ribs.extend(_Rib(side, index, z_mid) for side in (1, -1))
    return ribs


def _place_fractures(ribs: list[_Rib], grid: _Grid, anatomy: _Anatomy, rng: np.random.Generator,
                     requested: int) -> list[_Fracture]:
    """Draw up to ``requested`` fractures, at most one per rib, whose labels cannot touch."""
    # Two voxels of different blobs touch when their centres are within one voxel diagonal.
    clearance = 2 * float(np.linalg.norm(grid.spacing))
    low = np.array([grid.x[0], grid.y[0], grid.z[0]], dtype=np.float64)
    high = np.array([grid.x[-1], grid.y[-1], grid.z[-1]], dtype=np.float64)
    fractures: list[_Fracture] = []
    used_ribs: set[_Rib] = set()

    for _ in range(requested):
        for _ in range(_PLACEMENT_ATTEMPTS):
            candidate = _draw_fracture(ribs, grid, anatomy, rng, label_id=len(fractures) + 1)
            if candidate is None or candidate.rib in used_ribs:
                continue
            margin = candidate.label_radius + max(grid.spacing)
            if np.any(candidate.centre - margin < low) or np.any(candidate.centre + margin > high):
                continue
            if all(np.linalg.norm(candidate.centre - other.centre) > candidate.label_radius + other.label_radius + clearance
                   for other in fractures):
                fractures.append(candidate)
                used_ribs.add(candidate.rib)
                break
        else:
            break
    return fractures


def _draw_fracture(ribs: list[_Rib], grid: _Grid, anatomy: _Anatomy, rng: np.random.Generator,
                   label_id: int) -> _Fracture | None:
    """Draw one fracture's type, rib, position and shape."""
    if not ribs:
        return None
    codes = list(CODE_PROBABILITIES)
    code = int(rng.choice(codes, p=list(CODE_PROBABILITIES.values())))
    kind = int(rng.choice([NON_DISPLACED, BUCKLE])) if code == IGNORE else code
    rib = ribs[int(rng.integers(len(ribs)))]

    min_gap = MIN_GAP_VOXELS * max(grid.spacing[0], grid.spacing[1])
    min_radius = MIN_LABEL_RADIUS_VOXELS * max(grid.spacing[0], grid.spacing[1])
    label_radius = max(rng.uniform(6.5, 9.0), min_radius)
    gap_offsets: tuple[float, ...] = (0.0,)
    shift, shift_side, shift_length = (0.0, 0.0), 1, 1.0
    if kind == DISPLACED:
        gap = max(rng.uniform(5.0, 7.0), min_gap)
        magnitude, direction = rng.uniform(2.5, 5.0), rng.uniform(0.0, 2 * math.pi)
        shift = (magnitude * math.cos(direction), magnitude * math.sin(direction))
        shift_side = int(rng.choice([-1, 1]))
        shift_length = rng.uniform(15.0, 25.0)
    elif kind == SEGMENTAL:
        gap = max(rng.uniform(4.0, 5.5), min_gap)
        separation = rng.uniform(8.0, 11.0) + gap
        gap_offsets = (-separation / 2, separation / 2)
        # One label covers both breaks, about 2.5 mm past each.
        label_radius = max(rng.uniform(5.0, 6.5), min_radius) + separation / 2
    else:
        gap = max(rng.uniform(4.5, 6.5), min_gap)

    # Keep the label sphere off the rib's ends.
    end_margin = (label_radius + 3.0) / min(anatomy.rib_a, anatomy.rib_b)
    low, high = anatomy.angle_front + end_margin, anatomy.angle_back - end_margin
    if low >= high:
        return None
    angle = rng.uniform(low, high)
    return _Fracture(
        label_id=label_id, code=code, kind=kind, rib=rib, angle=angle,
        centre=_rib_point(rib, angle, anatomy), tangent=_rib_tangent(rib, angle, anatomy),
        gap=gap, gap_offsets=gap_offsets, shift=shift, shift_side=shift_side,
        shift_length=shift_length, label_radius=label_radius,
    )


@dataclass
class _RibColumns:
    """The (x, y) columns near the rib ellipse on one side, with their rib coordinates."""

    i: np.ndarray
    j: np.ndarray
    x: np.ndarray  # mm
    y: np.ndarray
    angle: np.ndarray  # parametric angle, 0 at the front
    radial: np.ndarray  # signed distance from the rib ellipse, mm, positive outside


def _rib_columns(grid: _Grid, anatomy: _Anatomy, side: int, reach: float) -> _RibColumns:
    """Find the columns within ``reach`` mm of one side's rib ellipse."""
    x, y = _plane(grid, anatomy)
    a, b = anatomy.rib_a, anatomy.rib_b
    level = (x / a) ** 2 + (y / b) ** 2 - 1
    gradient = 2 * np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2)
    # First-order distance to the ellipse; exact on it and close within a few cm.
    radial = level / np.maximum(gradient, 1e-6)
    i, j = np.nonzero((np.abs(radial) <= reach) & (side * x > 0))
    column_x = grid.x[i].astype(np.float64)
    column_y = grid.y[j].astype(np.float64)
    angle = np.arctan2(np.abs(column_x - anatomy.centre_x) / a, (column_y - anatomy.centre_y) / b)
    return _RibColumns(i, j, column_x, column_y, angle, radial[i, j].astype(np.float64))


def _render_ribs(image: np.ndarray, label: np.ndarray, ribs: list[_Rib], fractures: list[_Fracture],
                 grid: _Grid, anatomy: _Anatomy) -> None:
    """Draw every rib with its fractures into ``image`` and the fracture blobs into ``label``."""
    max_shift = 5.0
    reach = anatomy.rib_half_thickness + LABEL_DILATION_MM + max_shift + 2 * max(grid.spacing)
    columns = {side: _rib_columns(grid, anatomy, side, reach) for side in (1, -1)}
    by_rib = {fracture.rib: fracture for fracture in fractures}
    for rib in ribs:
        _render_rib(image, label, rib, by_rib.get(rib), columns[rib.side], grid, anatomy, reach)


def _render_rib(image: np.ndarray, label: np.ndarray, rib: _Rib, fracture: _Fracture | None,
                columns: _RibColumns, grid: _Grid, anatomy: _Anatomy, reach: float) -> None:
    """Draw one rib on the (column, z) grid around it."""
    along_rib = (columns.angle >= anatomy.angle_front) & (columns.angle <= anatomy.angle_back)
    if not along_rib.any():
        return
    cols = np.flatnonzero(along_rib)
    centre_z = _rib_centre_z(rib, columns.angle[cols], anatomy)
    z_reach = anatomy.rib_half_height + reach
    slab = np.flatnonzero((grid.z >= centre_z.min() - z_reach) & (grid.z <= centre_z.max() + z_reach))
    if slab.size == 0:
        return

    radial = np.broadcast_to(columns.radial[cols, None], (cols.size, slab.size))
    dz = grid.z[None, slab].astype(np.float64) - centre_z[:, None]
    shape = _RibShape(radial, dz, anatomy)
    index = (columns.i[cols, None], columns.j[cols, None], slab[None, :])
    values = image[index]

    if fracture is None:
        values[shape.bone()] = anatomy.cortex_hu
        values[shape.marrow()] = anatomy.marrow_hu
        image[index] = values
        return

    offset = np.stack(np.broadcast_arrays(
        columns.x[cols, None] - fracture.centre[0],
        columns.y[cols, None] - fracture.centre[1],
        dz + centre_z[:, None] - fracture.centre[2],
    ))
    along = np.tensordot(fracture.tangent, offset, axes=1)
    distance = np.sqrt((offset**2).sum(axis=0))
    broken = _FracturedRibShape(shape, fracture, along, anatomy)

    bone = broken.bone()
    values[bone] = anatomy.cortex_hu
    values[broken.marrow()] = anatomy.marrow_hu
    values[broken.gap_fill() & ~bone] = HEMATOMA_HU
    image[index] = values

    blob = (distance <= fracture.label_radius) & (shape.widened() | broken.widened())
    patch = label[index]
    patch[blob] = fracture.label_id
    label[index] = patch


class _RibShape:
    """Inside tests for a rib cross-section, from radial and z offsets (mm) to the centre line."""

    def __init__(self, radial: np.ndarray, dz: np.ndarray, anatomy: _Anatomy):
        self.radial = radial
        self.dz = dz
        self.anatomy = anatomy

    def _within(self, grow: float) -> np.ndarray:
        a = self.anatomy.rib_half_thickness + grow
        b = self.anatomy.rib_half_height + grow
        return (self.radial / a) ** 2 + (self.dz / b) ** 2 <= 1

    def bone(self) -> np.ndarray:
        return self._within(0.0)

    def marrow(self) -> np.ndarray:
        return self._within(-self.anatomy.cortex)

    def widened(self) -> np.ndarray:
        return self._within(LABEL_DILATION_MM)


class _FracturedRibShape:
    """A rib shape with breaks cut out and, for displaced fractures, the far segment moved.

    ``along`` is each grid point's signed distance (mm) from the break along the rib.
    The displacement is full at the edge of the break and fades to zero over
    ``shift_length`` mm, so the rib bends back instead of showing a second step.
    """

    def __init__(self, shape: _RibShape, fracture: _Fracture, along: np.ndarray, anatomy: _Anatomy):
        beyond = fracture.shift_side * along - fracture.gap / 2
        weight = np.where(beyond > 0, np.clip(1 - beyond / fracture.shift_length, 0.0, 1.0), 0.0)
        self.moved = _RibShape(shape.radial - weight * fracture.shift[0], shape.dz - weight * fracture.shift[1], anatomy)
        self.original = shape
        in_gap = np.zeros(along.shape, dtype=bool)
        for offset in fracture.gap_offsets:
            in_gap |= np.abs(along - offset) < fracture.gap / 2
        if fracture.kind == BUCKLE:
            # An incomplete break: only the outer part of the cross-section is cut.
            in_gap &= self.moved.radial > -0.2 * anatomy.rib_half_thickness
        self.in_gap = in_gap

    def bone(self) -> np.ndarray:
        return self.moved.bone() & ~self.in_gap

    def marrow(self) -> np.ndarray:
        return self.moved.marrow() & ~self.in_gap

    def gap_fill(self) -> np.ndarray:
        return self.in_gap & (self.original.bone() | self.moved.bone())

    def widened(self) -> np.ndarray:
        return self.moved.widened()
