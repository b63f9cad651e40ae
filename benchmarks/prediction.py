"""Prediction: the two-stage pipeline against a whole-volume sliding-window U-Net (FracNet's one-stage method).

Two-stage (ribfrac-ray): ``DetectorActor.process`` runs the RetinaNet over a
grid of 64^3 patches and merges the boxes, then ``SegmenterActor.process`` runs
the U-Net on a 32^3 crop per box, labels the instances and writes the mask.

One-stage (the baseline): ``monai.inferers.sliding_window_inference`` runs the
segmenter's U-Net architecture (same channels and strides) over the whole
volume with the detector's patch size, batch size and overlap. The probability
map is thresholded, labelled with cc3d and written the same way.

Both load the volume with the same reader and use one torch thread, as one Ray
actor with ``cpus_per_actor = 1`` does. Weights are untrained, because the
compute does not depend on them. Two settings keep the untrained networks' work
that of trained ones:

* The detector returns the 32 boxes (``PredictConfig.max_boxes``) of
  :func:`fixed_boxes` after running in full, because an untrained RetinaNet scores
  nearly every anchor at its prior (0.01) and would pass no box to the segmenter.
  32 boxes is the most the segmenter ever gets.
* The one-stage U-Net's background bias is raised so that its thresholded map
  is empty, as a trained network's is nearly everywhere. An untrained one marks
  about half the volume, which would make labelling and writing far slower than
  in real use. This favours the baseline.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.child import run_in_child
from benchmarks.context import Context
from benchmarks.data import SPLIT, make_subset, scan_files
from benchmarks.memory import RayWorkerMonitor, process_status, reset_peak
from benchmarks.report import Row, Section, check, megabytes, ratio, seconds
from ribfrac_ray.prediction.actors import DetectorActor

logger = logging.getLogger(__name__)

SPEED_TARGET = 3.0
# Anchor sizes (x, y, z voxels) of the benchmark's untrained detector. Their count
# sets the width of the detector's heads, so there are three, as in the default config.
ANCHOR_SHAPES = [[6.0, 6.0, 4.0], [10.0, 10.0, 6.0], [16.0, 16.0, 10.0]]
# Added to the one-stage U-Net's background logit so its thresholded map is empty.
BACKGROUND_BIAS = 20.0
# The full Ray pipeline runs without patch overlap, which needs 2.3 times fewer
# detector patches on a 512 x 512 x 300 scan, so that 2 + 8 scans fit the time budget.
PIPELINE_OVERLAP = 0.0


def make_checkpoints(folder: Path) -> tuple[str, str]:
    """Write untrained detector and segmenter checkpoints (default configs); return their folders."""
    import torch

    from ribfrac_ray.config import DetectorConfig, PredictConfig, SegmenterConfig
    from ribfrac_ray.models import (
        build_detector, build_segmenter, detector_meta, save_checkpoint, segmenter_meta, unwrap_network,
    )

    torch.manual_seed(0)
    predict = PredictConfig()
    detector = build_detector(DetectorConfig(), ANCHOR_SHAPES, predict.patch_size)
    save_checkpoint(folder / "detector", unwrap_network(detector).state_dict(),
                    detector_meta(DetectorConfig(), ANCHOR_SHAPES, predict.patch_size))
    save_checkpoint(folder / "segmenter", build_segmenter(SegmenterConfig()).state_dict(),
                    segmenter_meta(SegmenterConfig(), predict.crop_size))
    return str(folder / "detector"), str(folder / "segmenter")


def fixed_boxes(shape: tuple[int, ...], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``count`` boxes of 12 x 12 x 8 voxels spread over the central part of a volume, with falling scores.

    Fractures lie all around the rib cage, so the boxes spread over most of the
    volume's extent rather than clustering.
    """
    rng = np.random.default_rng(0)
    size = np.array([12, 12, 8], np.float32)
    low = np.asarray(shape, np.float32) * 0.1
    high = np.asarray(shape, np.float32) * 0.9 - size
    starts = rng.uniform(low, high, size=(count, 3)).astype(np.float32)
    boxes = np.concatenate([starts, starts + size], axis=1)
    scores = np.linspace(0.95, 0.2, count).astype(np.float32)
    return boxes, scores


class FixedBoxDetector(DetectorActor):
    """``DetectorActor`` that runs its network in full, then returns the boxes of :func:`fixed_boxes`."""

    def detect_volume(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        super().detect_volume(image)
        return fixed_boxes(image.shape, self.config.max_boxes)


def predict_one_stage(image_path: str, network: Any, config: Any, window: Any, out_path: str) -> None:
    """Segment a whole volume with a sliding-window U-Net, label the components and write the mask."""
    import cc3d
    import torch
    from monai.inferers import sliding_window_inference

    from ribfrac_ray.intensity import apply_window
    from ribfrac_ray.io.nifti import load_volume, save_like
    from ribfrac_ray.prediction.merge import MAX_INSTANCES

    image, geometry = load_volume(image_path, kind="image")
    volume = torch.from_numpy(apply_window(image, window))[None, None]
    del image
    network.eval()
    with torch.no_grad():
        logits = sliding_window_inference(volume, roi_size=tuple(config.patch_size),
                                          sw_batch_size=config.patch_batch_size, predictor=network,
                                          overlap=config.overlap)
    del volume
    foreground = (torch.softmax(logits, dim=1)[0, 1] >= config.seg_threshold).numpy()
    del logits
    components = cc3d.dust(cc3d.connected_components(foreground, connectivity=26), config.min_voxels)
    labels = np.minimum(components, MAX_INSTANCES).astype(np.uint8)
    save_like(labels, geometry, out_path, dtype=np.uint8)


def compare_in_process(image_paths: list[str], detector_path: str, segmenter_path: str, out_dir: str,
                       overlap: float, with_one_stage: bool) -> dict[str, Any]:
    """Child process: per scan, time and measure both stages and then the one-stage baseline."""
    import torch

    from ribfrac_ray.config import PredictConfig, WindowConfig
    from ribfrac_ray.models import load_segmenter
    from ribfrac_ray.patches import grid_origins, windows_reaching
    from ribfrac_ray.prediction.actors import SegmenterActor

    config = PredictConfig(detector_checkpoint=detector_path, segmenter_checkpoint=segmenter_path, overlap=overlap)
    window = WindowConfig()
    Path(out_dir, "two-stage").mkdir(parents=True, exist_ok=True)
    Path(out_dir, "one-stage").mkdir(parents=True, exist_ok=True)
    detector = FixedBoxDetector(detector_path, asdict(config), asdict(window))
    segmenter = SegmenterActor(segmenter_path, asdict(config), f"{out_dir}/two-stage")
    one_stage = load_segmenter(segmenter_path)
    _raise_background_bias(one_stage)
    baseline = process_status()["rss"]

    scans = []
    for image_path in image_paths:
        public_id = Path(image_path).name.replace("-image.nii.gz", "")
        scan: dict[str, Any] = {"public_id": public_id}

        row, scan["detector"] = _measure(detector.process, {"public_id": public_id, "image_path": image_path})
        output, scan["segmenter"] = _measure(segmenter.process, row)
        if output["status"] != "ok":
            raise RuntimeError(f"{public_id}: two-stage prediction failed: {output['reason']}")
        scan["boxes"] = len(json.loads(row["boxes"]))
        if with_one_stage:
            _, scan["one_stage"] = _measure(predict_one_stage, image_path, one_stage, config, window,
                                            f"{out_dir}/one-stage/{public_id}.nii.gz")
        scans.append(scan)

    from ribfrac_ray.io.nifti import load_volume

    image, _ = load_volume(image_paths[0], kind="image")
    grid = grid_origins(image.shape, tuple(config.patch_size), overlap)
    return {"scans": scans, "baseline_rss_mb": baseline, "threads": torch.get_num_threads(),
            "patch_batch_size": config.patch_batch_size, "windows": len(grid),
            "detector_windows": len(windows_reaching(image, grid, tuple(config.patch_size), config.bone_hu)),
            "bone_hu": config.bone_hu}


def _measure(function: Any, *args: Any) -> tuple[Any, dict[str, float]]:
    """Call ``function`` and return its result with its seconds and its peak RSS above the RSS before it."""
    reset_peak()
    before = process_status()["rss"]
    started = time.perf_counter()
    result = function(*args)
    elapsed = time.perf_counter() - started
    return result, {"seconds": elapsed, "peak_above_mb": process_status()["peak"] - before, "rss_before_mb": before}


def _raise_background_bias(network: Any) -> None:
    """Add :data:`BACKGROUND_BIAS` to the bias of the last layer with two output channels."""
    import torch

    last = None
    for module in network.modules():
        if getattr(module, "out_channels", None) == 2 and getattr(module, "bias", None) is not None:
            last = module
    if last is None:
        raise RuntimeError("no output layer with two channels found in the U-Net")
    with torch.no_grad():
        last.bias[0] += BACKGROUND_BIAS


def run_pipeline(data_dir: str, detector_path: str, segmenter_path: str, out_dir: str, overlap: float) -> dict[str, Any]:
    """Child process: ``ribfrac_ray.prediction.pipeline.predict`` on a local Ray instance with 2 CPUs."""
    from ribfrac_ray.config import PredictConfig, RayConfig, WindowConfig
    from ribfrac_ray.prediction import pipeline
    from ribfrac_ray.runtime import init_ray

    started = time.perf_counter()
    init_ray(RayConfig(num_cpus=2))
    init_seconds = time.perf_counter() - started

    # The pipeline builds its detector pool from this module attribute.
    pipeline.DetectorActor = FixedBoxDetector
    config = PredictConfig(data_dir=data_dir, split=SPLIT, out_dir=out_dir, detector_checkpoint=detector_path,
                           segmenter_checkpoint=segmenter_path, overlap=overlap, overwrite=True)
    with RayWorkerMonitor() as monitor:
        started = time.perf_counter()
        report = pipeline.predict(config, WindowConfig())
        elapsed = time.perf_counter() - started
    if report.failures:
        raise RuntimeError(f"prediction failed for {[f.to_dict() for f in report.failures]}")
    return {"init_seconds": init_seconds, "seconds": elapsed, "scans": len(report.predicted),
            "detector_workers": monitor.busy_workers("FixedBoxDetector"),
            "segmenter_workers": monitor.busy_workers("SegmenterActor")}


def run(context: Context) -> Section:
    section = Section("prediction", "Prediction: seconds per scan",
                      "one-stage sliding-window U-Net over the whole volume (FracNet's method), same patch size "
                      "and overlap")
    scratch = context.scratch("prediction")
    detector_path, segmenter_path = run_in_child("benchmarks.prediction:checkpoints_child",
                                                 {"folder": str(scratch / "checkpoints")}, context.log_path)["paths"]
    scans = scan_files(context.data_dir)
    n_compare = min(context.repetitions, len(scans))
    images = [str(image) for _, image, _ in scans[:n_compare]]
    common = {"detector_path": detector_path, "segmenter_path": segmenter_path}

    compared = run_in_child("benchmarks.prediction:compare_in_process",
                            {"image_paths": images, "out_dir": str(scratch / "compare"), "overlap": 0.25,
                             "with_one_stage": True, **common}, context.log_path)
    no_overlap = run_in_child("benchmarks.prediction:compare_in_process",
                              {"image_paths": images[:1], "out_dir": str(scratch / "compare-no-overlap"),
                               "overlap": PIPELINE_OVERLAP, "with_one_stage": False, **common}, context.log_path)
    small = make_subset(context.data_dir, 2, scratch / "subset-2")
    pipelines = {}
    for count, data_dir in ((2, small), (len(scans), context.data_dir)):
        pipelines[count] = run_in_child("benchmarks.prediction:run_pipeline",
                                        {"data_dir": str(data_dir), "out_dir": str(scratch / f"pipeline-{count}"),
                                         "overlap": PIPELINE_OVERLAP, **common}, context.log_path)
    section.raw = {"compared": compared, "no_overlap": no_overlap, "pipelines": pipelines}
    _add_rows(section, context, compared, no_overlap, pipelines)
    return section


def checkpoints_child(folder: str) -> dict[str, Any]:
    """Child process: write the untrained checkpoints (keeps torch out of the driver)."""
    return {"paths": list(make_checkpoints(Path(folder)))}


def _add_rows(section: Section, context: Context, compared: dict, no_overlap: dict, pipelines: dict) -> None:
    def median(part: str, key: str = "seconds", runs: dict = compared) -> float:
        return statistics.median(scan[part][key] for scan in runs["scans"])

    detector, segmenter, one_stage = median("detector"), median("segmenter"), median("one_stage")
    two_stage = detector + segmenter
    speedup = one_stage / two_stage
    count = len(compared["scans"])
    rows = [
        Row(f"seconds per scan, overlap 0.25 ({compared['windows']} windows of 64^3, median of {count} scans)",
            seconds(two_stage), seconds(one_stage), ratio(speedup), f">= {SPEED_TARGET:g}x faster",
            check(speedup >= SPEED_TARGET)),
        Row(f"  detector (read, {compared['detector_windows']} windows with bone, box merge, crops)",
            f"{seconds(detector)} ({detector / two_stage:.0%})"),
        Row(f"  segmenter ({compared['scans'][0]['boxes']} crops of 32^3, labelling, write)",
            f"{seconds(segmenter)} ({segmenter / two_stage:.0%})"),
    ]
    limit = 3 * context.size.int16_volume_mb
    target = f"<= {limit:.0f} MB above the baseline (3 int16 volumes)"
    peaks = {part: max(scan[part]["peak_above_mb"] for scan in compared["scans"])
             for part in ("detector", "segmenter", "one_stage")}
    rows += [
        Row("worker memory: RSS with torch and both models loaded (one process, no Ray)", megabytes(compared["baseline_rss_mb"])),
        Row("worker memory: detector peak RSS above that", megabytes(peaks["detector"]),
            target=target, status=check(peaks["detector"] <= limit)),
        Row("worker memory: segmenter peak RSS above that", megabytes(peaks["segmenter"]),
            f"one-stage {megabytes(peaks['one_stage'])}", target=target, status=check(peaks["segmenter"] <= limit)),
    ]

    steady_detector = median("detector", runs=no_overlap) + median("segmenter", runs=no_overlap)
    n_large = max(pipelines)
    per_scan = (pipelines[n_large]["seconds"] - pipelines[2]["seconds"]) / (n_large - 2)
    rows += [
        Row(f"Ray pipeline, overlap 0 ({no_overlap['windows']} windows): seconds per scan, steady state",
            seconds(per_scan), f"in one process {seconds(steady_detector)}", ratio(steady_detector / per_scan)),
        Row(f"Ray pipeline: whole run, 2 / {n_large} scans",
            f"{seconds(pipelines[2]['seconds'])} / {seconds(pipelines[n_large]['seconds'])}",
            target=f"ray.init {seconds(pipelines[2]['init_seconds'])}"),
    ]
    for role in ("detector", "segmenter"):
        workers = pipelines[n_large][f"{role}_workers"]
        if workers:
            rows.append(Row(f"Ray {role} actor: peak RSS", megabytes(max(w["peak"] for w in workers))))
    small, large = pipelines[2]["peak_rss_mb"], pipelines[n_large]["peak_rss_mb"]
    rows.append(Row(f"driver peak RSS with 2 / {n_large} scans", f"{megabytes(small)} / {megabytes(large)}",
                    target="flat as scans grow (< 10% growth)", status=check(large - small < 0.1 * small)))
    section.rows += rows
    windows, gated = compared["windows"], compared["detector_windows"]
    section.notes.append(
        f"Both methods cut the scan into the same grid of {windows} windows at overlap 0.25. The one-stage U-Net "
        f"runs on all of them ({one_stage / windows * 1000:.0f} ms per window, reading and writing included). The "
        f"detector runs only on the {gated} ({gated / windows:.0%}) whose brightest voxel reaches "
        f"`predict.bone_hu` = {compared['bone_hu']:g} HU ({detector / max(gated, 1) * 1000:.0f} ms per window, "
        "reading, the bone test over every window, box merging and crops included). A window without bone "
        "cannot hold a rib fracture. NOTE: real scans with contrast agent or a dense table keep more windows "
        "than these phantoms."
    )
    section.notes += [
        f"{compared['threads']} torch thread(s) per process; the detector and the one-stage U-Net take batches of "
        f"{compared['patch_batch_size']} patches. Times include reading the .nii.gz and writing the mask.",
        "The detector returns 32 fixed boxes after running its network in full, and the one-stage U-Net's "
        "thresholded map is empty (see the module docstring of benchmarks/prediction.py); both keep the work of "
        "trained networks with untrained weights, and the second favours the baseline.",
        f"The Ray pipeline ({n_large} and 2 scans, 1 detector and 1 segmenter actor of 1 CPU each, local Ray with "
        "2 CPUs) runs with overlap 0 to fit the time budget; its steady state is the difference of the two "
        "runs per extra scan, so startup cancels out.",
    ]
