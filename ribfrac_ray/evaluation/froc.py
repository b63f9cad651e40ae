"""FROC analysis (sensitivity against false positives per scan), as the RibFrac challenge scores detection.

The rules follow the challenge's evaluator (``ribfrac/evaluation.py`` in the
M3DV/RibFrac-Challenge repository, master branch):

* Confidence thresholds are ``np.arange(0, 1, 0.01)``: 0.00, 0.01, ..., 0.99. A
  prediction counts at threshold ``t`` when its confidence is ``>= t``, so a
  confidence of exactly 1.0 is counted at every threshold and a NaN never is.
  Ten of these floats lie just above their decimal value (0.35, 0.41, 0.47, 0.57,
  0.69, 0.70, 0.82, 0.83, 0.94, 0.95; e.g. 0.35000000000000003), so a confidence of
  exactly 0.35 is not counted at the threshold shown as 0.35.
* Sensitivity at ``t`` is ``(distinct hit instances + EPS) / (instances + EPS)``.
  Several predictions on one instance count once, and the extra ones are not false
  positives.
* False positives per scan at ``t`` are ``(predictions without a hit + EPS) / (scans + EPS)``.
  Scans without predictions still count in the denominator.
* Sensitivity at each key rate (0.5, 1, 2, 4, 8 FP per scan) is interpolated
  linearly between the nearest curve points below and above it. It is 0 below the
  curve's lowest rate and the maximum sensitivity above its highest rate.

The ``EPS`` terms are kept, so a curve point with no false positive has a rate of
about 1e-9 rather than 0, and a data set without instances has sensitivity 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# Same expression as the official evaluator, so every threshold is the same float.
THRESHOLDS = np.arange(0, 1, 0.01)
KEY_FPS = (0.5, 1.0, 2.0, 4.0, 8.0)
EPS = 1e-8
NO_HIT = -1
TIE_ORDERS = ("curve", "pandas")


@dataclass
class FrocResult:
    """FROC curve (one point per confidence threshold) and its summary numbers."""

    thresholds: np.ndarray
    fps_per_scan: np.ndarray
    sensitivities: np.ndarray
    key_fps: tuple[float, ...]
    key_sensitivities: tuple[float, ...]
    average_sensitivity: float
    max_sensitivity: float
    # The official report calls this "average FP per scan at maximum recall"; it is
    # the rate at the lowest threshold, which is also the highest rate on the curve.
    max_fps_per_scan: float
    num_gt: int
    num_scans: int
    num_predictions: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe form: lists of floats and scalars."""
        at_key_fps = {f"sensitivity@{fp:g}fp": value for fp, value in zip(self.key_fps, self.key_sensitivities)}
        return {
            **at_key_fps,
            "key_fps": list(self.key_fps),
            "key_sensitivities": list(self.key_sensitivities),
            "average_sensitivity": self.average_sensitivity,
            "max_sensitivity": self.max_sensitivity,
            "max_fps_per_scan": self.max_fps_per_scan,
            "num_gt": self.num_gt,
            "num_scans": self.num_scans,
            "num_predictions": self.num_predictions,
            "thresholds": self.thresholds.tolist(),
            "fps_per_scan": self.fps_per_scan.tolist(),
            "sensitivities": self.sensitivities.tolist(),
        }


def froc_from_hits(
    confidences: ArrayLike,
    hit_ids: ArrayLike,
    num_gt: int,
    num_scans: int,
    key_fps: tuple[float, ...] = KEY_FPS,
    tie_order: str = "curve",
) -> FrocResult:
    """Compute the FROC curve from per-prediction confidences and matches.

    ``confidences`` and ``hit_ids`` have shape (n_predictions,). ``hit_ids[i]`` is
    the ground-truth instance that prediction ``i`` hits, or ``NO_HIT`` (-1) for a
    false positive. Instance ids must be unique over the whole data set (for example
    ``scan_index * 256 + label_id``). ``num_gt`` counts all ground-truth instances
    and ``num_scans`` all scans, including scans without predictions. The caller
    decides what a hit is (mask IoU > 0.2 in the challenge, box IoU elsewhere).
    ``tie_order`` is passed to :func:`interpolate_sensitivity`.
    """
    confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
    hit_ids = np.asarray(hit_ids, dtype=np.int64).reshape(-1)
    if confidences.shape != hit_ids.shape:
        raise ValueError(
            f"confidences has {confidences.size} values but hit_ids has {hit_ids.size}; "
            "pass one hit id per prediction"
        )
    if num_scans <= 0:
        raise ValueError(f"num_scans must be positive, got {num_scans}")
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order must be one of {TIE_ORDERS}, got {tie_order!r}")

    is_hit = hit_ids != NO_HIT
    fp_counts = _count_at_thresholds(confidences[~is_hit])
    instance_confidences = _best_confidence_per_instance(hit_ids[is_hit], confidences[is_hit])
    tp_counts = _count_at_thresholds(instance_confidences)

    fps = (fp_counts + EPS) / (num_scans + EPS)
    sensitivities = (tp_counts + EPS) / (num_gt + EPS)
    key_sensitivities = tuple(interpolate_sensitivity(fps, sensitivities, key, tie_order) for key in key_fps)

    return FrocResult(
        thresholds=THRESHOLDS.copy(),
        fps_per_scan=fps,
        sensitivities=sensitivities,
        key_fps=tuple(float(key) for key in key_fps),
        key_sensitivities=key_sensitivities,
        average_sensitivity=float(np.mean(key_sensitivities)),
        max_sensitivity=float(sensitivities.max()),
        max_fps_per_scan=float(fps.max()),
        num_gt=int(num_gt),
        num_scans=int(num_scans),
        num_predictions=int(confidences.size),
    )


def interpolate_sensitivity(
    fps: np.ndarray, sensitivities: np.ndarray, key_fp: float, tie_order: str = "curve"
) -> float:
    """Interpolate the sensitivity at ``key_fp`` false positives per scan.

    The curve points are ordered by rate first. The official code sorts by rate
    alone with pandas' default quicksort, which is not stable, so the order of
    points that share a rate depends on the numpy version and the CPU's sorting
    instructions. When such points bracket a key rate, the score changes with it.
    ``tie_order="curve"`` (the default) orders them by sensitivity, which reads the
    curve as the polyline traced while the threshold falls: the upper end of a
    segment takes the highest sensitivity at its rate and the lower end the lowest.
    ``tie_order="pandas"`` sorts as the official code does, so it reproduces that
    code run with the same numpy on the same machine, and may differ elsewhere.
    """
    if tie_order == "pandas":
        order = np.argsort(fps, kind="quicksort")
    else:
        order = np.lexsort((sensitivities, fps))
    fps = fps[order]
    sensitivities = sensitivities[order]

    below = np.flatnonzero(fps <= key_fp)
    above = np.flatnonzero(fps >= key_fp)
    if below.size == 0:
        return 0.0
    if above.size == 0:
        return float(sensitivities.max())

    fp_0, fp_1 = fps[below[-1]], fps[above[0]]
    sensitivity_0, sensitivity_1 = sensitivities[below[-1]], sensitivities[above[0]]
    # The EPS in the denominator is the official code's; it keeps a zero-width
    # segment (fp_0 == fp_1 == key_fp) at sensitivity_0.
    fraction = (key_fp - fp_0) / (fp_1 - fp_0 + EPS)
    return float(sensitivity_0 + (sensitivity_1 - sensitivity_0) * fraction)


def _count_at_thresholds(values: np.ndarray) -> np.ndarray:
    """Count the values ``>= t`` for every threshold; NaN is never counted."""
    finite = np.sort(values[~np.isnan(values)])
    return finite.size - np.searchsorted(finite, THRESHOLDS, side="left")


def _best_confidence_per_instance(hit_ids: np.ndarray, confidences: np.ndarray) -> np.ndarray:
    """Return the highest confidence among the predictions on each hit instance.

    An instance is detected at threshold ``t`` exactly when its best prediction
    reaches ``t``. NaN confidences are skipped unless an instance has only NaN.
    """
    if hit_ids.size == 0:
        return np.empty(0, dtype=np.float64)
    order = np.argsort(hit_ids, kind="stable")
    sorted_ids = hit_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    return np.fmax.reduceat(confidences[order], starts)
