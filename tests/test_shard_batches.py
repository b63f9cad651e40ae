"""Training batches held in the worker's memory after the first epoch (training/loop.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ribfrac_ray.training.loop import ShardBatches


class CountingShard:
    """A real Ray Dataset that counts how often an epoch streams it."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.passes = 0

    def iter_torch_batches(self, **kwargs):
        self.passes += 1
        return self.dataset.iter_torch_batches(**kwargs)


def _dataset(rows: int):
    import ray

    ids = np.arange(rows, dtype=np.int64)
    images = np.repeat(ids[:, None, None], 8, axis=1).repeat(8, axis=2).astype(np.float32)
    return ray.data.from_items([{"id": int(i), "image": image} for i, image in zip(ids, images)])


def _epoch_ids(batches: ShardBatches, epoch: int) -> tuple[list[int], list[int]]:
    ids, sizes = [], []
    for batch in batches.epoch(epoch):
        assert set(batch) == {"id", "image"}
        assert torch.equal(batch["image"][:, 0, 0], batch["id"].float())
        ids += batch["id"].tolist()
        sizes.append(len(batch["id"]))
    return ids, sizes


def test_small_shard_streams_once_then_reshuffles_in_memory(ray_local):
    shard = CountingShard(_dataset(23))
    batches = ShardBatches(shard, batch_size=4, shuffle_buffer=8, limit_mb=1, seed=3)

    orders = []
    for epoch in range(3):
        ids, sizes = _epoch_ids(batches, epoch)
        assert sorted(ids) == list(range(23))
        assert sizes == [4, 4, 4, 4, 4, 3]
        orders.append(ids)

    assert shard.passes == 1
    assert orders[1] != orders[2]


@pytest.mark.parametrize(
    "limit_mb",
    [
        0.001,  # 23 rows of 8 x 8 float32 plus an int64 id are about 6 KiB, above 0.001 MiB
        0,  # a limit of 0 turns the cache off
    ],
)
def test_shard_streams_every_epoch(ray_local, limit_mb):
    shard = CountingShard(_dataset(23))
    batches = ShardBatches(shard, batch_size=5, shuffle_buffer=0, limit_mb=limit_mb, seed=0)

    for epoch in range(2):
        assert sorted(_epoch_ids(batches, epoch)[0]) == list(range(23))

    assert shard.passes == 2
    assert batches.columns is None
