"""The prediction driver: pick the scans to do, run both actor pools, write the CSV.

    from_items(scans) -> map_batches(DetectorActor, ActorPoolStrategy)
                      -> map_batches(SegmenterActor, ActorPoolStrategy) -> rows

Ray Data streams volumes through both pools at once, so the segmenter works on
one scan while the detector reads the next. Scans whose mask and record already
exist are skipped unless ``overwrite`` is set; a scan that fails is reported and
the others finish.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ribfrac_ray.config import PredictConfig, WindowConfig
from ribfrac_ray.io.atomic import remove_stale_temporaries
from ribfrac_ray.io.cases import CaseFailure, find_cases, natural_key
from ribfrac_ray.prediction.actors import DetectorActor, SegmenterActor
from ribfrac_ray.prediction.records import RECORD_FOLDER, is_done, output_path, read_rows, write_submission_csv

logger = logging.getLogger(__name__)


@dataclass
class PredictReport:
    """Summary of a prediction run: scans predicted, skipped and failed."""

    out_dir: str
    csv_path: str
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[CaseFailure] = field(default_factory=list)
    instances: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["failures"] = [f.to_dict() for f in self.failures]
        return values


def csv_name(split: str) -> str:
    """File name of the submission CSV for ``split``."""
    return f"ribfrac-{split}-pred.csv"


def predict(config: PredictConfig, window: WindowConfig) -> PredictReport:
    """Predict every scan of ``config.split`` under ``config.data_dir`` on the connected Ray cluster."""
    import ray

    started = time.perf_counter()
    out_dir = Path(config.out_dir).resolve()
    detector, segmenter = _checkpoints(config)
    case_set = find_cases(config.data_dir, config.split, require_labels=False)
    report = PredictReport(out_dir=str(out_dir), csv_path=str(out_dir / csv_name(config.split)), failures=list(case_set.failures))

    for folder in (out_dir, out_dir / RECORD_FOLDER):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(folder):
            logger.info("removed temporary file of an interrupted run: %s", stale)

    todo = []
    for case in case_set.cases:
        output_path(out_dir, case.public_id, ".nii.gz")
        if not config.overwrite and is_done(out_dir, case.public_id):
            report.skipped.append(case.public_id)
        else:
            todo.append({"public_id": case.public_id, "image_path": str(case.image_path)})
    logger.info("predicting %d scans (%d already done) into %s", len(todo), len(report.skipped), out_dir)

    if todo:
        results = _run_pipeline(ray, todo, config, window, detector, segmenter, out_dir)
        for row in results:
            if row["status"] == "ok":
                report.predicted.append(str(row["public_id"]))
            else:
                path = next(item["image_path"] for item in todo if item["public_id"] == row["public_id"])
                report.failures.append(CaseFailure(str(row["public_id"]), path, str(row["reason"]), stage="predict"))

    rows = _collect_rows(out_dir, [c.public_id for c in case_set.cases])
    report.instances = sum(1 for row in rows if int(row[1]) > 0)
    write_submission_csv(Path(report.csv_path), rows)
    report.seconds = time.perf_counter() - started
    return report


def _checkpoints(config: PredictConfig) -> tuple[str, str]:
    paths = []
    for name, value in (("detector", config.detector_checkpoint), ("segmenter", config.segmenter_checkpoint)):
        path = Path(value).resolve() if value else None
        if path is None or not (path / "meta.json").is_file():
            raise FileNotFoundError(
                f"{name} checkpoint folder {value or '(not set)'} has no meta.json; train it with "
                f"`ribfrac-ray train --net {'retinanet' if name == 'detector' else 'unet'}` or pass --{name}"
            )
        paths.append(str(path))
    return paths[0], paths[1]


def _run_pipeline(ray: Any, todo: list[dict[str, str]], config: PredictConfig, window: WindowConfig, detector: str, segmenter: str, out_dir: Path) -> list[dict[str, Any]]:
    settings = asdict(config)
    memory = {"memory": config.actor_memory_mb * 1024 * 1024} if config.actor_memory_mb > 0 else {}
    dataset = ray.data.from_items(todo, override_num_blocks=len(todo))
    # One scan per task takes seconds to minutes, so queueing more than one per actor
    # gains nothing and, with few scans, leaves the other actors idle.
    dataset = dataset.map_batches(
        DetectorActor,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=config.detector_actors, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs={"checkpoint": detector, "config": settings, "window": asdict(window)},
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        **memory,
    )
    dataset = dataset.map_batches(
        SegmenterActor,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=config.segmenter_actors, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs={"checkpoint": segmenter, "config": settings, "out_dir": str(out_dir)},
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        **memory,
    )
    return dataset.select_columns(["public_id", "status", "reason"]).take_all()


def _collect_rows(out_dir: Path, public_ids: list[str]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for public_id in sorted(public_ids, key=natural_key):
        if is_done(out_dir, public_id):
            rows.extend(read_rows(out_dir, public_id))
    return rows
