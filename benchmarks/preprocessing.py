"""Preprocessing: ``ribfrac_ray.preprocess`` on Ray with 1 and 2 CPUs against two single-process baselines.

* Floor: read and decompress each image and label with nibabel
  (``np.asarray(img.dataobj)``) and nothing else: the least any nibabel-based
  preprocessing pays per CPU. ribfrac-ray reads ``.nii.gz`` with ISA-L's inflate
  instead (``ribfrac_ray.io.nifti``), so it can go below this floor; the same
  child process times that reader alone for reference.
* Plain loop: what research code commonly does. Read each volume as float64
  (``get_fdata``), window the whole volume, cut the same patches and crops as
  ribfrac-ray and save each one as a compressed ``.npz``.

Throughput counts both input files of a scan: MB/s of compressed input is the
.nii.gz bytes of image and label per second, and MB/s of voxels is their
decompressed bytes (int16 image, uint8 label) per second. Ray's startup (``ray.init``
and a first run over one scan, which starts and warms the workers) is timed
apart from the steady state, a second run over every scan in the same Ray instance.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from benchmarks.child import run_in_child
from benchmarks.context import Context
from benchmarks.data import SPLIT, make_subset, scan_files
from benchmarks.memory import RayWorkerMonitor, process_status, reset_peak
from benchmarks.report import Row, Section, check, megabytes, ratio, seconds

logger = logging.getLogger(__name__)

FLOOR_TARGET = 1.5
# The plain loop takes several times longer per scan than the rest, so it runs on a few scans.
PLAIN_LOOP_SCANS = 4
# Speedup from 1 to 2 CPUs that counts as near-linear (90% parallel efficiency).
SCALING_TARGET = 1.8
WORKER_TITLE = "_process_batch"


def input_sizes(data_dir: str) -> dict[str, float]:
    """Return the compressed and decompressed MB of every image and label under ``data_dir``."""
    compressed = decompressed = 0.0
    for _, image_path, label_path in scan_files(Path(data_dir)):
        for path in (image_path, label_path):
            compressed += path.stat().st_size / 1e6
            header = nib.load(str(path)).header
            decompressed += float(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize / 1e6
    return {"compressed_mb": compressed, "voxel_mb": decompressed}


def run_baselines(data_dir: str, out_dir: str, plain_loop_scans: int) -> dict[str, Any]:
    """Child process: for each scan, time the floor read, then the plain loop on the first ``plain_loop_scans``."""
    from ribfrac_ray.config import PreprocessConfig, WindowConfig
    from ribfrac_ray.io.nifti import load_volume

    config, window = PreprocessConfig(), WindowConfig()
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    baseline = process_status()["rss"]
    floor_seconds, reader_seconds, loop_seconds, loop_peaks, files = 0.0, 0.0, 0.0, [], 0
    for index, (public_id, image_path, label_path) in enumerate(scan_files(Path(data_dir))):
        started = time.perf_counter()
        for path in (image_path, label_path):
            np.asarray(nib.load(str(path)).dataobj)
        floor_seconds += time.perf_counter() - started

        started = time.perf_counter()
        for path, kind in ((image_path, "image"), (label_path, "label")):
            load_volume(path, kind=kind)
        reader_seconds += time.perf_counter() - started
        if index >= plain_loop_scans:
            continue

        reset_peak()
        rss_before = process_status()["rss"]
        started = time.perf_counter()
        files += plain_loop_volume(public_id, image_path, label_path, out, config, window)
        loop_seconds += time.perf_counter() - started
        loop_peaks.append(process_status()["peak"] - rss_before)
    output_mb = sum(path.stat().st_size for path in out.iterdir()) / 1e6
    return {"floor_seconds": floor_seconds, "reader_seconds": reader_seconds, "loop_seconds": loop_seconds, "loop_scans": len(loop_peaks),
            "loop_files": files,
            "loop_output_mb": output_mb, "loop_peak_above_mb": max(loop_peaks, default=0.0),
            "baseline_rss_mb": baseline}


def plain_loop_volume(public_id: str, image_path: Path, label_path: Path, out: Path, config: Any, window: Any) -> int:
    """Cut one volume's patches the way research code commonly does; return the number of files written."""
    from ribfrac_ray.boxes import boxes_from_instances
    from ribfrac_ray.patches import boxes_in_patch, crop_origin, extract_patch, fracture_origins, negative_origins
    from ribfrac_ray.preprocess import AIR_HU, BONE_HU, NEGATIVE_GRID_STEP

    image = nib.load(str(image_path)).get_fdata()
    label = nib.load(str(label_path)).get_fdata()
    windowed = np.clip((image - window.hu_min) / (window.hu_max - window.hu_min), 0.0, 1.0)
    air = (AIR_HU - window.hu_min) / (window.hu_max - window.hu_min)

    # The same patch positions as ribfrac-ray, drawn with its functions and seed.
    rng = np.random.default_rng([config.seed, zlib.crc32(public_id.encode())])
    ids, boxes = boxes_from_instances(label.astype(np.int32))
    patch, crop = tuple(config.det_patch_size), tuple(config.seg_crop_size)
    positives = fracture_origins(boxes, image.shape, patch, config.det_patches_per_fracture, config.det_jitter, rng)
    n_negatives = max(2, int(round(config.det_negative_ratio * len(positives))))
    bone = image[::NEGATIVE_GRID_STEP, ::NEGATIVE_GRID_STEP, ::NEGATIVE_GRID_STEP] > BONE_HU
    negatives = negative_origins(image.shape, patch, n_negatives, boxes, rng, candidate_mask=bone if bone.any() else None)

    count = 0
    for origin in np.concatenate([positives, negatives]):
        _, local = boxes_in_patch(boxes, origin, patch)
        np.savez_compressed(out / f"{public_id}-det-{count}.npz",
                            image=extract_patch(windowed, origin, patch, fill=max(air, 0.0)).astype(np.float32),
                            boxes=local)
        count += 1
    for label_id, box in zip(ids, boxes):
        for copy in range(config.seg_crops_per_fracture):
            origin = crop_origin(box, crop, image.shape, config.seg_jitter if copy else 0, rng)
            np.savez_compressed(out / f"{public_id}-seg-{count}.npz",
                                image=extract_patch(windowed, origin, crop, fill=max(air, 0.0)).astype(np.float32),
                                mask=(extract_patch(label, origin, crop) == label_id).astype(np.uint8))
            count += 1
    return count


def run_ray(data_dir: str, warmup_dir: str, out_dir: str, num_cpus: int) -> dict[str, Any]:
    """Child process: start Ray with ``num_cpus``, warm up on one scan, then time a run over every scan."""
    from ribfrac_ray.config import PreprocessConfig, RayConfig, WindowConfig
    from ribfrac_ray.preprocess import preprocess
    from ribfrac_ray.runtime import init_ray

    window = WindowConfig()
    started = time.perf_counter()
    init_ray(RayConfig(num_cpus=num_cpus))
    init_seconds = time.perf_counter() - started

    warmup = PreprocessConfig(data_dir=warmup_dir, out_dir=f"{out_dir}/warmup", splits=(SPLIT,),
                              num_tasks=num_cpus, overwrite=True)
    started = time.perf_counter()
    preprocess(warmup, window)
    warmup_seconds = time.perf_counter() - started

    config = PreprocessConfig(data_dir=data_dir, out_dir=f"{out_dir}/steady", splits=(SPLIT,),
                              num_tasks=num_cpus, overwrite=True)
    with RayWorkerMonitor() as monitor:
        started = time.perf_counter()
        report = preprocess(config, window)
        steady_seconds = time.perf_counter() - started
    if report.failures:
        raise RuntimeError(f"preprocessing failed for {[f.to_dict() for f in report.failures]}")
    workers = monitor.busy_workers(WORKER_TITLE)
    return {
        "num_cpus": num_cpus,
        "init_seconds": init_seconds,
        "warmup_seconds": warmup_seconds,
        "steady_seconds": steady_seconds,
        "volumes": sum(len(ids) for ids in report.done.values()),
        "det_patches": report.det_patches,
        "seg_crops": report.seg_crops,
        "output_mb": sum(p.stat().st_size for p in Path(out_dir, "steady").rglob("*.parquet")) / 1e6,
        "workers": workers,
    }


def measure_volume_memory(data_dir: str, out_dir: str) -> dict[str, Any]:
    """Child process: RSS before and during ``process_volume`` on a second scan, after a first one warmed up.

    This is the work of one Ray task; the warm-up loads what a worker imports lazily.
    """
    import ray.data  # noqa: F401  (a Ray Data worker has it imported)

    from ribfrac_ray.config import PreprocessConfig, WindowConfig
    from ribfrac_ray.io.cases import find_cases
    from ribfrac_ray.preprocess import _case_item, process_volume, settings_fingerprint

    config, window = PreprocessConfig(data_dir=data_dir, out_dir=out_dir, splits=(SPLIT,)), WindowConfig()
    fingerprint = settings_fingerprint(config, window)
    items = [_case_item(case, "info CSV", fingerprint) for case in find_cases(data_dir, SPLIT).cases[:2]]
    for kind in ("det", "seg", "volumes"):
        Path(out_dir, kind, SPLIT).mkdir(parents=True, exist_ok=True)

    process_volume(items[0], config, window, Path(out_dir))
    baseline = process_status()["rss"]
    reset_peak()
    process_volume(items[1], config, window, Path(out_dir))
    return {"baseline_rss_mb": baseline, "peak_mb": process_status()["peak"]}


def run(context: Context) -> Section:
    section = Section("preprocessing", "Preprocessing: NIfTI volumes to Parquet patches",
                      "nibabel read + decompress (floor) and a plain float64 loop writing .npz files")
    scratch = context.scratch("preprocessing")
    n_scans = context.size.n_scans
    warmup_dir = make_subset(context.data_dir, 1, scratch / "subset-1")
    small_dir = make_subset(context.data_dir, 2, scratch / "subset-2")
    sizes = input_sizes(str(context.data_dir))
    data, log = str(context.data_dir), context.log_path

    baselines = run_in_child("benchmarks.preprocessing:run_baselines",
                             {"data_dir": data, "out_dir": str(scratch / "npz"), "plain_loop_scans": PLAIN_LOOP_SCANS},
                             log)
    rays = {}
    for num_cpus in (1, 2):
        rays[num_cpus] = run_in_child("benchmarks.preprocessing:run_ray",
                                      {"data_dir": data, "warmup_dir": str(warmup_dir),
                                       "out_dir": str(scratch / f"ray-{num_cpus}"), "num_cpus": num_cpus}, log)
    floor_again = run_in_child("benchmarks.preprocessing:run_baselines",
                               {"data_dir": data, "out_dir": str(scratch / "npz-floor"), "plain_loop_scans": 0},
                               log)
    driver_small = run_in_child("benchmarks.preprocessing:run_ray",
                                {"data_dir": str(small_dir), "warmup_dir": str(warmup_dir),
                                 "out_dir": str(scratch / "ray-driver"), "num_cpus": 2}, log)
    memory = run_in_child("benchmarks.preprocessing:measure_volume_memory",
                          {"data_dir": str(small_dir), "out_dir": str(scratch / "memory")}, log)
    section.raw = {"sizes": sizes, "baselines": baselines, "floor_again": floor_again, "ray": rays,
                   "driver_small": driver_small, "volume_memory": memory}

    floor = (baselines["floor_seconds"] + floor_again["floor_seconds"]) / 2
    loop_per_volume = baselines["loop_seconds"] / baselines["loop_scans"]

    def throughput(label: str, total: float, cpus: int, baseline: str = "", ratio_text: str = "",
                   target: str = "", status: str = "") -> list[Row]:
        return [Row(f"{label}: volumes per minute", f"{n_scans / total * 60:.1f}", baseline, ratio_text, target, status),
                Row(f"{label}: MB/s compressed input / MB/s voxels",
                    f"{sizes['compressed_mb'] / total:.1f} / {sizes['voxel_mb'] / total:.1f}"),
                Row(f"{label}: seconds per volume per CPU", seconds(total * cpus / n_scans))]

    floor_per_volume = floor / n_scans
    section.rows.append(Row("floor: seconds per volume (image + label)", seconds(floor_per_volume),
                            f"first {seconds(baselines['floor_seconds'] / n_scans)}, "
                            f"last {seconds(floor_again['floor_seconds'] / n_scans)}"))
    section.rows.append(Row("floor: MB/s compressed input / MB/s voxels",
                            f"{sizes['compressed_mb'] / floor:.1f} / {sizes['voxel_mb'] / floor:.1f}"))
    reader = (baselines["reader_seconds"] + floor_again["reader_seconds"]) / 2
    section.rows.append(Row("ribfrac-ray's reader alone (ISA-L inflate, canonical orientation): seconds per volume",
                            seconds(reader / n_scans), f"floor {seconds(floor_per_volume)}", ratio(floor / reader)))
    for num_cpus, result in rays.items():
        steady = result["steady_seconds"]
        per_cpu = steady * num_cpus / floor
        section.rows += throughput(f"Ray, {num_cpus} CPU{'s' if num_cpus > 1 else ''}", steady, num_cpus,
                                   f"floor {n_scans / floor * 60:.1f}", ratio(per_cpu, "x floor per CPU"),
                                   f"<= {FLOOR_TARGET:g}x floor per CPU", check(per_cpu <= FLOOR_TARGET))
    scaling = rays[1]["steady_seconds"] / rays[2]["steady_seconds"]
    section.rows.append(Row("speedup from 1 to 2 CPUs", ratio(scaling), target=f">= {SCALING_TARGET:g}x",
                            status=check(scaling >= SCALING_TARGET)))
    section.rows.append(Row("Ray, 1 CPU against the plain loop: seconds per volume",
                            seconds(rays[1]["steady_seconds"] / n_scans), seconds(loop_per_volume),
                            ratio(loop_per_volume * n_scans / rays[1]["steady_seconds"])))
    for num_cpus, result in rays.items():
        section.rows.append(Row(f"Ray startup, {num_cpus} CPU{'s' if num_cpus > 1 else ''}: ray.init / first run (1 scan)",
                                f"{seconds(result['init_seconds'])} / {seconds(result['warmup_seconds'])}",
                                target="reported apart from the steady state"))
    section.rows.append(Row("output on disk per scan", f"{rays[1]['output_mb'] / n_scans:.1f} MB Parquet",
                            f"{baselines['loop_output_mb'] / baselines['loop_scans']:.1f} MB .npz"))

    section.rows += _memory_rows(context, rays, memory, driver_small, baselines)
    section.notes += [
        f"{n_scans} scans with {rays[1]['det_patches']} detector patches (64^3) and {rays[1]['seg_crops']} segmenter "
        f"crops (32^3) in all; input {sizes['compressed_mb']:.0f} MB compressed, {sizes['voxel_mb']:.0f} MB of voxels.",
        "Order of the runs: floor and plain loop (alternating per scan; the plain loop on the first "
        f"{baselines['loop_scans']} scans only, to save time), Ray with 1 CPU, Ray with 2 CPUs, floor again; the "
        "floor row shows its first and last run, and the ratios use their mean.",
        "Each Ray run is a fresh local instance (`ray.init(num_cpus=N)`) with `PreprocessConfig.num_tasks = N`.",
        f"The floor runs in one process. With {max(rays)} tasks on a machine of {os.cpu_count()} cores, the Ray "
        "driver, raylet and GCS processes share the same cores with the tasks, which a single floor process does "
        "not have to do.",
    ]
    return section


def _memory_rows(context: Context, rays: dict[int, dict], memory: dict, driver_small: dict, baselines: dict) -> list[Row]:
    limit = 3 * context.size.int16_volume_mb
    target = f"<= {limit:.0f} MB above the baseline (3 int16 volumes)"
    above = memory["peak_mb"] - memory["baseline_rss_mb"]
    workers = [worker for result in rays.values() for worker in result["workers"]]
    rows = [
        Row("worker memory: RSS after one scan (one process, no Ray)", megabytes(memory["baseline_rss_mb"])),
        Row("worker memory: peak RSS above that, next scan", megabytes(above),
            f"plain loop {megabytes(baselines['loop_peak_above_mb'])}",
            ratio(above / baselines["loop_peak_above_mb"], ""), target, check(above <= limit)),
    ]
    if workers:
        peak = max(worker["peak"] for worker in workers)
        rows.append(Row(f"Ray task workers: highest peak RSS of the {len(workers)} worker processes",
                        megabytes(peak)))
    small, large = driver_small["peak_rss_mb"], rays[2]["peak_rss_mb"]
    rows.append(Row(f"driver peak RSS with 2 / {context.size.n_scans} scans (2 CPUs)",
                    f"{megabytes(small)} / {megabytes(large)}", target="flat as scans grow (< 10% growth)",
                    status=check(large - small < 0.1 * small)))
    return rows

