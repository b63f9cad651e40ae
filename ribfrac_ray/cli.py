"""The ``ribfrac-ray`` command line.

Every subcommand resolves one :class:`~ribfrac_ray.config.PipelineConfig`:
dataclass defaults, then ``--config FILE.yaml``, then ``--set section.key=value``
pairs, then the subcommand's own flags (each flag is shorthand for one ``--set``).
Relative paths are taken relative to ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ribfrac_ray.config import MODELS_FOLDER, ConfigError, PipelineConfig, resolve_config, resolve_paths, save_config

logger = logging.getLogger("ribfrac_ray")

EXIT_FAILURES = 3

# Flags of each subcommand: (flag, config key or a callable of the parsed args, help).
Flag = tuple[str, str, dict[str, Any]]

STAGE_FLAGS: dict[str, list[Flag]] = {
    "make-phantoms": [
        ("--out", "phantoms.out", {"help": "output folder (RibFrac layout)"}),
        ("--n-train", "phantoms.n_train", {"type": int, "help": "number of training scans"}),
        ("--n-val", "phantoms.n_val", {"type": int, "help": "number of validation scans"}),
        ("--n-test", "phantoms.n_test", {"type": int, "help": "number of test scans"}),
        ("--shape", "phantoms.shape", {"nargs": 3, "type": int, "metavar": ("X", "Y", "Z"), "help": "volume size in voxels"}),
        ("--spacing", "phantoms.spacing", {"nargs": 3, "type": float, "metavar": ("SX", "SY", "SZ"), "help": "voxel size in mm"}),
        ("--max-fractures", "phantoms.max_fractures", {"type": int, "help": "most fractures per scan"}),
        ("--seed", "phantoms.seed", {"type": int, "help": "random seed; the same seed writes the same files"}),
        ("--overwrite", "phantoms.overwrite", {"action": "store_true", "default": None, "help": "replace existing phantom files"}),
    ],
    "preprocess": [
        ("--data-dir", "preprocess.data_dir", {"help": "RibFrac data folder (official layout or flat)"}),
        ("--out-dir", "preprocess.out_dir", {"help": "Parquet output folder"}),
        ("--splits", "preprocess.splits", {"nargs": "+", "help": "splits to cut patches from"}),
        ("--num-tasks", "preprocess.num_tasks", {"type": int, "help": "volumes processed at once"}),
        ("--overwrite", "preprocess.overwrite", {"action": "store_true", "default": None, "help": "redo volumes that are already done"}),
        ("--strict", "preprocess.strict", {"action": "store_true", "default": None, "help": "exit non-zero when any volume fails"}),
    ],
    "train": [
        ("--epochs", "{train}.epochs", {"type": int, "help": "training epochs"}),
        ("--num-workers", "{train}.num_workers", {"type": int, "help": "Ray Train workers (DDP)"}),
        ("--use-gpu", "{train}.use_gpu", {"action": "store_true", "default": None, "help": "one GPU per worker, NCCL backend"}),
        ("--name", "{train}.name", {"help": "run name under the storage path; the same name resumes"}),
        ("--patch-dir", "{train}.patch_dir", {"help": "preprocessing output folder"}),
        ("--batch-size", "{train}.batch_size", {"type": int, "help": "patches per step and worker"}),
        ("--lr", "{train}.lr", {"type": float, "help": "AdamW learning rate"}),
    ],
    "predict": [
        ("--data-dir", "predict.data_dir", {"help": "RibFrac data folder"}),
        ("--split", "predict.split", {"help": "split to predict (test, val, ...)"}),
        ("--out-dir", "predict.out_dir", {"help": "submission folder"}),
        ("--detector", "predict.detector_checkpoint", {"help": "detector checkpoint folder"}),
        ("--segmenter", "predict.segmenter_checkpoint", {"help": "segmenter checkpoint folder"}),
        ("--detector-actors", "predict.detector_actors", {"type": int, "help": "detector actor pool size"}),
        ("--segmenter-actors", "predict.segmenter_actors", {"type": int, "help": "segmenter actor pool size"}),
        ("--overwrite", "predict.overwrite", {"action": "store_true", "default": None, "help": "redo scans that already have a prediction"}),
        ("--strict", "predict.strict", {"action": "store_true", "default": None, "help": "exit non-zero when any scan fails"}),
    ],
    "evaluate": [
        ("--gt", "evaluate.gt_dir", {"help": "ground-truth label folder"}),
        ("--pred", "evaluate.pred_dir", {"help": "prediction folder (NIfTI files and one CSV)"}),
        ("--out", "evaluate.out_dir", {"help": "where metrics.json and froc.png go"}),
    ],
    "demo": [],
    "tune": [],
}

HELP = {
    "make-phantoms": "write seeded chest-CT phantoms in the RibFrac layout",
    "preprocess": "cut detector patches and segmenter crops into Parquet (Ray Data)",
    "train": "train the RetinaNet or the U-Net (Ray Train)",
    "predict": "two-stage prediction into RibFrac submission files (Ray Data actor pools)",
    "evaluate": "score a prediction folder with the RibFrac challenge metric",
    "demo": "run every stage on phantoms under one MLflow parent run",
    "tune": "search detector settings with Ray Tune (see docs/tuning.md)",
}


def build_parser() -> argparse.ArgumentParser:
    """Create the argument parser with one subcommand per stage."""
    parser = argparse.ArgumentParser(prog="ribfrac-ray", description="Rib fracture detection and segmentation in chest CT on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command, flags in STAGE_FLAGS.items():
        sub = commands.add_parser(command, help=HELP[command], description=HELP[command])
        _add_common(sub)
        if command == "train":
            sub.add_argument("--net", required=True, choices=["retinanet", "unet"], help="network to train")
        if command == "tune":
            from ribfrac_ray.tuning.command import add_tune_arguments

            add_tune_arguments(sub)
        for flag, _, options in flags:
            sub.add_argument(flag, dest=_dest(flag), **options)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of config sections (dataclasses in ribfrac_ray/config.py) that overrides the defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value; repeatable")
    parser.add_argument("--workdir", help="folder for everything written; relative config paths start here (default ribfrac-demo)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray instance (default: all cores)")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """Resolve the pipeline config from defaults, the YAML file, --set pairs and flags."""
    pairs = list(args.overrides)
    train_section = "train_detector" if getattr(args, "net", "retinanet") == "retinanet" else "train_segmenter"
    for flag, key, _ in STAGE_FLAGS[args.command]:
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        pairs.append(f"{key.format(train=train_section)}={_as_text(value)}")
    for option, key in (("workdir", "workdir"), ("tracking_uri", "tracking.tracking_uri"), ("experiment", "tracking.experiment"), ("ray_address", "ray.address"), ("num_cpus", "ray.num_cpus")):
        value = getattr(args, option, None)
        if value is not None:
            pairs.append(f"{key}={_as_text(value)}")
    return resolve_paths(resolve_config(args.config, pairs))


def _as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ribfrac-ray`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as error:
        print(f"ribfrac-ray: invalid configuration: {error}", file=sys.stderr)
        return 2
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (for child processes);
    # put the caller's value back, so a second main() in this process with another
    # --workdir does not log into this command's store.
    caller_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return run_command(args, config)
    except (FileNotFoundError, ValueError, ConfigError) as error:
        logger.error("%s", error)
        print(f"ribfrac-ray {args.command}: {error}", file=sys.stderr)
        return 1
    finally:
        if caller_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = caller_uri


def run_command(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Run one subcommand with a resolved config."""
    from ribfrac_ray import stages, tracking

    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    save_config(config, Path(config.workdir) / f"config-{args.command}.yaml")
    if args.command == "make-phantoms":
        result = stages.make_phantoms_stage(config)
        counts = {name: int(value) for name, value in result.metrics.items()}
        print(f"phantoms written to {config.phantoms.out}: {json.dumps(counts)}")
        return 0
    if args.command == "tune":
        from ribfrac_ray.tuning.command import run_tune

        return run_tune(args, config)

    uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri, config.workdir)
    tracking.configure(uri, config.tracking.experiment)

    if args.command == "preprocess":
        results = [stages.preprocess_stage(config)]
        strict = config.preprocess.strict
    elif args.command == "train":
        results = [stages.train_stage(config, args.net)]
        strict = False
    elif args.command == "predict":
        results = [stages.predict_stage(config)]
        strict = config.predict.strict
    elif args.command == "evaluate":
        results = [stages.evaluate_stage(config)]
        strict = False
    else:
        results = stages.demo_stage(config)
        strict = config.preprocess.strict or config.predict.strict

    _print_summary(results, config, uri, args.command)
    failures = [f for r in results for f in r.failures]
    if failures and strict:
        print(f"ribfrac-ray: {len(failures)} case(s) failed and --strict is set", file=sys.stderr)
        return EXIT_FAILURES
    return 0


def _output_folders(command: str, config: PipelineConfig) -> list[tuple[str, str]]:
    """Return (label, folder) pairs that ``command`` names at the end of its summary."""
    predictions = ("predictions", config.predict.out_dir)
    folders = {
        "preprocess": [("patches", config.preprocess.out_dir)],
        "train": [("models", str(Path(config.workdir) / MODELS_FOLDER))],
        "predict": [predictions],
        "evaluate": [("metrics.json and froc.png", config.evaluate.out_dir)],
        "demo": [predictions, ("evaluation", config.evaluate.out_dir)],
    }
    return folders.get(command, [])


def _print_summary(results: list[Any], config: PipelineConfig, uri: str, command: str) -> None:
    for result in results:
        figures = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())[:8])
        print(f"{result.stage:<16} {result.seconds:8.1f} s  {figures}")
        if "table" in result.details:
            print(result.details["table"])
    failures = [f for r in results for f in r.failures]
    if failures:
        print(f"\n{len(failures)} case(s) failed:")
        for failure in failures:
            # Reasons from the volume checks start with the file; discovery reasons may not name it.
            where = "" if failure["path"] in failure["reason"] else f"{failure['path']}: "
            print(f"  {failure['public_id']}: {where}{failure['reason']}")
    print()
    for label, folder in _output_folders(command, config):
        print(f"{label}: {folder}")
    if command == "preprocess" and failures:
        print(f"failures listed in: {Path(config.preprocess.out_dir) / 'failures.csv'}")
    print(f"MLflow store: {uri}  (browse with: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)")


if __name__ == "__main__":
    raise SystemExit(main())
