"""Benchmark inputs: phantom scans at a chosen size, subsets of them, and perturbed predictions.

Phantom sets are cached under the results folder by size and count, so a rerun
reuses them; their generation is not part of any measurement. Arrays in this
module stay in the files' own voxel order, since nothing here reorients them.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from ribfrac_ray.config import PhantomConfig
from ribfrac_ray.io.cases import find_cases
from ribfrac_ray.phantoms import find_existing_phantoms, make_phantoms

logger = logging.getLogger(__name__)

SPLIT = "train"
PHANTOM_SEED = 2020


@dataclass(frozen=True)
class DataSize:
    """Size of the benchmark data: voxels (x, y, z), spacing in mm, and scan count."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    n_scans: int
    max_fractures: int

    @property
    def int16_volume_mb(self) -> float:
        return float(np.prod(self.shape)) * 2 / 1e6

    def describe(self) -> str:
        x, y, z = self.shape
        sx, sy, sz = self.spacing
        return f"{x} x {y} x {z} voxels, {sx:g} x {sy:g} x {sz:g} mm"


# A typical RibFrac scan; real ones have 300-400 slices of about 1.25 mm.
REALISTIC = DataSize("realistic", (512, 512, 300), (0.7, 0.7, 1.25), n_scans=8, max_fractures=8)
# The phantom generator's default size, for checking the scripts in a few minutes.
QUICK = DataSize("quick", (128, 128, 96), (2.2, 2.2, 2.5), n_scans=3, max_fractures=4)


def ensure_phantoms(results_dir: Path, size: DataSize) -> Path:
    """Return a folder with ``size.n_scans`` phantom scans in the RibFrac layout (split "train")."""
    x, y, z = size.shape
    config = PhantomConfig(
        out=str(results_dir / f"phantoms-{x}x{y}x{z}-{size.n_scans}"),
        n_train=size.n_scans,
        n_val=0,
        n_test=0,
        shape=size.shape,
        spacing=size.spacing,
        max_fractures=size.max_fractures,
        seed=PHANTOM_SEED,
    )
    if find_existing_phantoms(config) is None:
        logger.info("writing %d phantom scans (%s) to %s", size.n_scans, size.describe(), config.out)
        make_phantoms(replace(config, overwrite=True))
    return Path(config.out)


def scan_files(data_dir: Path) -> list[tuple[str, Path, Path]]:
    """Return ``(public id, image file, label file)`` of every scan, in natural id order."""
    case_set = find_cases(data_dir, SPLIT, require_labels=True)
    if case_set.failures:
        raise ValueError(f"{data_dir}: {case_set.failures[0].reason}")
    return [(case.public_id, case.image_path, case.label_path) for case in case_set.cases]


def info_csv(data_dir: Path) -> Path:
    return data_dir / f"ribfrac-{SPLIT}-info.csv"


def make_subset(data_dir: Path, count: int, dest: Path) -> Path:
    """Link the first ``count`` scans of ``data_dir`` into ``dest`` in the same layout; return ``dest``."""
    scans = scan_files(data_dir)[:count]
    if len(scans) < count:
        raise ValueError(f"{data_dir} has {len(scans)} scans, fewer than the {count} requested")
    if dest.exists():
        shutil.rmtree(dest)
    for kind in ("images", "labels"):
        (dest / f"ribfrac-{SPLIT}-{kind}").mkdir(parents=True)
    for _, image, label in scans:
        (dest / f"ribfrac-{SPLIT}-images" / image.name).symlink_to(image.resolve())
        (dest / f"ribfrac-{SPLIT}-labels" / label.name).symlink_to(label.resolve())
    table = pd.read_csv(info_csv(data_dir))
    ids = {public_id for public_id, _, _ in scans}
    table[table["public_id"].isin(ids)].to_csv(info_csv(dest), index=False)
    return dest


def make_evaluation_folders(data_dir: Path, dest: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a ground-truth folder and a prediction folder made by perturbing the ground truth.

    The ground-truth folder links the label files and contains the info CSV, as the
    official evaluator expects. Each ground-truth instance is kept, dropped, shifted
    by up to 6 voxels, dilated or split in two. Each scan also gets 2 to 11 spherical
    false positives. Confidences are random with two decimals, so some equal the
    thresholds 0.00..0.99 exactly, and label codes are random.
    """
    rng = np.random.default_rng(seed)
    gt_dir, pred_dir = dest / "gt", dest / "pred"
    for folder in (gt_dir, pred_dir):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    shutil.copy(info_csv(data_dir), gt_dir / info_csv(data_dir).name)

    rows = []
    for public_id, _, label_path in scan_files(data_dir):
        (gt_dir / label_path.name).symlink_to(label_path.resolve())
        image = nib.load(str(label_path))
        label = np.asarray(image.dataobj).astype(np.uint8)
        prediction = perturb_instances(label, rng)
        count = int(prediction.max())
        nib.save(nib.Nifti1Image(prediction, image.affine), str(pred_dir / f"{public_id}.nii.gz"))

        rows.append((public_id, 0, 0.5, 0))
        for label_id in range(1, count + 1):
            confidence = round(float(rng.uniform(0.0, 1.0)), 2)
            rows.append((public_id, label_id, confidence, int(rng.choice([1, 2, 3, 4, -1]))))
    table = pd.DataFrame(rows, columns=["public_id", "label_id", "confidence", "label_code"])
    table.to_csv(pred_dir / f"ribfrac-{SPLIT}-pred.csv", index=False)
    return gt_dir, pred_dir


def perturb_instances(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return a uint8 prediction volume with ids 1..n made from the instances of ``label``."""
    margin = 8
    prediction = np.zeros_like(label, dtype=np.uint8)
    masks = []
    for found in ndimage.find_objects(label):
        if found is None:
            continue
        label_id = int(label[found].max())
        window = tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(found, label.shape))
        masks.extend(_perturbed_masks(label[window] == label_id, window, rng))
    masks.extend(_false_positive_masks(label.shape, rng))

    order = rng.permutation(len(masks))
    for new_id, index in enumerate(order, start=1):
        window, mask = masks[index]
        region = prediction[window]
        region[mask & (region == 0)] = new_id
    return prediction


def _perturbed_masks(mask: np.ndarray, window: tuple[slice, ...], rng: np.random.Generator):
    draw = rng.random()
    if draw < 0.2:
        return []
    if draw < 0.45:
        shift = tuple(int(v) for v in rng.integers(-6, 7, size=3))
        return [(window, np.roll(mask, shift, axis=(0, 1, 2)))]
    if draw < 0.6:
        return [(window, ndimage.binary_dilation(mask))]
    if draw < 0.7:
        cut = int(np.median(np.nonzero(mask)[0]))
        first = mask.copy()
        first[cut:] = False
        second = mask.copy()
        second[:cut] = False
        return [(window, part) for part in (first, second) if part.any()]
    return [(window, mask)]


def _false_positive_masks(shape: tuple[int, ...], rng: np.random.Generator):
    masks = []
    for _ in range(int(rng.integers(2, 12))):
        radius = int(rng.integers(2, 6))
        center = [int(rng.integers(int(0.1 * n) + radius, int(0.9 * n) - radius)) for n in shape]
        window = tuple(slice(c - radius, c + radius + 1) for c in center)
        grid = np.indices((2 * radius + 1,) * 3) - radius
        masks.append((window, (grid**2).sum(axis=0) <= radius**2))
    return masks
