"""Match predicted fracture instances to ground-truth instances in one scan.

Both inputs are uint8 instance volumes of one shape, in the files' own voxel
order (not reoriented), with 0 for background and 1..n for instances.

The overlap rule is the RibFrac challenge evaluator's, which is not the plain mask
IoU of each (ground truth, prediction) pair:

* The binary masks' intersection and union are split into 26-connected components.
* Each intersection component gives one IoU: its voxel count over the voxel count
  of the union component that contains it. Two instances that touch therefore share
  one union component, and their IoU shrinks.
* The component is assigned to the ground-truth and predicted ids found at its
  first voxel in C order (lowest x, then y, then z index). A component that spans
  several instances counts only for that one pair, with its whole area.
* When one pair has several intersection components, the last one in C order of
  first voxels wins (an assignment, not a sum).
* Instance counts are the largest id in each volume, so missing ids in 1..n count:
  a gap in the ground-truth ids counts as an instance that can never be found.

For instances that do not touch each other and overlap in one piece, this equals
the usual mask IoU. The whole computation is two connected-component labelings
and a few ``np.bincount`` calls, with no loop over instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np

# Added to the union size before dividing, as in the official evaluator.
IOU_EPS = 1e-8


@dataclass
class ScanMatch:
    """Overlap of the predictions with the ground truth in one scan.

    ``max_iou`` and ``hit_label`` have one entry per predicted id 1..num_pred
    (index 0 is id 1). ``hit_label`` is the ground-truth id with the highest IoU
    (the lowest id on ties), or 0 when the prediction overlaps no instance. It is
    set for any overlap, whatever the IoU threshold. ``gt_voxels`` and
    ``pred_voxels`` count voxels per id, with index 0 for the background.
    """

    num_gt: int
    num_pred: int
    max_iou: np.ndarray
    hit_label: np.ndarray
    gt_voxels: np.ndarray
    pred_voxels: np.ndarray
    intersection_voxels: int
    union_voxels: int

    @property
    def gt_foreground_voxels(self) -> int:
        return int(self.gt_voxels[1:].sum())

    @property
    def pred_foreground_voxels(self) -> int:
        return int(self.pred_voxels[1:].sum())


def match_instances(gt: np.ndarray, pred: np.ndarray) -> ScanMatch:
    """Compute the per-prediction best IoU and hit id, and the voxel counts, of one scan.

    ``gt`` and ``pred`` are uint8 arrays of the same 3D shape.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
    if gt.dtype != np.uint8 or pred.dtype != np.uint8:
        raise TypeError(f"expected uint8 label volumes, got {gt.dtype} and {pred.dtype}")

    num_gt = int(gt.max(initial=0))
    num_pred = int(pred.max(initial=0))
    gt_voxels = _count_labels(gt, num_gt + 1)
    pred_voxels = _count_labels(pred, num_pred + 1)

    iou_matrix = np.zeros((num_gt, num_pred), dtype=np.float64)
    intersection_voxels = 0
    union_voxels = int(gt_voxels[1:].sum() + pred_voxels[1:].sum())
    if num_gt > 0 and num_pred > 0:
        intersection_voxels, union_voxels = _fill_component_ious(gt, pred, iou_matrix)

    if num_gt == 0:
        max_iou = np.zeros(num_pred, dtype=np.float64)
        hit_label = np.zeros(num_pred, dtype=np.int64)
    else:
        max_iou = iou_matrix.max(axis=0)
        hit_label = np.where(max_iou > 0, iou_matrix.argmax(axis=0) + 1, 0)

    return ScanMatch(
        num_gt=num_gt,
        num_pred=num_pred,
        max_iou=max_iou,
        hit_label=hit_label.astype(np.int64),
        gt_voxels=gt_voxels,
        pred_voxels=pred_voxels,
        intersection_voxels=intersection_voxels,
        union_voxels=union_voxels,
    )


def _fill_component_ious(gt: np.ndarray, pred: np.ndarray, iou_matrix: np.ndarray) -> tuple[int, int]:
    """Write each intersection component's IoU into ``iou_matrix[gt_id - 1, pred_id - 1]``.

    Returns the intersection and union voxel counts of the binary masks.
    """
    window = _union_box(gt, pred)
    gt, pred = gt[window], pred[window]
    gt_mask = gt > 0
    pred_mask = pred > 0
    union_mask = gt_mask | pred_mask
    intersection_mask = gt_mask & pred_mask

    # Cropping to the union's box keeps the components and their C order.
    union_components = cc3d.connected_components(union_mask, connectivity=26)
    intersection_components = cc3d.connected_components(intersection_mask, connectivity=26)
    union_sizes = _count_labels(union_components)

    flat_index = np.flatnonzero(intersection_components)
    component_of_voxel = intersection_components.reshape(-1)[flat_index]
    if flat_index.size == 0:
        return 0, int(union_sizes[1:].sum())

    # np.flatnonzero is in C order, so each component's first listed voxel is its anchor.
    component_ids, first_position = np.unique(component_of_voxel, return_index=True)
    anchors = flat_index[first_position]
    areas = np.bincount(component_of_voxel)[component_ids]

    anchor_index = np.unravel_index(anchors, intersection_components.shape)
    gt_ids = gt[anchor_index].astype(np.int64)
    pred_ids = pred[anchor_index].astype(np.int64)
    union_areas = union_sizes[union_components[anchor_index]]
    ious = areas.astype(np.float64) / (union_areas.astype(np.float64) + IOU_EPS)

    # Keep the component whose anchor comes last in C order for each pair.
    order = np.argsort(anchors)[::-1]
    pair_keys = gt_ids[order] * 256 + pred_ids[order]
    _, last = np.unique(pair_keys, return_index=True)
    chosen = order[last]
    iou_matrix[gt_ids[chosen] - 1, pred_ids[chosen] - 1] = ious[chosen]

    return int(flat_index.size), int(union_sizes[1:].sum())


def _count_labels(volume: np.ndarray, minlength: int = 1) -> np.ndarray:
    """Return ``np.bincount(volume.ravel(), minlength=minlength)`` without copying the whole volume.

    ``ravel(order="K")`` is a view of C- and Fortran-ordered arrays alike (nibabel
    returns the latter), and only the nonzero voxels, which are few in label
    volumes, go through bincount's int64 conversion.
    """
    flat = volume.ravel(order="K")
    nonzero = flat[flat != 0]
    counts = np.bincount(nonzero, minlength=max(minlength, 1))
    counts[0] = flat.size - nonzero.size
    return counts


def _union_box(gt: np.ndarray, pred: np.ndarray) -> tuple[slice, ...]:
    """Return the slices of the smallest box that contains every nonzero voxel of ``gt`` and ``pred``.

    ``np.any`` reduces the volumes directly, so no whole-volume mask is allocated.
    At least one voxel must be nonzero.
    """
    window = []
    for axis in range(gt.ndim):
        other_axes = tuple(a for a in range(gt.ndim) if a != axis)
        occupied = np.flatnonzero(np.any(gt, axis=other_axes) | np.any(pred, axis=other_axes))
        window.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(window)
