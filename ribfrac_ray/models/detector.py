"""3D RetinaNet that proposes fracture boxes in CT patches, built from MONAI's detection components.

Conventions for the whole module:

- Images are float32 tensors (B, 1, X, Y, Z) with intensities already windowed to [0, 1].
- Boxes are float32 voxel coordinates ``[xmin, ymin, zmin, xmax, ymax, zmax]`` in the
  patch (MONAI's ``StandardMode``), min corner inclusive and max corner exclusive.
- There is one foreground class (fracture), label 0 in MONAI's targets, and scores are
  sigmoid probabilities in [0, 1].

Feature levels. MONAI's ResNet starts with a convolution of stride ``conv1_stride`` and a
stride-2 max pool, and layers 2 to 4 each halve the resolution again, so backbone layer k
has stride ``conv1_stride * 2**k`` voxels. The FPN returns ``returned_layers`` plus one
max-pooled level at twice the last stride. The defaults (``conv1_stride`` 2, layers 1 and 2)
give strides 4, 8 and 16 voxels, which are 16^3, 8^3 and 4^3 anchor grids on a 64^3 patch.
A 6 to 14 voxel fracture spans 1.5 to 3.5 cells of the finest grid, so the nearest anchor
centre is at most 2 voxels away on each axis. Returning layer 3 as well would add levels
of stride 16 and 32, with cells as large as the largest fractures or larger.

Anchors. The base anchor shapes (:mod:`ribfrac_ray.models.anchors`) are the anchor sizes
on the finest level. Level i multiplies them by ``stride_i / stride_0`` (1, 2, 4 with the
defaults), so the coarser levels cover fractures 2 and 4 times larger.

Distributed training. ``RetinaNetDetector`` copies the attributes it needs from its
network (``spatial_dims``, ``num_classes``, ``num_anchors``, ``size_divisible`` and the
output keys) once, in ``__init__``, and afterwards only calls ``self.network(images)``.
Replacing ``detector.network`` with a ``DistributedDataParallel`` wrapper after
:func:`build_detector` therefore works, for training and for :func:`detect`.
:func:`wrap_network` does that with any wrapping function, for example Ray Train's
``prepare_model``, which also moves the network to the worker's device:

.. code-block:: python

    detector = build_detector(config, anchor_shapes, patch_size)
    wrap_network(detector, ray.train.torch.prepare_model)
    optimizer = torch.optim.AdamW(detector.network.parameters(), lr=1e-3)
    loss, values = detector_loss(detector, images.to(device), boxes_list)
    ...
    state_dict = unwrap_network(detector).state_dict()  # keys without "module."

Do not wrap the detector itself, because :func:`detector_loss` and :func:`detect` need
its attributes. Train through :func:`detector_loss` rather than ``detector(images, targets)``.
With MONAI's loss alone, a step in which one rank has no matched box leaves the regression
head without gradients, and DistributedDataParallel raises "Expected to have finished
reduction in the prior iteration" on the next step. The tests check the wrapped detector
with two CPU processes over gloo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.losses import FocalLoss
from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
from monai.networks.nets import resnet
from torch import Tensor, nn

from ribfrac_ray.config import BACKBONE_NORMS, DetectorConfig

SPATIAL_DIMS = 3
NUM_CLASSES = 1
FRACTURE_LABEL = 0
# Channels per GroupNorm group in MONAI's RetinaNet heads, which use 8 groups.
HEAD_NORM_GROUPS = 8
MATCHERS = ("atss", "iou")
# Boxes kept per feature level before NMS (MONAI's default). A 64^3 patch has at most
# 4096 locations per level, times the anchors per location.
TOPK_CANDIDATES_PER_LEVEL = 1000
# Hard negatives are drawn at random from the pool_size * n highest-scoring negatives (MONAI's default).
HARD_NEGATIVE_POOL_SIZE = 10
# MONAI's matched index for anchors left out of the classification loss (Matcher.BETWEEN_THRESHOLDS).
IGNORED_ANCHOR = -2
# SmoothL1 on encoded box offsets, with the beta of RetinaNet and MONAI's default.
BOX_LOSS_BETA = 1.0 / 9.0


class FractureDetector(RetinaNetDetector):
    """MONAI's RetinaNet detector with an optional ignore zone around each box.

    MONAI's matchers treat every anchor that is not matched to a box as a negative,
    including anchors centred inside a small 3D box that ATSS did not pick. An anchor
    of a 9-voxel box's size, one 4-voxel grid cell off along one axis, still has an
    IoU of 0.38 with the box. As negatives such anchors ask the classifier to fire at
    exactly the matched cells and not at their neighbours on the same fracture, and
    the hard-negative sampler prefers them because they score high. With ``ignore_centers_in_boxes`` such
    anchors are left out of the classification loss instead. The validation rule in
    :mod:`ribfrac_ray.training.validation` also counts a box centred inside a
    fracture as a hit.
    """

    ignore_centers_in_boxes: bool = False

    def compute_anchor_matched_idxs(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]], num_anchor_locs_per_level: Sequence[int]
    ) -> list[Tensor]:
        matched = super().compute_anchor_matched_idxs(anchors, targets, num_anchor_locs_per_level)
        if not self.ignore_centers_in_boxes:
            return matched
        return [
            _ignore_centers_in_boxes(matched_per_image, anchors_per_image, target[self.target_box_key])
            for matched_per_image, anchors_per_image, target in zip(matched, anchors, targets)
        ]


def _ignore_centers_in_boxes(matched: Tensor, anchors: Tensor, boxes: Tensor) -> Tensor:
    """Mark unmatched anchors (index < 0) whose centre lies inside a box as ignored (-2).

    ``anchors`` (N, 6) and ``boxes`` (M, 6) are ``[xmin, ymin, zmin, xmax, ymax, zmax]`` in voxels.
    """
    if boxes.numel() == 0:
        return matched
    boxes = boxes.to(anchors.device, anchors.dtype)
    centers = (anchors[:, :SPATIAL_DIMS] + anchors[:, SPATIAL_DIMS:]) / 2
    inside = (
        (centers[:, None, :] >= boxes[None, :, :SPATIAL_DIMS]) & (centers[:, None, :] < boxes[None, :, SPATIAL_DIMS:])
    ).all(dim=2).any(dim=1)
    ignored = matched.clone()
    ignored[(matched < 0) & inside] = IGNORED_ANCHOR
    return ignored


def feature_strides(config: DetectorConfig) -> list[int]:
    """Return the stride in voxels of every FPN level, finest first (returned layers, then the pooled level)."""
    first_layer_stride = config.conv1_stride * (2 if config.max_pool else 1)
    strides = [first_layer_stride * 2 ** (layer - 1) for layer in config.returned_layers]
    return strides + [2 * strides[-1]]


def build_detector(
    config: DetectorConfig,
    anchor_shapes: Sequence[Sequence[float]],
    patch_size: Sequence[int],
) -> RetinaNetDetector:
    """Build an untrained RetinaNet detector ready for :func:`detector_loss` and :func:`detect`.

    Args:
        config: network, matcher, sampler, loss and box-selection settings.
        anchor_shapes: anchor sizes (x, y, z) in voxels on the finest feature level, one
            anchor per shape and location; typically from
            :func:`ribfrac_ray.models.anchors.resolve_anchor_shapes`.
        patch_size: (X, Y, Z) input size in voxels; each must be divisible by the
            coarsest feature stride (16 with the defaults).

    Raises:
        ValueError: an invalid config value, anchor shape or patch size.
    """
    _check_config(config)
    strides = feature_strides(config)
    _check_anchor_shapes(anchor_shapes)
    _check_patch_size(patch_size, strides[-1])

    network = RetinaNet(
        spatial_dims=SPATIAL_DIMS,
        num_classes=NUM_CLASSES,
        num_anchors=len(anchor_shapes),
        feature_extractor=_build_feature_extractor(config),
        size_divisible=strides[-1],
    )
    anchor_generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[stride / strides[0] for stride in strides],
        base_anchor_shapes=[[float(value) for value in shape] for shape in anchor_shapes],
    )
    detector = FractureDetector(network, anchor_generator)
    detector.ignore_centers_in_boxes = config.ignore_centers_in_boxes

    # The classification head has one logit per anchor and MONAI's targets are one-hot over
    # the foreground classes only, without a background channel. Only a sigmoid focal loss
    # fits that (a softmax over one channel is constant), and the box selector applies a
    # sigmoid to the same logits at inference.
    detector.set_cls_loss(
        FocalLoss(
            include_background=True,
            to_onehot_y=False,
            use_softmax=False,
            gamma=config.focal_gamma,
            alpha=config.focal_alpha,
            reduction="mean",
        )
    )
    detector.set_box_regression_loss(
        nn.SmoothL1Loss(beta=BOX_LOSS_BETA, reduction="mean"), encode_gt=True, decode_pred=False
    )
    _set_matcher(detector, config)
    detector.set_hard_negative_sampler(
        batch_size_per_image=config.batch_size_per_image,
        positive_fraction=config.positive_fraction,
        min_neg=config.min_negatives_per_image,
        pool_size=HARD_NEGATIVE_POOL_SIZE,
    )
    detector.set_box_selector_parameters(
        score_thresh=config.score_thresh,
        topk_candidates_per_level=TOPK_CANDIDATES_PER_LEVEL,
        nms_thresh=config.nms_thresh,
        detections_per_img=config.detections_per_img,
        apply_sigmoid=True,
    )
    return detector


def _build_feature_extractor(config: DetectorConfig) -> BackboneWithFPN:
    """Build a MONAI ResNet with an FPN of ``config.fpn_channels`` over ``config.returned_layers``.

    MONAI's ``resnet_fpn_feature_extractor`` fixes the FPN, and so the heads, at 256
    channels. This builds the same structure at a configurable width.
    """
    backbone = resnet.ResNet(
        block=resnet.ResNetBlock,
        layers=list(config.layers),
        block_inplanes=list(config.block_inplanes),
        spatial_dims=SPATIAL_DIMS,
        n_input_channels=1,
        conv1_t_size=config.conv1_kernel,
        conv1_t_stride=config.conv1_stride,
        no_max_pool=not config.max_pool,
        feed_forward=False,
        norm=_backbone_norm(config.norm),
    )
    return_layers = {f"layer{layer}": str(index) for index, layer in enumerate(config.returned_layers)}
    in_channels_list = [
        config.block_inplanes[layer - 1] * resnet.ResNetBlock.expansion for layer in config.returned_layers
    ]
    # BackboneWithFPN keeps the backbone only up to the last returned layer and appends a max-pooled level.
    return BackboneWithFPN(
        backbone=backbone,
        return_layers=return_layers,
        in_channels_list=in_channels_list,
        out_channels=config.fpn_channels,
        spatial_dims=SPATIAL_DIMS,
    )


def _backbone_norm(name: str) -> str | tuple[str, dict[str, Any]]:
    if name == "group":
        return ("group", {"num_groups": HEAD_NORM_GROUPS})
    return name


def _set_matcher(detector: RetinaNetDetector, config: DetectorConfig) -> None:
    # ATSS is the default because fixed IoU thresholds suit small 3D boxes poorly. IoU falls
    # with the cube of the per-axis overlap, so an 8-voxel box 2 voxels off an 8-voxel
    # anchor's centre on each axis has IoU 0.27. At fg_iou_thresh 0.5, most fractures would
    # then keep only the one low-quality match. ATSS sets each box's threshold to the mean
    # plus standard deviation of the IoUs of its nearest candidates on every level, which
    # adapts to the box size. center_in_gt=False keeps candidates whose centre lies just
    # outside a thin box.
    if config.matcher == "atss":
        detector.set_atss_matcher(num_candidates=config.atss_num_candidates, center_in_gt=False)
    else:
        detector.set_regular_matcher(config.fg_iou_thresh, config.bg_iou_thresh, allow_low_quality_matches=True)


def _check_config(config: DetectorConfig) -> None:
    if len(config.layers) != 4 or len(config.block_inplanes) != 4:
        raise ValueError(
            "detector.layers and detector.block_inplanes need 4 values each (MONAI's ResNet has 4 layers), "
            f"got layers={list(config.layers)}, block_inplanes={list(config.block_inplanes)}"
        )
    layers = list(config.returned_layers)
    if not layers or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] > 4:
        raise ValueError(f"detector.returned_layers must be increasing values in 1..4, got {layers}")
    if config.conv1_stride < 1:
        raise ValueError(f"detector.conv1_stride must be at least 1, got {config.conv1_stride}")
    if config.fpn_channels < HEAD_NORM_GROUPS or config.fpn_channels % HEAD_NORM_GROUPS:
        raise ValueError(
            f"detector.fpn_channels must be a positive multiple of {HEAD_NORM_GROUPS} "
            f"(the heads' GroupNorm groups), got {config.fpn_channels}"
        )
    if config.norm not in BACKBONE_NORMS:
        raise ValueError(f"detector.norm must be one of {', '.join(BACKBONE_NORMS)}, got {config.norm!r}")
    if config.norm == "group" and any(width % HEAD_NORM_GROUPS for width in config.block_inplanes):
        raise ValueError(
            f"detector.norm 'group' needs block_inplanes divisible by {HEAD_NORM_GROUPS}, got {list(config.block_inplanes)}"
        )
    if config.matcher not in MATCHERS:
        raise ValueError(f"detector.matcher must be one of {', '.join(MATCHERS)}, got {config.matcher!r}")
    if not 0.0 < config.positive_fraction < 1.0:
        raise ValueError(f"detector.positive_fraction must be in (0, 1), got {config.positive_fraction}")


def _check_anchor_shapes(anchor_shapes: Sequence[Sequence[float]]) -> None:
    shapes = np.asarray(anchor_shapes, dtype=np.float64)
    if shapes.ndim != 2 or shapes.shape[1] != SPATIAL_DIMS or len(shapes) == 0:
        raise ValueError(f"anchor shapes must be a non-empty list of [x, y, z] sizes in voxels, got {anchor_shapes!r}")
    if not np.all(np.isfinite(shapes)) or np.any(shapes <= 0):
        raise ValueError(f"anchor shapes must be positive, got {anchor_shapes!r}")


def _check_patch_size(patch_size: Sequence[int], divisor: int) -> None:
    if len(patch_size) != SPATIAL_DIMS or any(int(size) % divisor for size in patch_size):
        raise ValueError(
            f"patch size {tuple(patch_size)} must be 3 sizes divisible by {divisor}, "
            "the coarsest feature stride in voxels; change preprocess.det_patch_size or "
            "detector.returned_layers / detector.conv1_stride"
        )


def detector_loss(
    detector: RetinaNetDetector,
    images: Tensor,
    boxes_list: Sequence[Tensor | np.ndarray],
) -> tuple[Tensor, dict[str, float]]:
    """Compute the training loss of one batch, switching the detector to training mode.

    Args:
        detector: from :func:`build_detector`, its network optionally wrapped by :func:`wrap_network`.
        images: (B, 1, X, Y, Z) float32 patches on the network's device.
        boxes_list: B arrays of shape (n_i, 6) in voxels of the patch. n_i may be 0, and
            such a patch contributes hard negatives to the classification loss.

    Returns:
        The scalar loss to back-propagate (focal classification loss plus box regression
        loss), and its parts as floats under ``"loss"``, ``"cls_loss"`` and ``"box_loss"``.
    """
    if len(boxes_list) != images.shape[0]:
        raise ValueError(f"got {len(boxes_list)} box arrays for a batch of {images.shape[0]} patches")
    targets = [_make_target(boxes, images.device, index) for index, boxes in enumerate(boxes_list)]

    head_outputs: list[Tensor] = []
    hook = detector.network.register_forward_hook(
        lambda _module, _inputs, output: head_outputs.extend(_collect_tensors(output))
    )
    detector.train()
    try:
        losses = detector(images, targets)
    finally:
        hook.remove()

    cls_loss = losses[detector.cls_key]
    box_loss = losses[detector.box_reg_key].to(cls_loss.device)
    # When no anchor in the batch matches a box (all patches negative), MONAI returns a
    # constant 0 box loss and the regression head gets no gradient. DistributedDataParallel
    # then raises on the next step unless find_unused_parameters is set, so the raw head
    # outputs are added with weight 0 to give every parameter a gradient.
    zero_weight_outputs = torch.stack([output.sum() for output in head_outputs]).sum() * 0.0
    total = cls_loss + box_loss + zero_weight_outputs

    values = {"loss": float(total.detach()), "cls_loss": float(cls_loss.detach()), "box_loss": float(box_loss.detach())}
    return total, values


def _make_target(boxes: Tensor | np.ndarray, device: torch.device, index: int) -> dict[str, Tensor]:
    boxes_t = torch.as_tensor(np.asarray(boxes, np.float32) if isinstance(boxes, np.ndarray) else boxes)
    boxes_t = boxes_t.to(device=device, dtype=torch.float32).reshape(-1, 2 * SPATIAL_DIMS)
    sizes = boxes_t[:, SPATIAL_DIMS:] - boxes_t[:, :SPATIAL_DIMS]
    if bool((sizes <= 0).any()):
        raise ValueError(
            f"patch {index}: boxes need max > min on every axis, got {boxes_t[(sizes <= 0).any(dim=1)].tolist()}"
        )
    labels = torch.full((boxes_t.shape[0],), FRACTURE_LABEL, dtype=torch.long, device=device)
    return {"boxes": boxes_t, "labels": labels}


def _collect_tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [tensor for item in output for tensor in _collect_tensors(item)]
    return []


@torch.no_grad()
def detect(detector: RetinaNetDetector, images: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Detect fractures in a batch of patches, switching the detector to evaluation mode.

    Args:
        images: (B, 1, X, Y, Z) float32 patches on the network's device.

    Returns:
        One ``(boxes, scores)`` pair per patch: float32 boxes (n, 6) in voxels of the patch,
        clipped to it, and float32 scores (n,) in [0, 1], highest first. Boxes pass
        ``score_thresh``, NMS at ``nms_thresh`` and the ``detections_per_img`` limit.
    """
    detector.eval()
    outputs = detector(images)
    results = []
    for output in outputs:
        boxes = output[detector.target_box_key].float().cpu().numpy().reshape(-1, 2 * SPATIAL_DIMS)
        scores = output[detector.pred_score_key].float().cpu().numpy().reshape(-1)
        results.append((boxes, scores))
    return results


def wrap_network(detector: RetinaNetDetector, wrap_fn: Callable[[nn.Module], nn.Module]) -> RetinaNetDetector:
    """Replace ``detector.network`` with ``wrap_fn(detector.network)`` and return the detector.

    ``wrap_fn`` is typically ``ray.train.torch.prepare_model`` or
    ``lambda net: DistributedDataParallel(net)``. Build optimizers from
    ``detector.network.parameters()`` after wrapping.
    """
    detector.network = wrap_fn(detector.network)
    return detector


def unwrap_network(detector: RetinaNetDetector) -> nn.Module:
    """Return the RetinaNet network inside any DistributedDataParallel or DataParallel wrappers."""
    network = detector.network
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


def count_parameters(module: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)
