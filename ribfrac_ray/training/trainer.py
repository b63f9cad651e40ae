"""Driver side of training: datasets, anchors, the TorchTrainer, and the exported model.

``train_network`` reads the Parquet patches written by preprocessing and builds
one ``TorchTrainer``: DDP over ``num_workers`` workers, with gloo on CPU and NCCL
on GPU. It runs under ``RunConfig(name, storage_path)``, so a rerun with the same
name resumes from the last checkpoint. The best checkpoint by validation score is
copied to ``<models_dir>/<kind>`` for prediction.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ribfrac_ray.config import DetectorConfig, PipelineConfig, TrainConfig, config_to_dict
from ribfrac_ray.models.anchors import expand_anchor_shapes, plan_anchor_shapes
from ribfrac_ray.preprocess import read_manifest
from ribfrac_ray.training.loop import epoch_learning_rate
from ribfrac_ray.training.networks import LOOPS, SPECS

logger = logging.getLogger(__name__)

# Ray's placement group strategies (ray.util.placement_group).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PATCH_FOLDERS = {"detector": "det", "segmenter": "seg"}
# Columns the training loop reads; validation also reads ``public_id`` to count scans.
PATCH_COLUMNS = {
    "detector": ["image", "boxes", "n_boxes"],
    "segmenter": ["image", "mask"],
}


@dataclass
class TrainOutcome:
    """Result of one network's training run."""

    kind: str
    checkpoint_dir: str
    run_path: str
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def train_config_for(kind: str, config: PipelineConfig) -> TrainConfig:
    """Return the TrainConfig section of ``kind`` ('detector' or 'segmenter')."""
    if kind not in SPECS:
        raise ValueError(f"unknown network {kind!r}; use 'detector' (RetinaNet) or 'segmenter' (U-Net)")
    return config.train_detector if kind == "detector" else config.train_segmenter


def plan_anchors(config: DetectorConfig, patch_dir: str | Path) -> list[list[float]]:
    """Return the anchor shapes: the configured base shapes, or shapes planned from the training boxes."""
    if config.anchor_shapes:
        base = np.asarray(config.anchor_shapes, np.float32)
    else:
        sizes = np.asarray(read_manifest(patch_dir)["box_sizes"], np.float32).reshape(-1, 3)
        if len(sizes) == 0:
            raise ValueError(
                f"the training patches in {patch_dir} contain no fracture boxes, so anchor shapes cannot be "
                f"planned. Check that preprocessing succeeded (see {Path(patch_dir) / 'failures.csv'}) and that "
                "the train split has labelled fractures, or set detector.anchor_shapes by hand"
            )
        base = plan_anchor_shapes(sizes, config.n_anchor_shapes)
        logger.info("planned %d anchor shapes from %d training boxes: %s", len(base), len(sizes), np.round(base, 1).tolist())
    return expand_anchor_shapes(base, config.anchor_scales)


def loop_config(kind: str, config: PipelineConfig, anchor_shapes: list[list[float]] | None) -> dict[str, Any]:
    """Build the plain mapping that every training worker receives."""
    train = train_config_for(kind, config)
    values: dict[str, Any] = asdict(train)
    if kind == "detector":
        values["detector"] = config_to_dict(config.detector)
        values["anchor_shapes"] = anchor_shapes
        values["patch_size"] = list(config.preprocess.det_patch_size)
    else:
        values["segmenter"] = config_to_dict(config.segmenter)
        values["patch_size"] = list(config.preprocess.seg_crop_size)
    return values


def read_patches(kind: str, patch_dir: str | Path, split: str) -> ray.data.Dataset:
    """Open the Parquet patches of one network and split as a Ray Dataset."""
    folder = Path(patch_dir).resolve() / PATCH_FOLDERS[kind] / split
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        raise FileNotFoundError(
            f"no {kind} patches in {folder}; run `ribfrac-ray preprocess` with split '{split}' first"
        )
    if split == "train":
        return ray.data.read_parquet(str(folder), columns=PATCH_COLUMNS[kind], shuffle="files")
    return ray.data.read_parquet(str(folder), columns=PATCH_COLUMNS[kind] + ["public_id"])


def train_network(
    kind: str,
    config: PipelineConfig,
    models_dir: str | Path,
    callbacks: list[Any] | None = None,
    extra_loop_config: dict[str, Any] | None = None,
) -> TrainOutcome:
    """Train one network with Ray Train and export its best checkpoint to ``models_dir/kind``."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    train = train_config_for(kind, config)
    spec = SPECS[kind]
    _check_cpu_budget(train)
    _check_placement_strategy(train)
    epoch_learning_rate(asdict(train), 0)  # rejects an unknown lr_schedule before Ray starts anything

    anchors = plan_anchors(config.detector, train.patch_dir) if kind == "detector" else None
    values = loop_config(kind, config, anchors) | (extra_loop_config or {})
    storage = str(Path(train.storage_path).resolve())
    name = train.name or kind

    trainer = TorchTrainer(
        LOOPS[kind],
        train_loop_config=values,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker} | ({"GPU": 1} if train.use_gpu else {}),
            placement_strategy=train.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.num_to_keep,
                checkpoint_score_attribute=spec.score_metric,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks or [],
        ),
        datasets=_quiet_datasets(kind, train.patch_dir, train.cache_max_mb),
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    logger.info("training the %s: %d worker(s), %d epochs, run %s/%s", kind, train.num_workers, train.epochs, storage, name)
    result = trainer.fit()

    best = result.get_best_checkpoint(spec.score_metric, "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"{kind} training under {storage}/{name} reported no checkpoint")
    target = Path(models_dir).resolve() / kind
    export_checkpoint(best.path, target)
    history, best_metrics = _history(best.path)
    logger.info("%s: best %s = %.4f (epoch %s), exported to %s", kind, spec.score_metric, best_metrics.get(spec.score_metric, float("nan")), best_metrics.get("epoch"), target)
    return TrainOutcome(
        kind=kind,
        checkpoint_dir=str(target),
        run_path=f"{storage}/{name}",
        best_metrics=best_metrics,
        history=history,
        seconds=time.perf_counter() - started,
    )


def _quiet_datasets(kind: str, patch_dir: str, cache_max_mb: int) -> dict[str, ray.data.Dataset]:
    """Open train and val patches with Ray Data progress bars off, cached when small.

    Each epoch iterates the datasets again in the workers, and a progress bar per
    pass buries the training log. A dataset keeps the DataContext it was created
    with. Small patch sets are materialised once, which saves re-reading and
    decompressing them every epoch.
    """
    context = ray.data.DataContext.get_current()
    previous = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        datasets = {}
        for split in ("train", "val"):
            dataset = read_patches(kind, patch_dir, split)
            size_mb = _folder_mb(Path(patch_dir) / PATCH_FOLDERS[kind] / split)
            if 0 < size_mb < cache_max_mb:
                dataset = dataset.materialize()
            datasets[split] = dataset
        return datasets
    finally:
        context.enable_progress_bars = previous


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.parquet")) / 2**20


def _check_cpu_budget(train: TrainConfig) -> None:
    """Fail early where training workers would leave Ray Data no CPU and hang."""
    total = float(ray.cluster_resources().get("CPU", 0))
    needed = train.num_workers * train.cpus_per_worker
    if needed + 1 > total and not train.use_gpu:
        raise ValueError(
            f"{train.num_workers} training worker(s) x {train.cpus_per_worker} CPU need {needed:g} of the "
            f"cluster's {total:g} CPUs and leave none for reading data, which would hang; lower "
            "num_workers or cpus_per_worker, or start Ray with more logical CPUs (ray.num_cpus)"
        )


def _check_placement_strategy(train: TrainConfig) -> None:
    if train.placement_strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(
            f"invalid placement_strategy {train.placement_strategy!r}; use one of {', '.join(PLACEMENT_STRATEGIES)}"
        )


def export_checkpoint(source: str | Path, target: Path) -> None:
    """Copy a checkpoint folder to ``target``, replacing an older export atomically."""
    staging = target.with_name(f".{target.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source, staging)
    previous = target.with_name(f".{target.name}.previous")
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    if previous.exists():
        shutil.rmtree(previous)


def _history(checkpoint_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ribfrac_ray.models.checkpoint import read_checkpoint

    _, meta, _ = read_checkpoint(checkpoint_dir)
    return list(meta.get("history", [])), dict(meta.get("metrics", {}))
