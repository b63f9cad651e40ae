"""Training: Ray Train with one worker against a plain PyTorch loop on the same model and batches.

Both sides train the same network (``ribfrac_ray.training.networks.SPECS``) on
the same Parquet patches, written by ``ribfrac_ray.preprocess`` from the
benchmark scans, with the same batch size, optimizer and torch threads. Ray
Train runs the product's per-worker loop (``ribfrac_ray.training.loop.run_training``)
in a ``TorchTrainer``, with the materialised patch set as ``train_network`` uses
it for small sets. Validation is replaced by a no-op on the Ray side, because the plain
loop does not validate and validation counts inside the product's epoch time.

The rate is training samples per second of epoch time, from the second epoch
on. The first epoch warms caches, so it is left out on both sides. Ray Train's
startup is what ``fit()`` takes beyond its epochs: starting the worker, the
per-epoch report with a checkpoint, and shutting down.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.child import run_in_child
from benchmarks.context import Context
from benchmarks.data import SPLIT
from benchmarks.report import Row, Section, check, ratio, seconds

logger = logging.getLogger(__name__)

OVERHEAD_TARGET = 0.10
KINDS = ("detector", "segmenter")
# Epochs per side; the first is a warm-up. The segmenter's steps are about 10
# times cheaper, so it gets more epochs for a steady figure.
EPOCHS = {"detector": 3, "segmenter": 8}
QUICK_EPOCHS = {"detector": 2, "segmenter": 3}
BATCH_SIZE = 4
# One torch thread on both sides. With two, OpenMP threads wait on each other at
# every operation, and on a machine loaded by other processes that waiting made
# epoch times swing by up to 50x between identical epochs.
TORCH_THREADS = 1
ANCHOR_SHAPES = [[6.0, 6.0, 4.0], [10.0, 10.0, 6.0], [16.0, 16.0, 10.0]]


def make_patches(data_dir: str, out_dir: str) -> dict[str, Any]:
    """Child process: preprocess the benchmark scans (skipped where already done)."""
    from ribfrac_ray.config import PreprocessConfig, RayConfig, WindowConfig
    from ribfrac_ray.preprocess import preprocess
    from ribfrac_ray.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    report = preprocess(PreprocessConfig(data_dir=data_dir, out_dir=out_dir, splits=(SPLIT,), num_tasks=2),
                        WindowConfig())
    return {"det_patches": report.det_patches, "seg_crops": report.seg_crops}


def loop_settings(kind: str, patch_dir: str, storage: str, epochs: int, threads: int) -> dict[str, Any]:
    """Return the config mapping that ``run_training`` and the plain loop both use."""
    from ribfrac_ray.config import PipelineConfig, TrainConfig
    from ribfrac_ray.training.trainer import loop_config

    train = TrainConfig(patch_dir=patch_dir, storage_path=storage, name=f"bench-{kind}", epochs=epochs,
                        batch_size=BATCH_SIZE, torch_threads=threads, num_to_keep=1)
    config = dataclasses.replace(PipelineConfig(), train_detector=train, train_segmenter=train)
    return loop_config(kind, config, ANCHOR_SHAPES if kind == "detector" else None)


def train_plain(patch_dir: str, threads: int, epochs: dict[str, int]) -> dict[str, Any]:
    """Child process: train each network with a plain PyTorch loop over batches read from Parquet."""
    import torch

    from ribfrac_ray.training.networks import SPECS

    results = {}
    for kind in KINDS:
        config = loop_settings(kind, patch_dir, "", epochs[kind], threads)
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        spec = SPECS[kind]
        model, saved_module = spec.build(config)
        optimizer = torch.optim.AdamW([p for p in saved_module.parameters() if p.requires_grad],
                                      lr=config["lr"], weight_decay=config["weight_decay"])
        loss_function = spec.make_loss(config)
        columns = _read_patches(kind, patch_dir)
        count = len(next(iter(columns.values())))
        rng = np.random.default_rng(0)
        augment = bool(config.get("augment", True))

        epoch_seconds = []
        for _ in range(epochs[kind]):
            started = time.perf_counter()
            model.train()
            order = rng.permutation(count)
            for start in range(0, count, BATCH_SIZE):
                rows = order[start:start + BATCH_SIZE]
                batch = {name: torch.from_numpy(values[rows]) for name, values in columns.items()}
                loss, _ = spec.train_step(model, batch, loss_function, augment)
                value = loss.item()
                if not np.isfinite(value):
                    raise FloatingPointError(f"{kind} loss became {value}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            epoch_seconds.append(time.perf_counter() - started)
        results[kind] = {"samples": count, "epoch_seconds": epoch_seconds}
    return results


def _read_patches(kind: str, patch_dir: str) -> dict[str, np.ndarray]:
    """Read the training columns of every Parquet file of ``kind`` into numpy arrays."""
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray  # noqa: F401  (registers the tensor column type)

    from ribfrac_ray.training.trainer import PATCH_COLUMNS, PATCH_FOLDERS

    folder = Path(patch_dir) / PATCH_FOLDERS[kind] / SPLIT
    tables = [pq.read_table(path, columns=PATCH_COLUMNS[kind]) for path in sorted(folder.glob("*.parquet"))]
    columns = {}
    for name in PATCH_COLUMNS[kind]:
        columns[name] = np.concatenate([table.column(name).combine_chunks().to_numpy() for table in tables])
    return columns


def _without_validation(spec: Any) -> Any:
    return dataclasses.replace(spec, validate=lambda model, shard, config: {spec.score_metric: 0.0})


def detector_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the product's loop for the RetinaNet, without validation."""
    from ribfrac_ray.training.loop import run_training
    from ribfrac_ray.training.networks import DETECTOR

    run_training(config, _without_validation(DETECTOR))


def segmenter_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the product's loop for the U-Net, without validation."""
    from ribfrac_ray.training.loop import run_training
    from ribfrac_ray.training.networks import SEGMENTER

    run_training(config, _without_validation(SEGMENTER))


def train_ray(patch_dir: str, storage: str, threads: int, epochs: dict[str, int]) -> dict[str, Any]:
    """Child process: train each network with Ray Train (one worker of 1 CPU) on a local Ray with 2 CPUs."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ribfrac_ray.config import RayConfig
    from ribfrac_ray.models.checkpoint import read_checkpoint
    from ribfrac_ray.runtime import init_ray
    from ribfrac_ray.training.trainer import read_patches

    started = time.perf_counter()
    init_ray(RayConfig(num_cpus=2))
    results: dict[str, Any] = {"init_seconds": time.perf_counter() - started}
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    loops = {"detector": detector_loop, "segmenter": segmenter_loop}

    for kind in KINDS:
        config = loop_settings(kind, patch_dir, storage, epochs[kind], threads)
        dataset = read_patches(kind, patch_dir, SPLIT).materialize()
        trainer = TorchTrainer(
            loops[kind],
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"bench-{kind}-{time.time_ns()}", storage_path=storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
            # The loop requests a "val" shard on rank 0, and the no-op validation never reads it.
            datasets={"train": dataset, "val": dataset},
            dataset_config=DataConfig(datasets_to_split=["train"]),
        )
        started = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - started
        _, meta, _ = read_checkpoint(result.checkpoint.path)
        history = meta["history"]
        results[kind] = {
            "samples": dataset.count(),
            "epoch_seconds": [epoch["epoch_seconds"] for epoch in history],
            "steps": [epoch["train_steps"] for epoch in history],
            "fit_seconds": fit_seconds,
        }
    return results


def run(context: Context) -> Section:
    section = Section("training", "Training: samples per second, one worker",
                      "plain PyTorch loop, same model, patches, batch size, optimizer and threads")
    scratch = context.scratch("training")
    patch_dir = str(scratch / "patches")
    counts = run_in_child("benchmarks.training:make_patches",
                          {"data_dir": str(context.data_dir), "out_dir": patch_dir}, context.log_path)
    threads = TORCH_THREADS
    epochs = QUICK_EPOCHS if context.size.name == "quick" else EPOCHS
    plain_epochs = {kind: max(2, count - 1) for kind, count in epochs.items()}
    args = {"patch_dir": patch_dir, "threads": threads}

    plain_first = run_in_child("benchmarks.training:train_plain", {**args, "epochs": plain_epochs}, context.log_path)
    ray_run = run_in_child("benchmarks.training:train_ray",
                           {**args, "epochs": epochs, "storage": str(scratch / "ray_results")}, context.log_path)
    plain_last = run_in_child("benchmarks.training:train_plain", {**args, "epochs": plain_epochs}, context.log_path)
    section.raw = {"patches": counts, "plain": [plain_first, plain_last], "ray": ray_run}

    for kind in KINDS:
        plain_rate = statistics.mean(_rate(run[kind]) for run in (plain_first, plain_last))
        ray_rate = _rate(ray_run[kind])
        slowdown = 1 - ray_rate / plain_rate
        startup = ray_run[kind]["fit_seconds"] - sum(ray_run[kind]["epoch_seconds"])
        section.rows += [
            Row(f"{kind}: samples/s, steady state ({ray_run[kind]['samples']} samples per epoch)",
                f"{ray_rate:.2f}", f"{plain_rate:.2f}", ratio(ray_rate / plain_rate),
                f"<= {OVERHEAD_TARGET:.0%} slower", check(slowdown <= OVERHEAD_TARGET)),
            Row(f"{kind}: Ray Train startup and reports (fit time beyond epochs)", seconds(startup),
                target="reported apart from the steady state"),
            Row(f"{kind}: first epoch", seconds(ray_run[kind]["epoch_seconds"][0]),
                seconds(statistics.mean(run[kind]["epoch_seconds"][0] for run in (plain_first, plain_last)))),
        ]
    section.rows.append(Row("ray.init", seconds(ray_run["init_seconds"])))
    for kind in KINDS:
        plain_step = BATCH_SIZE / statistics.mean(_rate(run[kind]) for run in (plain_first, plain_last))
        ray_step = BATCH_SIZE / _rate(ray_run[kind])
        section.notes.append(
            f"{kind}: a step (batch of {BATCH_SIZE}) takes {plain_step * 1000:.0f} ms in the plain loop and "
            f"{ray_step * 1000:.0f} ms under Ray Train, {(ray_step - plain_step) * 1000:+.0f} ms per step."
        )
    section.notes += [
        f"Batch size {BATCH_SIZE}, AdamW, {threads} torch thread(s) on both sides (`train_*.torch_threads`). Ray "
        "Train uses one worker of 1 CPU on a local Ray instance with 2 CPUs.",
        f"Epochs: Ray Train {epochs['detector']} (detector) and {epochs['segmenter']} (segmenter); the plain loop "
        f"runs {plain_epochs['detector']} and {plain_epochs['segmenter']}, once before and once after Ray Train, and "
        "its rate is the mean of both runs.",
        f"Patches: {counts['det_patches']} detector patches (64^3) and {counts['seg_crops']} segmenter crops (32^3), "
        f"preprocessed from the {context.size.n_scans} benchmark scans. A RibFrac training set has about 50 times "
        "more, so fixed per-epoch costs weigh less there than here.",
    ]
    return section


def _rate(run: dict[str, Any]) -> float:
    """Samples per second over the epochs after the first."""
    steady = run["epoch_seconds"][1:]
    return run["samples"] * len(steady) / sum(steady)
