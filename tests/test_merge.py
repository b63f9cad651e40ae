"""Merging detections across overlapping patches and stitching crop probabilities."""

import numpy as np
import pytest

from ribfrac_ray.prediction.merge import InstanceStitcher, merge_patch_detections


def test_nms_merges_one_fracture_seen_by_two_patches():
    # The same fracture at volume voxels [40, 48) on each axis, seen from two patches.
    origins = np.array([[0, 0, 0], [32, 0, 0]])
    per_patch = [
        (np.array([[40, 40, 40, 48, 48, 48]], np.float32), np.array([0.9], np.float32)),
        (np.array([[9, 40, 40, 17, 48, 48]], np.float32), np.array([0.7], np.float32)),
    ]
    boxes, scores = merge_patch_detections(per_patch, origins, nms_iou=0.2, score_thresh=0.1, max_boxes=10)
    assert boxes.tolist() == [[40, 40, 40, 48, 48, 48]]
    assert scores.tolist() == [np.float32(0.9)]


def test_merge_keeps_separate_fractures_and_drops_low_scores():
    origins = np.array([[0, 0, 0], [0, 64, 0]])
    per_patch = [
        (np.array([[10, 10, 10, 18, 18, 18], [30, 30, 30, 34, 34, 34]], np.float32), np.array([0.8, 0.05], np.float32)),
        (np.array([[10, 10, 10, 18, 18, 18]], np.float32), np.array([0.6], np.float32)),
    ]
    boxes, scores = merge_patch_detections(per_patch, origins, nms_iou=0.2, score_thresh=0.1, max_boxes=10)
    assert boxes.tolist() == [[10, 10, 10, 18, 18, 18], [10, 74, 10, 18, 82, 18]]
    assert scores.tolist() == [np.float32(0.8), np.float32(0.6)]


def test_merge_of_no_detections_is_empty():
    boxes, scores = merge_patch_detections([(np.zeros((0, 6)), np.zeros(0))], np.zeros((1, 3)), 0.2, 0.1, 10)
    assert boxes.shape == (0, 6)
    assert scores.shape == (0,)


def test_stitcher_labels_instances_with_box_confidence():
    stitcher = InstanceStitcher((40, 40, 40))
    blob = np.zeros((8, 8, 8), np.float32)
    blob[2:6, 2:6, 2:6] = 0.9
    stitcher.add(np.array([0, 0, 0]), blob, score=0.4, threshold=0.5)
    stitcher.add(np.array([20, 20, 20]), blob, score=0.8, threshold=0.5)
    # A crop reaching past the border is clipped.
    stitcher.add(np.array([36, 0, 0]), blob, score=0.3, threshold=0.5)
    labels, instances = stitcher.instances(threshold=0.5, min_voxels=2)

    assert labels.dtype == np.uint8
    assert [label_id for label_id, _ in instances] == [1, 2, 3]
    assert [round(c, 2) for _, c in instances] == [0.8, 0.4, 0.3]
    assert (labels[22:26, 22:26, 22:26] == 1).all()
    assert (labels[2:6, 2:6, 2:6] == 2).all()
    assert (labels == 3).sum() == 2 * 4 * 4


def test_stitcher_drops_small_components():
    stitcher = InstanceStitcher((10, 10, 10))
    speck = np.zeros((2, 2, 2), np.float32)
    speck[0, 0, 0] = 1.0
    stitcher.add(np.array([4, 4, 4]), speck, score=0.9, threshold=0.5)
    labels, instances = stitcher.instances(threshold=0.5, min_voxels=2)
    assert instances == []
    assert not labels.any()


def test_stitcher_weights_confidence_by_segmenter():
    stitcher = InstanceStitcher((40, 40, 40))
    confident = np.zeros((8, 8, 8), np.float32)
    confident[2:6, 2:6, 2:6] = 1.0
    doubtful = np.zeros((8, 8, 8), np.float32)
    doubtful[2:6, 2:6, 2:6] = 0.6
    stitcher.add(np.array([0, 0, 0]), doubtful, score=0.8, threshold=0.5)
    stitcher.add(np.array([20, 20, 20]), confident, score=0.6, threshold=0.5)

    labels, instances = stitcher.instances(threshold=0.5, min_voxels=2, confidence="detector_x_segmenter")

    # 0.8 x 0.6 = 0.48 ranks below 0.6 x 1.0, so the confident instance becomes label 1.
    assert [round(c, 2) for _, c in instances] == [0.6, 0.48]
    assert (labels[22:26, 22:26, 22:26] == 1).all()
    assert (labels[2:6, 2:6, 2:6] == 2).all()


def test_stitcher_rejects_unknown_confidence():
    stitcher = InstanceStitcher((10, 10, 10))
    with pytest.raises(ValueError, match="detector_x_segmenter"):
        stitcher.instances(threshold=0.5, min_voxels=2, confidence="mean")
