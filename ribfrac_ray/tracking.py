"""MLflow tracking: where runs go, and the helpers every stage uses to log.

The tracking URI is, in order: ``--tracking-uri``, ``MLFLOW_TRACKING_URI``, or a
SQLite store at ``<workdir>/mlflow.db`` given as an absolute path, so every Ray
worker finds the same store whatever its working directory. MLflow 3 no longer
creates new file stores (``./mlruns``), hence SQLite. On a multi-node cluster
use a tracking server that every node reaches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from ribfrac_ray.config import flatten_config_dict

logger = logging.getLogger(__name__)

# MLflow rejects parameter values longer than this many characters.
MAX_PARAM_LENGTH = 6000
# Retries for writes to a SQLite store that another process holds locked.
LOCK_RETRIES = 8


def resolve_tracking_uri(cli_uri: str, workdir: str | Path) -> str:
    """Return the tracking URI to use: flag, then environment, then ``<workdir>/mlflow.db``."""
    if cli_uri:
        return cli_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(workdir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def configure(tracking_uri: str, experiment: str) -> str:
    """Point the ``mlflow`` module at ``tracking_uri`` and select (or create) ``experiment``.

    Returns the experiment id. For a local SQLite store the artifacts go next to the
    database (``<folder>/mlartifacts``) instead of the current directory.
    """
    mlflow.set_tracking_uri(tracking_uri)
    existing = retry_locked(mlflow.get_experiment_by_name, experiment)
    if existing is not None:
        mlflow.set_experiment(experiment_id=existing.experiment_id)
        return existing.experiment_id

    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///"):])
        artifact_location = (database.parent / "mlartifacts").resolve().as_uri()
    try:
        experiment_id = retry_locked(mlflow.create_experiment, experiment, artifact_location=artifact_location)
    except MlflowException:
        # Another process created it between our lookup and our create.
        experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def retry_locked(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call an MLflow function, retrying while a SQLite store reports 'database is locked'."""
    for attempt in range(LOCK_RETRIES):
        try:
            return function(*args, **kwargs)
        except MlflowException as error:
            if "locked" not in str(error).lower() or attempt == LOCK_RETRIES - 1:
                raise
            delay = 0.2 * 2**attempt
            logger.warning("MLflow store is locked; retrying in %.1f s (%d/%d)", delay, attempt + 1, LOCK_RETRIES)
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def stage_run(stage: str, config_section: dict[str, Any], nested: bool = True, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run for one stage, logging its resolved config as params and YAML.

    Nested under the active run when there is one (the ``demo`` parent run).
    """
    parent = mlflow.active_run()
    run = retry_locked(mlflow.start_run, run_name=stage, nested=nested and parent is not None, tags={"stage": stage, **(tags or {})})
    try:
        log_config(config_section)
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run()


def log_config(config_section: dict[str, Any]) -> None:
    """Log a resolved config mapping as params (dotted keys) and as ``config.yaml``."""
    import yaml

    params = {key: value[:MAX_PARAM_LENGTH] for key, value in flatten_config_dict(config_section).items()}
    items = list(params.items())
    for start in range(0, len(items), 90):
        retry_locked(mlflow.log_params, dict(items[start : start + 90]))
    retry_locked(mlflow.log_text, yaml.safe_dump(config_section, sort_keys=False), "config.yaml")


def log_dict_artifact(values: dict[str, Any], name: str) -> None:
    """Log a mapping as a JSON artifact."""
    retry_locked(mlflow.log_text, json.dumps(values, indent=1, default=str), name)


def log_failures(failures: list[dict[str, str]], name: str = "failures.json") -> None:
    """Record per-case failures as a metric and, when there are any, as an artifact."""
    retry_locked(mlflow.log_metric, "failed_cases", len(failures))
    if failures:
        log_dict_artifact({"failures": failures}, name)


def log_folder(folder: str | Path, artifact_path: str) -> None:
    """Upload a folder's files as artifacts under ``artifact_path``."""
    retry_locked(mlflow.log_artifacts, str(folder), artifact_path)


def log_pytorch_model(model: Any, name: str, registered_name: str | None = None) -> None:
    """Log a torch module with ``mlflow.pytorch.log_model`` (and register it when named).

    NOTE: the model is stored in MLflow's pickle format, because MLflow's default
    ``pt2`` format cannot export the RetinaNet detector (its outputs are dicts of
    lists) and takes about 20 s for the U-Net on 2 CPUs. Unpickling runs code, so
    load these models only from a store you trust; ``ribfrac-ray predict`` reads
    the safetensors checkpoints instead.
    """
    import mlflow.pytorch

    retry_locked(mlflow.pytorch.log_model, model, name=name, registered_model_name=registered_name, serialization_format="pickle")
