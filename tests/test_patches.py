"""Patch placement, patch cutting with padding, and boxes from masks."""

import numpy as np
import pytest

from ribfrac_ray.boxes import box_iou, boxes_from_instances
from ribfrac_ray.patches import (
    boxes_in_patch,
    extract_patch,
    fracture_origins,
    grid_origins,
    negative_origins,
    window_starts,
    windows_reaching,
)


def test_window_starts_cover_axis_with_overlap():
    starts = window_starts(200, 64, 0.25)
    assert starts[0] == 0
    assert starts[-1] == 200 - 64
    steps = np.diff(starts)
    assert steps.max() <= 48
    assert window_starts(40, 64, 0.5) == [0]


def test_grid_covers_every_voxel():
    shape, patch = (100, 70, 50), (32, 32, 32)
    covered = np.zeros(shape, bool)
    for origin in grid_origins(shape, patch, 0.25):
        x, y, z = origin
        covered[x : x + 32, y : y + 32, z : z + 32] = True
    assert covered.all()


def test_extract_patch_pads_outside_volume():
    volume = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    patch = extract_patch(volume, (-1, 0, 1), (3, 3, 3), fill=-1024)
    assert patch.shape == (3, 3, 3)
    assert (patch[0] == -1024).all()
    assert np.array_equal(patch[1:, :, :2], volume[:2, :, 1:])
    assert (patch[:, :, 2] == -1024).all()


def test_boxes_from_instances_max_exclusive():
    label = np.zeros((20, 20, 20), np.uint8)
    label[3:8, 4:6, 10:11] = 1
    label[12:15, 12:15, 12:15] = 3
    ids, boxes = boxes_from_instances(label)
    assert ids.tolist() == [1, 3]
    assert boxes[0].tolist() == [3, 4, 10, 8, 6, 11]
    assert boxes[1].tolist() == [12, 12, 12, 15, 15, 15]
    empty_ids, empty_boxes = boxes_from_instances(np.zeros((4, 4, 4), np.uint8))
    assert empty_ids.shape == (0,)
    assert empty_boxes.shape == (0, 6)


def test_boxes_in_patch_clip_and_visibility():
    boxes = np.array([[10, 10, 10, 20, 20, 20], [0, 0, 0, 4, 4, 4]], np.float32)
    keep, local = boxes_in_patch(boxes, (5, 5, 5), (10, 10, 10))
    assert keep.tolist() == []
    keep, local = boxes_in_patch(boxes, (12, 12, 12), (16, 16, 16))
    assert keep.tolist() == [0]
    assert local[0].tolist() == [0, 0, 0, 8, 8, 8]
    keep, _ = boxes_in_patch(boxes, (12, 12, 12), (16, 16, 16), min_visible=0.6)
    assert keep.tolist() == []


def test_fracture_patches_contain_their_box():
    rng = np.random.default_rng(0)
    boxes = np.array([[40, 50, 30, 48, 58, 36]], np.float32)
    origins = fracture_origins(boxes, (128, 128, 96), (64, 64, 64), per_box=5, jitter=12, rng=rng)
    assert origins.shape == (5, 3)
    for origin in origins:
        keep, _ = boxes_in_patch(boxes, origin, (64, 64, 64), min_visible=1.0)
        assert keep.tolist() == [0]


def test_negative_patches_avoid_boxes():
    rng = np.random.default_rng(1)
    boxes = np.array([[40, 40, 40, 60, 60, 60]], np.float32)
    origins = negative_origins((128, 128, 128), (32, 32, 32), 6, boxes, rng)
    assert len(origins) == 6
    for origin in origins:
        keep, _ = boxes_in_patch(boxes, origin, (32, 32, 32), min_visible=1e-6)
        assert len(keep) == 0


def test_box_iou_values():
    first = np.array([[0, 0, 0, 2, 2, 2]], np.float32)
    second = np.array([[1, 0, 0, 3, 2, 2], [5, 5, 5, 6, 6, 6]], np.float32)
    assert box_iou(first, second)[0].tolist() == pytest.approx([4 / 12, 0.0])


def test_windows_reaching_needs_bright_voxel():
    volume = np.full((96, 64, 64), -1000, np.int16)
    volume[70, 10, 10] = 700  # one bone voxel near the far x end
    origins = grid_origins(volume.shape, (32, 32, 32), 0.0)
    bony = windows_reaching(volume, origins, (32, 32, 32), 200)
    assert bony.tolist() == [[64, 0, 0]]

    # Windows partly outside the volume are judged on their inside part.
    shifted = np.asarray([[60, -16, -16], [-40, -40, -40]])
    assert windows_reaching(volume, shifted, (32, 32, 32), 200).tolist() == [[60, -16, -16]]
    assert len(windows_reaching(volume, origins, (32, 32, 32), 701)) == 0
    assert len(windows_reaching(volume, origins, (32, 32, 32), -1024)) == len(origins)
