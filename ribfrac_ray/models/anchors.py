"""Anchor shapes for the detector, planned from the sizes of the training boxes.

Shapes and sizes are float voxel extents ``(x, y, z)`` of the detector's input
patch. A base shape is the anchor size on the finest feature level, and the detector
multiplies it by each level's stride ratio (see :mod:`ribfrac_ray.models.detector`).

Planning uses k-means with the distance ``1 - IoU`` between boxes that share
their min corner, so only the sizes matter and a cluster centre is the shape
that overlaps its members best. Under a Euclidean distance, large boxes would
dominate the clusters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ribfrac_ray.config import DetectorConfig

logger = logging.getLogger(__name__)

MAX_KMEANS_ITERATIONS = 100


def aligned_iou(sizes: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Return the (n, k) IoU of boxes of ``sizes`` (n, 3) and ``shapes`` (k, 3) placed at the same min corner."""
    sizes = np.asarray(sizes, np.float64).reshape(-1, 1, 3)
    shapes = np.asarray(shapes, np.float64).reshape(1, -1, 3)
    intersection = np.minimum(sizes, shapes).prod(axis=-1)
    union = sizes.prod(axis=-1) + shapes.prod(axis=-1) - intersection
    return intersection / union


def plan_anchor_shapes(box_sizes: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster box sizes into ``k`` anchor shapes by k-means under the distance ``1 - IoU``.

    Args:
        box_sizes: (N, 3) positive box sizes in voxels along x, y, z.
        k: requested number of shapes.
        seed: seed of the k-means++ initialisation. Equal inputs and seeds give equal shapes.

    Returns:
        float64 array of shape (min(k, number of distinct sizes), 3), sorted by volume.
        Each shape is the per-axis median of its cluster's sizes.

    Raises:
        ValueError: ``box_sizes`` is empty, not (N, 3), or has a non-positive or
            non-finite size, or ``k`` < 1.
    """
    sizes = np.asarray(box_sizes, np.float64)
    if k < 1:
        raise ValueError(f"the number of anchor shapes must be at least 1, got k={k}")
    if sizes.size == 0:
        raise ValueError(
            "cannot plan anchor shapes because there are no training boxes. "
            "Set detector.anchor_shapes by hand, for example [[8, 8, 8], [12, 12, 12]]"
        )
    if sizes.ndim != 2 or sizes.shape[1] != 3:
        raise ValueError(f"box sizes must have shape (N, 3), got {sizes.shape}")
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        bad = sizes[~np.all(np.isfinite(sizes) & (sizes > 0), axis=1)]
        raise ValueError(f"box sizes must be positive and finite, got invalid rows {bad[:5].tolist()}")

    distinct = np.unique(sizes, axis=0)
    if len(distinct) <= k:
        if len(distinct) < k:
            logger.warning(
                "only %d distinct box sizes for %d anchor shapes, so each size becomes a shape", len(distinct), k
            )
        return _sort_by_volume(distinct)

    rng = np.random.default_rng(seed)
    centres = _initial_centres(sizes, k, rng)
    assignment = np.full(len(sizes), -1)
    for _ in range(MAX_KMEANS_ITERATIONS):
        new_assignment = aligned_iou(sizes, centres).argmax(axis=1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        centres = _update_centres(sizes, centres, assignment)

    return _sort_by_volume(centres)


def _initial_centres(sizes: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``k`` distinct sizes by k-means++: each next centre with probability proportional to distance squared."""
    centres = [sizes[rng.integers(len(sizes))]]
    for _ in range(1, k):
        distance = 1.0 - aligned_iou(sizes, np.asarray(centres)).max(axis=1)
        weights = distance**2
        if weights.sum() <= 0:
            # Unreachable while callers pass more than k distinct sizes: every size already equals a centre.
            break
        centres.append(sizes[rng.choice(len(sizes), p=weights / weights.sum())])
    return np.asarray(centres)


def _update_centres(sizes: np.ndarray, centres: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Move each centre to the median of its members. An empty cluster takes the worst-covered size."""
    updated = centres.copy()
    for index in range(len(centres)):
        members = sizes[assignment == index]
        if len(members) > 0:
            updated[index] = np.median(members, axis=0)
        else:
            coverage = aligned_iou(sizes, updated).max(axis=1)
            updated[index] = sizes[coverage.argmin()]
    return updated


def _sort_by_volume(shapes: np.ndarray) -> np.ndarray:
    order = np.argsort(shapes.prod(axis=1), kind="stable")
    return np.asarray(shapes, np.float64)[order]


def expand_anchor_shapes(base_shapes: Sequence[Sequence[float]], scales: Sequence[float]) -> list[list[float]]:
    """Multiply every base shape by every scale.

    Returns ``len(base_shapes) * len(scales)`` shapes in voxels, ordered by base
    shape first, then by scale: ``[s0*m0, s0*m1, ..., s1*m0, ...]``.
    """
    base = np.asarray(base_shapes, np.float64)
    if base.ndim != 2 or base.shape[1] != 3 or len(base) == 0:
        raise ValueError(f"anchor shapes must be a non-empty list of [x, y, z] sizes, got {base_shapes!r}")
    if np.any(base <= 0):
        raise ValueError(f"anchor shapes must be positive, got {base_shapes!r}")
    if len(scales) == 0 or any(scale <= 0 for scale in scales):
        raise ValueError(f"anchor scales must be a non-empty list of positive numbers, got {scales!r}")

    return [[float(value * scale) for value in shape] for shape in base for scale in scales]


def resolve_anchor_shapes(config: DetectorConfig, box_sizes: np.ndarray | None = None) -> list[list[float]]:
    """Return the detector's anchor shapes: the configured ones, or ones planned from ``box_sizes``.

    ``config.anchor_shapes`` wins when it is set. Otherwise ``config.n_anchor_shapes``
    shapes are planned from ``box_sizes`` (N, 3) in voxels. Either way every
    shape is then expanded by ``config.anchor_scales``.
    """
    if config.anchor_shapes:
        base = np.asarray(config.anchor_shapes, np.float64)
    else:
        if box_sizes is None:
            box_sizes = np.zeros((0, 3))
        base = plan_anchor_shapes(box_sizes, config.n_anchor_shapes)
        logger.info("planned %d anchor shapes from %d boxes: %s", len(base), len(box_sizes), np.round(base, 1).tolist())

    return expand_anchor_shapes(base.tolist(), config.anchor_scales)
