"""Turning per-patch detections and per-crop probabilities into volume results.

Coordinates are (x, y, z) voxels of the canonical volume; boxes use the package's
layout ``[xmin, ymin, zmin, xmax, ymax, zmax]`` with an exclusive max corner.
"""

from __future__ import annotations

import cc3d
import numpy as np
import torch
from monai.data.box_utils import non_max_suppression
from scipy import ndimage

from ribfrac_ray.config import CONFIDENCE_MODES

# The RibFrac format stores instance ids in uint8 volumes.
MAX_INSTANCES = 255


def merge_patch_detections(
    per_patch: list[tuple[np.ndarray, np.ndarray]],
    origins: np.ndarray,
    nms_iou: float,
    score_thresh: float,
    max_boxes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Move patch boxes to volume coordinates and merge them across patches with NMS.

    ``per_patch[i]`` contains (boxes (n, 6), scores (n,)) in the voxels of the patch
    whose origin is ``origins[i]``. Overlapping patches find the same fracture more
    than once; NMS keeps the highest-scoring box of each group. Returns at most
    ``max_boxes`` boxes (float32, (k, 6)) and scores (float32, (k,)), best first.
    """
    boxes, scores = [], []
    for (patch_boxes, patch_scores), origin in zip(per_patch, np.asarray(origins, np.float32)):
        patch_boxes = np.asarray(patch_boxes, np.float32).reshape(-1, 6)
        boxes.append(patch_boxes + np.concatenate([origin, origin]))
        scores.append(np.asarray(patch_scores, np.float32).reshape(-1))
    if not boxes:
        return np.zeros((0, 6), np.float32), np.zeros(0, np.float32)

    all_boxes = np.concatenate(boxes)
    all_scores = np.concatenate(scores)
    confident = all_scores >= score_thresh
    all_boxes, all_scores = all_boxes[confident], all_scores[confident]
    if len(all_boxes) == 0:
        return np.zeros((0, 6), np.float32), np.zeros(0, np.float32)

    keep = non_max_suppression(torch.from_numpy(all_boxes), torch.from_numpy(all_scores), nms_iou, max_boxes)
    keep = np.asarray(keep, np.int64).reshape(-1)
    return all_boxes[keep], all_scores[keep]


class InstanceStitcher:
    """Collects crop probabilities in a volume and labels the fracture instances.

    Memory: two uint8 volumes of the canonical shape (probability and owning
    detection score, both scaled to 0..255), plus the labelling of the region the
    crops cover.
    """

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = tuple(shape)
        self.probability = np.zeros(self.shape, np.uint8)
        self.score = np.zeros(self.shape, np.uint8)

    def add(self, origin: np.ndarray, probability: np.ndarray, score: float, threshold: float) -> None:
        """Add one crop's foreground probability (X, Y, Z) at ``origin`` with its box score."""
        source, target = _overlap(np.asarray(origin, np.int64), probability.shape, self.shape)
        if source is None:
            return
        crop = np.round(np.clip(probability[source], 0, 1) * 255).astype(np.uint8)
        region = self.probability[target]
        np.maximum(region, crop, out=region)
        owned = self.score[target]
        scaled = np.uint8(round(float(np.clip(score, 0, 1)) * 255))
        np.maximum(owned, np.where(crop >= threshold * 255, scaled, 0).astype(np.uint8), out=owned)

    def instances(
        self, threshold: float, min_voxels: int, confidence: str = "detector"
    ) -> tuple[np.ndarray, list[tuple[int, float]]]:
        """Threshold, label connected components (26-connectivity), drop small ones.

        ``confidence`` is "detector" (the highest box score among the crops that
        reach the instance) or "detector_x_segmenter" (that score times the mean
        foreground probability over the instance's voxels).

        Returns the uint8 instance volume (ids 1..n, at most 255, ordered by
        confidence) and ``[(label_id, confidence in [0, 1]), ...]``.
        """
        if confidence not in CONFIDENCE_MODES:
            raise ValueError(f"invalid confidence {confidence!r}; use one of {', '.join(CONFIDENCE_MODES)}")
        level = np.uint8(min(255, round(threshold * 255)))
        # Label only the box around the foreground, and reduce over foreground voxels
        # alone. Over the whole volume, np.bincount and ndimage.maximum would make
        # int64 and sorted copies of the label volume (over 1 GB for 512 x 512 x 300).
        # Cropping keeps the components and their order, as cc3d numbers them in raster order.
        window = ndimage.find_objects((self.probability >= level).view(np.uint8))
        if not window:
            return np.zeros(self.shape, np.uint8), []
        window = window[0]
        foreground = self.probability[window] >= level
        components = cc3d.connected_components(foreground, connectivity=26)
        count = int(components.max())
        component_of_voxel = components[foreground]
        scores = self.score[window][foreground]
        sizes = np.bincount(component_of_voxel, minlength=count + 1)[1:]
        best_score = np.zeros(count + 1, np.uint8)
        np.maximum.at(best_score, component_of_voxel, scores)
        scores_of_instances = best_score[1:] / 255.0
        if confidence == "detector_x_segmenter":
            probability_sums = np.bincount(
                component_of_voxel, weights=self.probability[window][foreground], minlength=count + 1
            )[1:]
            scores_of_instances = scores_of_instances * probability_sums / (255.0 * np.maximum(sizes, 1))
        del foreground
        large = [i for i in np.argsort(-scores_of_instances, kind="stable") if sizes[i] >= min_voxels][:MAX_INSTANCES]

        lookup = np.zeros(count + 1, np.uint8)
        records = []
        for new_id, position in enumerate(large, start=1):
            lookup[position + 1] = new_id
            records.append((new_id, float(scores_of_instances[position])))
        # The uint32 components are the largest array here, so they go before the output is allocated.
        labels_in_window = lookup[components]
        del components
        labels = np.zeros(self.shape, np.uint8)
        labels[window] = labels_in_window
        return labels, records


def _overlap(origin: np.ndarray, size: tuple[int, ...], shape: tuple[int, int, int]):
    source, target = [], []
    for axis in range(3):
        low = max(0, origin[axis])
        high = min(shape[axis], origin[axis] + size[axis])
        if high <= low:
            return None, None
        source.append(slice(low - origin[axis], high - origin[axis]))
        target.append(slice(low, high))
    return tuple(source), tuple(target)
