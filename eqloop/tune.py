"""Optuna studies over the STARS hyperparameters: one trial is one ``eqloop.train`` run.

Usage::

    eqloop tune --n-trials 20                                  # lam in [1e-3, 1], log scale
    eqloop tune --config tune.json --set base.steps=300 --search lam,lr,depth.mu
    eqloop tune --objective multi --sampler gp --pruner none
    eqloop tune --report-only                                  # rewrite CSV, JSON and plots

Several workers, on one machine or many, share a study through its storage; every
worker runs trials until the study holds ``n_trials`` of them (the number is a total for
the study, not per worker)::

    eqloop tune --config tune.json --n-trials 40 &          # SQLite file, one machine
    eqloop tune --config tune.json --n-trials 40 &
    eqloop tune --config tune.json --storage journal:runs/tune/journal.log --n-trials 40
    eqloop tune --config tune.json --storage postgresql://user:pw@host/db --n-trials 40

Watch or inspect a study in optuna-dashboard (``pip install optuna-dashboard``)::

    optuna-dashboard sqlite:///runs/tune/study.db
    optuna-dashboard runs/tune/journal.log          # a journal file

What a trial does. Its parameters come from the search space (``space``; default: the
penalty weight ``lam`` log-uniform in [1e-3, 1]), every other setting from the base
:class:`~eqloop.config.TrainConfig` (``base_config`` file plus ``base`` overrides), with
``eval_loops`` set to the tuning grid ``loops``. Its seed is ``base.seed + n`` for trial
number ``n`` (``seed_per_trial``), its run directory
``<study_dir>/<study_name>/trials/trial_<n>``; both are stored as trial user attributes
(``seed``, ``run_dir``, ``checkpoint_dir``, ``metrics_path``, ``config_path``), so a trial
is rerun with ``eqloop train --config <run_dir>/config.json --out-dir NEW_DIR``.

Objectives, over the exact-match accuracies ``acc[t]`` at the loop counts ``t`` of
``loops`` (which should extend past the depths seen in training):

* ``deep_accuracy`` (default): maximise ``mean_t acc[t]``; reported after each periodic
  evaluation, so the pruner can stop a clearly bad trial early (median pruner by default,
  Hyperband on request; the final evaluation is reported but never pruned).
* ``multi``: maximise ``peak = max_t acc[t]`` and minimise ``drop = peak - acc[max t]``.
  Optuna cannot prune multi-objective trials, so the pruner must be ``none``.

Trial budget, failures and resumption:

* ``n_trials`` counts the study's trials that are complete, pruned, running or waiting,
  checked before each new trial. (Optuna's ``MaxTrialsCallback`` counts only finished
  trials, after a trial ends, so a worker starts another trial while the running trials
  of other workers already fill the budget.) The check and the creation of the trial
  happen under a file lock next to a SQLite or journal storage, so concurrent workers on
  one machine end with exactly ``n_trials``.
  (On a server storage there is no shared lock; a trial started past the budget in a
  race is failed at once with the user attribute ``surplus``.)
* Resuming (same ``study_name`` and storage) keeps the finished trials; the study's
  objective, grid, search space and base config must be unchanged (checked before any
  trial starts). Raise ``n_trials`` to add trials.
* A trial that raises is marked FAIL with its error in the user attribute ``error``; the
  worker goes on with the next trial (at most ``max_failed`` failures per study).
  Ctrl-C or SIGTERM fail the running trial, queue it again and stop the worker.
* A worker killed outright (SIGKILL, power loss) leaves its trial RUNNING. The next
  worker to start a trial fails it when its process is gone (same machine: host, boot id,
  pid and process start time are stored with the trial) or, on RDB storages (SQLite,
  PostgreSQL, MySQL), when its heartbeat is older than ``grace_period`` seconds; Optuna's
  ``RetryHeartbeatStaleTrialCallback`` then queues it again with the same parameters and
  intermediate values (up to ``max_retry`` times). The retry continues from the killed
  trial's last checkpoint in the same run directory. A journal file has no heartbeat: a
  worker killed on another machine leaves its trial RUNNING (counted in the budget) until
  it is failed by hand; share a study across machines through an RDB storage.

Outputs in ``<study_dir>/<study_name>/`` (rewritten by every worker when it stops):
``best_params.json`` (best trial, or the Pareto front for ``multi``, with its command
line and the compute saved by pruning), ``trials.csv`` (``study.trials_dataframe()``),
``history.png`` (objective per trial and running best) and ``objective_vs_params.png``
(objective against each searched parameter, log axis for log-scaled ones).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from eqloop.checkpoint import CHECKPOINT_DIR, write_json_atomic
from eqloop.cli import add_config_arguments
from eqloop.config import TrainConfig, apply_overrides, load_config, read_config_file
from eqloop.plotting import pyplot, style_axis

__all__ = [
    "DEFAULT_RANGES",
    "OBJECTIVES",
    "PRUNERS",
    "SAMPLERS",
    "ParamSpec",
    "RetryTrial",
    "StorageSpec",
    "TuneConfig",
    "build_parser",
    "config_from_args",
    "default_storage",
    "fail_dead_trials",
    "load_study",
    "load_tune_config",
    "main",
    "make_pruner",
    "make_sampler",
    "objective_values",
    "open_storage",
    "parse_storage",
    "plot_history",
    "plot_objective_vs_params",
    "pruning_savings",
    "run_study",
    "trial_table",
    "write_report",
]

OBJECTIVES: tuple[str, ...] = ("deep_accuracy", "multi")
PRUNERS: tuple[str, ...] = ("median", "percentile", "hyperband", "none")
SAMPLERS: tuple[str, ...] = ("tpe", "gp", "random")
DIRECTIONS: dict[str, list[str]] = {
    "deep_accuracy": ["maximize"],
    "multi": ["maximize", "minimize"],
}
OBJECTIVE_NAMES: dict[str, list[str]] = {
    "deep_accuracy": ["deep_accuracy"],
    "multi": ["peak_accuracy", "drop"],
}

DEFAULT_RANGES: dict[str, dict[str, Any]] = {
    "lam": {"low": 1e-3, "high": 1.0, "log": True},
    "penalty_target": {"low": 0.1, "high": 1.0},
    "depth.mu": {"low": 1.0, "high": 3.0},
    "depth.sigma": {"low": 0.2, "high": 1.0},
    "lr": {"low": 1e-4, "high": 1e-2, "log": True},
}
"""Ranges ``--search NAME`` uses for a parameter the config does not specify."""

_SPEC_KEYS = frozenset({"low", "high", "log", "step", "type", "choices"})
_SPEC_TYPES = ("float", "int")
_STUDY_ATTR = "eqloop_tune"  # study user attribute holding what resuming must not change
_INTERRUPTED = "interrupted"


# ----------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a dotted :class:`TrainConfig` key and its distribution.

    Attributes:
        name: the key (``lam``, ``lr``, ``depth.mu``, ``model.d_model``, ...); also the
            Optuna parameter name.
        low, high: range of a numeric parameter (``low < high``; ``low > 0`` if ``log``).
        log: sample on a log scale.
        step: grid step of a numeric parameter (not with ``log``).
        type: ``"float"`` or ``"int"``.
        choices: the values of a categorical parameter (then no range).
    """

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    type: str = "float"
    choices: tuple[Any, ...] | None = None

    @classmethod
    def from_dict(cls, name: str, spec: Mapping[str, Any]) -> ParamSpec:
        """Parse and check ``{"low", "high", "log", "step", "type"}`` or ``{"choices"}``.

        Raises:
            ValueError: unknown keys, an empty or inverted range, ``low <= 0`` on a log
                scale, or a range together with ``choices``.
        """
        if not isinstance(spec, Mapping):
            raise ValueError(f"space.{name} must be an object like {{'low': .., 'high': ..}}")
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"space.{name}: unknown keys {unknown}; valid: {sorted(_SPEC_KEYS)}")
        if "choices" in spec:
            return cls._categorical(name, spec)
        return cls._numeric(name, spec)

    @classmethod
    def _categorical(cls, name: str, spec: Mapping[str, Any]) -> ParamSpec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise ValueError(f"space.{name}: 'choices' cannot be combined with a range")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"space.{name}.choices must be a non-empty list, got {choices!r}")
        return cls(name, choices=tuple(choices))

    @classmethod
    def _numeric(cls, name: str, spec: Mapping[str, Any]) -> ParamSpec:
        kind = spec.get("type", "float")
        if kind not in _SPEC_TYPES:
            raise ValueError(f"space.{name}.type must be one of {list(_SPEC_TYPES)}, got {kind!r}")
        for key in ("low", "high"):
            if key not in spec:
                raise ValueError(f"space.{name} needs '{key}'")
            if not _is_number(spec[key]) or not math.isfinite(spec[key]):
                raise ValueError(f"space.{name}.{key} must be a finite number, got {spec[key]!r}")
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if not low < high:
            raise ValueError(f"space.{name}: empty or inverted range, low={low} >= high={high}")
        if log and not low > 0:
            raise ValueError(f"space.{name}: a log-scaled range needs low > 0, got low={low}")
        step = spec.get("step")
        if step is not None and (log or not _is_number(step) or not step > 0):
            raise ValueError(f"space.{name}.step must be a number > 0 and needs log=false")
        if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
            raise ValueError(f"space.{name}: an int range needs integer bounds")
        return cls(name, low=low, high=high, log=log, step=step, type=kind)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw (or, for a queued trial, read back) this parameter's value."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.type == "int":
            step = int(self.step or 1)
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """Values the range must accept: its two ends, or every choice."""
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def to_dict(self) -> dict[str, Any]:
        """The spec as written in a config file."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        if self.type != "float":
            out["type"] = self.type
        return out


def _with_default_range(name: str, spec: Any) -> Any:
    if not isinstance(spec, Mapping) or "choices" in spec:
        return spec
    return {**DEFAULT_RANGES.get(name, {}), **spec}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- the config


def _default_space() -> dict[str, dict[str, Any]]:
    return {"lam": dict(DEFAULT_RANGES["lam"])}


def _default_loops() -> list[int]:
    return [4, 8, 16, 32, 64]


@dataclass
class TuneConfig:
    """Everything that defines a study and how a worker runs it (see the module docstring)."""

    # -- study and storage ---------------------------------------------------------------
    study_name: str = "stars-lam"  # several studies may share one storage
    study_dir: str = "runs/tune"  # default SQLite file, trial run directories and outputs
    storage: str | None = None  # None: sqlite:///<study_dir>/study.db | URL | journal:PATH
    n_trials: int = 20  # total for the study (complete + pruned + running + waiting)
    timeout: float | None = None  # this worker starts no new trial after this many seconds
    # -- what is optimised ---------------------------------------------------------------
    objective: str = "deep_accuracy"  # "deep_accuracy" | "multi"
    loops: list[int] = field(default_factory=_default_loops)  # test-time loop counts
    space: dict[str, Any] = field(default_factory=_default_space)  # name -> range/choices
    base_config: str | None = None  # TrainConfig file (JSON/TOML) with the fixed settings
    base: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides on top of it
    seed_per_trial: bool = True  # trial n trains with seed base.seed + n (else base.seed)
    # -- search --------------------------------------------------------------------------
    sampler: str = "tpe"  # "tpe" | "gp" (Gaussian process, needs scipy and torch) | "random"
    sampler_options: dict[str, Any] = field(default_factory=dict)  # sampler kwargs
    sampler_seed: int | None = None  # seeds the sampler (plus the trials already stored)
    pruner: str | None = None  # median | percentile | hyperband | none; None: median (none: multi)
    pruner_options: dict[str, Any] = field(default_factory=dict)  # pruner kwargs
    # -- failures ------------------------------------------------------------------------
    heartbeat_interval: int = 60  # RDB storages: seconds between a running trial's heartbeats
    grace_period: int | None = None  # heartbeat age that fails a trial (None: 2 x interval)
    max_retry: int = 1  # how often a killed or interrupted trial is queued again
    max_failed: int | None = None  # stop once the study has this many FAIL trials (n_trials)
    # -- output --------------------------------------------------------------------------
    progress: bool = True  # tqdm bar over trials and one line per finished trial
    plots: bool = True  # write history.png and objective_vs_params.png

    def __post_init__(self) -> None:
        self.loops = list(self.loops) if isinstance(self.loops, (list, tuple)) else self.loops

    # -- derived -------------------------------------------------------------------------

    @property
    def out_dir(self) -> Path:
        """``<study_dir>/<study_name>``: trial run directories and the study's outputs."""
        return Path(self.study_dir) / self.study_name

    @property
    def directions(self) -> list[str]:
        """Optuna directions of the objective(s)."""
        return DIRECTIONS[self.objective]

    def resolved_pruner(self) -> str:
        """The pruner name after applying the default."""
        if self.pruner is not None:
            return self.pruner
        return "none" if self.objective == "multi" else "median"

    def param_specs(self) -> list[ParamSpec]:
        """The search space as :class:`ParamSpec` objects (``lam`` first if searched).

        A range that leaves out ``low``, ``high`` or ``log`` takes them from
        :data:`DEFAULT_RANGES` (``space.lr.high=0.005`` keeps the default ``low``).
        """
        names = sorted(self.space, key=lambda n: (n != "lam", n))
        return [ParamSpec.from_dict(n, _with_default_range(n, self.space[n])) for n in names]

    def train_base(self) -> TrainConfig:
        """The fixed part of every trial: ``base_config``, then ``base``, then ``loops``.

        Raises:
            ValueError: unknown TrainConfig keys or invalid values.
            FileNotFoundError: ``base_config`` does not exist.
        """
        data = load_config(self.base_config).to_dict()
        base = copy.deepcopy(self.base)
        model = base.pop("model", {})
        if not isinstance(model, Mapping):
            raise ValueError(f"base.model must be an object, got {model!r}")
        unknown = sorted(set(base) - set(data))
        if unknown:
            raise ValueError(f"unknown TrainConfig keys in base: {unknown}; valid: {sorted(data)}")
        data.update(base, model={**data["model"], **model}, eval_loops=list(self.loops))
        return TrainConfig.from_dict(data)

    # -- checks --------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Check every field and the space against the base config; return the base.

        Each searched parameter is set to both ends of its range (or to every choice) in
        the base config, which must then validate, so a bad name or range fails here and
        not in the middle of a study.

        Raises:
            ValueError: naming the field and what is allowed.
        """
        self._validate_study()
        self._validate_search()
        if not self.space:
            raise ValueError("space is empty: search at least one parameter (e.g. lam)")
        base = self.train_base()
        specs = self.param_specs()
        for spec in specs:
            if spec.name in ("seed", "out_dir", "resume", "eval_loops", "progress"):
                raise ValueError(f"space.{spec.name}: this field is set by the study itself")
            for value in spec.extremes():
                try:
                    _trial_train_config(base, {spec.name: value}, seed=base.seed, run_dir=".")
                except ValueError as err:
                    raise ValueError(f"space.{spec.name}={value!r} is not valid: {err}") from err
        self._validate_pruning(base)
        return base

    def _validate_study(self) -> None:
        if not isinstance(self.study_name, str) or not self.study_name.strip():
            raise ValueError(f"study_name must be a non-empty string, got {self.study_name!r}")
        if any(c in self.study_name for c in "/\\") or self.study_name in (".", ".."):
            raise ValueError(f"study_name must not contain path separators: {self.study_name!r}")
        for name, low in (("n_trials", 1), ("max_retry", 0), ("heartbeat_interval", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("grace_period", "max_failed", "sampler_seed"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if name == "sampler_seed" else 1)
            ):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        if self.timeout is not None and (not _is_number(self.timeout) or not self.timeout > 0):
            raise ValueError(f"timeout must be None or a number > 0, got {self.timeout!r}")
        if self.storage is not None:
            parse_storage(self.storage)  # syntax only; opening happens in open_storage

    def _validate_search(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {list(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {list(SAMPLERS)}")
        if self.pruner is not None and self.pruner not in PRUNERS:
            raise ValueError(f"unknown pruner {self.pruner!r}; valid: {list(PRUNERS)}")
        if (
            not isinstance(self.loops, list)
            or not self.loops
            or not all(_is_int(t) and t >= 1 for t in self.loops)
        ):
            raise ValueError(f"loops must be a non-empty list of integers >= 1, got {self.loops!r}")
        if not isinstance(self.space, Mapping):
            raise ValueError(f"space must be an object of name -> range, got {self.space!r}")
        for name, options in (
            ("sampler_options", self.sampler_options),
            ("pruner_options", self.pruner_options),
        ):
            if not isinstance(options, Mapping):
                raise ValueError(f"{name} must be an object, got {options!r}")
        _check_kwargs(
            _SAMPLER_CLASSES[self.sampler],
            self.sampler_options,
            "sampler_options",
            reserved=("seed",),
        )
        pruner = self.resolved_pruner()
        if pruner == "none" and self.pruner_options:
            raise ValueError("pruner_options are given but the pruner is 'none'")
        if pruner != "none":
            _check_kwargs(_PRUNER_CLASSES[pruner], self.pruner_options, "pruner_options")
        if pruner == "percentile" and not 0 < self.pruner_options.get("percentile", -1) < 100:
            raise ValueError(
                "the percentile pruner needs pruner_options['percentile'] in (0, 100), the "
                "share of trials it keeps, e.g. --set pruner_options.percentile=75 (prune a "
                "trial that is in the bottom quarter at an evaluation)"
            )

    def _validate_pruning(self, base: TrainConfig) -> None:
        pruner = self.resolved_pruner()
        if pruner == "none":
            return
        if self.objective == "multi":
            raise ValueError(
                f"pruner {pruner!r} cannot be used with objective 'multi': Optuna does not "
                "prune multi-objective trials; use --pruner none"
            )
        if not 0 < base.eval_every < base.steps:
            raise ValueError(
                f"pruning needs intermediate evaluations: set base.eval_every in (0, "
                f"base.steps={base.steps}), got {base.eval_every} (or use --pruner none)"
            )

    # -- conversion ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuneConfig:
        """Build a config (not yet validated against the base; see :meth:`validate`).

        Raises:
            ValueError: unknown keys (the valid ones are listed).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tune config keys: {unknown}; valid keys are {sorted(known)}")
        return cls(**copy.deepcopy(dict(data)))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_kwargs(
    cls: type, options: Mapping[str, Any], what: str, reserved: Sequence[str] = ()
) -> None:
    """Raise ``ValueError`` if ``options`` holds keywords ``cls`` does not take."""
    accepted = set(inspect.signature(cls).parameters) - set(reserved)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"{what}: unknown options {unknown} for {cls.__name__}; valid: {sorted(accepted)}"
        )


def load_tune_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> TuneConfig:
    """A :class:`TuneConfig` from defaults, an optional JSON file and ``key=value`` overrides.

    Overrides follow :func:`eqloop.config.apply_overrides` (``n_trials=40``,
    ``base.steps=300``, ``space.lam.high=0.5``, ``loops=[8,16,32]``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file or unknown keys.
    """
    data = TuneConfig().to_dict()
    if path is not None:
        data.update(read_config_file(path, data, kind="tune config", toml=False))
    return TuneConfig.from_dict(apply_overrides(data, overrides))


# ------------------------------------------------------------------------------ storage


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``--storage`` value.

    Attributes:
        kind: ``"rdb"`` (an SQLAlchemy URL) or ``"journal"`` (a journal file).
        target: the URL or the journal file path.
        lock_path: file locked while a worker checks the budget and creates a trial
            (local files only), or None.
    """

    kind: str
    target: str
    lock_path: Path | None

    def display(self) -> str:
        """The storage without a password, for logs and reports."""
        if self.kind == "journal":
            return f"journal:{self.target}"
        from sqlalchemy.engine import make_url

        return make_url(self.target).render_as_string(hide_password=True)

    def dashboard_command(self) -> str:
        """The command that opens this storage in optuna-dashboard."""
        return f"optuna-dashboard {self.target if self.kind == 'journal' else self.display()}"


def default_storage(study_dir: str | os.PathLike[str]) -> str:
    """``sqlite:///<absolute study_dir>/study.db``."""
    return f"sqlite:///{Path(study_dir).resolve() / 'study.db'}"


def parse_storage(storage: str) -> StorageSpec:
    """Check the syntax of a storage: ``journal:PATH`` or an SQLAlchemy database URL.

    Raises:
        ValueError: an empty journal path, or a string that is not a database URL.
    """
    if not isinstance(storage, str) or not storage.strip():
        raise ValueError(f"storage must be a non-empty string, got {storage!r}")
    if storage.startswith("journal:"):
        path = storage[len("journal:") :]
        if not path:
            raise ValueError("journal storage needs a file: journal:PATH")
        file = Path(path).resolve()
        return StorageSpec("journal", str(file), file.with_name(file.name + ".eqloop-lock"))
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError as err:
        raise ValueError(
            f"invalid storage {storage!r}: expected journal:PATH or a database URL such as "
            "sqlite:///PATH, postgresql://USER:PASSWORD@HOST/DB or mysql://USER@HOST/DB"
        ) from err
    lock = None
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError(f"storage {storage!r}: a SQLite storage needs a file (sqlite:///PATH)")
        file = Path(url.database).resolve()
        storage = url.set(database=str(file)).render_as_string(hide_password=False)
        lock = file.with_name(file.name + ".eqloop-lock")
    return StorageSpec("rdb", storage, lock)


def open_storage(config: TuneConfig) -> tuple[optuna.storages.BaseStorage, StorageSpec]:
    """Open (creating if needed) the study's storage.

    RDB storages get a heartbeat (``heartbeat_interval``, ``grace_period``) whose stale
    trials are failed and queued again by ``RetryHeartbeatStaleTrialCallback``; SQLite
    waits up to 60 s for a lock held by another worker.

    Raises:
        ValueError: the storage cannot be opened (bad URL, missing database driver,
            unreachable server, unwritable file).
    """
    spec = parse_storage(config.storage or default_storage(config.study_dir))
    try:
        if spec.kind == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            Path(spec.target).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(spec.target)), spec
        engine_kwargs: dict[str, Any] = {}
        if spec.lock_path is not None:  # SQLite
            spec.lock_path.parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs["connect_args"] = {"timeout": 60}
        with warnings.catch_warnings():  # the heartbeat is "experimental" since 2.x
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                spec.target,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=config.heartbeat_interval,
                grace_period=config.grace_period,
                heartbeat_stale_trial_callback=RetryTrial(config.max_retry),
            )
        return storage, spec
    except Exception as err:  # driver import errors, connection errors, bad files
        raise ValueError(f"cannot open storage {spec.display()}: {err}") from err


class _FileLock:
    """An exclusive ``flock`` on a file, released at most once; a no-op without a path."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._path is None or self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------------- sampler, pruner

_SAMPLER_CLASSES: dict[str, type] = {
    "tpe": optuna.samplers.TPESampler,
    "gp": optuna.samplers.GPSampler,
    "random": optuna.samplers.RandomSampler,
}
_PRUNER_CLASSES: dict[str, type] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,  # keeps the top pruner_options["percentile"] %
    "hyperband": optuna.pruners.HyperbandPruner,
}


def make_sampler(config: TuneConfig, n_existing: int) -> optuna.samplers.BaseSampler:
    """The configured sampler.

    With ``sampler_seed`` its seed also depends on ``n_existing`` (trials already in the
    study), so a resumed study does not repeat its first suggestions. Workers started
    together with one seed would repeat each other's: give each worker its own seed or
    none.
    """
    seed = None
    if config.sampler_seed is not None:
        seed = (config.sampler_seed * 1_000_003 + n_existing) % (2**32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _SAMPLER_CLASSES[config.sampler](seed=seed, **config.sampler_options)


def make_pruner(config: TuneConfig, base: TrainConfig) -> optuna.pruners.BasePruner:
    """The configured pruner; Hyperband's resources are training steps by default."""
    name = config.resolved_pruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    options = dict(config.pruner_options)
    if name == "hyperband":
        options.setdefault("min_resource", base.eval_every)
        options.setdefault("max_resource", base.steps)
    return _PRUNER_CLASSES[name](**options)


# -------------------------------------------------------------------------- objectives


def objective_values(
    accuracy: Mapping[str, float], loops: Sequence[int], objective: str
) -> list[float]:
    """The objective value(s) from exact-match accuracies keyed by loop count.

    Args:
        accuracy: ``{"<loops>": accuracy}`` as in ``train``'s evaluation metrics.
        loops: the grid; every entry must be present in ``accuracy``.
        objective: ``deep_accuracy`` (``[mean]``) or ``multi`` (``[peak, drop]`` with
            ``drop = peak - accuracy at the largest loop count``).

    Raises:
        KeyError: a loop count of the grid is missing.
    """
    values = [float(accuracy[str(t)]) for t in loops]
    if objective == "deep_accuracy":
        return [sum(values) / len(values)]
    peak = max(values)
    return [peak, peak - float(accuracy[str(max(loops))])]


def _trial_train_config(
    base: TrainConfig,
    params: Mapping[str, Any],
    *,
    seed: int,
    run_dir: str | Path,
    resume: bool = False,
) -> TrainConfig:
    """The TrainConfig of one trial: ``base`` with ``params``, seed and run directory."""
    overrides = [f"{name}={json.dumps(value)}" for name, value in params.items()]
    overrides += [
        f"seed={seed}",
        f"out_dir={json.dumps(str(run_dir))}",
        f"resume={json.dumps(resume)}",
        "progress=false",
    ]
    return TrainConfig.from_dict(apply_overrides(base.to_dict(), overrides))


# ------------------------------------------------------------------------ worker identity


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "start": _process_start(pid),
    }


def _is_dead(worker: Mapping[str, Any]) -> bool:
    """True if ``worker`` ran on this machine and its process is gone (or is a zombie)."""
    if worker.get("host") != socket.gethostname() or worker.get("boot_id") != _boot_id():
        return False
    pid = worker.get("pid")
    if not _is_int(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    if state in ("Z", "X"):
        return True
    start = worker.get("start")
    return start is not None and _process_start(pid) not in (None, start)


class RetryTrial:
    """Queue a failed trial again: Optuna's ``RetryHeartbeatStaleTrialCallback``, minus
    the dead worker's identity (a queued copy must not look like its worker died).

    The copy keeps the parameters, user attributes and intermediate values; its system
    attribute ``failed_trial`` names the original trial (whose run directory and seed the
    retry reuses), ``retry_history`` all earlier attempts. At most ``max_retry`` retries.
    """

    def __init__(self, max_retry: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._callback = RetryHeartbeatStaleTrialCallback(
                max_retry, inherit_intermediate_values=True
            )

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.set_user_attr("worker", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._callback(study, trial)


def fail_dead_trials(study: optuna.Study, max_retry: int) -> list[int]:
    """Fail and queue again the RUNNING trials whose worker process on this host is gone.

    Returns:
        The numbers of the trials failed here.
    """
    failed = []
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not isinstance(worker, Mapping) or not _is_dead(worker):
            continue
        try:
            storage.set_trial_user_attr(
                trial._trial_id, "error", f"worker process {worker.get('pid')} died"
            )
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        RetryTrial(max_retry)(study, storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    return failed


# -------------------------------------------------------------------------- the budget


def _count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


_BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def _budget_left(study: optuna.Study, n_trials: int) -> bool:
    """Whether a new trial may start: a queued one exists, or fewer than ``n_trials`` count.

    Complete, pruned, running and waiting trials count (failed ones do not); a waiting
    trial is already counted, so running it never exceeds the budget.
    """
    if _count(study, TrialState.WAITING):
        return True
    return _count(study, *_BUDGET_STATES) < n_trials


def _surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """True if ``n_trials`` counted trials were created before trial ``number`` (a race)."""
    earlier = [
        t for t in study.get_trials(deepcopy=False, states=_BUDGET_STATES) if t.number < number
    ]
    return len(earlier) >= n_trials


class _BudgetReached(Exception):
    """A trial started after the budget was used up by concurrent workers."""


# --------------------------------------------------------------------------- one trial


@dataclass
class _Objective:
    """Runs one trial: parameters, run directory, training with pruning, attributes."""

    config: TuneConfig
    base: TrainConfig
    specs: list[ParamSpec]
    lock: _FileLock
    train_fn: Callable[..., dict[str, Any]]
    guard_surplus: bool  # no shared lock: fail a trial created past the budget in a race

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        trial.set_user_attr("worker", _worker_identity())
        self.lock.release()  # the trial exists: other workers may now count it
        if self.guard_surplus and _surplus(trial.study, trial.number, self.config.n_trials):
            trial.set_user_attr("surplus", True)
            raise _BudgetReached(f"trial {trial.number}: the study already has its trials")
        origin = _frozen(trial).system_attrs.get("failed_trial")  # set on retries
        number = trial.number if origin is None else origin
        params = {spec.name: spec.suggest(trial) for spec in self.specs}
        seed = self.base.seed + number if self.config.seed_per_trial else self.base.seed
        run_dir = self.config.out_dir / "trials" / f"trial_{number:05d}"
        if origin is None:
            _move_aside(run_dir)
        config = _trial_train_config(
            self.base, params, seed=seed, run_dir=run_dir, resume=origin is not None
        )
        for key, value in {
            "seed": seed,
            "run_dir": str(run_dir),
            "config_path": str(run_dir / "config.json"),
            "checkpoint_dir": str(run_dir / CHECKPOINT_DIR),
            "metrics_path": str(run_dir / "metrics.jsonl"),
            "retry_of": origin,
            "error": None,
            "steps": config.steps,
        }.items():
            trial.set_user_attr(key, value)
        return self._train(trial, config)

    def _train(self, trial: optuna.Trial, config: TrainConfig) -> float | list[float]:
        single = self.config.objective == "deep_accuracy"
        start = time.perf_counter()

        def on_eval(step: int, metrics: dict[str, Any]) -> None:
            trial.set_user_attr("steps_run", step)
            if not single:
                return
            value = objective_values(metrics["accuracy"], self.config.loops, "deep_accuracy")[0]
            with warnings.catch_warnings():  # a resumed retry re-reports inherited steps
                warnings.simplefilter("ignore")
                trial.report(value, step)
            if step < config.steps and trial.should_prune():
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"pruned at step {step}: {value:.4f}")

        try:
            result = self.train_fn(config, on_eval=on_eval)
        except optuna.TrialPruned:
            trial.set_user_attr("train_seconds", time.perf_counter() - start)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", _INTERRUPTED)
            RetryTrial(self.config.max_retry)(trial.study, _frozen(trial))
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        accuracy = result["eval"]["accuracy"]
        values = objective_values(accuracy, self.config.loops, self.config.objective)
        trial.set_user_attr("accuracy", accuracy)
        trial.set_user_attr("steps_run", result["step"])
        trial.set_user_attr("train_seconds", time.perf_counter() - start)
        return values[0] if single else values


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    """The stored state of a running trial (``Trial`` no longer exposes system attributes)."""
    return trial.study._storage.get_trial(trial._trial_id)


def _move_aside(run_dir: Path) -> None:
    """Rename a leftover run directory (from a storage that was reset) out of the way."""
    if not run_dir.exists():
        return
    for i in range(1, 10_000):
        target = run_dir.with_name(f"{run_dir.name}.old{i}")
        if not target.exists():
            os.replace(run_dir, target)
            warnings.warn(f"{run_dir} held an older run; moved it to {target}", stacklevel=3)
            return


# ---------------------------------------------------------------------------- the study


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (main thread only) so the trial is failed."""
    if sys.platform == "win32" or not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _study_signature(config: TuneConfig, base: TrainConfig) -> dict[str, Any]:
    """What a resumed study must share with the one in storage."""
    train = base.to_dict()
    for key in ("out_dir", "resume", "progress", "device", "data_cache_dir", "eval_loops"):
        train.pop(key)
    return _normalised(
        {
            "objective": config.objective,
            "loops": config.loops,
            "space": {s.name: s.to_dict() for s in config.param_specs()},
            "seed_per_trial": config.seed_per_trial,
            "base": train,
        }
    )


def _check_compatible(study: optuna.Study, config: TuneConfig, base: TrainConfig) -> None:
    """Raise ``ValueError`` if the stored study was made with another objective or setup."""
    expected = [optuna.study.StudyDirection[d.upper()] for d in config.directions]
    if list(study.directions) != expected:
        have = [d.name.lower() for d in study.directions]
        raise ValueError(
            f"study {study.study_name!r} optimises {have}, but objective "
            f"{config.objective!r} needs {config.directions}; use another --study-name"
        )
    signature = _study_signature(config, base)
    stored = study.user_attrs.get(_STUDY_ATTR)
    if stored is None:
        study.set_user_attr(_STUDY_ATTR, signature)
        return
    differ = sorted(k for k in signature if stored.get(k) != signature[k])
    if "base" in differ:
        keys = sorted(k for k in signature["base"] if stored["base"].get(k) != signature["base"][k])
        differ[differ.index("base")] = f"base ({', '.join(keys)})"
    if differ:
        raise ValueError(
            f"study {study.study_name!r} in this storage was created with a different "
            f"{', '.join(differ)}; resume it with its original settings or use another "
            "--study-name"
        )


def load_study(config: TuneConfig) -> tuple[optuna.Study, StorageSpec, TrainConfig]:
    """Validate ``config``, open the storage and create or load the study.

    Nothing is trained; every error is raised before a trial starts.

    Raises:
        ValueError: invalid config, storage or an incompatible stored study.
        FileNotFoundError: ``base_config`` does not exist.
    """
    base = config.validate()
    spec = parse_storage(config.storage or default_storage(config.study_dir))
    lock = _FileLock(spec.lock_path)
    lock.acquire()  # workers starting together must not both create tables or the study
    try:
        storage, spec = open_storage(config)
        try:
            existing = _trial_count(storage, config.study_name)
        except Exception as err:
            raise ValueError(f"cannot read storage {spec.display()}: {err}") from err
        study = optuna.create_study(
            storage=storage,
            sampler=make_sampler(config, existing),
            pruner=make_pruner(config, base),
            study_name=config.study_name,
            directions=config.directions,
            load_if_exists=True,
        )
        _check_compatible(study, config, base)
    finally:
        lock.release()
    return study, spec, base


def _trial_count(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def run_study(
    config: TuneConfig, *, train_fn: Callable[..., dict[str, Any]] | None = None
) -> optuna.Study:
    """Run trials of the configured study until it holds ``n_trials`` of them.

    Several processes may call this on one storage (see the module docstring). When the
    worker stops (budget reached, ``timeout``, ``max_failed``) the report is written
    (:func:`write_report`).

    Args:
        config: the study.
        train_fn: the training function (default :func:`eqloop.train.train`).

    Returns:
        The study (all trials, including those of other workers).

    Raises:
        ValueError: invalid config or storage, raised before any trial starts.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the running trial is failed and queued
            again, the report is still written.
    """
    study, spec, base = load_study(config)
    if train_fn is None:
        from eqloop.train import train as train_fn
    lock = _FileLock(spec.lock_path)
    objective = _Objective(
        config, base, config.param_specs(), lock, train_fn, guard_surplus=spec.lock_path is None
    )
    max_failed = config.max_failed or config.n_trials
    started = time.monotonic()
    bar = _TrialBar(study, config)
    try:
        with _sigterm_as_interrupt():
            while config.timeout is None or time.monotonic() - started < config.timeout:
                if _count(study, TrialState.FAIL) >= max_failed:
                    bar.write(f"stopping: the study has {max_failed} failed trials", notice=True)
                    break
                if not _next_trial(study, config, objective, lock, bar):
                    break
    finally:
        bar.close()
        write_report(study, config, spec, base)
    return study


def _next_trial(
    study: optuna.Study,
    config: TuneConfig,
    objective: _Objective,
    lock: _FileLock,
    bar: _TrialBar,
) -> bool:
    """Run one trial if the budget allows; False when this worker should stop."""
    lock.acquire()
    try:
        for number in fail_dead_trials(study, config.max_retry):
            bar.write(f"trial {number}: its worker died; marked FAIL and queued again", notice=True)
        with warnings.catch_warnings():  # stale heartbeats (RDB): fail and queue again
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if not _budget_left(study, config.n_trials):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[bar.callback])
    finally:
        lock.release()
    return True


class _TrialBar:
    """tqdm bar over the study's finished trials, one line per trial this worker ran."""

    def __init__(self, study: optuna.Study, config: TuneConfig) -> None:
        self._config = config
        self._bar = tqdm(
            total=config.n_trials,
            initial=min(_count(study, TrialState.COMPLETE, TrialState.PRUNED), config.n_trials),
            desc=f"study {config.study_name}",
            unit="trial",
            disable=not config.progress,
            dynamic_ncols=True,
        )

    def write(self, message: str, *, notice: bool = False) -> None:
        """Print above the bar; without progress output only if ``notice`` (to stderr)."""
        if self._config.progress:
            self._bar.write(message)
        elif notice:
            print(message, file=sys.stderr)

    def callback(self, study: optuna.Study, trial: FrozenTrial) -> None:
        done = _count(study, TrialState.COMPLETE, TrialState.PRUNED)
        self._bar.n = min(done, self._config.n_trials)
        if len(study.directions) == 1 and _count(study, TrialState.COMPLETE):
            self._bar.set_postfix(best=f"{study.best_value:.4f}", refresh=False)
        self._bar.refresh()
        self.write(_trial_line(trial))

    def close(self) -> None:
        self._bar.close()


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _trial_line(trial: FrozenTrial) -> str:
    params = " ".join(f"{k}={_format_value(v)}" for k, v in trial.params.items())
    line = f"trial {trial.number} {trial.state.name.lower()} {params}"
    if trial.values is not None:
        line += " -> " + ", ".join(f"{v:.4f}" for v in trial.values)
    elif trial.state == TrialState.PRUNED:
        line += f" at step {trial.user_attrs.get('pruned_at_step')}"
    if trial.user_attrs.get("error"):
        line += f" ({trial.user_attrs['error']})"
    return line


# ------------------------------------------------------------------------------ report


def pruning_savings(study: optuna.Study) -> dict[str, Any]:
    """Training steps the pruned trials ran versus the steps they would have run.

    Returns:
        ``n_pruned``, ``steps_run_pruned`` and ``steps_full_pruned`` (their steps run
        and their full budgets), ``steps_saved``, ``steps_run_total`` (complete and
        pruned trials) and ``saved_fraction`` (saved / what all those trials would have
        run unpruned; 0 when nothing finished).
    """
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    run = full = run_pruned = full_pruned = 0
    n_pruned = 0
    for trial in finished:
        steps = int(trial.user_attrs.get("steps", 0))
        done = int(trial.user_attrs.get("steps_run", steps))
        run, full = run + done, full + steps
        if trial.state == TrialState.PRUNED:
            n_pruned += 1
            run_pruned, full_pruned = run_pruned + done, full_pruned + steps
    return {
        "n_pruned": n_pruned,
        "steps_run_pruned": run_pruned,
        "steps_full_pruned": full_pruned,
        "steps_saved": full_pruned - run_pruned,
        "steps_run_total": run,
        "saved_fraction": (full - run) / full if full else 0.0,
    }


def _trial_record(trial: FrozenTrial, names: Sequence[str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "params": trial.params,
    }
    if trial.values is not None:
        record["values"] = dict(zip(names, trial.values, strict=True))
    keys = (
        "accuracy",
        "seed",
        "run_dir",
        "config_path",
        "checkpoint_dir",
        "metrics_path",
        "steps_run",
        "train_seconds",
    )
    record.update({k: trial.user_attrs[k] for k in keys if k in trial.user_attrs})
    if "config_path" in record:
        record["rerun"] = (
            f"eqloop train --config {record['config_path']} --out-dir {record['run_dir']}-rerun"
        )
    return record


def _best(study: optuna.Study, names: Sequence[str]) -> Any:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) == 1:
        return _trial_record(study.best_trial, names)
    return [_trial_record(t, names) for t in sorted(study.best_trials, key=lambda t: t.number)]


def write_report(
    study: optuna.Study,
    config: TuneConfig,
    spec: StorageSpec | None = None,
    base: TrainConfig | None = None,
) -> dict[str, Path]:
    """Write ``best_params.json``, ``trials.csv`` and the plots into ``config.out_dir``.

    Returns:
        ``{"best_params": path, "trials_csv": path, "history_plot": path,
        "objective_plot": path}`` (plots only with ``config.plots``).
    """
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    spec = spec or parse_storage(config.storage or default_storage(config.study_dir))
    names = OBJECTIVE_NAMES[config.objective]
    states = {s.name: _count(study, s) for s in TrialState}
    summary = {
        "study_name": study.study_name,
        "storage": spec.display(),
        "dashboard": spec.dashboard_command(),
        "objective": config.objective,
        "objectives": dict(zip(names, config.directions, strict=True)),
        "loops": config.loops,
        "space": {s.name: s.to_dict() for s in config.param_specs()},
        "trials": {k.lower(): v for k, v in states.items() if v},
        "pruning": pruning_savings(study),
        "best" if len(names) == 1 else "pareto_front": _best(study, names),
    }
    if base is not None:
        summary["base"] = base.to_dict()
    paths = {"best_params": out / "best_params.json", "trials_csv": out / "trials.csv"}
    write_json_atomic(paths["best_params"], summary)
    _write_atomic(paths["trials_csv"], lambda p: study.trials_dataframe().to_csv(p, index=False))
    if config.plots:
        paths["history_plot"] = out / "history.png"
        paths["objective_plot"] = out / "objective_vs_params.png"
        _write_atomic(paths["history_plot"], lambda p: plot_history(study, names, p))
        _write_atomic(
            paths["objective_plot"], lambda p: plot_objective_vs_params(study, config, names, p)
        )
    return paths


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _last_intermediate(trial: FrozenTrial) -> float | None:
    if not trial.intermediate_values:
        return None
    return trial.intermediate_values[max(trial.intermediate_values)]


def plot_history(study: optuna.Study, names: Sequence[str], path: Path) -> None:
    """Objective value per trial number, the running best, pruned trials at their last value."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    for i, (ax, name) in enumerate(zip(axes[0], names, strict=True)):
        xs = [t.number for t in complete]
        ys = [t.values[i] for t in complete]
        ax.plot(xs, ys, "o", color="C0", label="complete")
        if len(names) == 1 and ys:
            best = _running_best(ys, study.direction == optuna.study.StudyDirection.MAXIMIZE)
            ax.step(xs, best, where="post", color="C1", label="best so far")
            px = [(t.number, _last_intermediate(t)) for t in pruned]
            px = [(x, y) for x, y in px if y is not None]
            if px:
                ax.plot(*zip(*px, strict=True), "x", color="C3", label="pruned (last report)")
        style_axis(ax, "trial", name)
    fig.suptitle(f"study {study.study_name}: optimization history")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _running_best(values: Sequence[float], maximize: bool) -> list[float]:
    out, best = [], None
    for v in values:
        best = v if best is None else (max(best, v) if maximize else min(best, v))
        out.append(best)
    return out


def plot_objective_vs_params(
    study: optuna.Study, config: TuneConfig, names: Sequence[str], path: Path
) -> None:
    """One panel per (searched parameter, objective); log axis for log-scaled parameters."""
    plt = pyplot()
    specs = config.param_specs()
    fig, axes = plt.subplots(
        len(names), len(specs), figsize=(5 * len(specs), 4 * len(names)), squeeze=False
    )
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    for row, name in enumerate(names):
        for col, spec in enumerate(specs):
            ax = axes[row][col]
            pts = [(t.params[spec.name], t.values[row]) for t in complete if spec.name in t.params]
            if pts:
                ax.plot(
                    *zip(*sorted(pts, key=lambda p: str(p[0])), strict=True),
                    "o",
                    color="C0",
                    label="complete",
                )
            if len(names) == 1:
                px = [(t.params.get(spec.name), _last_intermediate(t)) for t in pruned]
                px = [(x, y) for x, y in px if x is not None and y is not None]
                if px:
                    ax.plot(*zip(*px, strict=True), "x", color="C3", label="pruned (last report)")
            if spec.log:
                ax.set_xscale("log")
            style_axis(ax, spec.name, name)
    fig.suptitle(f"study {study.study_name}: objective vs parameters (loops {config.loops})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def trial_table(study: optuna.Study, config: TuneConfig) -> str:
    """A plain-text table of the finished trials sorted by the first searched parameter."""
    names = OBJECTIVE_NAMES[config.objective]
    specs = [s.name for s in config.param_specs()]
    rows = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    rows = sorted(rows, key=lambda t: (str(type(t.params.get(specs[0]))), t.params.get(specs[0])))
    header = ["trial", *specs, "state", "steps", *names]
    lines = [header]
    for t in rows:
        values = t.values or [_last_intermediate(t)] + [None] * (len(names) - 1)
        lines.append(
            [
                str(t.number),
                *(_format_value(t.params.get(s)) for s in specs),
                t.state.name.lower(),
                str(t.user_attrs.get("steps_run", "")),
                *("" if v is None else f"{v:.4f}" for v in values),
            ]
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in lines)


# --------------------------------------------------------------------------------- CLI

_EPILOG = """\
Several workers: start the same command in several shells (or on several machines with a
server or journal storage); --n-trials is the total for the study.

Inspect a study:  optuna-dashboard sqlite:///runs/tune/study.db
                  optuna-dashboard runs/tune/journal.log   (journal storage)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``eqloop tune`` argument parser."""
    p = argparse.ArgumentParser(
        prog="eqloop tune",
        description=(
            "Optuna study whose trials are eqloop training runs (default: the STARS penalty "
            "weight lam, log-uniform in [1e-3, 1]). Settings come from the defaults, then "
            "--config, then --set overrides, then the explicit flags."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(
        p,
        file_help="JSON file with TuneConfig fields",
        example="--set base.steps=300 --set space.lam.high=0.5 --set loops=[8,16,32]",
    )
    p.add_argument("--base-config", help="TrainConfig file (JSON/TOML) with the fixed settings")
    p.add_argument("--study-name", help="study name (default stars-lam)")
    p.add_argument("--study-dir", help="directory for the default SQLite file and outputs")
    p.add_argument(
        "--storage",
        help="sqlite:///PATH, postgresql://..., mysql://... or "
        "journal:PATH (default: sqlite:///<study-dir>/study.db)",
    )
    p.add_argument("--n-trials", type=int, help="trials in total for the study")
    p.add_argument("--timeout", type=float, help="seconds after which this worker stops")
    p.add_argument("--objective", help=f"one of {', '.join(OBJECTIVES)}")
    p.add_argument("--pruner", help=f"one of {', '.join(PRUNERS)} (default median; none for multi)")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default tpe)")
    p.add_argument("--sampler-seed", type=int, help="seed of the sampler")
    p.add_argument(
        "--search",
        help="comma-separated parameters to search, with default "
        f"ranges where not configured: {', '.join(DEFAULT_RANGES)}",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or trial lines")
    p.add_argument(
        "--report-only", action="store_true", help="run no trials; rewrite the JSON, CSV and plots"
    )
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    return p


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """The :class:`TuneConfig` described by parsed ``eqloop tune`` arguments.

    Raises:
        ValueError: unknown names in ``--search`` or in the config.
    """
    config = load_tune_config(args.config, args.overrides)
    flags = {
        "base_config": args.base_config,
        "study_name": args.study_name,
        "study_dir": args.study_dir,
        "storage": args.storage,
        "n_trials": args.n_trials,
        "timeout": args.timeout,
        "objective": args.objective,
        "pruner": args.pruner,
        "sampler": args.sampler,
        "sampler_seed": args.sampler_seed,
    }
    for key, value in flags.items():
        if value is not None:
            setattr(config, key, value)
    if args.no_progress:
        config.progress = False
    if args.search is not None:
        config.space = _search_space(args.search, config.space)
    return config


def _search_space(names: str, configured: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters named in ``--search``, with their configured or default ranges."""
    space = {}
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name in configured:
            space[name] = configured[name]
        elif name in DEFAULT_RANGES:
            space[name] = {}
        else:
            raise ValueError(
                f"--search {name}: no range configured and no default range; "
                f"defaults exist for {list(DEFAULT_RANGES)}"
            )
    return space


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``eqloop tune``; returns the exit status (2 on invalid settings)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    try:
        config = config_from_args(args)
        if args.print_config:
            config.validate()
            space = {s.name: s.to_dict() for s in config.param_specs()}
            print(json.dumps({**config.to_dict(), "space": space}, indent=2))
            return 0
        if args.report_only:
            study, spec, base = load_study(config)
            paths = write_report(study, config, spec, base)
        else:
            study = run_study(config)
            paths = {k: config.out_dir / v for k, v in _REPORT_FILES.items()}
    except (ValueError, FileNotFoundError) as err:
        print(f"eqloop tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "eqloop tune: interrupted; the running trial was failed and queued again",
            file=sys.stderr,
        )
        return 130
    print(trial_table(study, config))
    print(json.dumps({"pruning": pruning_savings(study)}))
    for path in paths.values():
        if path.exists():
            print(f"wrote {path}")
    return 0


_REPORT_FILES = {
    "best_params": "best_params.json",
    "trials_csv": "trials.csv",
    "history_plot": "history.png",
    "objective_plot": "objective_vs_params.png",
}


if __name__ == "__main__":
    sys.exit(main())
