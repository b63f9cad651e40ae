"""Model checkpoints: one folder with the weights, the metadata to rebuild the network, and optionally the optimizer.

Folder layout:

- ``model.safetensors``: the network's state dict. For a detector this is the state dict
  of ``detector.network`` (see :func:`ribfrac_ray.models.detector.unwrap_network`), for a
  segmenter that of the U-Net. A ``module.`` prefix left by DistributedDataParallel is
  removed on saving.
- ``meta.json``: ``kind`` (``"detector"`` or ``"segmenter"``), ``config`` (the
  :class:`DetectorConfig` or :class:`SegmenterConfig` as a plain mapping), for a detector
  ``anchor_shapes`` (finest-level anchor sizes in voxels, as passed to ``build_detector``)
  and ``patch_size`` (voxels), for a segmenter ``crop_size`` (voxels), plus ``epoch``,
  ``metrics`` and any other JSON values the caller adds.
- ``optimizer.pt`` (optional): ``optimizer.state_dict()``, read with ``torch.load(weights_only=True)``.

Each file is written atomically and ``meta.json`` last, so a folder that has
``meta.json`` contains a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from torch import Tensor, nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ribfrac_ray.config import DetectorConfig, SegmenterConfig, apply_mapping, config_to_dict
from ribfrac_ray.io.atomic import atomic_write_text, atomic_write_with
from ribfrac_ray.models.detector import build_detector
from ribfrac_ray.models.segmenter import build_segmenter

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
OPTIMIZER_FILE = "optimizer.pt"
FORMAT_VERSION = 1
KINDS = ("detector", "segmenter")
REQUIRED_META_KEYS = {
    "detector": ("config", "anchor_shapes", "patch_size"),
    "segmenter": ("config",),
}


class CheckpointError(ValueError):
    """A checkpoint folder whose metadata or weights are invalid or of the wrong kind."""


def detector_meta(
    config: DetectorConfig,
    anchor_shapes: Sequence[Sequence[float]],
    patch_size: Sequence[int],
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Return the ``meta.json`` mapping for a detector, with ``extra`` as further JSON-serialisable keys."""
    return {
        "kind": "detector",
        "config": config_to_dict(config),
        "anchor_shapes": [[float(value) for value in shape] for shape in anchor_shapes],
        "patch_size": [int(size) for size in patch_size],
        "epoch": epoch,
        "metrics": dict(metrics or {}),
        **extra,
    }


def segmenter_meta(
    config: SegmenterConfig,
    crop_size: Sequence[int],
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Return the ``meta.json`` mapping for a segmenter, with ``extra`` as further JSON-serialisable keys."""
    return {
        "kind": "segmenter",
        "config": config_to_dict(config),
        "crop_size": [int(size) for size in crop_size],
        "epoch": epoch,
        "metrics": dict(metrics or {}),
        **extra,
    }


def save_checkpoint(
    folder: str | Path,
    model_state_dict: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (created if missing) and return its path.

    Without ``optimizer_state``, an ``optimizer.pt`` left from an earlier save is deleted
    so that it cannot be mistaken for this model's optimizer.

    Raises:
        CheckpointError: ``meta`` lacks a required key or is not JSON-serialisable.
    """
    folder = Path(folder)
    _check_meta(dict(meta), folder)
    try:
        meta_text = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, default=_to_json)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder}: metadata is not JSON-serialisable: {error}") from error
    folder.mkdir(parents=True, exist_ok=True)

    state = dict(model_state_dict)
    consume_prefix_in_state_dict_if_present(state, "module.")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    atomic_write_with(folder / WEIGHTS_FILE, lambda path: safetensors.torch.save_file(tensors, str(path)))

    optimizer_path = folder / OPTIMIZER_FILE
    if optimizer_state is not None:
        atomic_write_with(optimizer_path, lambda path: torch.save(dict(optimizer_state), path))
    elif optimizer_path.exists():
        optimizer_path.unlink()

    atomic_write_text(folder / META_FILE, meta_text)
    logger.info("saved %s checkpoint to %s", meta["kind"], folder)
    return folder


def read_checkpoint(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint folder: ``(state_dict on device, meta, optimizer state or None)``.

    Raises:
        FileNotFoundError: the folder, ``model.safetensors`` or ``meta.json`` is missing.
        CheckpointError: ``meta.json`` is invalid or of a newer format.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    missing = [name for name in (META_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint folder {folder} is missing {', '.join(missing)}; "
            "it is not a checkpoint or its save was interrupted"
        )

    meta = _read_meta(folder)
    state_dict = safetensors.torch.load_file(str(folder / WEIGHTS_FILE), device=str(device))

    optimizer_state = None
    optimizer_path = folder / OPTIMIZER_FILE
    if optimizer_path.is_file():
        optimizer_state = torch.load(optimizer_path, map_location=device, weights_only=True)
    return state_dict, meta, optimizer_state


def load_detector(folder: str | Path, device: str | torch.device = "cpu") -> RetinaNetDetector:
    """Rebuild the detector saved in ``folder`` with its weights, on ``device`` and in evaluation mode."""
    folder = Path(folder)
    state_dict, meta, _ = read_checkpoint(folder, device)
    _check_kind(meta, "detector", folder)

    config = apply_mapping(DetectorConfig(), meta["config"], source=str(folder / META_FILE))
    detector = build_detector(config, meta["anchor_shapes"], tuple(meta["patch_size"]))
    _load_weights(detector.network, state_dict, folder)
    detector.network.to(device)
    return detector.eval()


def load_segmenter(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the segmenter saved in ``folder`` with its weights, on ``device`` and in evaluation mode."""
    folder = Path(folder)
    state_dict, meta, _ = read_checkpoint(folder, device)
    _check_kind(meta, "segmenter", folder)

    config = apply_mapping(SegmenterConfig(), meta["config"], source=str(folder / META_FILE))
    model = build_segmenter(config)
    _load_weights(model, state_dict, folder)
    model.to(device)
    return model.eval()


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")

    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is newer than this ribfrac-ray reads ({FORMAT_VERSION}); "
            "upgrade ribfrac-ray"
        )
    _check_meta(meta, folder)
    return meta


def _check_meta(meta: dict[str, Any], folder: Path) -> None:
    kind = meta.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"checkpoint {folder}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    missing = [key for key in REQUIRED_META_KEYS[kind] if key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {folder}: {kind} metadata is missing {', '.join(missing)}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"checkpoint {folder}: 'config' must be a mapping, got {type(meta['config']).__name__}")


def _check_kind(meta: dict[str, Any], expected: str, folder: Path) -> None:
    if meta["kind"] != expected:
        raise CheckpointError(f"checkpoint {folder} contains a {meta['kind']}, expected a {expected}")


def _load_weights(model: nn.Module, state_dict: dict[str, Tensor], folder: Path) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {folder}: the weights do not fit the network that meta.json describes: {error}"
        ) from error


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON-serialisable: {value!r}")
