"""MLflow tracking helpers against a real SQLite store."""

import multiprocessing
import os
from pathlib import Path

import mlflow
import pytest

from ribfrac_ray import tracking


def _write_runs(uri: str, worker: int) -> None:
    tracking.configure(uri, "concurrency")
    for index in range(3):
        with tracking.stage_run(f"writer-{worker}-{index}", {"section": {"worker": worker, "index": index}}, nested=False):
            for step in range(10):
                tracking.retry_locked(mlflow.log_metric, "value", float(step), step=step)


def test_default_uri_is_absolute_sqlite_in_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.resolve_tracking_uri("", "work")
    assert uri == f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    assert Path(uri[len("sqlite:///"):]).is_absolute()


def test_flag_beats_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri("", tmp_path) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("sqlite:////x.db", tmp_path) == "sqlite:////x.db"


def test_concurrent_writers_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure(uri, "concurrency")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_runs, args=(uri, worker)) for worker in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=240)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["concurrency"], output_format="list")
    assert len(runs) == 12
    assert all(r.data.metrics["value"] == 9.0 for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_stage_run_logs_config_and_marks_failure(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure(uri, "stages")
    with pytest.raises(RuntimeError):
        with tracking.stage_run("broken", {"train": {"epochs": 3}}, nested=False):
            raise RuntimeError("stage failed")
    run = mlflow.search_runs(experiment_names=["stages"], output_format="list")[0]
    assert run.info.status == "FAILED"
    assert run.data.params["train.epochs"] == "3"
    artifacts = [a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts
    assert os.path.isdir(tmp_path / "mlartifacts")


def test_cli_leaves_the_callers_tracking_uri_alone(tmp_path, monkeypatch):
    from ribfrac_ray import cli

    # The evaluate command configures MLflow first, then fails on the missing folders.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "first")]) == 1
    assert (tmp_path / "first" / "mlflow.db").is_file()
    assert "MLFLOW_TRACKING_URI" not in os.environ

    # A second command in the same process with another workdir gets its own store.
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "second")]) == 1
    assert (tmp_path / "second" / "mlflow.db").is_file()

    outer = f"sqlite:///{tmp_path / 'outer.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", outer)
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "third")]) == 1
    assert os.environ["MLFLOW_TRACKING_URI"] == outer
    assert not (tmp_path / "third" / "mlflow.db").exists()
