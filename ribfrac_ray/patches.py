"""Patch placement: where patches start, how to cut them, which boxes they hold.

All positions are (x, y, z) voxel indices of the canonical volume. A patch with
origin ``o`` and size ``s`` covers ``[o, o + s)`` on each axis; parts outside the
volume are filled with a constant, so volumes smaller than a patch still work.
"""

from __future__ import annotations

import numpy as np

from ribfrac_ray.boxes import box_centers

Triple = tuple[int, int, int]


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Return sliding-window start positions along one axis of ``length`` voxels.

    Consecutive windows overlap by at least ``overlap`` (a fraction of ``patch``)
    and the last window ends exactly at the border. A volume shorter than the patch
    gets one window at 0.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = int(np.ceil((length - patch) / step)) + 1
    return [int(round(i * (length - patch) / (count - 1))) for i in range(count)]


def grid_origins(shape: Triple, patch: Triple, overlap: float) -> np.ndarray:
    """Return the (n, 3) origins of a sliding-window grid that covers the whole volume."""
    axes = [window_starts(shape[i], patch[i], overlap) for i in range(3)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).astype(np.int64)


def windows_reaching(volume: np.ndarray, origins: np.ndarray, size: Triple, threshold: float) -> np.ndarray:
    """Return the rows of ``origins`` (n, 3) whose window contains a voxel of at least ``threshold``.

    ``volume`` is (X, Y, Z) in its own units (HU for CT). The part of a window that
    lies outside the volume counts as below the threshold.
    """
    origins = np.asarray(origins, np.int64).reshape(-1, 3)
    keep = np.zeros(len(origins), bool)
    for index, origin in enumerate(origins):
        low = np.maximum(origin, 0)
        high = np.minimum(origin + np.asarray(size), volume.shape)
        if np.all(high > low):
            window = volume[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
            keep[index] = window.max() >= threshold
    return origins[keep]


def extract_patch(volume: np.ndarray, origin: np.ndarray | Triple, size: Triple, fill: float = 0) -> np.ndarray:
    """Cut ``volume[o:o+s]`` per axis, padding with ``fill`` where the patch leaves the volume."""
    origin = np.asarray(origin, np.int64)
    out = np.full(size, fill, dtype=volume.dtype)
    source, target = [], []
    for axis in range(3):
        low = max(0, origin[axis])
        high = min(volume.shape[axis], origin[axis] + size[axis])
        if high <= low:
            return out
        source.append(slice(low, high))
        target.append(slice(low - origin[axis], high - origin[axis]))
    out[tuple(target)] = volume[tuple(source)]
    return out


def clamp_origin(origin: np.ndarray, shape: Triple, patch: Triple) -> np.ndarray:
    """Shift an origin so the patch lies inside the volume where the volume is large enough."""
    high = np.maximum(np.asarray(shape) - np.asarray(patch), 0)
    return np.clip(np.asarray(origin, np.int64), 0, high)


def fracture_origins(
    boxes: np.ndarray, shape: Triple, patch: Triple, per_box: int, jitter: int, rng: np.random.Generator
) -> np.ndarray:
    """Return origins of patches centred on each box, moved by up to ``jitter`` voxels per axis."""
    origins = []
    half = np.asarray(patch) // 2
    for center in box_centers(boxes):
        for _ in range(per_box):
            shift = rng.integers(-jitter, jitter + 1, size=3) if jitter > 0 else np.zeros(3, np.int64)
            origin = np.floor(center).astype(np.int64) - half + shift
            origins.append(clamp_origin(origin, shape, patch))
    return np.asarray(origins, np.int64).reshape(-1, 3)


def negative_origins(
    shape: Triple,
    patch: Triple,
    count: int,
    boxes: np.ndarray,
    rng: np.random.Generator,
    candidate_mask: np.ndarray | None = None,
    max_tries: int = 50,
) -> np.ndarray:
    """Return up to ``count`` random origins whose patches contain no box at all.

    ``candidate_mask`` (a coarse boolean map of the volume, any shape) limits the
    patch centres to where it is True, for example the body, so negatives are not
    mostly air.
    """
    origins: list[np.ndarray] = []
    high = np.maximum(np.asarray(shape) - np.asarray(patch), 0)
    for _ in range(count * max_tries):
        if len(origins) == count:
            break
        origin = np.array([rng.integers(0, h + 1) for h in high], np.int64)
        if candidate_mask is not None and not _center_in_mask(origin, patch, shape, candidate_mask):
            continue
        if len(boxes) and len(boxes_in_patch(boxes, origin, patch, min_visible=1e-6)[0]):
            continue
        origins.append(origin)
    return np.asarray(origins, np.int64).reshape(-1, 3)


def _center_in_mask(origin: np.ndarray, patch: Triple, shape: Triple, mask: np.ndarray) -> bool:
    center = (origin + np.asarray(patch) // 2) / np.asarray(shape, np.float64)
    index = np.minimum((center * np.asarray(mask.shape)).astype(np.int64), np.asarray(mask.shape) - 1)
    return bool(mask[tuple(index)])


def boxes_in_patch(
    boxes: np.ndarray, origin: np.ndarray | Triple, patch: Triple, min_visible: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Clip volume boxes to a patch and express them in patch coordinates.

    Returns the indices of the kept boxes and their clipped boxes (float32, (k, 6)).
    A box is kept when at least ``min_visible`` of its volume lies inside the patch.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 6)
    origin = np.asarray(origin, np.float32)
    size = np.asarray(patch, np.float32)
    local = boxes - np.concatenate([origin, origin])
    clipped = np.concatenate([np.clip(local[:, :3], 0, size), np.clip(local[:, 3:], 0, size)], axis=1)
    full = (local[:, 3:] - local[:, :3]).prod(axis=1)
    inside = np.clip(clipped[:, 3:] - clipped[:, :3], 0, None).prod(axis=1)
    keep = np.nonzero((full > 0) & (inside >= min_visible * full))[0]
    return keep, clipped[keep]


def crop_origin(box: np.ndarray, crop: Triple, shape: Triple, jitter: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Return the origin of a fixed-size crop centred on ``box`` (optionally jittered)."""
    center = np.floor(box_centers(box)[0]).astype(np.int64)
    if jitter > 0 and rng is not None:
        center = center + rng.integers(-jitter, jitter + 1, size=3)
    return center - np.asarray(crop) // 2
