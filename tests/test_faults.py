"""Interrupted ``ribfrac-ray`` commands: the same command again finishes the batch.

Each test starts the command as a subprocess with its own local Ray instance and
kills it once part of the batch is written. It then runs the command again and
checks that the rerun skipped the finished volumes or scans and redid the rest,
that it left the finished files untouched, and that no temporary files of the
interrupted writes remain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from processes import session_pids
from ribfrac_ray.io.atomic import TEMP_MARKER

pytestmark = pytest.mark.slow

RIBFRAC_RAY = str(Path(sys.executable).with_name("ribfrac-ray"))
COMMAND_TIMEOUT_S = 300
# Seconds that a command gets to exit after a signal, and that the Ray processes
# of a finished or killed command get to follow it. Ray's dashboard and runtime
# environment agents took 30-60 s to notice a SIGKILLed driver on a loaded 2-core machine.
EXIT_GRACE_S = 120
AGENT_NAMES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


class Sessions:
    """The sessions (process groups) of the commands a test started, to check and clean up."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def leftovers(self, grace_s: float = EXIT_GRACE_S) -> list[int]:
        """Wait up to ``grace_s`` for the sessions' processes to exit, and return those still running."""
        deadline = time.monotonic() + grace_s
        while self._pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        return self._pids()

    def wait_for_task_workers(self, timeout_s: float = EXIT_GRACE_S) -> None:
        """Wait until only Ray's agents, which run no tasks, are left of the sessions.

        A SIGKILLed driver's task workers can finish their current task (and write
        its files) for a few seconds after the driver is gone.
        """
        deadline = time.monotonic() + timeout_s
        while any(not _command_line(pid).startswith(AGENT_NAMES) for pid in self._pids()):
            if time.monotonic() > deadline:
                pytest.fail(f"task workers of the interrupted command still ran {timeout_s} s later")
            time.sleep(0.5)

    def kill_leftovers(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGKILL)

    def _pids(self) -> list[int]:
        return session_pids(self.ids)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def sessions() -> Iterator[Sessions]:
    started = Sessions()
    yield started
    started.kill_leftovers()


@pytest.fixture
def session_env() -> Iterator[dict[str, str]]:
    """Environment for one command's local Ray instance, with a private temp folder."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rfk", dir="/tmp"))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_TMPDIR"] = str(temp_dir)
    yield env
    shutil.rmtree(temp_dir, ignore_errors=True)


def _start(command: list[str], env: dict[str, str], log: Path, sessions: Sessions) -> subprocess.Popen:
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    sessions.ids.append(process.pid)
    return process


def _interrupt(command: list[str], env: dict[str, str], ready: Callable[[], bool], sig: signal.Signals, log: Path, sessions: Sessions) -> int:
    """Run ``command`` until ``ready()`` holds, send ``sig`` to it, and return its exit code."""
    process = _start(command, env, log, sessions)
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the command ended (exit code {process.returncode}) before it was interrupted:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {COMMAND_TIMEOUT_S} s waiting to interrupt the command")
        time.sleep(0.2)
    process.send_signal(sig)
    return process.wait(timeout=EXIT_GRACE_S)


def _run(command: list[str], env: dict[str, str], log: Path, sessions: Sessions) -> None:
    code = _start(command, env, log, sessions).wait(timeout=COMMAND_TIMEOUT_S)
    assert code == 0, log.read_text()[-3000:]


def _temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob(f"*{TEMP_MARKER}*")]


def _runs(workdir: Path, name: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ribfrac-ray")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'", order_by=["attributes.start_time ASC"])
    return list(runs)


def test_preprocess_rerun_after_sigkill(tiny_phantoms, session_env, sessions, tmp_path):
    workdir = tmp_path / "work"
    patches = workdir / "patches"
    command = [
        RIBFRAC_RAY, "preprocess", "--workdir", str(workdir), "--data-dir", str(tiny_phantoms),
        "--num-cpus", "2", "--set", "preprocess.num_tasks=1",
    ]
    volumes = sorted(path.name.removesuffix("-image.nii.gz") for path in tiny_phantoms.glob("ribfrac-*-images/*-image.nii.gz") if "test" not in path.parent.name)

    code = _interrupt(command, session_env, lambda: any(patches.glob("volumes/*/*.json")), signal.SIGKILL, tmp_path / "first.log", sessions)
    sessions.wait_for_task_workers()
    done_at_kill = {path.stem for path in patches.glob("volumes/*/*.json")}
    rerun_started = time.time_ns()
    _run(command, session_env, tmp_path / "rerun.log", sessions)

    manifest = json.loads((patches / "manifest.json").read_text())
    skipped = {public_id for ids in manifest["skipped"].values() for public_id in ids}
    redone = {public_id for ids in manifest["done"].values() for public_id in ids}
    skipped_files = [path for path in patches.glob("*/*/*") if path.name.split(".")[0] in skipped]
    assert code == -signal.SIGKILL
    assert done_at_kill <= skipped
    assert sorted(skipped | redone) == volumes
    assert skipped.isdisjoint(redone)
    assert len(skipped) < len(volumes)
    assert [path for path in skipped_files if path.stat().st_mtime_ns >= rerun_started] == []
    assert len(list(patches.glob("volumes/*/*.json"))) == len(volumes)
    assert _temporaries(patches) == []
    assert sessions.leftovers() == []


def test_predict_rerun_after_sigterm(tiny_phantoms, untrained_models, session_env, sessions, tmp_path):
    data = tmp_path / "data"
    images = data / "ribfrac-test-images"
    images.mkdir(parents=True)
    sources = sorted(tiny_phantoms.glob("ribfrac-test-images/*-image.nii.gz"))
    for copy in range(3):
        for number, source in enumerate(sources):
            shutil.copyfile(source, images / f"RibFrac{100 + copy * 10 + number}-image.nii.gz")
    scans = sorted(path.name.removesuffix("-image.nii.gz") for path in images.iterdir())
    workdir = tmp_path / "work"
    out = workdir / "predictions"
    records = out / ".ribfrac-ray"
    command = [
        RIBFRAC_RAY, "predict", "--workdir", str(workdir), "--data-dir", str(data), "--split", "test",
        "--detector", str(untrained_models / "detector"), "--segmenter", str(untrained_models / "segmenter"),
        "--num-cpus", "2",
    ]

    code = _interrupt(command, session_env, lambda: any(records.glob("*.json")), signal.SIGTERM, tmp_path / "first.log", sessions)
    sessions.wait_for_task_workers()
    done_at_signal = {path.stem for path in records.glob("*.json")}
    rerun_started = time.time_ns()
    _run(command, session_env, tmp_path / "rerun.log", sessions)

    interrupted, rerun = _runs(workdir, "predict")
    done_before = {path.stem for path in records.glob("*.json") if path.stat().st_mtime_ns < rerun_started}
    masks = {path.name.removesuffix(".nii.gz"): path.stat().st_mtime_ns for path in out.glob("*.nii.gz")}
    table = pd.read_csv(out / "ribfrac-test-pred.csv")
    assert code != 0
    assert interrupted.info.status == "FAILED"
    assert done_at_signal <= done_before
    assert len(done_before) < len(scans)
    assert rerun.data.metrics["scans_skipped"] == len(done_before)
    assert rerun.data.metrics["scans_predicted"] == len(scans) - len(done_before)
    assert [public_id for public_id in done_before if masks[public_id] >= rerun_started] == []
    assert sorted(masks) == scans
    assert sorted(table[table.label_id == 0].public_id) == scans
    assert _temporaries(out) == []
    assert sessions.leftovers() == []
