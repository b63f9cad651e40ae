"""Each pipeline stage as a function that runs it and records it in MLflow.

The CLI, the Ray job scripts and the tests call these. Every function takes the
resolved :class:`~ribfrac_ray.config.PipelineConfig` (absolute paths) and starts
an MLflow run for its stage, nested under the active run when there is one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from ribfrac_ray import tracking
from ribfrac_ray.config import MODELS_FOLDER, PipelineConfig, config_to_dict
from ribfrac_ray.runtime import init_ray

logger = logging.getLogger(__name__)

NETWORK_NAMES = {"retinanet": "detector", "unet": "segmenter", "detector": "detector", "segmenter": "segmenter"}


@dataclass
class StageResult:
    """Outcome of one stage: its MLflow run, wall time, key figures and failures."""

    stage: str
    run_id: str = ""
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def make_phantoms_stage(config: PipelineConfig, reuse: bool = False) -> StageResult:
    """Write the phantom data set and record it in MLflow when a run is active or ``reuse`` is set.

    With ``reuse`` (the demo), an identical phantom set already in the output folder
    is kept instead of raising, so a rerun of the demo resumes.
    """
    from ribfrac_ray.phantoms import find_existing_phantoms, make_phantoms

    started = time.perf_counter()
    written = find_existing_phantoms(config.phantoms) if reuse else None
    if written is not None:
        logger.info("reusing the identical phantom set in %s", config.phantoms.out)
    else:
        written = make_phantoms(config.phantoms)
    counts = {f"{split}_scans": float(len(ids)) for split, ids in written.items()}
    seconds = time.perf_counter() - started
    if mlflow.active_run() is None:
        return StageResult("make-phantoms", seconds=seconds, metrics=counts, details={"out": config.phantoms.out})
    with tracking.stage_run("make-phantoms", {"phantoms": config_to_dict(config.phantoms)}) as run:
        tracking.retry_locked(mlflow.log_metrics, counts | {"seconds": seconds})
        return StageResult("make-phantoms", run.info.run_id, seconds, counts, details={"out": config.phantoms.out})


def preprocess_stage(config: PipelineConfig) -> StageResult:
    """Cut training patches with Ray Data and record the run."""
    from ribfrac_ray.preprocess import preprocess

    init_ray(config.ray)
    sections = {"preprocess": config_to_dict(config.preprocess), "window": config_to_dict(config.window)}
    with tracking.stage_run("preprocess", sections) as run:
        started = time.perf_counter()
        report = preprocess(config.preprocess, config.window)
        seconds = time.perf_counter() - started
        metrics = {
            "volumes_done": float(sum(len(v) for v in report.done.values())),
            "volumes_skipped": float(sum(len(v) for v in report.skipped.values())),
            "det_patches": float(report.det_patches),
            "seg_crops": float(report.seg_crops),
            "seconds": seconds,
        }
        tracking.retry_locked(mlflow.log_metrics, metrics)
        failures = [f.to_dict() for f in report.failures]
        tracking.log_failures(failures)
        tracking.retry_locked(mlflow.log_artifact, str(Path(report.out_dir) / "manifest.json"))
        return StageResult("preprocess", run.info.run_id, seconds, metrics, failures)


def train_stage(config: PipelineConfig, network: str) -> StageResult:
    """Train the detector ('retinanet') or the segmenter ('unet') and log the model."""
    from ribfrac_ray.models.checkpoint import load_detector, load_segmenter
    from ribfrac_ray.training.callbacks import MlflowEpochLogger
    from ribfrac_ray.training.trainer import train_config_for, train_network

    kind = _network_kind(network)
    init_ray(config.ray)
    sections = {f"train_{kind}": config_to_dict(train_config_for(kind, config)), kind: config_to_dict(getattr(config, kind))}
    with tracking.stage_run(f"train-{kind}", sections) as run:
        callback = MlflowEpochLogger(mlflow.get_tracking_uri(), run.info.run_id)
        outcome = train_network(kind, config, Path(config.workdir) / MODELS_FOLDER, callbacks=[callback])
        best = {f"best_{k}": float(v) for k, v in outcome.best_metrics.items() if isinstance(v, (int, float))}
        tracking.retry_locked(mlflow.log_metrics, best | {"seconds": outcome.seconds})
        tracking.log_folder(outcome.checkpoint_dir, f"checkpoints/{kind}")
        tracking.log_dict_artifact({"history": outcome.history}, f"{kind}_history.json")
        model = load_detector(outcome.checkpoint_dir) if kind == "detector" else load_segmenter(outcome.checkpoint_dir)
        tracking.log_pytorch_model(model, name=kind, registered_name=f"ribfrac-{kind}")
        return StageResult(f"train-{kind}", run.info.run_id, outcome.seconds, best, details={"checkpoint": outcome.checkpoint_dir})


def predict_stage(config: PipelineConfig) -> StageResult:
    """Run two-stage prediction and log the submission CSV."""
    from ribfrac_ray.prediction.pipeline import predict

    init_ray(config.ray)
    sections = {"predict": config_to_dict(config.predict), "window": config_to_dict(config.window)}
    with tracking.stage_run("predict", sections) as run:
        report = predict(config.predict, config.window)
        metrics = {
            "scans_predicted": float(len(report.predicted)),
            "scans_skipped": float(len(report.skipped)),
            "instances": float(report.instances),
            "seconds": report.seconds,
        }
        tracking.retry_locked(mlflow.log_metrics, metrics)
        failures = [f.to_dict() for f in report.failures]
        tracking.log_failures(failures)
        tracking.retry_locked(mlflow.log_artifact, report.csv_path)
        return StageResult("predict", run.info.run_id, report.seconds, metrics, failures, details={"out_dir": report.out_dir, "csv": report.csv_path})


def evaluate_stage(config: PipelineConfig) -> StageResult:
    """Score predictions with the challenge metric; log metrics, JSON and the FROC plot."""
    from ribfrac_ray.evaluation import evaluate_folders, format_table, write_report

    settings = config.evaluate
    with tracking.stage_run("evaluate", {"evaluate": config_to_dict(settings)}) as run:
        started = time.perf_counter()
        result = evaluate_folders(settings.gt_dir, settings.pred_dir, iou_thresh=settings.iou_thresh)
        paths = write_report(result, settings.out_dir)
        metrics = _numeric(result.to_dict())
        tracking.retry_locked(mlflow.log_metrics, metrics)
        tracking.log_folder(settings.out_dir, "evaluation")
        seconds = time.perf_counter() - started
        return StageResult("evaluate", run.info.run_id, seconds, metrics, details={"table": format_table(result), "report": [str(p) for p in paths or []]})


def demo_stage(config: PipelineConfig) -> list[StageResult]:
    """Run every stage in order under one parent MLflow run."""
    results: list[StageResult] = []
    with tracking.stage_run("demo", config_to_dict(config), nested=False) as parent:
        results.append(make_phantoms_stage(config, reuse=True))
        results.append(preprocess_stage(config))
        results.append(train_stage(config, "retinanet"))
        results.append(train_stage(config, "unet"))
        results.append(predict_stage(config))
        results.append(evaluate_stage(config))
        total = {f"{r.stage}_seconds": r.seconds for r in results}
        tracking.retry_locked(mlflow.log_metrics, total)
        for result in results:
            result.details.setdefault("parent_run_id", parent.info.run_id)
    return results


def _network_kind(network: str) -> str:
    if network not in NETWORK_NAMES:
        raise ValueError(f"unknown network {network!r}; use --net retinanet (detector) or --net unet (segmenter)")
    return NETWORK_NAMES[network]


def _numeric(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}".replace("@", "_at_")
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            flat[name] = float(value)
        elif isinstance(value, dict):
            flat.update(_numeric(value, f"{name}_"))
    return flat
