"""What a study is: its :class:`TuneConfig`, search space, sampler and pruner."""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import optuna
from optuna import distributions as od
from optuna import pruners, samplers

from eqloop.config import ConfigBase, apply_overrides, load_config_data, merge_config
from eqloop.training.config import TrainConfig, load_config
from solvers import checks

OBJECTIVES = {
    "deep_accuracy": {"deep_accuracy": "maximize"},  # value name: direction
    "multi": {"peak_accuracy": "maximize", "drop": "minimize"},
}
SAMPLERS = {"tpe": samplers.TPESampler, "gp": samplers.GPSampler, "random": samplers.RandomSampler}
PrunerName = Literal["median", "percentile", "hyperband", "none"]  # --set pruner=none: "none"
PRUNERS = dict(
    zip(
        get_args(PrunerName),
        (
            pruners.MedianPruner,
            pruners.PercentilePruner,
            pruners.HyperbandPruner,
            pruners.NopPruner,
        ),
        strict=True,
    )
)
DEFAULT_RANGES: dict[str, dict[str, Any]] = {  # for parameters searched without a range
    "lam": {"low": 1e-3, "high": 1.0, "log": True},
    "lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "penalty_target": {"low": 0.1, "high": 1.0},
    "depth.mu": {"low": 1.0, "high": 3.0},
    "depth.sigma": {"low": 0.2, "high": 1.0},
}
_SET_BY_STUDY = ("seed", "out_dir", "resume", "eval_loops", "progress")
_INTEGERS = {"n_trials": 1, "max_retry": 0, "heartbeat_interval": 1}  # field: lowest value
_OPTIONAL = {"grace_period": 1, "max_failed": 1, "sampler_seed": 0}  # or None


@contextlib.contextmanager
def experimental_api() -> Iterator[None]:
    """Silence ExperimentalWarning around one call of an Optuna feature eqloop relies on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def distribution(name: str, spec: Mapping[str, Any]) -> od.BaseDistribution:
    """Optuna's distribution for ``space.<name>``: ``{"low", "high", "log", "step", "type":
    "float" | "int"}`` or ``{"choices": [...]}``, checked by Optuna and for an empty range."""
    spec = dict(spec)
    kind = checks.choice(f"space.{name}.type", spec.pop("type", "float"), ("float", "int"))
    try:
        if "choices" in spec:
            return od.CategoricalDistribution(**spec)
        dist = (od.IntDistribution if kind == "int" else od.FloatDistribution)(**spec)
    except (TypeError, ValueError) as err:  # unknown keys, inverted range, step with log, ...
        raise ValueError(f"space.{name}: {err}") from err
    if not dist.low < dist.high:
        raise ValueError(f"space.{name}: the range [{dist.low}, {dist.high}] is empty")
    return dist


def suggest(trial: optuna.Trial, name: str, dist: od.BaseDistribution) -> Any:
    """Draw (or, for a queued trial, read back) parameter ``name`` from ``dist``."""
    if isinstance(dist, od.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    number = trial.suggest_int if isinstance(dist, od.IntDistribution) else trial.suggest_float
    return number(name, dist.low, dist.high, step=dist.step, log=dist.log)


@dataclass
class TuneConfig(ConfigBase):
    """Everything that defines a study and how a worker runs it (see ``eqloop.tune``)."""

    study_name: str = "stars-lam"  # several studies may share one storage
    study_dir: str = "runs/tune"  # default SQLite file, trial run directories and outputs
    storage: str | None = None  # None: sqlite:///<study_dir>/study.db | URL | journal:PATH
    n_trials: int = 20  # total for the study (complete + pruned + running + waiting)
    timeout: float | None = None  # this worker starts no new trial after this many seconds
    objective: str = "deep_accuracy"  # "deep_accuracy" | "multi"
    loops: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])  # test-time loops
    space: dict[str, Any] = field(default_factory=lambda: {"lam": {}})  # name -> range/choices
    base_config: str | None = None  # TrainConfig file (JSON/TOML) with the fixed settings
    base: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides on top of it
    seed_per_trial: bool = True  # trial n trains with seed base.seed + n (else base.seed)
    sampler: str = "tpe"  # "tpe" | "gp" (Gaussian process, needs scipy and torch) | "random"
    sampler_options: dict[str, Any] = field(default_factory=dict)  # sampler kwargs
    sampler_seed: int | None = None  # seeds the sampler (plus the trials already stored)
    pruner: PrunerName | None = None  # None: median (none for objective multi)
    pruner_options: dict[str, Any] = field(default_factory=dict)  # pruner kwargs
    heartbeat_interval: int = 60  # RDB storages: seconds between a running trial's heartbeats
    grace_period: int | None = None  # heartbeat age that fails a trial (None: 2 x interval)
    max_retry: int = 1  # how often a killed or interrupted trial is queued again
    max_failed: int | None = None  # stop once the study has this many FAIL trials (n_trials)
    progress: bool = True  # each trial's training progress bar and Optuna's line per trial
    plots: bool = True  # write history.png and objective_vs_params.png

    @property
    def out_dir(self) -> Path:
        """``<study_dir>/<study_name>``: trial run directories and the study's outputs."""
        return Path(self.study_dir) / self.study_name

    def resolved_pruner(self) -> str:
        """The pruner name after applying the default (median; none for ``multi``)."""
        return self.pruner or ("none" if self.objective == "multi" else "median")

    def param_space(self) -> dict[str, dict[str, Any]]:
        """The space, ``lam`` first, with DEFAULT_RANGES filling a range's missing keys."""
        out = {}
        for name in sorted(self.space, key=lambda n: (n != "lam", n)):
            spec = self.space[name]
            if not isinstance(spec, Mapping):
                raise ValueError(f"space.{name} must be an object like {{'low': .., 'high': ..}}")
            out[name] = spec if "choices" in spec else {**DEFAULT_RANGES.get(name, {}), **spec}
        return out

    def distributions(self) -> dict[str, od.BaseDistribution]:
        """The search space as Optuna distributions, ``lam`` first."""
        return {name: distribution(name, spec) for name, spec in self.param_space().items()}

    def train_data(self) -> dict[str, Any]:
        """``base_config`` with ``base`` merged in as a train config file would be
        (:func:`eqloop.config.merge_config`), as a dict."""
        data = load_config(self.base_config).to_dict()
        return merge_config(data, self.base, schema=TrainConfig, where="base")

    def train_base(self) -> TrainConfig:
        """The fixed part of every trial: ``base_config``, then ``base``, then ``loops``."""
        return TrainConfig.from_dict({**self.train_data(), "eval_loops": list(self.loops)})

    def validate(self) -> TrainConfig:
        """Check every field, and each end of each range in the base config (a bad name or
        range fails now, not mid-study); return the base config. Errors name the field."""
        name = self.study_name
        if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name:
            raise ValueError(f"study_name must be a non-empty name without '/', got {name!r}")
        for key, low in {**_INTEGERS, **_OPTIONAL}.items():
            if key in _INTEGERS or getattr(self, key) is not None:
                checks.integer(key, getattr(self, key), low=low)
        if self.timeout is not None:
            checks.number("timeout", self.timeout, low=0, low_open=True)
        checks.boolean("seed_per_trial", self.seed_per_trial)
        for key, valid in (("objective", OBJECTIVES), ("sampler", SAMPLERS)):
            checks.choice(key, getattr(self, key), tuple(valid))
        pruner = checks.choice("pruner", self.resolved_pruner(), tuple(PRUNERS))
        if not isinstance(self.loops, list) or not self.loops:
            raise ValueError(f"loops must be a non-empty list of integers >= 1, got {self.loops!r}")
        for t in self.loops:
            checks.integer("each entry of loops", t, low=1)
        for key in ("space", "base", "sampler_options", "pruner_options"):
            if not isinstance(getattr(self, key), Mapping):
                raise ValueError(f"{key} must be an object, got {getattr(self, key)!r}")
        if not self.space:
            raise ValueError("space is empty: search at least one parameter (e.g. lam)")
        _check_kwargs(SAMPLERS[self.sampler], self.sampler_options, "sampler_options", "seed")
        _check_kwargs(PRUNERS[pruner], self.pruner_options, "pruner_options")
        if pruner == "percentile" and not 0 < self.pruner_options.get("percentile", -1) < 100:
            raise ValueError(
                "the percentile pruner needs pruner_options['percentile'] in (0, 100)"
                ", the share of trials it keeps: --set pruner_options.percentile=75"
            )
        if pruner != "none" and self.objective == "multi":
            raise ValueError(
                f"pruner {pruner!r} cannot be used with objective 'multi' (Optuna "
                "does not prune multi-objective trials): --set pruner=none"
            )
        base = self.train_base()
        if pruner != "none" and not 0 < base.eval_every < base.steps:
            raise ValueError(
                f"pruning needs intermediate evaluations: base.eval_every in (0, "
                f"{base.steps}), got {base.eval_every} (or --set pruner=none)"
            )
        for name, dist in self.distributions().items():
            if name in _SET_BY_STUDY:
                raise ValueError(f"space.{name}: this field is set by the study itself")
            categorical = isinstance(dist, od.CategoricalDistribution)
            for value in dist.choices if categorical else (dist.low, dist.high):
                try:
                    trial_train_config(base, {name: value})
                except ValueError as err:
                    raise ValueError(f"space.{name}={value!r} is not valid: {err}") from err
        return base


def _check_kwargs(cls: type, options: Mapping[str, Any], what: str, *reserved: str) -> None:
    accepted = sorted(set(inspect.signature(cls).parameters) - set(reserved))
    if unknown := sorted(set(options) - set(accepted)):
        raise ValueError(f"{what}: unknown options {unknown}; {cls.__name__} takes {accepted}")


def load_tune_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> TuneConfig:
    """A :class:`TuneConfig` from defaults, an optional file, ``key=value`` overrides and
    typed ``values`` (the command line's flags, applied last).

    Read as ``eqloop train`` reads its config (:func:`eqloop.config.load_config_data`:
    JSON or TOML by suffix, one merge rule, unknown keys are errors). An override
    ``base.<key>=<value>`` is train's ``--set <key>=<value>`` on the base config
    (``base_config`` with ``base``): parsed by TrainConfig's field types, and a dotted key
    sets one entry, so ``base.depth.mu=2.5`` keeps the other depth-sampler settings. The
    top-level TrainConfig fields it changes are stored in ``base``.

    Raises:
        FileNotFoundError: ``path`` (or, with ``base.`` overrides, ``base_config``) does
            not exist.
        ValueError: an unreadable file, unknown keys or values that do not fit.
    """
    items = [item.strip() for item in overrides]
    on_base = [item.removeprefix("base.") for item in items if item.startswith("base.")]
    rest = [item for item in items if not item.startswith("base.")]
    defaults = TuneConfig().to_dict()
    config = TuneConfig(**load_config_data(defaults, path, rest, schema=TuneConfig, values=values))
    if on_base:
        try:
            data = apply_overrides(config.train_data(), on_base, schema=TrainConfig)
        except ValueError as err:
            raise ValueError(f"base: {err}") from None
        changed = {item.partition("=")[0].strip().split(".")[0] for item in on_base}
        config.base = {**config.base, **{key: data[key] for key in sorted(changed)}}
    return config


def trial_train_config(base: TrainConfig, settings: Mapping[str, Any]) -> TrainConfig:
    """``base`` with ``settings`` (dotted keys such as ``depth.mu`` reach nested fields)."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    return TrainConfig.from_dict(apply_overrides(base.to_dict(), overrides))
