"""3D U-Net that segments the fracture in a crop around each detected box.

Crops are float32 tensors (B, 1, X, Y, Z) with intensities windowed to [0, 1]. The
network outputs two-channel logits (B, 2, X, Y, Z): channel 0 background, channel 1
fracture. Label maps for the loss are (B, 1, X, Y, Z) with values 0 and 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import Tensor, nn

from ribfrac_ray.config import SegmenterConfig

SPATIAL_DIMS = 3
NUM_OUTPUT_CHANNELS = 2
FRACTURE_CHANNEL = 1


def build_segmenter(config: SegmenterConfig) -> nn.Module:
    """Build an untrained MONAI U-Net with one input channel and two output channels.

    Raises:
        ValueError: ``config.strides`` does not have one value fewer than ``config.channels``.
    """
    if len(config.channels) < 2 or len(config.strides) != len(config.channels) - 1:
        raise ValueError(
            "segmenter.strides needs one value fewer than segmenter.channels (at least 2 channels), "
            f"got channels={list(config.channels)}, strides={list(config.strides)}"
        )
    return UNet(
        spatial_dims=SPATIAL_DIMS,
        in_channels=1,
        out_channels=NUM_OUTPUT_CHANNELS,
        channels=tuple(config.channels),
        strides=tuple(config.strides),
        num_res_units=config.num_res_units,
    )


def check_crop_size(strides: Sequence[int], crop_size: Sequence[int]) -> None:
    """Raise ValueError unless each crop size (voxels) is divisible by the product of the U-Net's ``strides``.

    Other sizes fail inside the U-Net, where a skip connection and the upsampled
    features no longer have equal sizes.
    """
    divisor = math.prod(int(stride) for stride in strides)
    if len(crop_size) != SPATIAL_DIMS or any(int(size) % divisor for size in crop_size):
        raise ValueError(
            f"crop size {tuple(crop_size)} must be 3 sizes divisible by {divisor}, the product of "
            f"segmenter.strides {list(strides)}; change the crop size or the strides"
        )


def segmenter_loss(config: SegmenterConfig) -> DiceCELoss:
    """Return the Dice plus cross-entropy loss for logits (B, 2, X, Y, Z) and labels (B, 1, X, Y, Z).

    The labels are one-hot encoded inside the loss, and the logits go through a softmax
    for the Dice term. ``dice_weight`` and ``ce_weight`` weight the two terms.
    """
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        lambda_dice=config.dice_weight,
        lambda_ce=config.ce_weight,
    )


@torch.no_grad()
def foreground_probability(model: nn.Module, crops: Tensor) -> Tensor:
    """Compute the fracture probability (B, X, Y, Z) in [0, 1], switching ``model`` to evaluation mode.

    Args:
        model: from :func:`build_segmenter`, possibly wrapped in DistributedDataParallel.
        crops: (B, 1, X, Y, Z) float32 crops on the model's device, each size divisible
            by the product of the U-Net's strides (4 with the defaults).
    """
    if crops.ndim != SPATIAL_DIMS + 2 or crops.shape[1] != 1:
        raise ValueError(f"crops must have shape (B, 1, X, Y, Z), got {tuple(crops.shape)}")
    unet = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if isinstance(unet, UNet):
        check_crop_size(unet.strides, crops.shape[2:])

    model.eval()
    logits = model(crops)
    return torch.softmax(logits.float(), dim=1)[:, FRACTURE_CHANNEL]
