"""The RibFrac challenge metric over a ground-truth folder and a prediction folder.

Detection is scored by FROC (:mod:`ribfrac_ray.evaluation.froc`), classification
by a confusion matrix and macro F1 (:mod:`ribfrac_ray.evaluation.classification`),
and segmentation by Dice and IoU over all voxels of all scans. The numbers equal
those of the challenge's evaluator (M3DV/RibFrac-Challenge, ``ribfrac/evaluation.py``),
with three differences, all for inputs that evaluator mishandles:

* Inconsistent inputs raise an error here, where the official code would crash or
  miscount silently: a predicted instance without a CSV row, a ground-truth instance
  without an info-CSV row, repeated CSV rows, or different shapes.
* The total number of instances is summed as a Python int. Under numpy 2 the
  official code sums numpy uint8 values, which wraps above 255.
* Curve points with equal FP rates are ordered deterministically by default,
  where the official order depends on the numpy build (see
  :func:`ribfrac_ray.evaluation.froc.interpolate_sensitivity`); ``tie_order="pandas"``
  sorts as the official code does.

Quirks of the official evaluator that are kept on purpose:

* A CSV row whose id is not in the volume but is below its largest id counts as a
  prediction that hits nothing (a false positive at its confidence). Rows above the
  largest id are ignored. Both cases are logged as warnings.
* A scan's instance count is its largest ground-truth id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ribfrac_ray.evaluation.classification import (
    GROUND_TRUTH_COLUMNS,
    PREDICTION_ROWS,
    add_scan_to_confusion,
    empty_confusion_matrix,
    macro_f1_scores,
)
from ribfrac_ray.evaluation.froc import NO_HIT, FrocResult, froc_from_hits
from ribfrac_ray.evaluation.inputs import (
    find_ground_truth_csv,
    find_prediction_csv,
    load_label_volume,
    pair_label_files,
    read_ground_truth_csv,
    read_prediction_csv,
)
from ribfrac_ray.evaluation.matching import ScanMatch, match_instances
from ribfrac_ray.io.nifti import VolumeError

logger = logging.getLogger(__name__)

DEFAULT_IOU_THRESH = 0.2
# Ids in a uint8 volume are below 256, so scan_index * 256 + id is unique over scans.
_IDS_PER_SCAN = 256
# Added to the denominators of Dice and IoU, as in the official evaluator.
SEGMENTATION_EPS = 1e-8


@dataclass
class ScanSummary:
    """Per-scan counts, for finding the scans that cost the most."""

    public_id: str
    num_gt: int
    num_pred: int
    detected: int
    false_positives: int
    dice: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EvaluationResult:
    """All challenge metrics of one prediction folder.

    ``detected`` and ``false_positives`` in :class:`ScanSummary` count predictions
    of any confidence, at ``iou_thresh``. ``confusion_matrix`` has shape (5, 6):
    rows are :data:`PREDICTION_ROWS` and columns :data:`GROUND_TRUTH_COLUMNS`.
    """

    froc: FrocResult
    iou_thresh: float
    dice: float
    iou: float
    intersection_voxels: int
    union_voxels: int
    gt_voxels: int
    pred_voxels: int
    confusion_matrix: np.ndarray
    f1: dict[str, float]
    scans: list[ScanSummary] = field(default_factory=list)

    @property
    def average_sensitivity(self) -> float:
        """The detection score: mean sensitivity at 0.5, 1, 2, 4 and 8 FP per scan."""
        return self.froc.average_sensitivity

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form."""
        return {
            "detection": {"iou_thresh": self.iou_thresh, **self.froc.to_dict()},
            "segmentation": {
                "dice": self.dice,
                "iou": self.iou,
                "intersection_voxels": self.intersection_voxels,
                "union_voxels": self.union_voxels,
                "gt_voxels": self.gt_voxels,
                "pred_voxels": self.pred_voxels,
            },
            "classification": {
                "rows": list(PREDICTION_ROWS),
                "columns": list(GROUND_TRUTH_COLUMNS),
                "confusion_matrix": self.confusion_matrix.tolist(),
                **self.f1,
            },
            "scans": [scan.to_dict() for scan in self.scans],
        }


@dataclass
class _Totals:
    """Running sums over scans."""

    confidences: list[np.ndarray] = field(default_factory=list)
    hit_ids: list[np.ndarray] = field(default_factory=list)
    num_gt: int = 0
    voxels: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.int64))
    confusion: np.ndarray = field(default_factory=empty_confusion_matrix)
    scans: list[ScanSummary] = field(default_factory=list)


def evaluate_folders(
    gt_dir: str | Path,
    pred_dir: str | Path,
    pred_csv: str | Path | None = None,
    iou_thresh: float = DEFAULT_IOU_THRESH,
    gt_csv: str | Path | None = None,
    tie_order: str = "curve",
) -> EvaluationResult:
    """Score the prediction folder against the ground-truth folder.

    Files pair by scan id (the name without ``.nii``, ``.gz`` and ``-label``), and
    both folders must contain the same ids with volumes of the same shape in the same
    voxel order. ``pred_csv`` defaults to the single CSV in ``pred_dir``; ``gt_csv``
    to the single CSV in ``gt_dir``, else ``ribfrac-<split>-info.csv`` beside it.
    A prediction hits an instance when their IoU is above ``iou_thresh``.
    ``tie_order`` chooses how FROC points with equal FP rates are ordered (see
    :func:`ribfrac_ray.evaluation.froc.interpolate_sensitivity`).
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    pairs = pair_label_files(gt_dir, pred_dir)
    gt_csv = Path(gt_csv) if gt_csv else find_ground_truth_csv(gt_dir)
    pred_csv = Path(pred_csv) if pred_csv else find_prediction_csv(pred_dir)
    gt_table = read_ground_truth_csv(gt_csv)
    pred_table = read_prediction_csv(pred_csv)
    _warn_about_unknown_ids(pred_table, {scan_id for scan_id, _, _ in pairs}, pred_csv)
    logger.info("evaluating %d scans: ground truth %s (%s), predictions %s (%s)",
                len(pairs), gt_dir, gt_csv.name, pred_dir, pred_csv.name)

    gt_rows = _rows_by_scan(gt_table)
    pred_rows = _rows_by_scan(pred_table)
    totals = _Totals()
    for scan_index, (scan_id, gt_path, pred_path) in enumerate(tqdm(pairs, desc="evaluate", unit="scan")):
        gt_codes = _codes(gt_rows.get(scan_id))
        predictions = pred_rows.get(scan_id, pred_table.iloc[0:0])
        _evaluate_scan(scan_index, scan_id, gt_path, pred_path, gt_codes, predictions,
                       gt_csv, pred_csv, iou_thresh, totals)

    return _summarize(totals, len(pairs), iou_thresh, tie_order)


def _evaluate_scan(
    scan_index: int,
    scan_id: str,
    gt_path: Path,
    pred_path: Path,
    gt_codes: dict[int, int],
    predictions: pd.DataFrame,
    gt_csv: Path,
    pred_csv: Path,
    iou_thresh: float,
    totals: _Totals,
) -> None:
    """Match one scan and add its detections, confusion counts and voxel counts to ``totals``."""
    gt = load_label_volume(gt_path)
    pred = load_label_volume(pred_path)
    if gt.shape != pred.shape:
        raise VolumeError(pred_path, f"shape {pred.shape} differs from the ground truth {gt_path} shape {gt.shape}",
                          "write predictions on the image's own voxel grid")
    match = match_instances(gt, pred)
    _check_gt_rows(match, gt_codes, scan_id, gt_path, gt_csv)

    rows = _prediction_rows(match, predictions, scan_id, pred_path, pred_csv)
    label_ids = rows["label_id"].to_numpy(dtype=np.int64)
    max_iou = match.max_iou[label_ids - 1]
    hit_label = match.hit_label[label_ids - 1]
    is_hit = max_iou > iou_thresh
    hit_ids = np.where(is_hit, scan_index * _IDS_PER_SCAN + hit_label, NO_HIT)
    totals.confidences.append(rows["confidence"].to_numpy(dtype=np.float64))
    totals.hit_ids.append(hit_ids)
    totals.num_gt += match.num_gt

    add_scan_to_confusion(totals.confusion, rows["label_code"].tolist(), hit_label.tolist(), gt_codes)
    voxels = [match.intersection_voxels, match.union_voxels,
              match.gt_foreground_voxels, match.pred_foreground_voxels]
    totals.voxels += np.asarray(voxels, dtype=np.int64)
    totals.scans.append(ScanSummary(
        public_id=scan_id,
        num_gt=match.num_gt,
        num_pred=len(rows),
        detected=len(set(hit_label[is_hit].tolist())),
        false_positives=int((~is_hit).sum()),
        dice=_dice(voxels[0], voxels[2], voxels[3]),
    ))
    logger.debug("%s: %d instances, %d predictions, %d detected", scan_id, match.num_gt, len(rows),
                 totals.scans[-1].detected)


def _prediction_rows(
    match: ScanMatch, predictions: pd.DataFrame, scan_id: str, pred_path: Path, pred_csv: Path
) -> pd.DataFrame:
    """Return the CSV rows that count as predictions: ids 1..largest id in the volume."""
    present = set((np.flatnonzero(match.pred_voxels[1:]) + 1).tolist())
    listed = set(predictions["label_id"].tolist()) - {0}
    missing = sorted(present - listed)
    if missing:
        raise ValueError(
            f"{pred_csv}: no row for instance(s) {missing} of {scan_id} in {pred_path}; "
            "add a row with public_id, label_id, confidence and label_code for every instance"
        )

    empty = sorted(i for i in listed - present if i <= match.num_pred)
    if empty:
        logger.warning("%s: %s lists instance(s) %s that have no voxels in %s; they count as false "
                       "positives, as in the challenge evaluator", scan_id, pred_csv.name, empty, pred_path.name)
    beyond = sorted(i for i in listed if i > match.num_pred)
    if beyond:
        logger.warning("%s: %s lists instance(s) %s above the largest id %d in %s; they are ignored, "
                       "as in the challenge evaluator", scan_id, pred_csv.name, beyond, match.num_pred, pred_path.name)

    counted = (predictions["label_id"] >= 1) & (predictions["label_id"] <= match.num_pred)
    return predictions[counted].sort_values("label_id")


def _check_gt_rows(match: ScanMatch, gt_codes: dict[int, int], scan_id: str, gt_path: Path, gt_csv: Path) -> None:
    present = set((np.flatnonzero(match.gt_voxels[1:]) + 1).tolist())
    missing = sorted(present - set(gt_codes))
    if missing:
        raise ValueError(
            f"{gt_csv}: no row for instance(s) {missing} of {scan_id} in {gt_path}; "
            "the info CSV needs one row per instance"
        )


def _summarize(totals: _Totals, num_scans: int, iou_thresh: float, tie_order: str) -> EvaluationResult:
    confidences = np.concatenate(totals.confidences) if totals.confidences else np.empty(0)
    hit_ids = np.concatenate(totals.hit_ids) if totals.hit_ids else np.empty(0, dtype=np.int64)
    froc = froc_from_hits(confidences, hit_ids, totals.num_gt, num_scans, tie_order=tie_order)
    intersection, union, gt_voxels, pred_voxels = (int(v) for v in totals.voxels)

    result = EvaluationResult(
        froc=froc,
        iou_thresh=iou_thresh,
        dice=_dice(intersection, gt_voxels, pred_voxels),
        iou=intersection / (union + SEGMENTATION_EPS),
        intersection_voxels=intersection,
        union_voxels=union,
        gt_voxels=gt_voxels,
        pred_voxels=pred_voxels,
        confusion_matrix=totals.confusion,
        f1=macro_f1_scores(totals.confusion),
        scans=totals.scans,
    )
    logger.info("average sensitivity %.4f over %d scans and %d instances, dice %.4f",
                result.average_sensitivity, num_scans, totals.num_gt, result.dice)
    return result


def _dice(intersection: int, gt_voxels: int, pred_voxels: int) -> float:
    return (2 * intersection) / (gt_voxels + pred_voxels + SEGMENTATION_EPS)


def _rows_by_scan(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {str(scan_id): rows for scan_id, rows in table.groupby("public_id", sort=False)}


def _codes(rows: pd.DataFrame | None) -> dict[int, int]:
    if rows is None:
        return {}
    return {int(label_id): int(code) for label_id, code in zip(rows["label_id"], rows["label_code"])}


def _warn_about_unknown_ids(table: pd.DataFrame, scan_ids: set[str], path: Path) -> None:
    unknown = sorted(set(table["public_id"]) - scan_ids)
    if unknown:
        logger.warning("%s: rows for %d scan id(s) without a label file are ignored: %s",
                       path, len(unknown), ", ".join(unknown[:5]))
