"""Evaluation: ``ribfrac_ray.evaluation.evaluate_folders`` against the official RibFrac evaluator.

The official evaluator is ``ribfrac/evaluation.py`` of the M3DV/RibFrac-Challenge
repository, which is not on PyPI and needs scikit-image. Pass a checkout of it
with ``--official PATH``. Both tools score the same ground-truth and prediction
folders, each in its own fresh process, alternating, so the time excludes imports
and the peak RSS of one does not include the other.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.child import run_in_child
from benchmarks.context import Context
from benchmarks.data import make_evaluation_folders
from benchmarks.memory import process_status
from benchmarks.report import MET, MISSED, SKIPPED, Row, Section, check, megabytes, ratio, seconds

logger = logging.getLogger(__name__)

OFFICIAL_MODULE = Path("ribfrac") / "evaluation.py"
SPEED_TARGET = 10.0
MEMORY_TARGET = 0.25
# Groups of numbers compared between the two evaluators, in table order.
COMPARED = ("key_recall", "average_recall", "max_recall", "fp_at_max_recall", "fp_curve", "recall_curve",
            "confusion_matrix", "f1", "dice", "iou")


def evaluate_with_ribfrac_ray(gt_dir: str, pred_dir: str) -> dict[str, Any]:
    """Child process: run ``evaluate_folders`` with both tie orders; time the first."""
    from ribfrac_ray.evaluation import evaluate_folders

    baseline = process_status()["rss"]
    started, cpu_started = time.perf_counter(), time.process_time()
    result = evaluate_folders(gt_dir, pred_dir, tie_order="pandas")
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    curve = evaluate_folders(gt_dir, pred_dir, tie_order="curve")
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "read_seconds": _time_reading(gt_dir, pred_dir),
        "baseline_rss_mb": baseline,
        "numbers": _numbers_from_ours(result),
        "curve_numbers": _numbers_from_ours(curve),
    }


def _time_reading(gt_dir: str, pred_dir: str) -> float:
    """Return the seconds that reading and decompressing every label file takes, with nothing else."""
    import nibabel as nib

    started = time.perf_counter()
    for folder in (gt_dir, pred_dir):
        for path in sorted(Path(folder).glob("*.nii.gz")):
            np.asarray(nib.load(str(path)).dataobj)
    return time.perf_counter() - started


def evaluate_with_official(checkout: str, gt_dir: str, pred_dir: str) -> dict[str, Any]:
    """Child process: run the official ``ribfrac.evaluation.evaluate`` from a checkout."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path.insert(0, checkout)
    from ribfrac.evaluation import evaluate

    baseline = process_status()["rss"]
    started, cpu_started = time.perf_counter(), time.process_time()
    results = evaluate(gt_dir, pred_dir)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    detection, classification = results["detection"], results["classification"]
    numbers = {
        "key_recall": [float(v) for v in detection["key_recall"]],
        "average_recall": float(detection["average_recall"]),
        "max_recall": float(detection["max_recall"]),
        "fp_at_max_recall": float(detection["average_fp_at_max_recall"]),
        "fp_curve": [float(v) for v in detection["fp"]],
        "recall_curve": [float(v) for v in detection["recall"]],
        "confusion_matrix": classification["confusion_matrix"].to_numpy().tolist(),
        "f1": [float(classification[key]) for key in ("macro_average_F1", "target_aware_F1", "prediction_aware_F1")],
        "dice": float(results["segmentation"]["dice"]),
        "iou": float(results["segmentation"]["iou"]),
    }
    return {"seconds": elapsed, "cpu_seconds": cpu, "baseline_rss_mb": baseline, "numbers": numbers}


def _numbers_from_ours(result: Any) -> dict[str, Any]:
    froc = result.froc
    return {
        "key_recall": list(froc.key_sensitivities),
        "average_recall": froc.average_sensitivity,
        "max_recall": froc.max_sensitivity,
        "fp_at_max_recall": froc.max_fps_per_scan,
        "fp_curve": froc.fps_per_scan.tolist(),
        "recall_curve": froc.sensitivities.tolist(),
        "confusion_matrix": result.confusion_matrix.astype(float).tolist(),
        "f1": [result.f1[key] for key in ("macro_f1", "target_aware_f1", "prediction_aware_f1")],
        "dice": result.dice,
        "iou": result.iou,
    }


def compare_numbers(ours: dict[str, Any], official: dict[str, Any]) -> dict[str, float]:
    """Return the largest absolute difference per group of numbers (0.0 means bit-identical)."""
    differences = {}
    for key in COMPARED:
        first = np.asarray(ours[key], dtype=np.float64)
        second = np.asarray(official[key], dtype=np.float64)
        if first.shape != second.shape:
            differences[key] = math.inf
            continue
        differences[key] = float(np.max(np.abs(first - second))) if first.size else 0.0
    return differences


def check_official_checkout(path: Path | None) -> str | None:
    """Return why the official evaluator cannot run from ``path``, or None when it can."""
    if path is None:
        return ("no checkout of the official evaluator was given; pass --official PATH (a clone of "
                "M3DV/RibFrac-Challenge) to compare against it")
    if not (path / OFFICIAL_MODULE).is_file():
        return f"{path / OFFICIAL_MODULE} not found; --official must point at a RibFrac-Challenge checkout"
    try:
        import skimage  # noqa: F401  (the official evaluator imports it)
    except ImportError:
        return "the official evaluator needs scikit-image; install it with `pip install scikit-image`"
    return None


def run(context: Context) -> Section:
    section = Section("evaluation", "Evaluation: challenge metric over a folder of scans",
                      "official RibFrac evaluator (M3DV/RibFrac-Challenge, ribfrac/evaluation.py)")
    gt_dir, pred_dir = make_evaluation_folders(context.data_dir, context.scratch("evaluation"))
    n_scans = len(list(gt_dir.glob("*.nii.gz")))
    folders = {"gt_dir": str(gt_dir), "pred_dir": str(pred_dir)}
    problem = check_official_checkout(context.official)

    # ribfrac-ray runs before and after each official run, so that both see the same machine load.
    ours_runs = [run_in_child("benchmarks.evaluation:evaluate_with_ribfrac_ray", folders, context.log_path)]
    official_runs = []
    for repetition in range(context.repetitions if problem is None else 0):
        logger.info("evaluation repetition %d of %d", repetition + 1, context.repetitions)
        official_runs.append(run_in_child("benchmarks.evaluation:evaluate_with_official",
                                          {"checkout": str(context.official), **folders}, context.log_path))
        ours_runs.append(run_in_child("benchmarks.evaluation:evaluate_with_ribfrac_ray", folders, context.log_path))

    ours_seconds = statistics.median(r["seconds"] for r in ours_runs)
    ours_peak = max(r["peak_rss_mb"] for r in ours_runs)
    ours_base = ours_runs[0]["baseline_rss_mb"]
    section.raw = {"ours": ours_runs, "official": official_runs}
    per_scan = f"{n_scans} scans, median of {len(ours_runs)} / {len(official_runs)} runs"

    if problem is not None:
        section.notes.append(f"Official evaluator skipped: {problem}.")
        section.rows += [
            Row(f"time ({per_scan})", seconds(ours_seconds), status=SKIPPED),
            Row("peak RSS of the process", megabytes(ours_peak), status=SKIPPED),
        ]
        return section

    official_seconds = statistics.median(r["seconds"] for r in official_runs)
    ours_cpu = statistics.median(r["cpu_seconds"] for r in ours_runs)
    official_cpu = statistics.median(r["cpu_seconds"] for r in official_runs)
    official_peak = max(r["peak_rss_mb"] for r in official_runs)
    official_base = official_runs[0]["baseline_rss_mb"]
    speedup = official_seconds / ours_seconds
    memory_share = ours_peak / official_peak
    section.rows += [
        Row(f"time ({per_scan})", seconds(ours_seconds), seconds(official_seconds), ratio(speedup),
            f">= {SPEED_TARGET:g}x faster", check(speedup >= SPEED_TARGET)),
        Row("time per scan", seconds(ours_seconds / n_scans), seconds(official_seconds / n_scans)),
        Row("CPU time per scan (user + system, same runs)", seconds(ours_cpu / n_scans),
            seconds(official_cpu / n_scans), ratio(official_cpu / ours_cpu)),
        Row("reading and decompressing the two .nii.gz files alone, per scan (both tools do it)",
            seconds(statistics.median(r["read_seconds"] for r in ours_runs) / n_scans)),
        Row("peak RSS of the process", megabytes(ours_peak), megabytes(official_peak), ratio(memory_share, ""),
            f"<= {MEMORY_TARGET:g} of baseline", check(memory_share <= MEMORY_TARGET)),
        Row("RSS after imports, before the first scan", megabytes(ours_base), megabytes(official_base)),
        Row("peak RSS above that", megabytes(ours_peak - ours_base), megabytes(official_peak - official_base),
            ratio((ours_peak - ours_base) / (official_peak - official_base), "")),
    ]

    official_numbers = official_runs[0]["numbers"]
    for tie_order, key in (("pandas", "numbers"), ("curve", "curve_numbers")):
        differences = compare_numbers(ours_runs[0][key], official_numbers)
        different = {name: value for name, value in differences.items() if value != 0.0}
        if not different:
            text, status = "all identical", MET
        else:
            text = ", ".join(f"{name} differs by {value:.3g}" for name, value in different.items())
            status = MISSED if tie_order == "pandas" else ""
        target = "identical numbers" if tie_order == "pandas" else "(default setting, for reference)"
        section.rows.append(Row(f"numbers with tie_order=\"{tie_order}\"", text, target=target, status=status))
    section.raw["differences"] = {
        tie: compare_numbers(ours_runs[0][key], official_numbers)
        for tie, key in (("pandas", "numbers"), ("curve", "curve_numbers"))
    }
    section.raw["average_recall"] = {
        "official": official_numbers["average_recall"],
        "pandas": ours_runs[0]["numbers"]["average_recall"],
        "curve": ours_runs[0]["curve_numbers"]["average_recall"],
    }
    section.notes.append(
        "Compared: sensitivity at 0.5, 1, 2, 4 and 8 FP per scan and their mean, maximum sensitivity, FP per scan "
        "at maximum sensitivity, the 100-point FROC curve, the classification confusion matrix and its three "
        "macro F1 scores, Dice and IoU; \"identical\" means equal as float64 values."
    )
    section.notes.append(
        f"Average sensitivity: official {official_numbers['average_recall']:.6f}, ribfrac-ray "
        f"{ours_runs[0]['numbers']['average_recall']:.6f} with tie_order=\"pandas\" and "
        f"{ours_runs[0]['curve_numbers']['average_recall']:.6f} with the default tie_order=\"curve\"."
    )
    section.notes.append(
        "Predictions are the ground truth perturbed per instance (20% dropped, 25% shifted by up to 6 voxels, "
        "15% dilated, 10% split in two, the rest kept) plus 2 to 11 spherical false positives per scan, with "
        "random two-decimal confidences and random label codes."
    )
    return section
