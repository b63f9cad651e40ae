"""The two :class:`~ribfrac_ray.training.loop.NetworkSpec` definitions and their loop entry points.

Batches come from the Parquet tables written by preprocessing. ``image`` is
float16 (B, X, Y, Z) in [0, 1]. Detector batches add ``boxes`` (B, max_boxes, 6)
and ``n_boxes`` (B,), and segmenter batches add ``mask`` uint8 (B, X, Y, Z).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ribfrac_ray.config import DetectorConfig, SegmenterConfig, apply_mapping
from ribfrac_ray.models.detector import build_detector, detect, detector_loss, unwrap_network, wrap_network
from ribfrac_ray.models.segmenter import build_segmenter, foreground_probability, segmenter_loss
from ribfrac_ray.training.loop import NetworkSpec, run_training
from ribfrac_ray.training.validation import patch_detection_metrics, crop_dice

DETECTOR_SCORE = "val_froc"
SEGMENTER_SCORE = "val_dice"


def _images(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["image"].float().unsqueeze(1)


def random_flip_axes(generator: torch.Generator) -> list[int]:
    """Pick each spatial axis (0 = x, 1 = y, 2 = z) with probability 0.5."""
    return [axis for axis in range(3) if torch.rand(1, generator=generator).item() < 0.5]


def flip_boxes(boxes: torch.Tensor, axes: list[int], size: tuple[int, ...]) -> torch.Tensor:
    """Mirror (n, 6) boxes in a patch of ``size`` voxels along ``axes``; min and max swap roles."""
    flipped = boxes.clone()
    for axis in axes:
        flipped[:, axis] = size[axis] - boxes[:, axis + 3]
        flipped[:, axis + 3] = size[axis] - boxes[:, axis]
    return flipped


_FLIPS = torch.Generator().manual_seed(0)


def _detector_config(config: dict[str, Any]) -> DetectorConfig:
    return apply_mapping(DetectorConfig(), config["detector"], source="detector checkpoint config")


def _build_detector(config: dict[str, Any]) -> tuple[Any, torch.nn.Module]:
    detector = build_detector(_detector_config(config), config["anchor_shapes"], tuple(config["patch_size"]))
    return detector, detector.network


def _wrap_detector(detector: Any) -> tuple[Any, Any]:
    import ray.train.torch

    # One object serves both roles; _validate_detector unwraps its network for the
    # duration of validation.
    wrapped = wrap_network(detector, ray.train.torch.prepare_model)
    return wrapped, wrapped


def _detector_step(detector: Any, batch: dict[str, torch.Tensor], loss_function: Any, augment: bool) -> tuple[torch.Tensor, dict[str, float]]:
    images = _images(batch)
    counts = batch["n_boxes"].tolist()
    boxes = [batch["boxes"][i, : int(n)].float() for i, n in enumerate(counts)]
    if augment:
        # Mirror the whole batch along random axes; ribs appear on both sides and at
        # every height, so mirrored patches are plausible new samples.
        axes = random_flip_axes(_FLIPS)
        if axes:
            images = torch.flip(images, dims=[axis + 2 for axis in axes])
            boxes = [flip_boxes(b, axes, tuple(images.shape[2:])) for b in boxes]
    return detector_loss(detector, images, boxes)


def _validate_detector(detector: Any, shard: Any, config: dict[str, Any]) -> dict[str, float]:
    # Rank 0 validates alone, so it must not call the DDP wrapper: its forward
    # broadcasts buffers to the other ranks, which wait at the report barrier.
    wrapped = detector.network
    detector.network = unwrap_network(detector)
    try:
        predictions, truths, scans = [], [], set()
        for batch in shard.iter_batches(batch_size=int(config["batch_size"]), batch_format="numpy"):
            images = torch.from_numpy(batch["image"].astype(np.float32)).unsqueeze(1)
            predictions.extend(detect(detector, images))
            truths.extend(boxes[: int(count)] for boxes, count in zip(batch["boxes"], batch["n_boxes"]))
            scans.update(str(public_id) for public_id in batch["public_id"])
    finally:
        detector.network = wrapped
    return patch_detection_metrics(predictions, truths, n_scans=max(1, len(scans)))


def _detector_meta(config: dict[str, Any]) -> dict[str, Any]:
    return {"config": config["detector"], "anchor_shapes": config["anchor_shapes"], "patch_size": list(config["patch_size"])}


DETECTOR = NetworkSpec(
    kind="detector",
    score_metric=DETECTOR_SCORE,
    build=_build_detector,
    make_loss=lambda config: None,
    wrap_ddp=_wrap_detector,
    train_step=_detector_step,
    validate=_validate_detector,
    meta=_detector_meta,
)


def _segmenter_config(config: dict[str, Any]) -> SegmenterConfig:
    return apply_mapping(SegmenterConfig(), config["segmenter"], source="segmenter checkpoint config")


def _build_segmenter(config: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    network = build_segmenter(_segmenter_config(config))
    return network, network


def _wrap_segmenter(network: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    import ray.train.torch

    return ray.train.torch.prepare_model(network), network


def _segmenter_step(network: torch.nn.Module, batch: dict[str, torch.Tensor], loss_function: Any, augment: bool) -> tuple[torch.Tensor, dict[str, float]]:
    images = _images(batch)
    masks = batch["mask"].long().unsqueeze(1)
    axes = [axis + 2 for axis in random_flip_axes(_FLIPS)] if augment else []
    if axes:
        images, masks = torch.flip(images, dims=axes), torch.flip(masks, dims=axes)
    logits = network(images)
    return loss_function(logits, masks), {}


def _validate_segmenter(network: torch.nn.Module, shard: Any, config: dict[str, Any]) -> dict[str, float]:
    dices = []
    for batch in shard.iter_batches(batch_size=int(config["batch_size"]), batch_format="numpy"):
        images = torch.from_numpy(batch["image"].astype(np.float32)).unsqueeze(1)
        probability = foreground_probability(network, images)
        dices.extend(crop_dice(probability.numpy() > 0.5, batch["mask"] > 0))
    return {SEGMENTER_SCORE: float(np.mean(dices)) if dices else 0.0}


def _segmenter_meta(config: dict[str, Any]) -> dict[str, Any]:
    return {"config": config["segmenter"], "crop_size": list(config["patch_size"])}


SEGMENTER = NetworkSpec(
    kind="segmenter",
    score_metric=SEGMENTER_SCORE,
    build=_build_segmenter,
    make_loss=lambda config: segmenter_loss(_segmenter_config(config)),
    wrap_ddp=_wrap_segmenter,
    train_step=_segmenter_step,
    validate=_validate_segmenter,
    meta=_segmenter_meta,
)

def detector_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for the RetinaNet."""
    run_training(config, DETECTOR)


def segmenter_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for the U-Net."""
    run_training(config, SEGMENTER)


SPECS = {"detector": DETECTOR, "segmenter": SEGMENTER}
LOOPS = {"detector": detector_loop, "segmenter": segmenter_loop}
