"""The pipeline on a three-node Ray cluster on 127.0.0.1, and what losing a node does to it.

The head node has no CPUs: it hosts the driver, the Ray Train controller and Ray
Data's coordinators. Two worker nodes with 2 CPUs each run the preprocessing
tasks, the training workers (one per node, STRICT_SPREAD) and the prediction
actors. The node-loss tests kill a worker node in the middle of a stage with
``Cluster.remove_node(allow_graceful=False)``, add a fresh node in its place, and
compare what the stage wrote with the outputs of the run without a fault.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest

from ribfrac_ray.config import PhantomConfig, PipelineConfig, resolve_config, resolve_paths
from ribfrac_ray.phantoms import make_phantoms
from ribfrac_ray.prediction.pipeline import csv_name, predict
from ribfrac_ray.prediction.records import RECORD_FOLDER, read_record
from ribfrac_ray.preprocess import preprocess
from ribfrac_ray.runtime import LOOPBACK, LOOPBACK_ONLY_VARIABLE
from ribfrac_ray.training.trainer import train_network

pytestmark = pytest.mark.slow

NODE_CPUS = 2
# Ray's test clusters give each node a 150 MiB object store, too small for a few
# blocks of CT patches.
OBJECT_STORE_BYTES = 400 * 2**20
SETTINGS = [
    "preprocess.num_tasks=2",
    "train_detector.epochs=1",
    "train_segmenter.epochs=1",
    "train_detector.num_workers=2",
    "train_segmenter.num_workers=2",
    "train_detector.placement_strategy=STRICT_SPREAD",
    "train_segmenter.placement_strategy=STRICT_SPREAD",
    "train_detector.torch_threads=1",
    "train_segmenter.torch_threads=1",
    "predict.detector_actors=2",
    "predict.segmenter_actors=2",
]
STAGE_TIMEOUT_S = 300


@dataclass
class Baseline:
    """The run without a fault: its config (output folders included) and the training workers' nodes."""

    config: PipelineConfig
    worker_nodes: dict[str, list[str]]


def _node_args(num_cpus: int = NODE_CPUS) -> dict[str, Any]:
    return {"num_cpus": num_cpus, "node_ip_address": LOOPBACK, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False}


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs and two worker nodes, all on 127.0.0.1, with this process as driver."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    restart_local = ray.is_initialized()
    if restart_local:
        ray.shutdown()
    # A short private temp folder keeps the session's socket paths under the
    # 107-byte limit and the cluster's address file away from other Ray instances.
    temp_dir = Path(tempfile.mkdtemp(prefix="rfr", dir="/tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(temp_dir))
        patch.setenv(LOOPBACK_ONLY_VARIABLE, "0")
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        nodes = Cluster(initialize_head=True, head_node_args=_node_args(num_cpus=0))
        try:
            for _ in range(2):
                nodes.add_node(**_node_args())
            nodes.wait_for_nodes()
            ray.init(address=nodes.address, log_to_driver=False)
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    if restart_local:
        # The same instance as the ray_local fixture, for the tests that follow.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module")
def preprocessed(cluster, tmp_path_factory) -> PipelineConfig:
    """Write phantoms, preprocess them on the cluster, and return the config of the run."""
    workdir = tmp_path_factory.mktemp("multinode")
    make_phantoms(PhantomConfig(out=str(workdir / "data"), n_train=3, n_val=1, n_test=3, shape=(96, 96, 64), spacing=(3.0, 3.0, 4.0), seed=5))
    config = resolve_paths(resolve_config(None, [f"workdir={workdir}", *SETTINGS]))
    report = preprocess(config.preprocess, config.window)
    assert report.failures == []
    return config


@pytest.fixture(scope="module")
def baseline(preprocessed) -> Baseline:
    """Train both networks and predict on the cluster, after preprocessing."""
    config = preprocessed
    worker_nodes = {}
    for kind in ("detector", "segmenter"):
        outcome = train_network(kind, config, Path(config.workdir) / "models")
        worker_nodes[kind] = json.loads((Path(outcome.checkpoint_dir) / "meta.json").read_text())["worker_nodes"]
    result = _predict_with_all_actors(config)
    assert result.failures == []
    return Baseline(config=config, worker_nodes=worker_nodes)


def _predict_with_all_actors(config: PipelineConfig):
    """Predict once every pool actor has started, so the first scans go to different actors.

    By default Ray Data hands scans to the first actor that is ready, and with a
    few tiny scans one actor can finish them all before its peers start.
    """
    import ray

    context = ray.data.DataContext.get_current()
    previous = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = STAGE_TIMEOUT_S
    try:
        return predict(config.predict, config.window)
    finally:
        context.wait_for_min_actors_s = previous


def _worker_node_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


def _replace_worker_node(cluster, node_id: str | None = None) -> str:
    """Kill a worker node (the one with ``node_id`` if given), add a fresh one, and return the killed node's id."""
    victim = next(node for node in cluster.worker_nodes if node_id in (None, node.node_id))
    cluster.remove_node(victim, allow_graceful=False)
    cluster.add_node(**_node_args())
    cluster.wait_for_nodes()
    return victim.node_id


def _wait_until(condition: Callable[[], bool], future: Future, event: str, timeout_s: float = STAGE_TIMEOUT_S) -> None:
    """Poll ``condition`` until it holds, and fail when the stage ends first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if future.done():
            future.result()
            pytest.fail(f"the stage finished before {event}, so the fault came too late to test anything")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting until {event}")
        time.sleep(0.2)


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def _registered_checkpoint(run_dir: Path) -> str | None:
    """Return the folder name of the latest checkpoint that the Ray Train controller has registered.

    A checkpoint folder appears while a worker still uploads it; a run restarts
    from it only once the controller lists it in its snapshot file.
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


def _latest_checkpoint_meta(run_dir: Path) -> dict[str, Any]:
    metas = [json.loads(path.read_text()) for path in run_dir.glob("checkpoint_*/meta.json")]
    return max(metas, key=lambda meta: meta["epoch"])


def test_preprocessing_spreads_over_nodes(cluster, preprocessed):
    markers = Path(preprocessed.preprocess.out_dir).glob("volumes/*/*.json")
    nodes = {json.loads(path.read_text())["node_id"] for path in markers}
    assert len(nodes) == 2


def test_training_uses_one_worker_per_node(cluster, baseline):
    for kind, nodes in baseline.worker_nodes.items():
        assert len(set(nodes)) == 2, kind


def test_prediction_spreads_over_nodes(cluster, baseline):
    records = Path(baseline.config.predict.out_dir, RECORD_FOLDER).glob("*.json")
    nodes = {node for path in records for node in json.loads(path.read_text())["node_ids"].values()}
    assert len(nodes) >= 2


def test_preprocessing_survives_node_loss(cluster, preprocessed, tmp_path):
    config = dataclasses.replace(preprocessed.preprocess, out_dir=str(tmp_path / "patches"))
    markers = tmp_path / "patches" / "volumes"
    n_volumes = len(list(Path(preprocessed.preprocess.out_dir).glob("volumes/*/*.json")))

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(preprocess, config, preprocessed.window)
        _wait_until(lambda: len(list(markers.glob("*/*.json"))) >= 1, future, "the first volume was done")
        lost = _replace_worker_node(cluster)
        report = future.result(timeout=STAGE_TIMEOUT_S)

    expected = Path(preprocessed.preprocess.out_dir)
    written = tmp_path / "patches"
    assert report.failures == []
    assert sum(len(ids) for ids in report.done.values()) == n_volumes
    assert _files(written) == _files(expected)
    for name in _files(expected):
        if name.endswith(".parquet"):
            assert (written / name).read_bytes() == (expected / name).read_bytes(), name
    for marker in expected.glob("volumes/*/*.json"):
        before = json.loads(marker.read_text())
        after = json.loads((written / marker.relative_to(expected)).read_text())
        assert {k: v for k, v in after.items() if k != "node_id"} == {k: v for k, v in before.items() if k != "node_id"}
    assert lost not in _worker_node_ids(cluster)


def test_prediction_survives_node_loss(cluster, baseline, tmp_path):
    config = dataclasses.replace(baseline.config.predict, out_dir=str(tmp_path / "predictions"))
    records = tmp_path / "predictions" / RECORD_FOLDER
    expected = Path(baseline.config.predict.out_dir)

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(predict, config, baseline.config.window)
        _wait_until(lambda: len(list(records.glob("*.json"))) >= 1, future, "the first scan was written")
        _replace_worker_node(cluster)
        report = future.result(timeout=STAGE_TIMEOUT_S)

    written = tmp_path / "predictions"
    assert report.failures == []
    assert _files(written) == _files(expected)
    csv = csv_name(baseline.config.predict.split)
    assert (written / csv).read_text() == (expected / csv).read_text()
    for mask_path in expected.glob("*.nii.gz"):
        before, after = nib.load(mask_path), nib.load(written / mask_path.name)
        assert np.array_equal(np.asarray(after.dataobj), np.asarray(before.dataobj)), mask_path.name
        assert np.array_equal(after.affine, before.affine), mask_path.name
        public_id = mask_path.name.removesuffix(".nii.gz")
        assert read_record(written, public_id)["rows"] == read_record(expected, public_id)["rows"]


def test_training_resumes_after_node_loss(cluster, preprocessed, tmp_path):
    settings = dataclasses.replace(preprocessed.train_segmenter, epochs=3, name="segmenter-node-loss", storage_path=str(tmp_path / "ray_results"))
    config = dataclasses.replace(preprocessed, train_segmenter=settings)
    run_dir = tmp_path / "ray_results" / settings.name

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(train_network, "segmenter", config, tmp_path / "models")
        _wait_until(lambda: _registered_checkpoint(run_dir) is not None, future, "Ray Train registered a checkpoint")
        first_nodes = json.loads((run_dir / _registered_checkpoint(run_dir) / "meta.json").read_text())["worker_nodes"]
        lost = _replace_worker_node(cluster, node_id=first_nodes[-1])
        future.result(timeout=STAGE_TIMEOUT_S)

    meta = _latest_checkpoint_meta(run_dir)
    history = meta["history"]
    assert [entry["epoch"] for entry in history] == [0, 1, 2]
    assert history[0]["start_epoch"] == 0
    assert history[-1]["start_epoch"] > 0, history
    assert lost in first_nodes
    assert lost not in meta["worker_nodes"]
    assert len(set(meta["worker_nodes"])) == 2
