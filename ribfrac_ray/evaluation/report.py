"""Human-readable output of an evaluation: a text table, ``metrics.json`` and ``froc.png``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ribfrac_ray.evaluation.classification import GROUND_TRUTH_COLUMNS, PREDICTION_ROWS
from ribfrac_ray.evaluation.metric import EvaluationResult
from ribfrac_ray.io.atomic import atomic_write_text, atomic_write_with

METRICS_FILE = "metrics.json"
FROC_FILE = "froc.png"
# Curve points below this rate (the EPS-only "0 FP" points) sit at the plot's left edge.
_MIN_PLOTTED_FP = 0.1


def format_table(result: EvaluationResult) -> str:
    """Format the detection, segmentation and classification numbers as a text table."""
    froc = result.froc
    lines = [
        f"Detection ({froc.num_scans} scans, {froc.num_gt} fractures, {froc.num_predictions} predictions, "
        f"hit = IoU > {result.iou_thresh:g})",
        "  " + "  ".join(f"{f'FP={fp:g}':>7}" for fp in froc.key_fps) + f"  {'average':>8}",
        "  " + "  ".join(f"{value:>7.4f}" for value in froc.key_sensitivities)
        + f"  {froc.average_sensitivity:>8.4f}",
        f"  max sensitivity {froc.max_sensitivity:.4f} at {froc.max_fps_per_scan:.4f} FP per scan",
        "",
        "Segmentation (all voxels of all scans)",
        f"  Dice {result.dice:.4f}   IoU {result.iou:.4f}",
        "",
        "Classification (rows: predicted type, columns: ground-truth type)",
    ]
    lines.extend(_format_confusion(result.confusion_matrix))
    lines.append(
        "  macro F1 {macro_f1:.4f}   target-aware F1 {target_aware_f1:.4f}   "
        "prediction-aware F1 {prediction_aware_f1:.4f}".format(**result.f1)
    )
    return "\n".join(lines)


def write_report(result: EvaluationResult, out_dir: str | Path) -> list[Path]:
    """Write ``metrics.json`` and ``froc.png`` into ``out_dir`` atomically; return the two paths in that order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    froc_path = out_dir / FROC_FILE

    atomic_write_text(metrics_path, json.dumps(result.to_dict(), indent=2) + "\n")
    figure = plot_froc(result)
    atomic_write_with(froc_path, lambda temp: FigureCanvasAgg(figure).print_png(str(temp)))
    return [metrics_path, froc_path]


def plot_froc(result: EvaluationResult) -> Figure:
    """Draw the FROC curve on a log2 FP axis with the key operating points marked."""
    froc = result.froc
    order = np.lexsort((froc.sensitivities, froc.fps_per_scan))
    fps = np.maximum(froc.fps_per_scan[order], _MIN_PLOTTED_FP)

    figure = Figure(figsize=(6, 4.5), dpi=100)
    axes = figure.add_subplot()
    axes.plot(fps, froc.sensitivities[order], color="tab:blue", label="FROC")
    axes.plot(froc.key_fps, froc.key_sensitivities, "o", color="tab:red",
              label=f"key points, average {froc.average_sensitivity:.3f}")
    for fp, sensitivity in zip(froc.key_fps, froc.key_sensitivities):
        axes.annotate(f"{sensitivity:.2f}", (fp, sensitivity), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=8)

    axes.set_xscale("log", base=2)
    axes.set_xlim(_MIN_PLOTTED_FP, max(16.0, float(fps.max()) * 1.2))
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("false positives per scan")
    axes.set_ylabel("sensitivity")
    axes.set_title(f"FROC, {froc.num_scans} scans, {froc.num_gt} fractures")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def _format_confusion(matrix: np.ndarray) -> list[str]:
    width = max(len(name) for name in GROUND_TRUTH_COLUMNS + PREDICTION_ROWS) + 1
    lines = ["  " + " " * width + "".join(f"{name:>{width}}" for name in GROUND_TRUTH_COLUMNS)]
    for name, row in zip(PREDICTION_ROWS, matrix):
        lines.append("  " + f"{name:<{width}}" + "".join(f"{int(value):>{width}}" for value in row))
    return lines
