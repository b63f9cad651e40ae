"""Random flips used in training: boxes must follow the mirrored voxels."""

import numpy as np
import torch

from ribfrac_ray.boxes import boxes_from_instances
from ribfrac_ray.training.networks import flip_boxes


def test_flipped_boxes_match_flipped_mask():
    mask = np.zeros((16, 12, 10), np.uint8)
    mask[2:5, 7:11, 0:3] = 1
    _, boxes = boxes_from_instances(mask)
    for axes in ([0], [1], [2], [0, 2], [0, 1, 2]):
        flipped_mask = np.flip(mask, axis=axes)
        _, expected = boxes_from_instances(np.ascontiguousarray(flipped_mask))
        flipped = flip_boxes(torch.from_numpy(boxes), axes, mask.shape)
        assert flipped.numpy().tolist() == expected.tolist(), axes


def test_flip_twice_is_identity():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 5.0, 9.0, 4.0]])
    twice = flip_boxes(flip_boxes(boxes, [0, 1, 2], (10, 10, 10)), [0, 1, 2], (10, 10, 10))
    assert torch.equal(twice, boxes)
