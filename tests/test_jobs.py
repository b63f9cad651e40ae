"""The demo as a Ray job, submitted the way the README shows, to a ``ray start`` head node on 127.0.0.1.

The head node runs as ``ray start --head --block`` in a session of its own, with
a private temp folder and a private home folder, where ``ray get-auth-token
--generate`` writes the token. The test stops it by sending SIGTERM to that
process, never with ``ray stop``, which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from processes import session_pids

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 120
JOB_TIMEOUT_S = 900
STOP_TIMEOUT_S = 60
TINY = [
    "phantoms.n_train=2",
    "phantoms.n_val=1",
    "phantoms.n_test=1",
    "phantoms.shape=[96,96,64]",
    "phantoms.spacing=[3.0,3.0,4.0]",
    "train_detector.epochs=1",
    "train_segmenter.epochs=1",
]
# The code the job needs, and what jobs/runtime_env.yaml must keep out of the upload.
UPLOADED = {"ribfrac_ray", "jobs", "pyproject.toml"}
EXCLUDED_SUFFIXES = (".nii", ".nii.gz", ".parquet", ".db", ".safetensors")
EXCLUDED_FOLDERS = {".venv", ".git", "mlruns", "mlartifacts", "ribfrac-demo", "data", "patches", "predictions"}
MAX_PACKAGE_BYTES = 5 * 2**20


@dataclass
class HeadNode:
    """A running head node: its job server address, the environment to reach it, its temp folder."""

    address: str
    env: dict[str, str]
    temp_dir: Path


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _stop(process: subprocess.Popen) -> None:
    """Stop ``ray start --block`` and the Ray processes it started, and kill what remains after the timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while session_pids({process.pid}) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in session_pids({process.pid}):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def head_node() -> Iterator[HeadNode]:
    # A short folder keeps Ray's socket paths under the 107-byte limit.
    base = Path(tempfile.mkdtemp(prefix="rfj", dir="/tmp"))
    (base / "home").mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {
        "HOME": str(base / "home"),
        # As in an activated virtual environment: the job's `python` is this one.
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)

    port, dashboard, agent, client = _free_ports(4)
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}", "--num-cpus=4", f"--temp-dir={base / 'ray'}",
        f"--object-store-memory={500 * 2**20}",
    ]
    log = base / "ray-start.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "block forever" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield HeadNode(address=f"http://127.0.0.1:{dashboard}", env=env, temp_dir=base / "ray")
    finally:
        _stop(process)
        shutil.rmtree(base, ignore_errors=True)


def _uploaded_files(head: HeadNode) -> dict[Path, int]:
    """Return the files of the job's unpacked working directory on the head node, with their sizes."""
    packages = [p for p in head.temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(packages) == 1, packages
    return {path.relative_to(packages[0]): path.stat().st_size for path in packages[0].rglob("*") if path.is_file()}


def test_demo_job_on_head_node(head_node, tmp_path):
    workdir = tmp_path / "demo"
    settings = [argument for pair in TINY for argument in ("--set", pair)]
    command = [
        str(BIN / "ray"), "job", "submit", "--address", head_node.address, "--working-dir", ".",
        "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/demo.py", "--workdir", str(workdir), *settings,
    ]
    result = subprocess.run(command, cwd=REPO, env=head_node.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "succeeded" in output

    table = pd.read_csv(workdir / "predictions" / "ribfrac-test-pred.csv")
    assert len(table[table.label_id == 0]) == 1
    assert (workdir / "evaluation" / "metrics.json").is_file()

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ribfrac-ray"], output_format="list")
    names = sorted(run.info.run_name for run in runs)
    assert names == sorted(["demo", "make-phantoms", "preprocess", "train-detector", "train-segmenter", "predict", "evaluate"])
    assert {run.info.status for run in runs} == {"FINISHED"}

    files = _uploaded_files(head_node)
    top_level = {path.parts[0] for path in files}
    assert UPLOADED <= top_level
    assert top_level.isdisjoint(EXCLUDED_FOLDERS)
    assert [path for path in files if path.name.endswith(EXCLUDED_SUFFIXES)] == []
    assert sum(files.values()) < MAX_PACKAGE_BYTES
