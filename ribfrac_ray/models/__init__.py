"""Networks of both stages: the RetinaNet detector, its anchors, the U-Net segmenter, and their checkpoints."""

from ribfrac_ray.models.anchors import expand_anchor_shapes, plan_anchor_shapes, resolve_anchor_shapes
from ribfrac_ray.models.checkpoint import (
    CheckpointError,
    detector_meta,
    load_detector,
    load_segmenter,
    read_checkpoint,
    save_checkpoint,
    segmenter_meta,
)
from ribfrac_ray.models.detector import (
    build_detector,
    count_parameters,
    detect,
    detector_loss,
    feature_strides,
    unwrap_network,
    wrap_network,
)
from ribfrac_ray.models.segmenter import build_segmenter, check_crop_size, foreground_probability, segmenter_loss

__all__ = [
    "CheckpointError",
    "build_detector",
    "build_segmenter",
    "check_crop_size",
    "count_parameters",
    "detect",
    "detector_loss",
    "detector_meta",
    "expand_anchor_shapes",
    "feature_strides",
    "foreground_probability",
    "load_detector",
    "load_segmenter",
    "plan_anchor_shapes",
    "read_checkpoint",
    "resolve_anchor_shapes",
    "save_checkpoint",
    "segmenter_loss",
    "segmenter_meta",
    "unwrap_network",
    "wrap_network",
]
