"""Preprocessing with Ray Data: NIfTI volumes to Parquet patch tables.

One Ray Data task reads one volume, cuts its patches and writes them, chunk by
chunk, into Parquet files of its own:

    <out>/det/<split>/<id>.parquet   detector patches: image float16 (P, P, P) in [0, 1],
                                     boxes float32 (max_boxes, 6) in patch voxels,
                                     n_boxes int32, origin int32 (3,), public_id
    <out>/seg/<split>/<id>.parquet   segmenter crops: image float16 (C, C, C), mask uint8
                                     (C, C, C) of one instance, label_id, public_id
    <out>/volumes/<split>/<id>.json  written last: the marker that the volume is done,
                                     with its patch counts, fracture box sizes and the
                                     id of the Ray node that processed it
    <out>/manifest.json              all markers of the run, plus the failures

Per-volume files make each task idempotent: a retried task (a lost node) rewrites
the same bytes, and a rerun skips volumes whose marker matches the current
settings and input files, so an interrupted run redoes only what is missing. A
rerun never appends: outputs of volumes that are no longer inputs, or that were
made with other settings, are replaced or removed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ribfrac_ray.boxes import box_sizes, boxes_from_instances
from ribfrac_ray.config import PreprocessConfig, WindowConfig
from ribfrac_ray.intensity import apply_window
from ribfrac_ray.io.atomic import atomic_path, atomic_write_text, remove_stale_temporaries
from ribfrac_ray.io.cases import Case, CaseFailure, find_cases
from ribfrac_ray.io.nifti import VolumeError, load_volume
from ribfrac_ray.io.validate import check_image, check_label
from ribfrac_ray.patches import (
    boxes_in_patch,
    crop_origin,
    extract_patch,
    fracture_origins,
    negative_origins,
)
from ribfrac_ray.runtime import current_node_id

logger = logging.getLogger(__name__)

AIR_HU = -1024
# Negatives are drawn around bone (ribs, spine) so that they teach the detector
# what an intact rib looks like; the threshold is in HU.
BONE_HU = 300
NEGATIVE_GRID_STEP = 4


@dataclass
class PreprocessReport:
    """Summary of a preprocessing run: volumes done, skipped and failed, per split."""

    out_dir: str
    done: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    failures: list[CaseFailure] = field(default_factory=list)
    det_patches: int = 0
    seg_crops: int = 0
    box_sizes: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["failures"] = [f.to_dict() for f in self.failures]
        return values


def preprocess(config: PreprocessConfig, window: WindowConfig) -> PreprocessReport:
    """Run preprocessing over every split in ``config.splits`` on the connected Ray cluster."""
    import ray

    out_dir = Path(config.out_dir).resolve()
    report = PreprocessReport(out_dir=str(out_dir))
    items: list[dict[str, Any]] = []
    fingerprint = settings_fingerprint(config, window)

    for split in config.splits:
        case_set = find_cases(config.data_dir, split, require_labels=True)
        report.failures.extend(case_set.failures)
        csv_name = ", ".join(str(p) for p in case_set.info_csvs) or "the info CSV"
        _prepare_folders(out_dir, split, {c.public_id for c in case_set.cases})
        for case in case_set.cases:
            item = _case_item(case, csv_name, fingerprint)
            if not config.overwrite and _is_done(out_dir, item):
                report.skipped.setdefault(split, []).append(case.public_id)
                continue
            items.append(item)

    skipped = sum(len(v) for v in report.skipped.values())
    logger.info("preprocessing %d volumes (%d already done) into %s", len(items), skipped, out_dir)
    if items:
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        summaries = dataset.map_batches(
            _process_batch,
            batch_size=1,
            fn_kwargs={"config": asdict(config), "window": asdict(window), "out_dir": str(out_dir)},
            num_cpus=1,
            memory=config.task_memory_mb * 1024 * 1024,
            compute=ray.data.TaskPoolStrategy(size=max(1, config.num_tasks)),
        ).take_all()
        for summary in summaries:
            _record(report, summary)

    _collect_markers(out_dir, config.splits, report)
    _write_manifest(out_dir, report, fingerprint)
    return report


def settings_fingerprint(config: PreprocessConfig, window: WindowConfig) -> str:
    """Hash of every setting that changes the patch files (not parallelism or strictness)."""
    values = asdict(config)
    for key in ("num_tasks", "task_memory_mb", "strict", "overwrite", "chunk_size", "out_dir", "splits", "data_dir"):
        values.pop(key, None)
    values["window"] = asdict(window)
    text = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _case_item(case: Case, csv_name: str, fingerprint: str) -> dict[str, Any]:
    stats = [case.image_path.stat()]
    if case.label_path:
        stats.append(case.label_path.stat())
    source = ";".join(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)
    return {
        "public_id": case.public_id,
        "split": case.split,
        "image_path": str(case.image_path),
        "label_path": str(case.label_path) if case.label_path else "",
        "codes": json.dumps(case.codes()) if case.codes() is not None else "",
        "info_csv": csv_name,
        "fingerprint": f"{fingerprint}:{source}",
    }


def _marker_path(out_dir: Path, split: str, public_id: str) -> Path:
    return out_dir / "volumes" / split / f"{public_id}.json"


def _is_done(out_dir: Path, item: dict[str, Any]) -> bool:
    marker = _marker_path(out_dir, item["split"], item["public_id"])
    if not marker.is_file():
        return False
    try:
        summary = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return summary.get("fingerprint") == item["fingerprint"]


def _prepare_folders(out_dir: Path, split: str, current_ids: set[str]) -> None:
    """Clear temporary files of interrupted runs and outputs of volumes no longer given."""
    for kind in ("det", "seg", "volumes"):
        folder = out_dir / kind / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(folder):
            logger.info("removed temporary file of an interrupted run: %s", stale)
        for path in folder.iterdir():
            public_id = path.name.rsplit(".", 1)[0]
            if public_id not in current_ids:
                logger.info("removing output of a volume that is no longer an input: %s", path)
                path.unlink()


def _process_batch(batch: dict[str, np.ndarray], config: dict, window: dict, out_dir: str) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: process each volume of the batch (one, with batch_size=1)."""
    preprocess_config = PreprocessConfig(**config)
    window_config = WindowConfig(**window)
    for index in range(len(batch["public_id"])):
        item = {key: batch[key][index] for key in batch}
        summary = process_volume(item, preprocess_config, window_config, Path(out_dir))
        yield {key: np.asarray([value]) for key, value in summary.items()}


def process_volume(item: dict[str, Any], config: PreprocessConfig, window: WindowConfig, out_dir: Path) -> dict[str, Any]:
    """Read one volume, write its patch files and marker; return a summary row.

    A volume that cannot be read or checked yields a summary with status "failed"
    and the reason, and no output files.
    """
    public_id, split = str(item["public_id"]), str(item["split"])
    try:
        image, label, boxes = _load_checked(item)
    except VolumeError as error:
        logger.warning("skipping %s: %s", public_id, error)
        return _summary(item, "failed", path=error.path, reason=str(error))

    try:
        rng = np.random.default_rng([config.seed, zlib.crc32(public_id.encode())])
        n_det = _write_detector_patches(out_dir / "det" / split / f"{public_id}.parquet", public_id, image, boxes, config, window, rng)
        seg_path = out_dir / "seg" / split / f"{public_id}.parquet"
        n_seg = _write_segmenter_crops(seg_path, public_id, image, label, boxes, config, window, rng)
    except Exception as error:  # noqa: BLE001 - one volume must not stop the batch
        logger.exception("failed to cut patches from %s", public_id)
        return _summary(item, "failed", reason=f"patch extraction failed: {type(error).__name__}: {error}")

    summary = _summary(item, "done", n_det=n_det, n_seg=n_seg, box_sizes=json.dumps(box_sizes(boxes[1]).tolist()))
    atomic_write_text(_marker_path(out_dir, split, public_id), json.dumps(summary, indent=1))
    logger.info("%s: %d detector patches, %d segmenter crops", public_id, n_det, n_seg)
    return summary


def _summary(item: dict[str, Any], status: str, **values: Any) -> dict[str, Any]:
    summary = {
        "public_id": str(item["public_id"]),
        "split": str(item["split"]),
        "status": status,
        "path": str(item["image_path"]),
        "reason": "",
        "n_det": 0,
        "n_seg": 0,
        "box_sizes": "[]",
        "fingerprint": str(item["fingerprint"]),
        "node_id": current_node_id(),
    }
    summary.update(values)
    return summary


def _load_checked(item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    image_path, label_path = str(item["image_path"]), str(item["label_path"])
    image, image_geometry = load_volume(image_path, kind="image")
    check_image(image_path, image)
    if not label_path:
        raise VolumeError(image_path, "no label file for a training split", "add the label file")
    label, label_geometry = load_volume(label_path, kind="label")
    codes = json.loads(item["codes"]) if item["codes"] else None
    if codes is not None:
        codes = {int(k): int(v) for k, v in codes.items()}
    label = check_label(label_path, label, label_geometry, image_path, image_geometry, codes, str(item["info_csv"]))
    return image, label, boxes_from_instances(label)


def _write_detector_patches(
    path: Path,
    public_id: str,
    image: np.ndarray,
    boxes: tuple[np.ndarray, np.ndarray],
    config: PreprocessConfig,
    window: WindowConfig,
    rng: np.random.Generator,
) -> int:
    patch = tuple(config.det_patch_size)
    shape = tuple(image.shape)
    _, volume_boxes = boxes
    positives = fracture_origins(volume_boxes, shape, patch, config.det_patches_per_fracture, config.det_jitter, rng)
    n_negatives = max(2, int(round(config.det_negative_ratio * len(positives))))
    bone = image[::NEGATIVE_GRID_STEP, ::NEGATIVE_GRID_STEP, ::NEGATIVE_GRID_STEP] > BONE_HU
    negatives = negative_origins(shape, patch, n_negatives, volume_boxes, rng, candidate_mask=bone if bone.any() else None)
    if len(negatives) < n_negatives:
        # Small volumes may have no patch centre on bone that avoids every box.
        extra = negative_origins(shape, patch, n_negatives - len(negatives), volume_boxes, rng)
        negatives = np.concatenate([negatives, extra])
    origins = np.concatenate([positives, negatives]).astype(np.int64)

    def rows(chunk: np.ndarray) -> dict[str, Any]:
        patches = np.stack([apply_window(extract_patch(image, o, patch, fill=AIR_HU), window) for o in chunk])
        padded = np.zeros((len(chunk), config.max_boxes, 6), np.float32)
        counts = np.zeros(len(chunk), np.int32)
        for row, origin in enumerate(chunk):
            _, local = boxes_in_patch(volume_boxes, origin, patch)
            local = local[: config.max_boxes]
            padded[row, : len(local)] = local
            counts[row] = len(local)
        return {
            "image": patches.astype(np.float16),
            "boxes": padded,
            "n_boxes": counts,
            "origin": chunk.astype(np.int32),
            "public_id": np.asarray([public_id] * len(chunk)),
        }

    return _write_chunks(path, origins, rows, config.chunk_size)


def _write_segmenter_crops(
    path: Path,
    public_id: str,
    image: np.ndarray,
    label: np.ndarray,
    boxes: tuple[np.ndarray, np.ndarray],
    config: PreprocessConfig,
    window: WindowConfig,
    rng: np.random.Generator,
) -> int:
    ids, volume_boxes = boxes
    crop = tuple(config.seg_crop_size)
    jobs = []
    for label_id, box in zip(ids, volume_boxes):
        for copy in range(config.seg_crops_per_fracture):
            jitter = config.seg_jitter if copy > 0 else 0
            jobs.append((int(label_id), crop_origin(box, crop, tuple(image.shape), jitter, rng)))
    def rows(chunk: list[tuple[int, np.ndarray]]) -> dict[str, Any]:
        images = np.stack([apply_window(extract_patch(image, o, crop, fill=AIR_HU), window) for _, o in chunk])
        masks = np.stack([(extract_patch(label, o, crop, fill=0) == lid).astype(np.uint8) for lid, o in chunk])
        return {
            "image": images.astype(np.float16),
            "mask": masks,
            "label_id": np.asarray([lid for lid, _ in chunk], np.int32),
            "public_id": np.asarray([public_id] * len(chunk)),
        }

    return _write_chunks(path, jobs, rows, config.chunk_size)


def _write_chunks(path: Path, jobs: Any, make_rows: Any, chunk_size: int) -> int:
    """Write ``make_rows(chunk)`` for consecutive chunks of ``jobs`` as Parquet row groups.

    Without jobs no file is written (and an old one is removed), because readers
    take every ``*.parquet`` in the folder and an empty file has no schema.
    """
    from ray.data.extensions import ArrowTensorArray

    if len(jobs) == 0:
        path.unlink(missing_ok=True)
        return 0

    with atomic_path(path) as temp_path:
        writer = None
        for start in range(0, len(jobs), chunk_size):
            columns = make_rows(jobs[start : start + chunk_size])
            table = pa.table({
                name: ArrowTensorArray.from_numpy(values) if values.ndim > 1 else pa.array(values)
                for name, values in columns.items()
            })
            if writer is None:
                writer = pq.ParquetWriter(str(temp_path), table.schema, compression="zstd")
            writer.write_table(table)
        writer.close()
    return len(jobs)


def _record(report: PreprocessReport, summary: dict[str, Any]) -> None:
    if summary["status"] == "failed":
        report.failures.append(CaseFailure(summary["public_id"], summary["path"], summary["reason"], stage="preprocess"))
        return
    report.done.setdefault(summary["split"], []).append(summary["public_id"])


def _collect_markers(out_dir: Path, splits: tuple[str, ...], report: PreprocessReport) -> None:
    """Sum patch counts and box sizes over every done volume, new or skipped."""
    for split in splits:
        for marker in sorted((out_dir / "volumes" / split).glob("*.json")):
            summary = json.loads(marker.read_text())
            report.det_patches += int(summary["n_det"])
            report.seg_crops += int(summary["n_seg"])
            if split == "train":
                report.box_sizes.extend(json.loads(summary["box_sizes"]))


def _write_manifest(out_dir: Path, report: PreprocessReport, fingerprint: str) -> None:
    manifest = report.to_dict()
    manifest["fingerprint"] = fingerprint
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1))
    if report.failures:
        # The csv module quotes commas and quotes in reasons and keeps non-ASCII file names as they are.
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["public_id", "stage", "path", "reason"])
        writer.writerows([f.public_id, f.stage, f.path, f.reason] for f in report.failures)
        atomic_write_text(out_dir / "failures.csv", buffer.getvalue())
    elif (out_dir / "failures.csv").exists():
        os.remove(out_dir / "failures.csv")


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Load ``manifest.json`` of a preprocessing output folder."""
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `ribfrac-ray preprocess` first")
    return json.loads(path.read_text())
