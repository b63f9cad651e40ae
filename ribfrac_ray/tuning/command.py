"""The ``ribfrac-ray tune`` subcommand: its flags and what it runs.

``cli.py`` adds the common flags (``--config``, ``--set``, ``--workdir``,
``--tracking-uri``, ``--num-cpus``, ...) and resolves the pipeline config. This
module adds the search's own flags and runs :func:`~ribfrac_ray.tuning.search.run_search`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ribfrac_ray.config import PipelineConfig
from ribfrac_ray.tuning.space import load_space

if TYPE_CHECKING:
    from ribfrac_ray.tuning.search import SearchOutcome

# Exit status of a search that stopped before every trial finished (128 + SIGINT).
EXIT_INTERRUPTED = 130
EXIT_NO_SCORE = 1

# Flags that override one value of the space file's ``search`` section.
SEARCH_FLAGS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("--num-samples", "num_samples", {"type": int}, "number of trials"),
    ("--max-concurrent-trials", "max_concurrent_trials", {"type": int}, "trials that run at once, each with its own Ray Train workers"),
    ("--max-epochs", "max_epochs", {"type": int}, "epochs per trial, also ASHA's max_t"),
    ("--search-alg", "search_alg", {"choices": ("random", "optuna")}, "search algorithm: random or optuna"),
    ("--trial-cpus", "trial_cpus", {"type": float}, "CPUs reserved for each trial's own process, besides its Train workers"),
    ("--seed", "seed", {"type": int}, "seed of the search algorithm"),
)


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``tune`` subcommand's own flags to ``parser``."""
    parser.add_argument("--space", required=True, help="search space YAML file (see tune_spaces/ and docs/tuning.md)")
    parser.add_argument(
        "--name",
        help="search name: results go to <workdir>/tune/<name> and MLflow run tune-<name>; "
        "rerunning with the same name resumes the search (default: the space file's name without .yaml)",
    )
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier search of this name and start over; its MLflow runs stay")
    for flag, key, options, text in SEARCH_FLAGS:
        parser.add_argument(flag, dest=f"search_{key}", metavar=key.upper(), help=f"{text} (overrides the space file)", **options)


def run_tune(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Run or resume the search described by ``args``; return the exit status.

    ``config`` must be resolved with absolute paths (``cli.config_from_args``).
    Returns 0 when the search finished with a best trial, 1 when no trial produced
    a score, and 130 when the search stopped before every trial finished. Rerunning
    the same command resumes the search.
    """
    overrides = {}
    for _, key, _, _ in SEARCH_FLAGS:
        value = getattr(args, f"search_{key}", None)
        if value is not None:
            overrides[key] = value
    # Ray, Tune and MLflow load only here, so that building the parser stays fast.
    from ribfrac_ray.runtime import init_ray
    from ribfrac_ray.tuning.search import run_search

    space = load_space(args.space, overrides)
    name = args.name or Path(args.space).stem

    # The dashboard serves the State API, through which Ray Train frees the CPUs of
    # a trial that Tune stops (see runtime.init_ray).
    init_ray(config.ray, include_dashboard=True)
    outcome = run_search(space, config, name, overwrite=args.overwrite)
    print_summary(outcome, space.settings.metric)

    if outcome.interrupted:
        return EXIT_INTERRUPTED
    if outcome.best is None:
        return EXIT_NO_SCORE
    return 0


def print_summary(outcome: SearchOutcome, metric: str) -> None:
    """Print one line per trial, the best trial and where the results are."""
    print(f"\nsearch {outcome.name}: {len(outcome.trials)} trial(s) in {outcome.seconds:.0f} s{' (resumed)' if outcome.resumed else ''}")
    print(f"{'trial':<14} {'outcome':<14} {'epochs':>6} {metric:>12}  values")
    for trial in outcome.trials:
        score = "-" if trial.score is None else f"{trial.score:.4f}"
        values = ", ".join(f"{section}.{key}={value}" for section, items in trial.values.items() for key, value in items.items())
        print(f"{trial.trial_id:<14} {trial.outcome:<14} {trial.epochs:>6} {score:>12}  {values}")

    if outcome.interrupted:
        print(f"\nthe search stopped before every trial finished; rerun the same command to resume it from {outcome.experiment_dir}")
    elif outcome.best is None:
        print("\nno trial reported a score; see the errors in the trial folders under", outcome.experiment_dir)
    else:
        print(f"\nbest trial: {outcome.best.trial_id} ({metric} = {outcome.best.score:.4f}), MLflow run {outcome.best.run_id}")
        if outcome.best_detector_path:
            print(f"its best checkpoint, for predict --detector: {outcome.best_detector_path}")
        print(f"best config: {outcome.best_config_path}")
        print(f"train with it: ribfrac-ray train --net retinanet --config {outcome.best_config_path}")
    print(f"MLflow parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
