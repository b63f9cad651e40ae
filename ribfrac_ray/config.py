"""Typed configuration for every stage, with one source of defaults.

Each stage has a dataclass below; its field defaults are the only defaults in the
project. A YAML file overrides them section by section (the section names are the
field names of :class:`PipelineConfig`), and ``--set section.field=value`` flags
override the YAML. Every run records the fully resolved config
(:func:`config_to_dict`) as MLflow parameters and as a ``config.yaml`` artifact.

Array conventions used throughout the package: volumes are indexed (x, y, z) in
voxels after reorientation to the closest canonical (RAS+) orientation. Sizes
given as three integers are voxels in that order, and spacings are millimetres.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Invalid configuration: an unknown key, a wrong type or an out-of-range value."""


@dataclass
class PhantomConfig:
    """Built-in phantom data set (written in the RibFrac folder layout)."""

    out: str = "data"
    n_train: int = 16
    # The best detector checkpoint is picked on the validation patches. With 4 scans
    # (32 patches) that choice was noisy enough to pick an overfitted epoch; 8 scans
    # double the patches for about a minute more of demo time.
    n_val: int = 8
    n_test: int = 6
    shape: tuple[int, int, int] = (128, 128, 96)
    spacing: tuple[float, float, float] = (2.2, 2.2, 2.5)
    max_fractures: int = 4
    no_fracture_fraction: float = 0.15
    seed: int = 2020
    overwrite: bool = False


@dataclass
class WindowConfig:
    """Intensity window in Hounsfield units, mapped linearly to [0, 1] and clipped."""

    hu_min: float = -200.0
    hu_max: float = 1000.0


@dataclass
class PreprocessConfig:
    """Patch extraction from NIfTI volumes into Parquet tensor columns."""

    data_dir: str = "data"
    out_dir: str = "patches"
    splits: tuple[str, ...] = ("train", "val")
    det_patch_size: tuple[int, int, int] = (64, 64, 64)
    det_patches_per_fracture: int = 4
    det_jitter: int = 16
    det_negative_ratio: float = 0.5
    max_boxes: int = 16
    seg_crop_size: tuple[int, int, int] = (32, 32, 32)
    seg_crops_per_fracture: int = 6
    seg_jitter: int = 4
    chunk_size: int = 16
    num_tasks: int = 2
    task_memory_mb: int = 1024
    seed: int = 0
    strict: bool = False
    overwrite: bool = False


# Normalisation layers the detector's ResNet backbone accepts; see DetectorConfig.norm.
BACKBONE_NORMS = ("batch", "group")


@dataclass
class DetectorConfig:
    """3D RetinaNet: backbone width and depth, anchors and focal loss."""

    block_inplanes: tuple[int, ...] = (16, 32, 64, 128)
    layers: tuple[int, ...] = (1, 1, 1, 1)
    # Stride of the ResNet's first convolution. With the ResNet's max pooling,
    # backbone layer k has stride conv1_stride * 2**k voxels, so 2 puts layer 1
    # at stride 4, a 16^3 anchor grid on a 64^3 patch. Without it (max_pool false)
    # layer k has stride conv1_stride * 2**(k - 1).
    conv1_stride: int = 2
    # Edge of the first convolution's cubic kernel, in voxels.
    conv1_kernel: int = 7
    # NOTE: on the demo phantoms, conv1_stride 4 without max pooling trained 5 times
    # faster per step but did not generalise to the validation scans in 2400 steps.
    # The likely cause is that a stride-4 convolution samples a 2 to 3 voxel fracture
    # gap at one phase of its grid only, while max pooling after a stride-2 one keeps it.
    max_pool: bool = True
    # Normalisation in the ResNet backbone: "batch" or "group" (8 groups per layer).
    norm: str = "batch"
    # Width of the FPN and of both heads, a multiple of 8 because the heads' GroupNorm uses 8 groups.
    fpn_channels: int = 32
    # Backbone layers fed to the FPN. The FPN adds one max-pooled level after the last.
    returned_layers: tuple[int, ...] = (1, 2)
    # Base anchor shapes in voxels (x, y, z). Empty means "plan them from the
    # training boxes" with k-means under an IoU distance.
    anchor_shapes: tuple[tuple[float, float, float], ...] = ()
    n_anchor_shapes: int = 3
    # Multipliers applied to every base anchor shape; each adds one anchor per location.
    anchor_scales: tuple[float, ...] = (1.0,)
    # Weight of positive anchors in the focal loss. The hard-negative sampler already
    # balances anchors (positive_fraction), so positives get the larger share here,
    # unlike the 0.25 of RetinaNet papers that score every anchor.
    focal_alpha: float = 0.75
    focal_gamma: float = 1.0
    # "atss" (adaptive IoU threshold per box) or "iou" (fixed fg/bg IoU thresholds below).
    matcher: str = "atss"
    # ATSS candidates: the anchor locations nearest to the box centre, per feature level.
    atss_num_candidates: int = 4
    # Leave unmatched anchors centred inside a fracture box out of the classification
    # loss, instead of training them as background (see models/detector.py).
    ignore_centers_in_boxes: bool = True
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    # Hard-negative sampling of anchors for the classification loss, per patch.
    batch_size_per_image: int = 64
    positive_fraction: float = 0.3
    # Minimum hard negatives per patch. Without it, a patch without boxes gives
    # int(1 / positive_fraction - 1) negatives (2 at 0.3) to the loss.
    min_negatives_per_image: int = 16
    score_thresh: float = 0.05
    nms_thresh: float = 0.22
    detections_per_img: int = 32


@dataclass
class SegmenterConfig:
    """3D U-Net for the crop around each detected box."""

    channels: tuple[int, ...] = (16, 32, 64)
    strides: tuple[int, ...] = (2, 2)
    num_res_units: int = 1
    dice_weight: float = 1.0
    ce_weight: float = 1.0


@dataclass
class TrainConfig:
    """Ray Train settings shared by both networks."""

    patch_dir: str = "patches"
    storage_path: str = "ray_results"
    name: str = ""
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    # Ray placement group strategy for the workers: PACK fills one node first,
    # SPREAD prefers distinct nodes, STRICT_SPREAD requires one node per worker.
    placement_strategy: str = "PACK"
    epochs: int = 20
    batch_size: int = 4
    lr: float = 1e-3
    # "constant" keeps lr throughout. "cosine" lowers it from lr at the first epoch
    # towards 5% of it at the last, set per epoch, so a resumed run continues the
    # same curve. On the demo phantoms, 30 cosine epochs gave the detector a lower
    # best validation FROC (0.52) than 20 constant ones did (0.70 and 0.79).
    lr_schedule: str = "constant"
    weight_decay: float = 1e-5
    max_failures: int = 2
    num_to_keep: int = 2
    shuffle_buffer: int = 64
    # Mirror each batch along random axes (boxes and masks follow).
    augment: bool = True
    # Patch sets whose Parquet files total less than this (MiB on disk) are read
    # once into the object store instead of from disk every epoch; 0 disables it.
    cache_max_mb: int = 1024
    # A worker whose share of the training rows is at most this (MiB in memory)
    # keeps it after the first epoch and reshuffles it there each epoch. That skips
    # Ray Data's start-up cost per epoch. 0 streams the shard every epoch.
    worker_cache_mb: int = 512
    # Torch threads per worker; 0 means the node's cores divided by its workers.
    torch_threads: int = 0
    seed: int = 0


# Instance confidence modes of prediction; see PredictConfig.confidence.
CONFIDENCE_MODES = ("detector", "detector_x_segmenter")


@dataclass
class PredictConfig:
    """Two-stage prediction over whole volumes."""

    data_dir: str = "data"
    split: str = "test"
    out_dir: str = "predictions"
    detector_checkpoint: str = "models/detector"
    segmenter_checkpoint: str = "models/segmenter"
    patch_size: tuple[int, int, int] = (64, 64, 64)
    overlap: float = 0.25
    # The detector skips windows whose brightest voxel is below this value (HU):
    # without bone there is no rib to break. Cortical bone is several hundred HU
    # above it; set it to -1024 or below to run every window.
    bone_hu: float = 200.0
    patch_batch_size: int = 4
    score_thresh: float = 0.1
    nms_iou: float = 0.2
    max_boxes: int = 32
    crop_size: tuple[int, int, int] = (32, 32, 32)
    seg_threshold: float = 0.5
    min_voxels: int = 8
    # Confidence of each instance in the CSV: "detector" (its best box score) or
    # "detector_x_segmenter" (that score times the instance's mean foreground
    # probability). On the demo phantoms the product ranked fractures above false
    # positives better: for three trained detectors, FROC averages rose by 0.01 to 0.11
    # on the validation scans and by 0.03 to 0.11 on the test scans.
    confidence: str = "detector_x_segmenter"
    detector_actors: int = 1
    segmenter_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    # Memory reserved per actor in MiB, for Ray's scheduler; 0 reserves none.
    actor_memory_mb: int = 0
    overwrite: bool = False
    strict: bool = False


@dataclass
class EvaluateConfig:
    """Challenge metric over a ground-truth and a prediction folder."""

    gt_dir: str = "data/ribfrac-test-labels"
    pred_dir: str = "predictions"
    out_dir: str = "evaluation"
    iou_thresh: float = 0.2


@dataclass
class TrackingConfig:
    """MLflow tracking; an empty URI means a SQLite store in the working folder."""

    tracking_uri: str = ""
    experiment: str = "ribfrac-ray"


@dataclass
class RayConfig:
    """How to reach Ray; an empty address starts or joins a local instance."""

    address: str = ""
    num_cpus: int = 0
    object_store_mb: int = 0
    # Start a local instance with its dashboard on 127.0.0.1. The dashboard serves
    # Ray's State API, without which Ray Train's placement-group cleaner logs a
    # warning every few seconds and cannot free the CPUs of a killed run.
    include_dashboard: bool = True


@dataclass
class PipelineConfig:
    """All stages together; each field is one YAML section."""

    workdir: str = "ribfrac-demo"
    phantoms: PhantomConfig = field(default_factory=PhantomConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    # Flips are off for the detector. On the demo's 184 training patches, flipped
    # batches kept the patch-level validation FROC at 0.03 after 600 steps. Without
    # flips it reached 0.49 in a plain loop and 0.72 by epoch 9 under Ray Train.
    # Turn them on (train_detector.augment=true) for training sets large enough to
    # afford the slower start.
    # NOTE: even without flips, the demo detector's validation FROC stays near 0 for a
    # varying 6 to 16 epochs before it climbs. The 30 epochs leave room for a late
    # start, and the checkpoint with the best validation FROC is the one exported.
    train_detector: TrainConfig = field(
        default_factory=lambda: TrainConfig(name="detector", epochs=30, lr=2e-3, augment=False)
    )
    # The U-Net's steps cost about a tenth of the RetinaNet's, so it gets more epochs.
    train_segmenter: TrainConfig = field(default_factory=lambda: TrainConfig(name="segmenter", epochs=20, batch_size=8))
    predict: PredictConfig = field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# Fields that hold paths; relative values are taken relative to ``PipelineConfig.workdir``.
PATH_FIELDS = {
    "phantoms": ("out",),
    "preprocess": ("data_dir", "out_dir"),
    "train_detector": ("patch_dir", "storage_path"),
    "train_segmenter": ("patch_dir", "storage_path"),
    "predict": ("data_dir", "out_dir", "detector_checkpoint", "segmenter_checkpoint"),
    "evaluate": ("gt_dir", "pred_dir", "out_dir"),
}
MODELS_FOLDER = "models"


def resolve_paths(config: PipelineConfig) -> PipelineConfig:
    """Return a copy whose path fields are absolute, relative ones under ``workdir``."""
    workdir = Path(config.workdir).expanduser().resolve()
    updates: dict[str, Any] = {"workdir": str(workdir)}
    for section, names in PATH_FIELDS.items():
        current = getattr(config, section)
        values = {}
        for name in names:
            value = getattr(current, name)
            if value:
                path = Path(value).expanduser()
                values[name] = str(path if path.is_absolute() else workdir / path)
        updates[section] = dataclasses.replace(current, **values)
    return dataclasses.replace(config, **updates)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Convert a config dataclass to plain YAML-safe types (tuples become lists)."""
    return _to_plain(dataclasses.asdict(config))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return value


def flatten_config(config: Any) -> dict[str, str]:
    """Flatten a config into ``section.field -> str`` pairs for MLflow parameters."""
    return flatten_config_dict(config_to_dict(config))


def flatten_config_dict(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into dotted keys with string values."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_config_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def apply_mapping(config: Any, values: dict[str, Any], source: str) -> Any:
    """Return a copy of ``config`` with ``values`` (nested by section) applied.

    Raises ConfigError naming ``source`` and the dotted key for an unknown key or
    a value of the wrong type.
    """
    return _apply(config, values, source, prefix="")


def _apply(config: Any, values: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(type(config))
    known = {item.name for item in dataclasses.fields(config)}
    updates: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            choices = ", ".join(sorted(known))
            raise ConfigError(f"{source}: unknown config key '{dotted}'; valid keys here: {choices}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' is a section and needs a mapping, got {value!r}")
            updates[key] = _apply(current, value, source, prefix=f"{dotted}.")
        else:
            updates[key] = coerce_value(value, hints[key], f"{source}: '{dotted}'")
    return dataclasses.replace(config, **updates)


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's annotated type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if isinstance(value, str) and hint is not str and origin is not tuple:
        value = _parse_scalar(value)

    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        return str(value)
    if origin is tuple:
        return _coerce_tuple(value, args, where)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: union-typed fields are not supported")
    return value


def _coerce_tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        value = [] if value.strip() in ("", "[]") else parsed
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce_value(item, args[0], where) for item in value)
    if len(value) != len(args):
        raise ConfigError(f"{where} needs {len(args)} values, got {len(value)}: {value!r}")
    return tuple(coerce_value(item, arg, where) for item, arg in zip(value, args))


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["train_detector.epochs=3", ...]`` into a nested mapping."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects section.key=value, got {pair!r}")
        dotted, raw = pair.split("=", 1)
        parts = dotted.strip().split(".")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = raw
    return nested


def resolve_config(
    yaml_path: str | None = None,
    overrides: list[str] | None = None,
    base: PipelineConfig | None = None,
) -> PipelineConfig:
    """Build the pipeline config: defaults, then the YAML file, then ``--set`` pairs."""
    config = base or PipelineConfig()
    if yaml_path:
        config = apply_mapping(config, load_yaml(yaml_path), source=str(yaml_path))
    if overrides:
        config = apply_mapping(config, parse_overrides(overrides), source="--set")
    check_values(config)
    return config


def check_values(config: PipelineConfig) -> None:
    """Reject values that type-check but cannot work, naming the key, the value and the fix.

    Raises:
        ConfigError: the first value out of its range.
    """
    window = config.window
    if window.hu_min >= window.hu_max:
        raise ConfigError(
            f"window.hu_min ({window.hu_min:g}) must be below window.hu_max ({window.hu_max:g}); "
            "CT windows are given as [low, high] in HU, for example -200 and 1000"
        )

    positive_sizes = {
        "preprocess.det_patch_size": config.preprocess.det_patch_size,
        "preprocess.seg_crop_size": config.preprocess.seg_crop_size,
        "predict.patch_size": config.predict.patch_size,
        "predict.crop_size": config.predict.crop_size,
        "phantoms.shape": config.phantoms.shape,
    }
    for key, size in positive_sizes.items():
        if min(size) < 1:
            raise ConfigError(f"{key} must be at least 1 voxel along each axis, got {list(size)}")

    for section in ("train_detector", "train_segmenter"):
        train = getattr(config, section)
        for name in ("epochs", "batch_size", "num_workers"):
            if getattr(train, name) < 1:
                raise ConfigError(f"{section}.{name} must be at least 1, got {getattr(train, name)}")
        if train.lr <= 0:
            raise ConfigError(f"{section}.lr must be above 0, got {train.lr:g}")

    if config.detector.norm not in BACKBONE_NORMS:
        raise ConfigError(f"detector.norm must be one of {', '.join(BACKBONE_NORMS)}, got {config.detector.norm!r}")

    if config.predict.confidence not in CONFIDENCE_MODES:
        raise ConfigError(
            f"predict.confidence must be one of {', '.join(CONFIDENCE_MODES)}, got {config.predict.confidence!r}"
        )

    if not 0.0 <= config.predict.overlap < 1.0:
        raise ConfigError(f"predict.overlap must lie in [0, 1), got {config.predict.overlap:g}. The default is 0.25")


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML that :func:`resolve_config` reads back unchanged."""
    from ribfrac_ray.io.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))
