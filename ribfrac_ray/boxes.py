"""Boxes from instance masks.

Box layout, used everywhere in the package: float32 ``[xmin, ymin, zmin, xmax, ymax, zmax]``
in voxels of the canonical (x, y, z) array (MONAI's ``StandardMode``); the min corner
is inclusive and the max corner exclusive, so a box covering voxels 3..7 on x spans
``[3, 8)`` and its size is ``xmax - xmin`` voxels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def boxes_from_instances(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the ids (int64, shape (n,)) and tight boxes (float32, (n, 6)) of every instance > 0."""
    label = np.asarray(label)
    if label.size == 0 or not label.any():
        return np.zeros(0, np.int64), np.zeros((0, 6), np.float32)

    # find_objects takes any integer type, and an int32 copy of a uint8 volume is four times its size.
    integer_label = label if np.issubdtype(label.dtype, np.integer) else label.astype(np.int32)
    slices = find_objects_in_memory_order(integer_label)
    ids, boxes = [], []
    for index, found in enumerate(slices, start=1):
        if found is None:
            continue
        ids.append(index)
        boxes.append([s.start for s in found] + [s.stop for s in found])
    return np.asarray(ids, np.int64), np.asarray(boxes, np.float32).reshape(-1, 6)


def find_objects_in_memory_order(label: np.ndarray) -> list[tuple[slice, ...] | None]:
    """Return ``ndimage.find_objects(label)``, computed along the array's memory layout.

    find_objects walks the array in C index order. On the Fortran-ordered arrays
    that nibabel returns, that walk jumps through memory and took about 7 times
    longer (0.84 s against 0.12 s for 512 x 512 x 300 uint8 voxels, measured on a
    2-core AMD EPYC). So the array is transposed to put its largest stride first,
    and the slices are transposed back.
    """
    order = np.argsort([-abs(stride) for stride in label.strides], kind="stable")
    inverse = np.argsort(order)
    found = ndimage.find_objects(label.transpose(order))
    return [None if box is None else tuple(box[axis] for axis in inverse) for box in found]


def box_sizes(boxes: np.ndarray) -> np.ndarray:
    """Return (n, 3) sizes in voxels along x, y, z."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 6)
    return boxes[:, 3:] - boxes[:, :3]


def box_centers(boxes: np.ndarray) -> np.ndarray:
    """Return (n, 3) centres in voxels along x, y, z."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 6)
    return (boxes[:, 3:] + boxes[:, :3]) / 2.0


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return the (n, m) intersection over union of two sets of boxes."""
    first = np.asarray(first, np.float32).reshape(-1, 1, 6)
    second = np.asarray(second, np.float32).reshape(1, -1, 6)
    low = np.maximum(first[..., :3], second[..., :3])
    high = np.minimum(first[..., 3:], second[..., 3:])
    intersection = np.clip(high - low, 0, None).prod(axis=-1)
    volume_first = (first[..., 3:] - first[..., :3]).prod(axis=-1)
    volume_second = (second[..., 3:] - second[..., :3]).prod(axis=-1)
    union = volume_first + volume_second - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0).astype(np.float32)
