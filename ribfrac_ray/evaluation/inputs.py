"""Evaluation inputs: pairing label files by scan id, reading them, and reading the info CSVs.

Volumes stay in the files' own voxel order, because the challenge's overlap rule
depends on the C order of voxels (see :mod:`ribfrac_ray.evaluation.matching`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ribfrac_ray.io.cases import VALID_LABEL_CODES, read_info_csv
from ribfrac_ray.io.nifti import VolumeError

logger = logging.getLogger(__name__)

# The official evaluator derives the scan id by deleting these parts anywhere in the name.
_ID_NOISE = re.compile(r"(\.nii)|(\.gz)|(-label)")
PREDICTION_COLUMNS = ("public_id", "label_id", "confidence", "label_code")
_LABELS_FOLDER = re.compile(r"^ribfrac-(?P<split>[A-Za-z0-9]+)-labels(?P<part>-\d+)?$")


def scan_id_from_name(name: str) -> str:
    """Return the scan id of a file name: ``RibFrac7-label.nii.gz`` and ``RibFrac7.nii`` give ``RibFrac7``."""
    return _ID_NOISE.sub("", name)


def list_label_files(folder: Path) -> dict[str, Path]:
    """Map scan id to ``.nii``/``.nii.gz`` file in ``folder``; hidden files are skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"label folder not found: {folder}")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith((".nii", ".nii.gz")):
            continue
        scan_id = scan_id_from_name(path.name)
        if scan_id in files:
            raise ValueError(
                f"{folder}: both {files[scan_id].name} and {path.name} give scan id {scan_id!r}; "
                "keep one file per scan"
            )
        files[scan_id] = path
    return files


def pair_label_files(gt_dir: Path, pred_dir: Path) -> list[tuple[str, Path, Path]]:
    """Return ``(scan id, ground-truth file, prediction file)`` for every scan, sorted by id.

    Raises ValueError when the folders do not contain the same scan ids, as the
    challenge requires a prediction for every ground-truth scan and nothing else.
    """
    gt_files = list_label_files(gt_dir)
    pred_files = list_label_files(pred_dir)
    if not gt_files:
        raise ValueError(f"no .nii or .nii.gz files in the ground-truth folder {gt_dir}")

    missing = sorted(set(gt_files) - set(pred_files))
    extra = sorted(set(pred_files) - set(gt_files))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no prediction in {pred_dir} for {_preview(missing)}")
        if extra:
            parts.append(f"predictions in {pred_dir} for {_preview(extra)} have no ground truth in {gt_dir}")
        raise ValueError("; ".join(parts) + "; both folders must contain the same scan ids")

    return [(scan_id, gt_files[scan_id], pred_files[scan_id]) for scan_id in sorted(gt_files)]


def load_label_volume(path: Path) -> np.ndarray:
    """Read an instance-label volume as uint8 in the file's voxel order, shape (x, y, z).

    The values equal those the official evaluator computes: the data scaled to
    float64 and cast to uint8. Integer data within 0..255 is cast directly, which gives the same
    values faster. Anything else takes the float64 path, where values outside 0..255
    wrap or saturate as the platform's float-to-uint8 cast does, so such a file is
    logged as a warning.
    """
    image = _open_label_image(path)
    shape = tuple(int(size) for size in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(path, f"expected a 3D label volume, got shape {tuple(image.shape)}",
                          "write one 3D volume (x, y, z) per scan")

    proxy = image.dataobj
    unscaled = getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0
    if unscaled and np.issubdtype(proxy.dtype, np.integer):
        data = np.asarray(proxy.get_unscaled()).reshape(shape)
        if data.size == 0 or (data.min() >= 0 and data.max() <= 255):
            return data.astype(np.uint8, copy=False)

    data = np.asarray(image.get_fdata(dtype=np.float64)).reshape(shape)
    if data.size and (data.min() < 0 or data.max() > 255 or not np.array_equal(data, np.round(data))):
        logger.warning(
            "%s: label values range %s..%s or are not whole numbers; casting to uint8 as the "
            "challenge evaluator does (values outside 0..255 wrap)", path, data.min(), data.max(),
        )
    with np.errstate(invalid="ignore"):
        return data.astype(np.uint8)


def read_prediction_csv(path: Path) -> pd.DataFrame:
    """Read a prediction CSV with columns ``public_id, label_id, confidence, label_code``.

    Raises ValueError naming the file for a missing column, a non-integer id or code,
    an unknown code, a missing or non-numeric confidence on an instance row, or a
    repeated (public_id, label_id) pair.
    """
    table = _read_csv(path)
    missing = [column for column in PREDICTION_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; the prediction CSV needs columns "
            f"{', '.join(PREDICTION_COLUMNS)}"
        )

    table["public_id"] = table["public_id"].astype(str).str.strip()
    for column in ("label_id", "label_code"):
        table[column] = _integer_column(table, column, path)
    unknown = sorted(set(table["label_code"]) - VALID_LABEL_CODES)
    if unknown:
        raise ValueError(f"{path}: unknown label_code values {unknown}; valid codes are -1, 0, 1, 2, 3, 4")

    confidence = pd.to_numeric(table["confidence"], errors="coerce")
    bad = table[(table["label_id"] > 0) & confidence.isna()]
    if len(bad):
        raise ValueError(
            f"{path}: rows {_row_preview(bad)} have a missing or non-numeric confidence; "
            "give every predicted instance a confidence in [0, 1]"
        )
    table["confidence"] = confidence
    _reject_duplicate_rows(table, path)
    return table


def read_ground_truth_csv(path: Path) -> pd.DataFrame:
    """Read a ``public_id, label_id, label_code`` info CSV; repeated rows raise ValueError."""
    table = read_info_csv(path)
    table["public_id"] = table["public_id"].astype(str).str.strip()
    _reject_duplicate_rows(table, path)
    return table


def find_prediction_csv(pred_dir: Path) -> Path:
    """Return the single ``*.csv`` file in ``pred_dir``."""
    candidates = sorted(pred_dir.glob("*.csv"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FileNotFoundError(f"no prediction CSV (*.csv) in {pred_dir}; pass the CSV path explicitly")
    raise ValueError(f"{pred_dir} contains several CSV files {[p.name for p in candidates]}; pass the prediction CSV explicitly")


def find_ground_truth_csv(gt_dir: Path) -> Path:
    """Return the info CSV for ``gt_dir``.

    The challenge evaluator expects it inside the label folder. The RibFrac download
    keeps it beside the folder instead, as ``ribfrac-<split>-info.csv`` next to
    ``ribfrac-<split>-labels`` (with ``-1``/``-2`` part suffixes), so that place is
    tried second.
    """
    inside = sorted(gt_dir.glob("*.csv"))
    if len(inside) == 1:
        return inside[0]
    if len(inside) > 1:
        raise ValueError(f"{gt_dir} contains several CSV files {[p.name for p in inside]}; pass the info CSV explicitly")

    match = _LABELS_FOLDER.match(gt_dir.resolve().name)
    if match:
        beside = gt_dir.resolve().parent / f"ribfrac-{match['split']}-info{match['part'] or ''}.csv"
        if beside.is_file():
            return beside
    raise FileNotFoundError(
        f"no info CSV in {gt_dir} and no ribfrac-<split>-info.csv beside it; pass the info CSV explicitly"
    )


def _open_label_image(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as error:
        raise VolumeError(path, f"not a readable NIfTI file ({error})", "write it again as .nii or .nii.gz") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(path, f"not a NIfTI image (nibabel read it as {type(image).__name__})", "convert it to NIfTI")
    return image


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable CSV ({error})") from error
    table.columns = [str(column).strip() for column in table.columns]
    return table


def _integer_column(table: pd.DataFrame, column: str, path: Path) -> pd.Series:
    numeric = pd.to_numeric(table[column], errors="coerce")
    bad = table[numeric.isna() | (numeric != numeric.round())]
    if len(bad):
        raise ValueError(f"{path}: column {column} has non-integer values {bad[column].tolist()[:5]}")
    return numeric.astype(np.int64)


def _reject_duplicate_rows(table: pd.DataFrame, path: Path) -> None:
    repeated = table[table.duplicated(["public_id", "label_id"], keep=False)]
    if len(repeated):
        raise ValueError(
            f"{path}: (public_id, label_id) pairs {_row_preview(repeated)} appear more than once; "
            "keep one row per instance"
        )


def _row_preview(rows: pd.DataFrame) -> str:
    pairs = list(zip(rows["public_id"], rows["label_id"]))
    return _preview([f"({scan_id}, {label_id})" for scan_id, label_id in pairs])


def _preview(items: list[str], limit: int = 5) -> str:
    text = ", ".join(str(item) for item in items[:limit])
    if len(items) > limit:
        text += f" and {len(items) - limit} more"
    return text
