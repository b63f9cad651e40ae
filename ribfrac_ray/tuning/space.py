"""Search-space files: a YAML description of a Tune search, turned into Tune objects.

A space file has three top-level mappings::

    search:                       # how to search (SearchSettings below)
      num_samples: 3
      max_epochs: 2
    fixed:                        # config values that every trial uses
      train_detector.cpus_per_worker: 0.5
    space:                        # config values that the search samples
      detector.focal_alpha: {uniform: [0.1, 0.5]}
      detector.anchor_scales: {choice: [[1.0], [1.0, 2.0]]}

Keys under ``fixed`` and ``space`` are dotted :class:`~ribfrac_ray.config.PipelineConfig`
keys in the ``detector`` and ``train_detector`` sections, because a trial trains
the detector on patches that preprocessing already wrote. Each ``space`` value is
a mapping with one key, the name of a sampler from :data:`SAMPLERS`, whose value
is the list of the sampler's arguments. Every mistake raises ConfigError naming
the file and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ribfrac_ray.config import ConfigError, PipelineConfig, apply_mapping, load_yaml

TOP_LEVEL_KEYS = ("search", "fixed", "space")
SEARCHABLE_SECTIONS = ("detector", "train_detector")
# Keys that the search sets for every trial itself, with what to use instead.
RESERVED_KEYS = {
    "train_detector.name": "each trial trains under the name det-<trial id>",
    "train_detector.storage_path": "each trial stores its run under <workdir>/tune/<name>/trials",
    "train_detector.epochs": "search.max_epochs sets it, together with the scheduler's max_t",
}
SCHEDULERS = ("asha", "fifo")
SEARCH_ALGORITHMS = ("random", "optuna")
MODES = ("max", "min")


@dataclass
class SearchSettings:
    """Search settings: trial count, concurrency, scheduler, search algorithm and resources."""

    num_samples: int = 3
    # Trials that run at once, each with its own Ray Train run.
    max_concurrent_trials: int = 1
    # Metric reported by the detector's training loop after every epoch, and its direction.
    metric: str = "val_froc"
    mode: str = "max"
    # "asha" stops trials early (asynchronous successive halving), and "fifo" runs every trial to max_epochs.
    scheduler: str = "asha"
    # ASHA: epochs a trial runs before it can be stopped, and the fraction (1 / reduction_factor)
    # of trials that pass each rung.
    grace_period: int = 1
    reduction_factor: float = 2.0
    # Epochs per trial, also ASHA's max_t. 0 takes train_detector.epochs from the pipeline config.
    max_epochs: int = 0
    # "random" (Tune's BasicVariantGenerator) or "optuna" (OptunaSearch, TPE sampler).
    search_alg: str = "random"
    seed: int = 0
    # CPUs reserved for each trial's own process, which starts and waits on the Train run.
    # Its Train workers reserve train_detector.num_workers x cpus_per_worker on top.
    trial_cpus: float = 0.5


@dataclass
class _SearchSection:
    """Wrapper so that apply_mapping reports a wrong key as 'search.<key>'."""

    search: SearchSettings = field(default_factory=SearchSettings)


@dataclass(frozen=True)
class Sampler:
    """A Tune sampler that a space file may name, and the arguments it takes."""

    name: str
    arguments: tuple[str, ...]
    build: Callable[..., Any]
    # Python type of the sampled values: float, int, or None for a choice (the options' own types).
    value_type: type | None


def _tune_sampler(name: str) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        from ray import tune

        return getattr(tune, name)(*args)

    return build


SAMPLERS = {
    sampler.name: sampler
    for sampler in (
        Sampler("choice", ("options",), _tune_sampler("choice"), None),
        Sampler("uniform", ("low", "high"), _tune_sampler("uniform"), float),
        Sampler("loguniform", ("low", "high"), _tune_sampler("loguniform"), float),
        Sampler("quniform", ("low", "high", "q"), _tune_sampler("quniform"), float),
        Sampler("randint", ("low", "high (exclusive)"), _tune_sampler("randint"), int),
    )
}


@dataclass(frozen=True)
class Parameter:
    """One searched config value: its dotted key, sampler and the sampler's arguments."""

    key: str
    sampler: str
    args: tuple[Any, ...]

    @property
    def section(self) -> str:
        return self.key.split(".")[0]

    @property
    def name(self) -> str:
        return self.key.split(".")[1]

    @property
    def encoded(self) -> bool:
        """Whether Tune samples JSON text in place of the options (a choice among lists).

        Optuna's categorical distribution accepts only scalars, so list options,
        such as anchor scale sets, travel as JSON strings and are decoded in the trial.
        """
        return self.sampler == "choice" and any(isinstance(option, (list, dict)) for option in self.args[0])

    def domain(self) -> Any:
        """Return the Tune search domain for this parameter."""
        sampler = SAMPLERS[self.sampler]
        if self.encoded:
            return sampler.build([json.dumps(option) for option in self.args[0]])
        return sampler.build(*self.args)

    def describe(self) -> str:
        """Return the sampler as text, e.g. ``loguniform(0.0001, 0.003)``."""
        return f"{self.sampler}({', '.join(json.dumps(arg) for arg in self.args)})"


@dataclass
class SearchSpace:
    """A validated space file."""

    path: Path
    settings: SearchSettings
    parameters: list[Parameter]
    # Nested by section, ready for apply_mapping.
    fixed: dict[str, dict[str, Any]]
    text: str

    def param_space(self) -> dict[str, dict[str, Any]]:
        """Return Tune's ``param_space``: sampler domains nested by config section."""
        nested: dict[str, dict[str, Any]] = {}
        for parameter in self.parameters:
            nested.setdefault(parameter.section, {})[parameter.name] = parameter.domain()
        return nested

    def decode(self, sample: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Turn a trial's sampled config into config values nested by section."""
        values: dict[str, dict[str, Any]] = {}
        for parameter in self.parameters:
            value = sample[parameter.section][parameter.name]
            if parameter.encoded:
                value = json.loads(value)
            values.setdefault(parameter.section, {})[parameter.name] = value
        return values

    def describe(self) -> dict[str, str]:
        """Flatten settings, fixed values and samplers into MLflow parameters."""
        from ribfrac_ray.config import config_to_dict, flatten_config_dict

        described = {f"search.{key}": str(value) for key, value in config_to_dict(self.settings).items()}
        described.update(flatten_config_dict(self.fixed, prefix="fixed."))
        described.update({f"space.{p.key}": p.describe() for p in self.parameters})
        return described


def load_space(path: str | Path, search_overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Read and validate a space file; ``search_overrides`` replace values of its ``search`` section."""
    path = Path(path).resolve()
    data = load_yaml(path)
    source = str(path)

    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key '{unknown[0]}'; valid keys: {', '.join(TOP_LEVEL_KEYS)}")

    settings = _read_settings(data.get("search") or {}, source, search_overrides or {})
    fixed = _read_fixed(data.get("fixed") or {}, source)
    parameters = _read_parameters(data.get("space"), source)
    overlap = sorted(set(flat_keys(fixed)) & {p.key for p in parameters})
    if overlap:
        raise ConfigError(f"{source}: '{overlap[0]}' is both fixed and searched; keep it in one of the two sections")
    return SearchSpace(path, settings, parameters, fixed, path.read_text(encoding="utf-8"))


def flat_keys(nested: dict[str, dict[str, Any]]) -> list[str]:
    """Return the dotted keys of a mapping nested by section."""
    return [f"{section}.{name}" for section, values in nested.items() for name in values]


def _read_settings(raw: Any, source: str, overrides: dict[str, Any]) -> SearchSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'search' needs a mapping of settings, got {raw!r}")
    settings = apply_mapping(_SearchSection(), {"search": raw}, source).search
    if overrides:
        settings = apply_mapping(_SearchSection(settings), {"search": overrides}, "command line").search
    _check_settings(settings, source)
    return settings


def _check_settings(settings: SearchSettings, source: str) -> None:
    s = settings
    checks = [
        ("num_samples", s.num_samples >= 1, "must be at least 1"),
        ("max_concurrent_trials", s.max_concurrent_trials >= 1, "must be at least 1"),
        ("metric", bool(s.metric), "must name a metric that training reports, such as val_froc"),
        ("mode", s.mode in MODES, f"must be one of {', '.join(MODES)}"),
        ("scheduler", s.scheduler in SCHEDULERS, f"must be one of {', '.join(SCHEDULERS)}"),
        ("search_alg", s.search_alg in SEARCH_ALGORITHMS, f"must be one of {', '.join(SEARCH_ALGORITHMS)}"),
        ("grace_period", s.grace_period >= 1, "must be at least 1 epoch"),
        ("reduction_factor", s.reduction_factor > 1, "must be above 1"),
        ("max_epochs", s.max_epochs >= 0, "must be 0 (take train_detector.epochs) or positive"),
        ("max_epochs", s.max_epochs == 0 or s.max_epochs >= s.grace_period, "must be at least search.grace_period"),
        # Ray rejects an empty resource bundle and fractional CPU requests above 1.
        ("trial_cpus", s.trial_cpus > 0 and (s.trial_cpus <= 1 or float(s.trial_cpus).is_integer()), "must be above 0, and a whole number when above 1"),
    ]
    for key, passed, requirement in checks:
        if not passed:
            raise ConfigError(f"{source}: search.{key} {requirement}, got {getattr(s, key)!r}")


def _split_key(key: Any, source: str, where: str) -> tuple[str, str]:
    if not isinstance(key, str) or key.count(".") != 1:
        raise ConfigError(f"{source}: '{where}' expects dotted keys section.field, such as detector.focal_alpha; got {key!r}")
    section, name = key.split(".")
    if section not in SEARCHABLE_SECTIONS:
        raise ConfigError(
            f"{source}: '{key}' is outside the sections a trial uses ({', '.join(SEARCHABLE_SECTIONS)}); "
            "each trial only trains the detector on existing patches"
        )
    if key in RESERVED_KEYS:
        raise ConfigError(f"{source}: '{key}' cannot be set in a space file because {RESERVED_KEYS[key]}")
    return section, name


def _read_fixed(raw: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'fixed' needs a mapping of dotted config keys to values, got {raw!r}")
    nested: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        section, name = _split_key(key, source, "fixed")
        nested.setdefault(section, {})[name] = value
    # Checks every key and type, and converts the values to the fields' types.
    config = apply_mapping(PipelineConfig(), nested, f"{source} (fixed)")
    return {section: {name: getattr(getattr(config, section), name) for name in names} for section, names in nested.items()}


def _read_parameters(raw: Any, source: str) -> list[Parameter]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: 'space' needs a non-empty mapping of dotted config keys to samplers")
    parameters = []
    for key, spec in raw.items():
        _split_key(key, source, "space")
        parameter = _read_sampler(key, spec, source)
        _check_sampled_types(parameter, source)
        parameters.append(parameter)
    return parameters


def _read_sampler(key: str, spec: Any, source: str) -> Parameter:
    names = ", ".join(SAMPLERS)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{source}: '{key}' needs a mapping with one sampler, such as {{loguniform: [1.0e-4, 1.0e-2]}}; got {spec!r}; samplers: {names}")
    sampler_name, args = next(iter(spec.items()))
    if sampler_name not in SAMPLERS:
        raise ConfigError(f"{source}: '{key}' uses unknown sampler '{sampler_name}'; use one of {names}")
    sampler = SAMPLERS[sampler_name]
    usage = f"{sampler_name} takes [{', '.join(sampler.arguments)}]"

    if sampler_name == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{source}: '{key}': choice takes a non-empty list of options; got {args!r}")
        return Parameter(key, sampler_name, (args,))

    if not isinstance(args, list) or len(args) != len(sampler.arguments):
        count = len(args) if isinstance(args, list) else "no list of"
        raise ConfigError(f"{source}: '{key}': {usage}, got {count} values: {args!r}")
    if not all(isinstance(arg, (int, float)) and not isinstance(arg, bool) and math.isfinite(arg) for arg in args):
        raise ConfigError(f"{source}: '{key}': {usage} as numbers, got {args!r}")
    _check_bounds(key, sampler_name, args, source)
    return Parameter(key, sampler_name, tuple(args))


def _check_bounds(key: str, sampler: str, args: list[float], source: str) -> None:
    low, high = args[0], args[1]
    if low >= high:
        raise ConfigError(f"{source}: '{key}': {sampler} needs low < high, got {args!r}")
    if sampler == "loguniform" and low <= 0:
        raise ConfigError(f"{source}: '{key}': loguniform needs a positive low bound, got {args!r}")
    if sampler == "quniform" and args[2] <= 0:
        raise ConfigError(f"{source}: '{key}': quniform needs a positive step q, got {args!r}")
    if sampler == "randint" and not all(isinstance(arg, int) for arg in args):
        raise ConfigError(f"{source}: '{key}': randint needs integer bounds, got {args!r}")


def _check_sampled_types(parameter: Parameter, source: str) -> None:
    """Run values the sampler can produce through apply_mapping, which checks the field's type."""
    sampler = SAMPLERS[parameter.sampler]
    if parameter.sampler == "choice":
        examples = list(parameter.args[0])
    elif parameter.sampler == "randint":
        examples = [parameter.args[0], parameter.args[1] - 1]
    else:
        examples = [float(parameter.args[0]), float(parameter.args[1])]

    for value in examples:
        try:
            apply_mapping(PipelineConfig(), {parameter.section: {parameter.name: value}}, f"{source} (space)")
        except ConfigError as error:
            produced = f"; {parameter.sampler} samples {sampler.value_type.__name__} values" if sampler.value_type else ""
            raise ConfigError(f"{error}{produced}") from error
