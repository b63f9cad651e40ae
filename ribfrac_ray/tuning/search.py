"""A Ray Tune search over detector settings: every trial is one Ray Train run, recorded in MLflow.

Folder of a search, ``<workdir>/tune/<name>`` (Tune's experiment folder)::

    tuner.pkl, experiment_state-*.json  Tune's state; rerunning with the same name resumes from it
    trial_<trial id>/                   Tune's files for one trial (result.json, progress.csv)
    trials/det-<trial id>/              the trial's Ray Train run with its checkpoints
    search.json, base_config.yaml       the search settings and the config that every trial starts from
    best_config.yaml                    the full pipeline config with the best trial's values
    best_detector/                      the best trial's best checkpoint, for `ribfrac-ray predict --detector`

MLflow records the search as one parent run (run name ``tune-<name>``, tag
``ribfrac.tune_path``) and each trial as a child run (tag ``mlflow.parentRunId``, run
name = Tune's trial id) with the sampled values as parameters and one metric step per epoch. Three kinds of
process write to the store: this driver (the parent run and each trial's final
status), each trial's process (creates the trial's run) and each trial's Ray Train
controller (the epoch metrics). ``tracking.retry_locked`` absorbs SQLite's
'database is locked' errors between them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from ribfrac_ray.config import (
    PATH_FIELDS,
    ConfigError,
    PipelineConfig,
    TrainConfig,
    apply_mapping,
    config_to_dict,
    flatten_config_dict,
    save_config,
)
from ribfrac_ray.tracking import MAX_PARAM_LENGTH, configure, resolve_tracking_uri, retry_locked
from ribfrac_ray.training.callbacks import MlflowEpochLogger
from ribfrac_ray.training.trainer import PATCH_FOLDERS, export_checkpoint, train_network
from ribfrac_ray.tuning.space import SearchSettings, SearchSpace

logger = logging.getLogger(__name__)

TUNE_FOLDER = "tune"
TRIALS_FOLDER = "trials"
BEST_DETECTOR_FOLDER = "best_detector"
SETTINGS_FILE = "search.json"
BASE_CONFIG_FILE = "base_config.yaml"
BEST_CONFIG_FILE = "best_config.yaml"
# Tune's time attribute for ASHA: epochs trained so far, added by EpochTuneReportCallback.
EPOCHS_DONE = "epochs_done"
# CPUs left free for Ray Data tasks while every concurrent trial trains. With none
# free, reading patches waits for a CPU that never comes.
DATA_CPUS = 1.0
# The name becomes a folder and an MLflow tag value in search filters.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

TAG_TUNE_NAME = "ribfrac.tune_name"
TAG_TUNE_PATH = "ribfrac.tune_path"
TAG_TRIAL_ID = "ribfrac.trial_id"
TAG_OUTCOME = "ribfrac.trial_outcome"
TAG_RESTARTS = "ribfrac.restarts"
TAG_ERROR = "ribfrac.error"
OUTCOMES = ("completed", "stopped_early", "errored")


@dataclass
class MlflowTarget:
    """MLflow destination of a search: the tracking store, the experiment and the parent run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


@dataclass
class TrialContext:
    """Settings that every trial uses besides its sampled values, shipped by Tune to the trial processes."""

    # Resolved, with the space file's fixed values and max_epochs applied.
    config: PipelineConfig
    space: SearchSpace
    experiment_dir: str
    mlflow: MlflowTarget


@dataclass
class TrialSummary:
    """One trial as recorded in MLflow and in Tune's results."""

    trial_id: str
    run_id: str
    # "completed", "stopped_early", "errored", or "unfinished" (interrupted or never started).
    outcome: str
    # Best value of the search metric over the trial's epochs, or None before its first epoch.
    score: float | None
    epochs: int
    values: dict[str, Any] = field(default_factory=dict)
    # Ray Train checkpoint of the best epoch, when Tune's results contain it.
    checkpoint: str = ""


@dataclass
class SearchOutcome:
    """Result of one call of :func:`run_search`."""

    name: str
    experiment_dir: str
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config_path: str
    # Copy of the best trial's best checkpoint, or "" when there is none.
    best_detector_path: str
    interrupted: bool
    resumed: bool
    seconds: float


class EpochTuneReportCallback(TuneReportCallback):
    """Forward rank 0's metrics to Tune with ``epochs_done`` (epoch + 1) added.

    ASHA uses ``epochs_done`` as its time attribute. Tune's own ``training_iteration``
    restarts at 1 when a trial restarts after an interruption, while Ray Train resumes
    at the epoch after its last checkpoint.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            metrics = [{**metrics[0], EPOCHS_DONE: int(metrics[0]["epoch"]) + 1}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def run_trial(sample: dict[str, Any], context: TrialContext) -> None:
    """Tune trial function: train the detector with the sampled values, reporting each epoch to Tune."""
    trial_id = tune.get_context().get_trial_id()
    values = context.space.decode(sample)
    config = trial_config(context.config, values, trial_id, context.experiment_dir)
    run_id = open_trial_run(context.mlflow, trial_id, values)

    # The MLflow logger goes first: Tune may end this process as soon as it has an
    # epoch's metrics, and by then the epoch must be in MLflow.
    callbacks = [MlflowEpochLogger(context.mlflow.tracking_uri, run_id), EpochTuneReportCallback()]
    # train_network exports the best checkpoint when training returns. A trial that
    # the scheduler stops never gets there, so run_search exports the best trial's
    # checkpoint from its Train run instead.
    models_dir = Path(context.experiment_dir) / trial_folder(trial_id)
    train_network("detector", config, models_dir, callbacks=callbacks)


def trial_config(base: PipelineConfig, values: dict[str, Any], trial_id: str, experiment_dir: str | Path) -> PipelineConfig:
    """Apply a trial's values and give it its own Ray Train run, ``<experiment_dir>/trials/det-<trial_id>``."""
    config = apply_mapping(base, values, source=f"trial {trial_id}")
    train = dataclasses.replace(
        config.train_detector,
        name=f"det-{trial_id}",
        storage_path=str(Path(experiment_dir) / TRIALS_FOLDER),
    )
    return dataclasses.replace(config, train_detector=train)


def search_base_config(config: PipelineConfig, space: SearchSpace) -> PipelineConfig:
    """Return the config every trial starts from: ``config`` with the fixed values and max_epochs."""
    config = apply_mapping(config, space.fixed, f"{space.path} (fixed)")
    epochs = space.settings.max_epochs or config.train_detector.epochs
    return dataclasses.replace(config, train_detector=dataclasses.replace(config.train_detector, epochs=epochs))


def run_search(space: SearchSpace, config: PipelineConfig, name: str, overwrite: bool = False) -> SearchOutcome:
    """Run or resume the search ``name`` under ``<workdir>/tune/<name>`` and export the best config.

    ``config`` must be resolved (absolute paths) and Ray initialised. An existing
    search of the same name resumes: finished trials keep their results, and
    unfinished or errored trials continue from their last Ray Train checkpoint.
    ``overwrite`` deletes the existing search folder first; its MLflow runs stay.
    """
    started = time.perf_counter()
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"invalid search name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit")

    base = search_base_config(config, space)
    _check_patches(base.train_detector)
    _check_anchor_settings(base, space)
    check_resources(space.settings, base.train_detector)
    # Built before anything is written, so that its errors leave no trace.
    tune_config = _tune_config(space.settings, base.train_detector.epochs)
    if space.settings.scheduler == "asha":
        _warn_without_state_api()

    experiment_dir = Path(config.workdir) / TUNE_FOLDER / name
    if overwrite and experiment_dir.exists():
        logger.info("deleting the earlier search in %s (--overwrite)", experiment_dir)
        shutil.rmtree(experiment_dir)
    resumed = tune.Tuner.can_restore(str(experiment_dir))
    if resumed:
        _check_unchanged(experiment_dir, space, base)
    target = _open_parent_run(config, name, experiment_dir, space, base, resumed)
    client = MlflowClient(target.tracking_uri)

    context = TrialContext(config=base, space=space, experiment_dir=str(experiment_dir), mlflow=target)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": space.settings.trial_cpus})
    if resumed:
        # Tune restores the scheduler (without its rung records), the search algorithm
        # and the callbacks from the experiment folder. Only the trainable is passed again.
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        recorder = TrialRunRecorder(target, space.settings.metric, space.settings.mode, base.train_detector.epochs)
        run_config = tune.RunConfig(name=name, storage_path=str(experiment_dir.parent), callbacks=[recorder])
        tuner = tune.Tuner(trainable, param_space=space.param_space(), tune_config=tune_config, run_config=run_config)

    logger.info("%s search %s: %d trials, %s", "resuming" if resumed else "starting", experiment_dir, space.settings.num_samples, space.settings)
    try:
        results = tuner.fit()
    except BaseException as error:
        _end_run(client, target.parent_run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise

    trials = summarize_trials(client, target, results, space)
    finished = sum(trial.outcome in OUTCOMES for trial in trials)
    interrupted = finished < space.settings.num_samples
    best = best_trial(trials, space.settings.mode)
    best_config_path = best_detector_path = ""
    if best is not None and not interrupted:
        best_config_path = str(experiment_dir / BEST_CONFIG_FILE)
        export_best_config(base, best.values, f"detector-{name}-best", best_config_path)
        if best.checkpoint:
            best_detector_path = str(experiment_dir / BEST_DETECTOR_FOLDER)
            export_checkpoint(best.checkpoint, Path(best_detector_path))

    _finish_parent_run(client, target, trials, best, best_config_path, interrupted, space.settings, time.perf_counter() - started)
    return SearchOutcome(
        name=name,
        experiment_dir=str(experiment_dir),
        parent_run_id=target.parent_run_id,
        tracking_uri=target.tracking_uri,
        trials=trials,
        best=best,
        best_config_path=best_config_path,
        best_detector_path=best_detector_path,
        interrupted=interrupted,
        resumed=resumed,
        seconds=time.perf_counter() - started,
    )


def _tune_config(settings: SearchSettings, max_epochs: int) -> tune.TuneConfig:
    search_alg, max_concurrent = _search_algorithm(settings)
    return tune.TuneConfig(
        metric=settings.metric,
        mode=settings.mode,
        num_samples=settings.num_samples,
        max_concurrent_trials=max_concurrent,
        search_alg=search_alg,
        scheduler=_scheduler(settings, max_epochs),
        # Each trial owns its Ray Train controller, which ends with the trial's process.
        reuse_actors=False,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_dirname,
    )


def _open_parent_run(config: PipelineConfig, name: str, experiment_dir: Path, space: SearchSpace, base: PipelineConfig, resumed: bool) -> MlflowTarget:
    """Reopen the search's MLflow parent run, or record a new search in its folder and in MLflow."""
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri, config.workdir)
    experiment_id = configure(tracking_uri, config.tracking.experiment)
    client = MlflowClient(tracking_uri)
    if resumed:
        parent_run_id = _reopen_parent_run(client, experiment_id, name, experiment_dir, tracking_uri)
    else:
        experiment_dir.mkdir(parents=True, exist_ok=True)
        (experiment_dir / SETTINGS_FILE).write_text(json.dumps(space.describe(), indent=1), encoding="utf-8")
        save_config(base, experiment_dir / BASE_CONFIG_FILE)
        parent_run_id = _start_parent_run(client, experiment_id, name, experiment_dir, space, base)
    return MlflowTarget(tracking_uri, experiment_id, parent_run_id)


def trial_name(trial: Any) -> str:
    """Name a trial by its id in Tune's output."""
    return trial.trial_id


def trial_dirname(trial: Any) -> str:
    """Name Tune's folder of a trial."""
    return trial_folder(trial.trial_id)


def trial_folder(trial_id: str) -> str:
    """Return the name of Tune's folder of a trial, ``trial_<trial id>``."""
    return f"trial_{trial_id}"


def _search_algorithm(settings: SearchSettings) -> tuple[Any, int | None]:
    """Return the search algorithm and the value for TuneConfig.max_concurrent_trials."""
    if settings.search_alg == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator
        # passed in, so the limit goes to the generator itself.
        return BasicVariantGenerator(max_concurrent=settings.max_concurrent_trials, random_state=settings.seed), None
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise ConfigError(f"search.search_alg 'optuna' needs the optuna package ({error}); install it with `pip install optuna` or use search_alg: random") from error
    return OptunaSearch(seed=settings.seed), settings.max_concurrent_trials


def _scheduler(settings: SearchSettings, max_epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    if settings.grace_period > max_epochs:
        raise ConfigError(f"search.grace_period ({settings.grace_period}) is above the {max_epochs} epochs per trial; lower it or raise search.max_epochs")
    # Metric and mode come from TuneConfig, because ASHA rejects them when set in both places.
    # Ray Train ends a trial after max_epochs anyway. With stop_last_trials=False, Tune
    # does not end a trial's process only because it reached max_t, so a trial that
    # passes its last rung returns by itself.
    return ASHAScheduler(
        time_attr=EPOCHS_DONE,
        max_t=max_epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
        stop_last_trials=False,
    )


def check_resources(settings: SearchSettings, train: TrainConfig) -> None:
    """Raise ConfigError where the concurrent trials would leave Ray Data no CPU or lack GPUs.

    Each trial reserves ``trial_cpus`` for its own process and its Train workers
    ``num_workers x cpus_per_worker``; Ray Data needs a CPU beyond that to read
    patches, or ingest hangs.
    """
    # NOTE: an autoscaling cluster reports only the nodes it has now, so this check
    # can reject a search that would fit once the cluster has grown.
    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 0))
    concurrent = settings.max_concurrent_trials
    per_trial = settings.trial_cpus + train.num_workers * train.cpus_per_worker
    needed = concurrent * per_trial + DATA_CPUS
    if needed > total_cpus:
        raise ConfigError(
            f"{concurrent} concurrent trial(s) x ({settings.trial_cpus:g} CPU for the trial + {train.num_workers} "
            f"Train worker(s) x {train.cpus_per_worker:g} CPU) + {DATA_CPUS:g} CPU for Ray Data need {needed:g} CPUs, "
            f"but Ray has {total_cpus:g}; lower search.max_concurrent_trials, search.trial_cpus or "
            "train_detector.cpus_per_worker, or start Ray with more logical CPUs (--num-cpus)"
        )
    if train.use_gpu:
        needed_gpus = concurrent * train.num_workers
        total_gpus = float(resources.get("GPU", 0))
        if needed_gpus > total_gpus:
            raise ConfigError(
                f"{concurrent} concurrent trial(s) x {train.num_workers} GPU worker(s) need {needed_gpus} GPUs, "
                f"but Ray has {total_gpus:g}; lower search.max_concurrent_trials or train_detector.num_workers"
            )


def _warn_without_state_api() -> None:
    """Warn where Ray Train could not free the CPUs of trials that the scheduler stops.

    Tune ends a stopped trial's process, and with it the trial's Ray Train
    controller. Ray Train then frees the run's placement group from a helper actor
    that watches the controller through Ray's State API. Without that API the CPUs
    stay reserved until the search ends, and later trials can wait for them forever.
    """
    error = ray.get(_state_api_error.remote())
    if error:
        logger.warning(
            "Ray's State API is unavailable from Ray workers (%s), so each trial that ASHA stops keeps its "
            "Train workers' CPUs until the search ends; start Ray with its dashboard (the tune command does "
            "this for a local instance), or use search.scheduler: fifo",
            error,
        )


@ray.remote(num_cpus=0)
def _state_api_error() -> str:
    """Return why a Ray worker cannot reach the State API, or '' when it can."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        list_actors(limit=1, timeout=10)
    except (RayStateApiException, ConnectionError, ValueError) as error:
        return repr(error)[:300]
    return ""


def _check_patches(train: TrainConfig) -> None:
    for split in ("train", "val"):
        folder = Path(train.patch_dir) / PATCH_FOLDERS["detector"] / split
        if not any(folder.glob("*.parquet")):
            raise FileNotFoundError(f"no detector patches in {folder}; run `ribfrac-ray preprocess` with the same --workdir first")


def _check_anchor_settings(base: PipelineConfig, space: SearchSpace) -> None:
    searched = {parameter.key for parameter in space.parameters}
    if base.detector.anchor_shapes and "detector.n_anchor_shapes" in searched:
        raise ConfigError(
            f"{space.path}: detector.n_anchor_shapes is searched, but detector.anchor_shapes is set, so no trial "
            "plans anchor shapes and the searched value has no effect; clear detector.anchor_shapes or drop the key"
        )


def _check_unchanged(experiment_dir: Path, space: SearchSpace, base: PipelineConfig) -> None:
    """Raise ConfigError where a resumed search would run with other settings than it started with.

    Tune restores the sampler, scheduler and trial count from its own state, so a
    changed space file or search flag would be ignored without this check. Settings
    and config fields that the record lacks, because the code gained them since,
    keep their current values with a warning.
    """
    recorded_path = experiment_dir / SETTINGS_FILE
    recorded = json.loads(recorded_path.read_text(encoding="utf-8")) if recorded_path.is_file() else {}
    # A searched or fixed key that was added or removed is a change, but a search
    # setting missing from the record is one that the code gained since.
    unrecorded = sorted(key for key in space.describe().keys() - recorded.keys() if key.startswith("search."))
    current = {key: value for key, value in space.describe().items() if key not in unrecorded}
    changes = _differences(recorded, current)

    base_path = experiment_dir / BASE_CONFIG_FILE
    if base_path.is_file():
        # Trials use these sections, and their sampled keys override the base values.
        searched = {parameter.key for parameter in space.parameters}
        started_with = _trial_settings(yaml.safe_load(base_path.read_text(encoding="utf-8")), searched)
        now = _trial_settings(config_to_dict(base), searched)
        unrecorded += sorted(started_with.keys() ^ now.keys())
        shared = started_with.keys() & now.keys()
        changes += _differences({k: started_with[k] for k in shared}, {k: now[k] for k in shared})

    if unrecorded:
        logger.warning("resuming the search in %s with settings that it did not record when it started: %s", experiment_dir, ", ".join(unrecorded))
    if changes:
        raise ConfigError(
            f"the search in {experiment_dir} started with other settings ({'; '.join(changes[:5])}); "
            "rerun it with the original space file, config and flags, or start over with --overwrite or another --name"
        )


def _trial_settings(config: dict[str, Any], searched: set[str]) -> dict[str, str]:
    flat = flatten_config_dict(config)
    return {key: value for key, value in flat.items() if key.startswith(("detector.", "train_detector.")) and key not in searched}


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """List the keys whose values differ, as 'key: before -> after'; a missing key reads None."""
    return [f"{key}: {before.get(key)} -> {after.get(key)}" for key in sorted(before.keys() | after.keys()) if str(before.get(key)) != str(after.get(key))]


# ---- MLflow runs: the parent run of the search and one child run per trial ----


def _start_parent_run(client: MlflowClient, experiment_id: str, name: str, experiment_dir: Path, space: SearchSpace, base: PipelineConfig) -> str:
    tags = {"stage": "tune", TAG_TUNE_NAME: name, TAG_TUNE_PATH: str(experiment_dir)}
    run = retry_locked(client.create_run, experiment_id, run_name=f"tune-{name}", tags=tags)
    run_id = run.info.run_id
    params = [Param(key, value[:MAX_PARAM_LENGTH]) for key, value in space.describe().items()]
    for start in range(0, len(params), 100):
        retry_locked(client.log_batch, run_id, params=params[start : start + 100])
    retry_locked(client.log_text, run_id, space.text, "tune_space.yaml")
    retry_locked(client.log_text, run_id, yaml.safe_dump(config_to_dict(base), sort_keys=False), BASE_CONFIG_FILE)
    logger.info("MLflow parent run %s (tune-%s) in experiment %s", run_id, name, experiment_id)
    return run_id


def _reopen_parent_run(client: MlflowClient, experiment_id: str, name: str, experiment_dir: Path, tracking_uri: str) -> str:
    runs = retry_locked(client.search_runs, [experiment_id], filter_string=f"tags.`{TAG_TUNE_NAME}` = '{name}'")
    runs = [run for run in runs if run.data.tags.get(TAG_TUNE_PATH) == str(experiment_dir)]
    if not runs:
        raise ConfigError(
            f"the search in {experiment_dir} has no MLflow parent run (tag {TAG_TUNE_NAME}={name}) in {tracking_uri}, "
            f"experiment id {experiment_id}; resume it with the tracking URI and experiment it started with, "
            "or start over with --overwrite"
        )
    run = max(runs, key=lambda item: item.info.start_time)
    restarts = int(run.data.tags.get(TAG_RESTARTS, "0")) + 1
    retry_locked(client.update_run, run.info.run_id, status="RUNNING")
    retry_locked(client.set_tag, run.info.run_id, TAG_RESTARTS, str(restarts))
    logger.info("reusing MLflow parent run %s of search %s (resume %d)", run.info.run_id, name, restarts)
    return run.info.run_id


def find_trial_run(client: MlflowClient, target: MlflowTarget, trial_id: str) -> Any | None:
    """Return the child run of ``trial_id`` under the search's parent run, or None."""
    query = f"tags.{MLFLOW_PARENT_RUN_ID} = '{target.parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'"
    runs = retry_locked(client.search_runs, [target.experiment_id], filter_string=query, max_results=1)
    return runs[0] if runs else None


def open_trial_run(target: MlflowTarget, trial_id: str, values: dict[str, Any]) -> str:
    """Create the trial's child run, or reopen it when the trial restarts after an interruption."""
    client = MlflowClient(target.tracking_uri)
    existing = find_trial_run(client, target, trial_id)
    if existing is not None:
        run_id = existing.info.run_id
        restarts = int(existing.data.tags.get(TAG_RESTARTS, "0")) + 1
        retry_locked(client.update_run, run_id, status="RUNNING")
        retry_locked(client.set_tag, run_id, TAG_RESTARTS, str(restarts))
        # An errored trial that resumes is unfinished again until TrialRunRecorder closes it.
        for tag in (TAG_OUTCOME, TAG_ERROR):
            if tag in existing.data.tags:
                retry_locked(client.delete_tag, run_id, tag)
        logger.info("trial %s restarted (%d); reusing MLflow run %s", trial_id, restarts, run_id)
        return run_id

    tags = {MLFLOW_PARENT_RUN_ID: target.parent_run_id, TAG_TRIAL_ID: trial_id, "stage": "tune-trial"}
    run = retry_locked(client.create_run, target.experiment_id, run_name=trial_id, tags=tags)
    params = [Param(key, value[:MAX_PARAM_LENGTH]) for key, value in flatten_config_dict(values).items()]
    retry_locked(client.log_batch, run.info.run_id, params=params)
    return run.info.run_id


class TrialRunRecorder(tune.Callback):
    """Tune callback on the driver that records how each trial ended in its MLflow run.

    The trial's own process cannot do it: when the scheduler stops a trial, Tune
    ends that process. Logs ``best_<metric>`` (over the epochs in the run's metric
    history, so epochs from before a restart count) and ``epochs_done``, tags
    ``ribfrac.trial_outcome`` and ends the run.
    """

    def __init__(self, target: MlflowTarget, metric: str, mode: str, max_epochs: int):
        self.target = target
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        epochs = int(trial.last_result.get(EPOCHS_DONE, 0))
        self._close(trial, "completed" if epochs >= self.max_epochs else "stopped_early", "")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = trial.get_error()
        self._close(trial, "errored", str(error)[-2000:] if error else "")

    def _close(self, trial: Any, outcome: str, error: str) -> None:
        client = MlflowClient(self.target.tracking_uri)
        run = find_trial_run(client, self.target, trial.trial_id)
        if run is None:
            # The trial failed before its process created the run.
            tags = {MLFLOW_PARENT_RUN_ID: self.target.parent_run_id, TAG_TRIAL_ID: trial.trial_id, "stage": "tune-trial"}
            run = retry_locked(client.create_run, self.target.experiment_id, run_name=trial.trial_id, tags=tags)
        run_id = run.info.run_id

        history = retry_locked(client.get_metric_history, run_id, self.metric)
        now = int(time.time() * 1000)
        metrics = [Metric(EPOCHS_DONE, float(max((m.step + 1 for m in history), default=0)), now, 0)]
        if history:
            best = (max if self.mode == "max" else min)(m.value for m in history)
            metrics.append(Metric(f"best_{self.metric}", best, now, 0))
        tags = [RunTag(TAG_OUTCOME, outcome)] + ([RunTag(TAG_ERROR, error)] if error else [])
        retry_locked(client.log_batch, run_id, metrics=metrics, tags=tags)
        retry_locked(client.set_terminated, run_id, status="FAILED" if outcome == "errored" else "FINISHED")
        logger.info("trial %s %s after %d epoch(s)", trial.trial_id, outcome.replace("_", " "), int(metrics[0].value))


def summarize_trials(client: MlflowClient, target: MlflowTarget, results: Any, space: SearchSpace) -> list[TrialSummary]:
    """Combine the child runs (outcome, score, epochs) with Tune's results (values, checkpoints)."""
    by_trial = {}
    for result in results:
        trial_id = Path(result.path).name.removeprefix("trial_")
        by_trial[trial_id] = result

    query = f"tags.{MLFLOW_PARENT_RUN_ID} = '{target.parent_run_id}'"
    runs = retry_locked(client.search_runs, [target.experiment_id], filter_string=query, max_results=10000)
    summaries = []
    for run in runs:
        trial_id = run.data.tags.get(TAG_TRIAL_ID, run.info.run_name)
        metric = space.settings.metric
        score = run.data.metrics.get(f"best_{metric}")
        if score is None:
            history = retry_locked(client.get_metric_history, run.info.run_id, metric)
            score = (max if space.settings.mode == "max" else min)((m.value for m in history), default=None)
        result = by_trial.get(trial_id)
        summaries.append(
            TrialSummary(
                trial_id=trial_id,
                run_id=run.info.run_id,
                outcome=run.data.tags.get(TAG_OUTCOME, "unfinished"),
                score=score,
                epochs=int(run.data.metrics.get(EPOCHS_DONE, 0)),
                values=space.decode(result.config) if result is not None else {},
                checkpoint=_best_checkpoint(result, metric, space.settings.mode),
            )
        )
    return sorted(summaries, key=lambda summary: summary.trial_id)


def _best_checkpoint(result: Any, metric: str, mode: str) -> str:
    """Return the trial's checkpoint with the best score that still exists on disk.

    Ray Train keeps only the best ``num_to_keep`` checkpoints, and of epochs with
    equal scores it may have kept either.
    """
    frame = result.metrics_dataframe if result is not None else None
    if frame is None or frame.empty or metric not in frame or "checkpoint_path" not in frame:
        return ""
    frame = frame.dropna(subset=[metric, "checkpoint_path"]).sort_values(metric, ascending=mode != "max", kind="stable")
    for path in frame["checkpoint_path"]:
        if Path(path).is_dir():
            return str(path)
    return ""


def best_trial(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    """Return the finished trial with the best score; ties go to the earlier trial in ``trials``."""
    scored = [trial for trial in trials if trial.score is not None and trial.outcome in ("completed", "stopped_early") and trial.values]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda trial: sign * trial.score)


def export_best_config(base: PipelineConfig, values: dict[str, Any], train_name: str, path: str | Path) -> PipelineConfig:
    """Write the full pipeline config with the best values, for ``ribfrac-ray train/demo --config``.

    Paths under the work folder are written relative to it, so ``--workdir`` moves them.
    ``train_name`` is a new Ray Train run name: reusing a trial's name would resume that trial.
    """
    config = apply_mapping(base, values, source="best trial")
    config = dataclasses.replace(config, train_detector=dataclasses.replace(config.train_detector, name=train_name))
    save_config(_relative_paths(config), path)
    logger.info("best config written to %s", path)
    return config


def _relative_paths(config: PipelineConfig) -> PipelineConfig:
    workdir = Path(config.workdir)
    updates: dict[str, Any] = {}
    for section, names in PATH_FIELDS.items():
        current = getattr(config, section)
        values = {}
        for name in names:
            value = getattr(current, name)
            if value and Path(value).is_relative_to(workdir):
                values[name] = str(Path(value).relative_to(workdir))
        updates[section] = dataclasses.replace(current, **values)
    return dataclasses.replace(config, **updates)


def _finish_parent_run(
    client: MlflowClient,
    target: MlflowTarget,
    trials: list[TrialSummary],
    best: TrialSummary | None,
    best_config_path: str,
    interrupted: bool,
    settings: SearchSettings,
    seconds: float,
) -> None:
    run_id = target.parent_run_id
    now = int(time.time() * 1000)
    counts = {outcome: sum(trial.outcome == outcome for trial in trials) for outcome in (*OUTCOMES, "unfinished")}
    metrics = [Metric(f"trials_{outcome}", float(count), now, 0) for outcome, count in counts.items()]
    metrics.append(Metric("search_seconds", seconds, now, 0))
    scores = [trial.score for trial in trials if trial.score is not None]
    if scores:
        metrics.append(Metric(f"best_{settings.metric}", max(scores) if settings.mode == "max" else min(scores), now, 0))
        metrics.append(Metric(f"worst_{settings.metric}", min(scores) if settings.mode == "max" else max(scores), now, 0))
    tags = []
    if best is not None:
        tags += [RunTag("best_trial_id", best.trial_id), RunTag("best_run_id", best.run_id), RunTag("best_checkpoint", best.checkpoint)]
    retry_locked(client.log_batch, run_id, metrics=metrics, tags=tags)
    if best_config_path:
        retry_locked(client.log_artifact, run_id, best_config_path)

    if interrupted:
        # Trials cut off by the interruption stay open until a rerun resumes them.
        for trial in trials:
            if trial.outcome == "unfinished":
                _end_run(client, trial.run_id, "KILLED")
    _end_run(client, run_id, "KILLED" if interrupted else "FINISHED")


def _end_run(client: MlflowClient, run_id: str, status: str) -> None:
    retry_locked(client.set_terminated, run_id, status=status)
