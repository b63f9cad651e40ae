"""The per-worker training loop shared by both networks.

A :class:`NetworkSpec` defines how to build one network, take one training step
and validate it. :func:`run_training` does the rest the same way for both
networks: threads, seeding, DDP, resuming from the last checkpoint, and one report
with a checkpoint per epoch. Only rank 0 validates and writes checkpoint files; every rank reports once
per epoch, because ``ray.train.report`` is a barrier.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import ray
import torch

from ribfrac_ray.models.checkpoint import read_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class NetworkSpec:
    """How to train one kind of network inside :func:`run_training`.

    ``build`` returns the trainable module and the module whose state is saved.
    They are the same object for the U-Net, and the RetinaNet detector and its
    network for the detector. ``wrap_ddp`` returns the model to train, wrapped for DDP when the
    world size is above 1, and an unwrapped view for validation on rank 0 alone
    (a DDP forward is a collective call and would wait for the other ranks).
    ``make_loss`` builds the loss function that ``train_step`` receives (None
    where the model computes its own loss); ``train_step`` takes a flag for random flips and returns the loss and a mapping of scalar parts to log.
    ``validate`` returns the validation metrics, including ``score_metric``.
    """

    kind: str
    score_metric: str
    build: Callable[[dict[str, Any]], tuple[Any, torch.nn.Module]]
    wrap_ddp: Callable[[Any], tuple[Any, Any]]
    make_loss: Callable[[dict[str, Any]], Any]
    train_step: Callable[[Any, dict[str, torch.Tensor], Any, bool], tuple[torch.Tensor, dict[str, float]]]
    validate: Callable[[Any, Any, dict[str, Any]], dict[str, float]]
    meta: Callable[[dict[str, Any]], dict[str, Any]]


def run_training(config: dict[str, Any], spec: NetworkSpec) -> None:
    """Train ``spec``'s network for ``config['epochs']`` epochs on this worker's shard."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    _set_threads(config, context.get_local_world_size())
    torch.manual_seed(int(config["seed"]) + rank)

    model, saved_module = spec.build(config)
    optimizer = torch.optim.AdamW(
        [p for p in saved_module.parameters() if p.requires_grad],
        lr=float(config["lr"]),
        weight_decay=float(config["weight_decay"]),
    )
    start_epoch, history = _restore(saved_module, optimizer)
    model, eval_model = spec.wrap_ddp(model)
    worker_nodes = _worker_node_ids()

    train_batches = ShardBatches(
        ray.train.get_dataset_shard("train"),
        batch_size=int(config["batch_size"]),
        shuffle_buffer=int(config["shuffle_buffer"]),
        limit_mb=float(config.get("worker_cache_mb", 0)),
        seed=int(config["seed"]) + rank,
    )
    val_shard = ray.train.get_dataset_shard("val") if rank == 0 else None

    for epoch in range(start_epoch, int(config["epochs"])):
        started = time.perf_counter()
        lr = epoch_learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_metrics = _train_epoch(model, spec, train_batches.epoch(epoch), optimizer, config)
        # start_epoch is above 0 when this attempt resumed from a checkpoint.
        metrics = {"epoch": epoch, "start_epoch": start_epoch, "lr": lr, **train_metrics}
        if rank == 0:
            metrics.update(spec.validate(eval_model, val_shard, config))
        metrics["epoch_seconds"] = time.perf_counter() - started
        history.append(metrics)
        _report(metrics, history, saved_module, optimizer, spec, config, rank, worker_nodes)


LR_SCHEDULES = ("constant", "cosine")
# Share of ``lr`` that the cosine schedule reaches at the end of the last epoch.
COSINE_FINAL_FRACTION = 0.05


def epoch_learning_rate(config: dict[str, Any], epoch: int) -> float:
    """Return the learning rate of 0-based ``epoch`` under ``config['lr_schedule']``.

    The rate depends on the epoch alone, so a run resumed from a checkpoint
    continues the curve where the lost attempt left it.
    """
    base = float(config["lr"])
    schedule = config.get("lr_schedule", "constant")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant":
        return base

    final = base * COSINE_FINAL_FRACTION
    progress = epoch / max(1, int(config["epochs"]))
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def _worker_node_ids() -> list[str]:
    """Return the Ray node id of every rank, in rank order (a collective call)."""
    import torch.distributed as dist

    own = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return [str(node) for node in gathered]


def _set_threads(config: dict[str, Any], local_world_size: int) -> None:
    threads = int(config.get("torch_threads", 0))
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(threads)


def _restore(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    """Load the latest checkpoint of this run, if any; return the next epoch and the history."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        state, meta, optimizer_state = read_checkpoint(folder)
    module.load_state_dict(state)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    next_epoch = int(meta["epoch"]) + 1
    logger.info("resuming %s training at epoch %d from %s", meta.get("kind"), next_epoch, checkpoint.path)
    return next_epoch, list(meta.get("history", []))


class ShardBatches:
    """Training batches of one worker's shard, held in memory after the first epoch when small.

    Each pass over a Ray Data shard starts a new streaming execution, a fixed cost of
    about 0.4 s per epoch on 2 CPUs that weighs heavily on epochs of a few seconds.
    The first epoch streams the shard (with Ray Data's local shuffle) and keeps its
    batches. When they add up to at most ``limit_mb``, later epochs shuffle those
    rows in memory with a new permutation and do not read the shard again. A larger
    shard streams every epoch. The rows a worker keeps are the ones its first epoch
    received, so with several workers each reshuffles its own share. Every worker of
    ``streaming_split(equal=True)`` receives the same number of rows, so the ranks
    still take the same number of steps per epoch.
    """

    def __init__(self, shard: Any, batch_size: int, shuffle_buffer: int, limit_mb: float, seed: int) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.limit_bytes = limit_mb * 2**20
        self.seed = seed
        self.columns: dict[str, torch.Tensor] | None = None

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batches of one epoch (dicts of tensors with a leading batch axis)."""
        if self.columns is not None:
            yield from self._from_memory(epoch)
            return

        cached: list[dict[str, torch.Tensor]] | None = [] if self.limit_bytes > 0 else None
        cached_bytes = 0
        for batch in self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            drop_last=False,
        ):
            if cached is not None:
                cached_bytes += sum(value.numel() * value.element_size() for value in batch.values())
                if cached_bytes <= self.limit_bytes:
                    cached.append(batch)
                else:
                    cached = None
            yield batch
        if cached:
            self.columns = {name: torch.cat([batch[name] for batch in cached]) for name in cached[0]}
            logger.info("holding %d training rows (%.0f MiB) in memory for the next epochs", self._rows(), cached_bytes / 2**20)

    def _rows(self) -> int:
        assert self.columns is not None
        return len(next(iter(self.columns.values())))

    def _from_memory(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        assert self.columns is not None
        order = torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(self._rows()))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield {name: values[rows] for name, values in self.columns.items()}


def _train_epoch(
    model: Any,
    spec: NetworkSpec,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
) -> dict[str, float]:
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    loss_function = spec.make_loss(config)
    augment = bool(config.get("augment", True))
    for batch in batches:
        loss, parts = spec.train_step(model, batch, loss_function, augment)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{spec.kind} loss became {value} at step {steps}; lower train_{spec.kind}.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        for key, part in {"loss": value, **parts}.items():
            totals[key] = totals.get(key, 0.0) + part
    return {f"train_{key}": value / max(steps, 1) for key, value in totals.items()} | {"train_steps": steps}


def _report(
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    spec: NetworkSpec,
    config: dict[str, Any],
    rank: int,
    worker_nodes: list[str],
) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        meta = spec.meta(config) | {
            "kind": spec.kind,
            "epoch": metrics["epoch"],
            "metrics": metrics,
            "history": history,
            "worker_nodes": worker_nodes,
        }
        save_checkpoint(folder, module.state_dict(), meta, optimizer.state_dict())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
