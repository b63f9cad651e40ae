"""Patch-level detection score used to rank detector checkpoints and Tune trials."""

import numpy as np
import pytest

from ribfrac_ray.training.validation import crop_dice, patch_detection_metrics

TRUTH = np.array([[10, 10, 10, 17, 17, 17]], np.float32)


def test_perfect_detection_scores_one():
    predictions = [(TRUTH.copy(), np.array([0.9], np.float32))]
    metrics = patch_detection_metrics(predictions, [TRUTH], n_scans=1)
    assert metrics["val_froc"] == pytest.approx(1.0)
    assert metrics["val_max_recall"] == pytest.approx(1.0)


def test_centre_inside_box_counts_as_hit():
    # Shifted by 3 voxels on every axis: box IoU is about 0.07, the centre is inside.
    shifted = TRUTH + 3
    metrics = patch_detection_metrics([(shifted, np.array([0.9], np.float32))], [TRUTH], n_scans=1)
    assert metrics["val_froc"] == pytest.approx(1.0)


def test_false_positives_lower_score():
    far = np.array([[40, 40, 40, 47, 47, 47]] * 10, np.float32)
    boxes = np.concatenate([far, TRUTH])
    scores = np.array([0.9] * 10 + [0.5], np.float32)
    metrics = patch_detection_metrics([(boxes, scores)], [TRUTH], n_scans=1)
    # The hit only appears at 10 false positives per scan, beyond the 8 FP point.
    assert metrics["val_froc"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["val_max_recall"] == pytest.approx(1.0)


def test_patches_without_truth_and_predictions():
    empty = (np.zeros((0, 6), np.float32), np.zeros(0, np.float32))
    metrics = patch_detection_metrics([empty, empty], [TRUTH, np.zeros((0, 6), np.float32)], n_scans=2)
    assert metrics["val_froc"] == pytest.approx(0.0, abs=1e-6)


def test_crop_dice_values():
    predicted = np.zeros((3, 4, 4, 4), bool)
    truth = np.zeros((3, 4, 4, 4), bool)
    predicted[0, :2] = True
    truth[0, :1] = True
    predicted[1, :2] = True
    assert crop_dice(predicted, truth) == pytest.approx([2 * 16 / 48, 0.0, 1.0])
