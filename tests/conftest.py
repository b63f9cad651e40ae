"""Shared fixtures: a real local Ray instance, a real MLflow store, real phantom NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray Data progress bars and Ray's usage-stats prompt only clutter test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray instances of the tests use 127.0.0.1 as their node address and bind their
# servers there (see ribfrac_ray.runtime.LOOPBACK_ONLY_VARIABLE); Ray reads this on import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TINY_SHAPE = (96, 96, 64)
TINY_SPACING = (3.0, 3.0, 4.0)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by the tests of one session (4 logical CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_phantoms(tmp_path_factory) -> Path:
    """A small seeded phantom set in the RibFrac layout: 4 train, 2 val, 2 test scans."""
    from ribfrac_ray.config import PhantomConfig
    from ribfrac_ray.phantoms import make_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    make_phantoms(PhantomConfig(out=str(out), n_train=4, n_val=2, n_test=2, shape=TINY_SHAPE, spacing=TINY_SPACING, seed=7))
    return out


@pytest.fixture(scope="session")
def untrained_models(tmp_path_factory) -> Path:
    """Detector and segmenter checkpoints with seeded random weights, for tests of prediction's plumbing."""
    import torch

    from ribfrac_ray.config import DetectorConfig, SegmenterConfig
    from ribfrac_ray.models.checkpoint import detector_meta, save_checkpoint, segmenter_meta
    from ribfrac_ray.models.detector import build_detector
    from ribfrac_ray.models.segmenter import build_segmenter

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    anchors, patch_size = [[6.0, 6.0, 6.0], [10.0, 10.0, 10.0]], (64, 64, 64)
    detector = build_detector(DetectorConfig(), anchors, patch_size)
    save_checkpoint(folder / "detector", detector.network.state_dict(), detector_meta(DetectorConfig(), anchors, patch_size))
    segmenter_config = SegmenterConfig()
    save_checkpoint(folder / "segmenter", build_segmenter(segmenter_config).state_dict(), segmenter_meta(segmenter_config, (32, 32, 32)))
    return folder


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh SQLite MLflow store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
