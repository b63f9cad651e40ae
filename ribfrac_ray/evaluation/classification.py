"""Fracture-type confusion matrix and macro F1, as the RibFrac challenge scores classification.

Rows are the predicted types plus ``FN``, for a ground-truth instance that no
prediction overlaps. Columns are the ground-truth types plus ``FP``, for a
prediction that overlaps no instance, and ``Ignore``, for an instance annotated
with code -1. Following the challenge's evaluator:

* every predicted instance counts, whatever its confidence and IoU, as long as it
  overlaps its hit instance at all (see :mod:`ribfrac_ray.evaluation.matching`);
* predictions with code 0 (background) or -1 (ignore) are left out;
* a ground-truth instance with no overlapping prediction adds one ``FN`` count
  under its own type, and ``Ignore`` when its code is -1;
* F1 is averaged over the four fracture types, and the ``Ignore`` column is left
  out of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

LABEL_CODE_NAMES = {
    0: "Background",
    1: "Displaced",
    2: "Nondisplaced",
    3: "Buckle",
    4: "Segmental",
    -1: "Ignore",
}
PREDICTION_ROWS = ("Buckle", "Displaced", "Nondisplaced", "Segmental", "FN")
GROUND_TRUTH_COLUMNS = ("Buckle", "Displaced", "Nondisplaced", "Segmental", "FP", "Ignore")
F1_EPS = 1e-8

_ROW = {name: index for index, name in enumerate(PREDICTION_ROWS)}
_COLUMN = {name: index for index, name in enumerate(GROUND_TRUTH_COLUMNS)}
_FN_ROW = _ROW["FN"]
_FP_COLUMN = _COLUMN["FP"]


def empty_confusion_matrix() -> np.ndarray:
    """Return a zero matrix of shape (5 predicted rows, 6 ground-truth columns)."""
    return np.zeros((len(PREDICTION_ROWS), len(GROUND_TRUTH_COLUMNS)), dtype=np.int64)


def add_scan_to_confusion(
    matrix: np.ndarray,
    predicted_codes: Iterable[int],
    hit_labels: Iterable[int],
    gt_codes: Mapping[int, int],
) -> None:
    """Add one scan's counts to ``matrix`` in place.

    ``predicted_codes`` and ``hit_labels`` run over the scan's predictions (the hit
    id is 0 for no overlap). ``gt_codes`` maps each ground-truth label id of the
    scan's info CSV, background row included, to its code.
    """
    hit_set = set()
    for code, hit in zip(predicted_codes, hit_labels):
        hit_set.add(int(hit))
        predicted = LABEL_CODE_NAMES[int(code)]
        if predicted in ("Background", "Ignore"):
            continue
        matrix[_ROW[predicted], _COLUMN[_ground_truth_column(hit, gt_codes)]] += 1

    for label_id, code in gt_codes.items():
        if code == 0 or label_id in hit_set:
            continue
        matrix[_FN_ROW, _COLUMN[LABEL_CODE_NAMES[int(code)]]] += 1


def macro_f1_scores(matrix: np.ndarray) -> dict[str, float]:
    """Compute the challenge's three macro F1 scores from the confusion matrix.

    ``macro_f1`` counts detection errors (the ``FP`` column and the ``FN`` row) as
    classification errors. ``target_aware_f1`` leaves out the ``FP`` column.
    ``prediction_aware_f1`` leaves out both, so it scores only the types of
    detected fractures.
    """
    counts = matrix[:, :-1].astype(np.float64)
    true_positive = np.diag(counts)[:-1]
    false_positive = counts[:-1, :].sum(axis=1) - true_positive
    false_negative = counts[:, :-1].sum(axis=0) - true_positive
    false_positive_typed = false_positive - counts[:-1, _FP_COLUMN]
    false_negative_typed = false_negative - counts[_FN_ROW, :-1]

    return {
        "macro_f1": _mean_f1(true_positive, false_positive, false_negative),
        "target_aware_f1": _mean_f1(true_positive, false_positive_typed, false_negative),
        "prediction_aware_f1": _mean_f1(true_positive, false_positive_typed, false_negative_typed),
    }


def _ground_truth_column(hit: int, gt_codes: Mapping[int, int]) -> str:
    code = gt_codes.get(int(hit))
    if code is None or code == 0:
        return "FP"
    return LABEL_CODE_NAMES[int(code)]


def _mean_f1(true_positive: np.ndarray, false_positive: np.ndarray, false_negative: np.ndarray) -> float:
    precision = true_positive / (true_positive + false_positive + F1_EPS)
    recall = true_positive / (true_positive + false_negative + F1_EPS)
    return float(np.mean((2 * precision * recall) / (precision + recall + F1_EPS)))
