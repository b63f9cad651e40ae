"""The ``tune`` subcommand: space-file validation, a real ASHA search, and resuming after a crash.

The searches run ``python -m ribfrac_ray.cli tune`` in a subprocess. It starts its
own local Ray instance (4 logical CPUs, dashboard on) and writes to a SQLite MLflow
store in the test's folder, which the tests read back with MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ribfrac_ray.config import ConfigError, PipelineConfig, PreprocessConfig, resolve_config, resolve_paths
from ribfrac_ray.tuning.space import load_space

REPO = Path(__file__).resolve().parents[1]
SEARCH_TIMEOUT_S = 900


def write_space(folder: Path, text: str, name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def space_error(tmp_path: Path, text: str) -> str:
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_space(path)
    return str(error.value)


VALID_SPACE = """
search:
  num_samples: 2
space:
  detector.focal_alpha: {uniform: [0.1, 0.5]}
"""


# ---- space files ----


def test_shipped_spaces_load():
    for name in ("small.yaml", "full.yaml"):
        space = load_space(REPO / "tune_spaces" / name)
        assert space.parameters
        assert space.settings.max_epochs > 0


def test_space_unknown_top_level_key(tmp_path):
    message = space_error(tmp_path, VALID_SPACE + "serach:\n  num_samples: 3\n")
    assert "serach" in message
    assert str(tmp_path / "space.yaml") in message


def test_space_unknown_config_key(tmp_path):
    message = space_error(tmp_path, "space:\n  detector.focal_alfa: {uniform: [0.1, 0.5]}\n")
    assert "detector.focal_alfa" in message
    assert str(tmp_path / "space.yaml") in message


def test_space_unknown_fixed_key(tmp_path):
    message = space_error(tmp_path, VALID_SPACE + "fixed:\n  train_detector.batchsize: 2\n")
    assert "train_detector.batchsize" in message
    assert str(tmp_path / "space.yaml") in message


def test_space_unknown_search_setting(tmp_path):
    message = space_error(tmp_path, "search:\n  num_sample: 3\nspace:\n  detector.focal_alpha: {uniform: [0.1, 0.5]}\n")
    assert "search.num_sample" in message
    assert str(tmp_path / "space.yaml") in message


def test_space_unknown_sampler(tmp_path):
    message = space_error(tmp_path, "space:\n  detector.focal_alpha: {logunif: [0.1, 0.5]}\n")
    assert "logunif" in message
    assert "detector.focal_alpha" in message
    assert "loguniform" in message


@pytest.mark.parametrize(
    "sampler, args",
    [("loguniform", "[1.0e-4, 1.0e-3, 2]"), ("quniform", "[1.0, 3.0]"), ("randint", "[2]"), ("choice", "[]")],
)
def test_space_wrong_argument_count(tmp_path, sampler, args):
    key = "detector.n_anchor_shapes" if sampler == "randint" else "detector.focal_gamma"
    message = space_error(tmp_path, f"space:\n  {key}: {{{sampler}: {args}}}\n")
    assert key in message
    assert sampler in message


def test_space_sampled_type_must_fit_field(tmp_path):
    message = space_error(tmp_path, "space:\n  detector.n_anchor_shapes: {uniform: [2, 6]}\n")
    assert "detector.n_anchor_shapes" in message
    assert "must be an integer" in message


def test_space_bad_bounds(tmp_path):
    assert "low < high" in space_error(tmp_path, "space:\n  detector.focal_alpha: {uniform: [0.5, 0.1]}\n")
    assert "positive low" in space_error(tmp_path, "space:\n  train_detector.lr: {loguniform: [0.0, 0.1]}\n")


def test_space_rejects_keys_the_search_sets(tmp_path):
    assert "search.max_epochs" in space_error(tmp_path, "space:\n  train_detector.epochs: {randint: [1, 4]}\n")
    assert "only trains the detector" in space_error(tmp_path, "space:\n  segmenter.dice_weight: {uniform: [0.5, 1.0]}\n")


def test_space_rejects_key_both_fixed_and_searched(tmp_path):
    message = space_error(tmp_path, VALID_SPACE + "fixed:\n  detector.focal_alpha: 0.25\n")
    assert "detector.focal_alpha" in message


def test_space_invalid_search_setting_value(tmp_path):
    message = space_error(tmp_path, "search:\n  mode: maximum\nspace:\n  detector.focal_alpha: {uniform: [0.1, 0.5]}\n")
    assert "search.mode" in message
    assert "maximum" in message


def test_space_flag_overrides_file(tmp_path):
    space = load_space(write_space(tmp_path, VALID_SPACE), {"num_samples": 5})
    assert space.settings.num_samples == 5


def test_choice_of_lists_round_trips(tmp_path):
    space = load_space(
        write_space(
            tmp_path,
            "space:\n  detector.anchor_scales: {choice: [[1.0], [0.5, 1.0, 2.0]]}\n  detector.matcher: {choice: [atss, iou]}\n",
        )
    )
    domains = space.param_space()
    sample = {"detector": {"anchor_scales": domains["detector"]["anchor_scales"].sample(), "matcher": domains["detector"]["matcher"].sample()}}
    # Lists travel as JSON text because Optuna's categorical distribution accepts only scalars.
    assert isinstance(sample["detector"]["anchor_scales"], str)
    values = space.decode(sample)
    assert values["detector"]["anchor_scales"] in ([1.0], [0.5, 1.0, 2.0])
    assert values["detector"]["matcher"] in ("atss", "iou")


def test_trial_config_has_own_train_run(tmp_path):
    from ribfrac_ray.tuning.search import trial_config

    base = resolve_paths(resolve_config(None, [f"workdir={tmp_path}"]))
    config = trial_config(base, {"detector": {"focal_gamma": 1.5}}, "abc12_00001", tmp_path / "tune" / "s")
    assert config.detector.focal_gamma == 1.5
    assert config.train_detector.name == "det-abc12_00001"
    assert config.train_detector.storage_path == str(tmp_path / "tune" / "s" / "trials")


def test_best_config_loads_with_paths_under_workdir(tmp_path):
    from ribfrac_ray.tuning.search import export_best_config

    base = resolve_paths(resolve_config(None, [f"workdir={tmp_path}", "predict.out_dir=/elsewhere/out"]))
    path = tmp_path / "best_config.yaml"
    export_best_config(base, {"detector": {"anchor_scales": [0.75, 1.25]}, "train_detector": {"lr": 0.002}}, "detector-s-best", path)

    moved = resolve_paths(resolve_config(str(path), [f"workdir={tmp_path / 'moved'}"]))
    assert moved.detector.anchor_scales == (0.75, 1.25)
    assert moved.train_detector.lr == 0.002
    assert moved.train_detector.name == "detector-s-best"
    assert moved.train_detector.patch_dir == str(tmp_path / "moved" / "patches")
    assert moved.predict.out_dir == "/elsewhere/out"


def test_resume_check_rejects_changed_settings(tmp_path):
    import dataclasses

    from ribfrac_ray.config import save_config
    from ribfrac_ray.tuning import search

    space = load_space(write_space(tmp_path, VALID_SPACE))
    base = PipelineConfig()
    (tmp_path / search.SETTINGS_FILE).write_text(json.dumps(space.describe()))
    save_config(base, tmp_path / search.BASE_CONFIG_FILE)
    search._check_unchanged(tmp_path, space, base)

    with pytest.raises(ConfigError, match="search.num_samples: 2 -> 4"):
        search._check_unchanged(tmp_path, load_space(tmp_path / "space.yaml", {"num_samples": 4}), base)
    grown = write_space(tmp_path, VALID_SPACE + "  detector.focal_gamma: {uniform: [1.0, 2.0]}\n", "grown.yaml")
    with pytest.raises(ConfigError, match="space.detector.focal_gamma"):
        search._check_unchanged(tmp_path, load_space(grown), base)
    channels = base.detector.fpn_channels
    wider = dataclasses.replace(base, detector=dataclasses.replace(base.detector, fpn_channels=2 * channels))
    with pytest.raises(ConfigError, match=f"detector.fpn_channels: {channels} -> {2 * channels}"):
        search._check_unchanged(tmp_path, space, wider)
    # The searched value replaces the base value in every trial, so a new base value is no change.
    search._check_unchanged(tmp_path, space, dataclasses.replace(base, detector=dataclasses.replace(base.detector, focal_alpha=0.9)))


def test_best_trial_prefers_score_then_order():
    from ribfrac_ray.tuning.search import TrialSummary, best_trial

    values = {"detector": {"focal_alpha": 0.3}}
    trials = [
        TrialSummary("t0", "r0", "completed", 0.2, 2, values),
        TrialSummary("t1", "r1", "stopped_early", 0.4, 1, values),
        TrialSummary("t2", "r2", "errored", 0.9, 1, values),
        TrialSummary("t3", "r3", "completed", 0.4, 2, values),
        TrialSummary("t4", "r4", "unfinished", None, 0, values),
    ]
    assert best_trial(trials, "max").trial_id == "t1"
    assert best_trial(trials, "min").trial_id == "t0"
    assert best_trial(trials[2:3], "max") is None


def test_recorder_closes_errored_trial_runs(tracking_uri):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from ribfrac_ray.tuning.search import MlflowTarget, TrialRunRecorder, open_trial_run

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("tune-records")
    parent_id = client.create_run(experiment_id, run_name="tune-records").info.run_id
    target = MlflowTarget(tracking_uri, experiment_id, parent_id)
    run_id = open_trial_run(target, "abc12_00000", {"detector": {"focal_alpha": 0.3}})
    client.log_metric(run_id, "val_froc", 0.2, step=0)
    client.log_metric(run_id, "val_froc", 0.1, step=1)

    recorder = TrialRunRecorder(target, "val_froc", "max", max_epochs=3)
    recorder.on_trial_error(0, [], SimpleNamespace(trial_id="abc12_00000", last_result={}, get_error=lambda: "ValueError: boom"))
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["ribfrac.trial_outcome"] == "errored"
    assert "boom" in run.data.tags["ribfrac.error"]
    assert run.data.metrics["best_val_froc"] == 0.2
    assert run.data.metrics["epochs_done"] == 2
    assert run.data.params["detector.focal_alpha"] == "0.3"

    # A trial that fails before its process creates the run still gets one.
    recorder.on_trial_error(0, [], SimpleNamespace(trial_id="abc12_00001", last_result={}, get_error=lambda: None))
    early = client.search_runs([experiment_id], filter_string="tags.`ribfrac.trial_id` = 'abc12_00001'")
    assert len(early) == 1
    assert early[0].data.tags["ribfrac.trial_outcome"] == "errored"
    assert early[0].data.tags["mlflow.parentRunId"] == parent_id

    # Resuming the errored trial reopens its run as unfinished.
    assert open_trial_run(target, "abc12_00000", {"detector": {"focal_alpha": 0.3}}) == run_id
    reopened = client.get_run(run_id)
    assert reopened.info.status == "RUNNING"
    assert reopened.data.tags["ribfrac.restarts"] == "1"
    assert "ribfrac.trial_outcome" not in reopened.data.tags
    assert "ribfrac.error" not in reopened.data.tags


def test_resource_check_rejects_starved_data(ray_local):
    from ribfrac_ray.tuning.search import check_resources
    from ribfrac_ray.tuning.space import SearchSettings

    train = PipelineConfig().train_detector
    check_resources(SearchSettings(max_concurrent_trials=1, trial_cpus=0.5), train)
    with pytest.raises(ConfigError, match="Ray Data"):
        # 2 x (0.5 + 1) + 1 = 4 fits the fixture's 4 CPUs; 3 trials do not.
        check_resources(SearchSettings(max_concurrent_trials=3, trial_cpus=0.5), train)


# ---- real searches ----


# On the tiny phantoms val_froc is 0 for nearly every trial after two epochs, and
# ASHA stops no trial on ties, so the searches here rank trials by the focal
# (classification) part of the training loss. It is several times larger at gamma 0
# than at gamma 4, while the box loss varies with the data order from run to run.
# Seed 3 samples gamma 4 for the first trial and 0 for the next two, so ASHA stops
# at least the second.
TINY_SPACE = """
search:
  num_samples: 3
  max_concurrent_trials: 1
  max_epochs: 2
  metric: train_cls_loss
  mode: min
  scheduler: {scheduler}
  grace_period: 1
  reduction_factor: 2
  seed: 3
  trial_cpus: 0.5
fixed:
  train_detector.num_workers: 1
  train_detector.cpus_per_worker: 1
  train_detector.batch_size: 4
  train_detector.lr: 0.002
space:
  detector.focal_gamma: {{choice: [0.0, 4.0]}}
  detector.anchor_scales: {{choice: [[1.0], [0.75, 1.25]]}}
  detector.focal_alpha: {{uniform: [0.25, 0.3]}}
"""


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory, tiny_phantoms, ray_local) -> Path:
    """Detector patches of the tiny phantoms, shared by the searches of this module."""
    from ribfrac_ray.preprocess import preprocess

    out = tmp_path_factory.mktemp("tune-patches")
    config = PipelineConfig()
    preprocess(PreprocessConfig(data_dir=str(tiny_phantoms), out_dir=str(out)), config.window)
    return out


def tune_command(workdir: Path, space: Path, patch_dir: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "ribfrac_ray.cli", "tune",
        "--space", str(space),
        "--name", name,
        "--workdir", str(workdir),
        "--num-cpus", "4",
        "--tracking-uri", tracking_uri_of(workdir),
        "--set", f"train_detector.patch_dir={patch_dir}",
    ]  # fmt: skip


def tracking_uri_of(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def run_cli(command: list[str], log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as output:
        return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO, timeout=SEARCH_TIMEOUT_S)


def search_runs(uri: str, name: str):
    """Return the parent run and the child runs of search ``name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ribfrac-ray")
    parents = client.search_runs([experiment.experiment_id], filter_string=f"tags.`ribfrac.tune_name` = '{name}'")
    assert len(parents) == 1, [run.info.run_name for run in parents]
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, children


def metric_steps(client, run_id: str, key: str = "train_cls_loss") -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def asha_expected_epochs(first_epoch_losses: list[float], reduction_factor: float, max_epochs: int) -> list[int]:
    """Replay ASHA's one rung at epoch 1 for trials that reach it one after another.

    ASHA negates a metric that is minimised. A trial stops at the rung when its
    negated loss is below the (1 - 1/reduction_factor) quantile of those that
    earlier trials recorded there.
    """
    recorded: list[float] = []
    expected = []
    for loss in first_epoch_losses:
        reward = -loss
        cutoff = np.nanpercentile(recorded, (1 - 1 / reduction_factor) * 100) if recorded else None
        expected.append(1 if cutoff is not None and reward < cutoff else max_epochs)
        recorded.append(reward)
    return expected


@pytest.mark.slow
def test_asha_search_records_trials_and_best_config(tmp_path, patch_dir, ray_local):
    import mlflow

    from ribfrac_ray.training.trainer import train_network

    workdir = tmp_path / "work"
    space = write_space(tmp_path, TINY_SPACE.format(scheduler="asha"))
    result = run_cli(tune_command(workdir, space, patch_dir, "tiny"), tmp_path / "tune.log")
    assert result.returncode == 0, (tmp_path / "tune.log").read_text()[-4000:]

    uri = tracking_uri_of(workdir)
    client, parent, children = search_runs(uri, "tiny")
    assert parent.info.run_name == "tune-tiny"
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.detector.focal_alpha"] == "uniform(0.25, 0.3)"
    assert parent.data.params["fixed.train_detector.lr"] == "0.002"
    assert len(children) == 3
    mlflow.set_tracking_uri(uri)
    frame = mlflow.search_runs(experiment_names=["ribfrac-ray"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(frame) == 3

    # Every trial is one child run named by its trial id, with its sampled values and one step per epoch.
    for child in children:
        assert child.info.run_name == child.data.tags["ribfrac.trial_id"]
        assert {"detector.focal_gamma", "detector.anchor_scales", "detector.focal_alpha"} == set(child.data.params)
        assert child.data.tags["ribfrac.trial_outcome"] in ("completed", "stopped_early")
        steps = [step for step, _, _ in metric_steps(client, child.info.run_id)]
        assert steps == list(range(len(steps)))
        assert child.data.metrics["epochs_done"] == len(steps)

    # With one trial at a time, trials reach ASHA's rung at epoch 1 in the order of their first epoch.
    ordered = sorted(children, key=lambda child: metric_steps(client, child.info.run_id)[0][2])
    first_losses = [metric_steps(client, child.info.run_id)[0][1] for child in ordered]
    epochs = [len(metric_steps(client, child.info.run_id)) for child in ordered]
    assert epochs == asha_expected_epochs(first_losses, reduction_factor=2, max_epochs=2)
    gammas = [child.data.params["detector.focal_gamma"] for child in ordered]
    assert 1 in epochs, f"ASHA stopped no trial (focal_gamma {gammas}, first losses {first_losses}); change search.seed"
    for child, count in zip(ordered, epochs):
        assert child.data.tags["ribfrac.trial_outcome"] == ("completed" if count == 2 else "stopped_early")

    # The parent names the best trial, whose values are in best_config.yaml.
    best_id = parent.data.tags["best_run_id"]
    best = next(child for child in children if child.info.run_id == best_id)
    losses = [child.data.metrics["best_train_cls_loss"] for child in children]
    assert best.data.metrics["best_train_cls_loss"] == min(losses)
    assert parent.data.metrics["best_train_cls_loss"] == min(losses)
    assert parent.data.metrics["worst_train_cls_loss"] == max(losses)

    experiment_dir = workdir / "tune" / "tiny"
    assert (experiment_dir / "best_detector" / "meta.json").is_file()
    config = resolve_paths(resolve_config(str(experiment_dir / "best_config.yaml"), ["train_detector.epochs=1"]))
    assert config.train_detector.name == "detector-tiny-best"
    assert str(config.detector.focal_alpha) == best.data.params["detector.focal_alpha"]
    assert str(config.detector.focal_gamma) == best.data.params["detector.focal_gamma"]
    assert config.train_detector.lr == 0.002
    assert json.dumps(list(config.detector.anchor_scales)) == best.data.params["detector.anchor_scales"]

    outcome = train_network("detector", config, tmp_path / "models")
    assert len(outcome.history) == 1
    assert "val_froc" in outcome.best_metrics
    assert (tmp_path / "models" / "detector").is_dir()


def saved_trial_statuses(experiment_dir: Path) -> dict[str, str]:
    """Read the trial statuses from Tune's latest saved experiment state."""
    states = sorted(experiment_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:
        # Tune is rewriting the file.
        return {}
    trials = [json.loads(entry[0]) for entry in data["trial_data"]]
    return {trial["trial_id"]: trial["status"] for trial in trials}


def process_tree(pid: int) -> list[int]:
    import psutil

    root = psutil.Process(pid)
    return [pid] + [child.pid for child in root.children(recursive=True)]


def kill_tree(pids: list[int]) -> None:
    import psutil

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    psutil.wait_procs([p for p in map(_process_or_none, pids) if p is not None], timeout=30)


def _process_or_none(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def trials_with_an_epoch(uri: str, name: str) -> dict[str, str]:
    """Return trial id -> MLflow run id for the trials that have logged at least one epoch."""
    from ribfrac_ray.tracking import retry_locked

    client, _, children = retry_locked(search_runs, uri, name)
    return {
        child.data.tags["ribfrac.trial_id"]: child.info.run_id
        for child in children
        if retry_locked(client.get_metric_history, child.info.run_id, "train_loss")
    }


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(tmp_path, patch_dir):
    workdir = tmp_path / "work"
    uri = tracking_uri_of(workdir)
    experiment_dir = workdir / "tune" / "crash"
    space = write_space(tmp_path, TINY_SPACE.format(scheduler="fifo"))
    command = tune_command(workdir, space, patch_dir, "crash")

    # Kill the driver, its local Ray instance and the trials once Tune has saved a
    # finished trial and the next trial has logged its first epoch.
    with (tmp_path / "first.log").open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + SEARCH_TIMEOUT_S
        finished: list[str] = []
        running: list[str] = []
        while not (finished and running):
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(2)
            finished = [trial for trial, status in saved_trial_statuses(experiment_dir).items() if status == "TERMINATED"]
            running = [trial for trial in trials_with_an_epoch(uri, "crash") if trial not in finished] if finished else []
    finally:
        kill_tree(process_tree(process.pid))
    assert len(finished) < 3, "the search finished before it could be interrupted"

    client, parent, children = search_runs(uri, "crash")
    runs_before = {child.data.tags["ribfrac.trial_id"]: child for child in children}
    history_before = {trial: metric_steps(client, run.info.run_id) for trial, run in runs_before.items()}
    checkpoints_before = {trial: sorted(p.name for p in (experiment_dir / "trials" / f"det-{trial}").iterdir()) for trial in finished}

    result = run_cli(command, tmp_path / "second.log")
    log = (tmp_path / "second.log").read_text()
    assert result.returncode == 0, log[-4000:]
    assert "resuming search" in log

    client, parent_after, children = search_runs(uri, "crash")
    assert parent_after.info.run_id == parent.info.run_id
    assert parent_after.data.tags["ribfrac.restarts"] == "1"
    assert parent_after.info.status == "FINISHED"
    trial_ids = [child.data.tags["ribfrac.trial_id"] for child in children]
    assert len(trial_ids) == 3
    assert len(set(trial_ids)) == 3

    runs_after = {child.data.tags["ribfrac.trial_id"]: child for child in children}
    for trial in finished:
        run = runs_after[trial]
        assert run.info.run_id == runs_before[trial].info.run_id
        assert "ribfrac.restarts" not in run.data.tags, f"finished trial {trial} ran again"
        assert metric_steps(client, run.info.run_id) == history_before[trial]
        assert sorted(p.name for p in (experiment_dir / "trials" / f"det-{trial}").iterdir()) == checkpoints_before[trial]

    # The trial cut off after its first epoch reuses its run and resumes from that epoch's checkpoint.
    for trial in running:
        run = runs_after[trial]
        assert run.info.run_id == runs_before[trial].info.run_id
        assert run.data.tags["ribfrac.restarts"] == "1"
        history = metric_steps(client, run.info.run_id)
        assert history[: len(history_before[trial])] == history_before[trial]
        assert [step for step, _, _ in history] == [0, 1], f"trial {trial} trained an epoch again: {history}"

    for trial, run in runs_after.items():
        assert run.data.tags["ribfrac.trial_outcome"] == "completed"
        assert [step for step, _, _ in metric_steps(client, run.info.run_id)] == [0, 1]
    assert (experiment_dir / "best_config.yaml").is_file()
