"""Validation scores computed inside the training loop.

The detector is ranked by a patch-level FROC, computed by the same FROC code as
the challenge metric. A predicted box on a validation patch hits a ground-truth
box when their box IoU exceeds 0.2 (the challenge's rule, with boxes in place of
masks) or when its centre lies inside the ground-truth box. The second rule is
there because the segmenter, not the box, outlines the fracture: a crop centred
inside the fracture gives a mask that passes the challenge's mask-IoU test even
when a 7-voxel box is 2 voxels off on each axis, which alone drops its box IoU
to about 0.2. False positives are counted per validation scan, and the score is
the mean sensitivity at 0.5, 1, 2, 4 and 8 false positives per scan.

Whole-volume prediction with the mask metric would rank settings more faithfully
but costs a full prediction run per epoch; patches keep validation within seconds.
"""

from __future__ import annotations

import numpy as np

from ribfrac_ray.boxes import box_centers, box_iou
from ribfrac_ray.evaluation.froc import NO_HIT, froc_from_hits

HIT_IOU = 0.2


def patch_detection_metrics(
    predictions: list[tuple[np.ndarray, np.ndarray]],
    truths: list[np.ndarray],
    n_scans: int,
    iou_thresh: float = HIT_IOU,
) -> dict[str, float]:
    """Score box predictions per patch against ground-truth boxes.

    ``predictions[i]`` is (boxes (n, 6), scores (n,)) for patch i and ``truths[i]``
    its ground-truth boxes (m, 6), all in patch voxels. Returns ``val_froc`` (mean
    sensitivity over the five FP rates) and ``val_max_recall``.
    """
    confidences, hits = [], []
    offset = 0
    for (boxes, scores), truth in zip(predictions, truths):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 6)
        truth = np.asarray(truth, np.float32).reshape(-1, 6)
        if len(boxes) and len(truth):
            overlap = box_iou(boxes, truth)
            centers = box_centers(boxes)[:, None, :]
            inside = np.all((centers >= truth[None, :, :3]) & (centers < truth[None, :, 3:]), axis=2)
            score = np.where(inside, np.maximum(overlap, 1.0), overlap)
            best = score.argmax(axis=1)
            matched = score[np.arange(len(boxes)), best] > iou_thresh
            hit = np.where(matched, best + offset, NO_HIT)
        else:
            hit = np.full(len(boxes), NO_HIT)
        confidences.append(np.asarray(scores, np.float64).reshape(-1))
        hits.append(hit)
        offset += len(truth)

    result = froc_from_hits(
        np.concatenate(confidences) if confidences else np.zeros(0),
        np.concatenate(hits) if hits else np.zeros(0, np.int64),
        num_gt=offset,
        num_scans=n_scans,
    )
    return {"val_froc": float(result.average_sensitivity), "val_max_recall": float(result.max_sensitivity)}


def crop_dice(predicted: np.ndarray, truth: np.ndarray) -> list[float]:
    """Return the Dice score of each crop (B, X, Y, Z); an empty pair scores 1."""
    axes = tuple(range(1, predicted.ndim))
    intersection = np.logical_and(predicted, truth).sum(axis=axes)
    total = predicted.sum(axis=axes) + truth.sum(axis=axes)
    return [1.0 if t == 0 else float(2 * i / t) for i, t in zip(intersection, total)]
