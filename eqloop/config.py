"""The training configuration: one dataclass, loaded from JSON or TOML, overridable by flags.

Example::

    config = load_config("add3.json", overrides=["lam=0.1", "model.d_model=64",
                                                 'depth={"kind": "fixed", "t": 8}'])

Every check runs in :meth:`TrainConfig.validate`, before a training run writes anything.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from eqloop.data import TASKS, make_arithmetic_dataset
from eqloop.depth import make_depth_sampler
from eqloop.implicit import BACKWARD_MODES
from eqloop.model import LoopLMConfig

__all__ = [
    "PENALTY_POINTS",
    "SCHEDULES",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "read_config_file",
]

SCHEDULES: tuple[str, ...] = ("cosine", "constant")
PENALTY_POINTS: tuple[str, ...] = ("trajectory", "fixed_point")


def _default_model() -> LoopLMConfig:
    """The CPU recipe's LoopLM: prelude, one post-sandwich core block, coda; d=64.

    (The paper's addition model is one d=512, 8-head, FFN-1024 block.) ``init_std=0.1``
    instead of 0.02 shortens the initial loss plateau of such a narrow model severalfold.
    """
    return LoopLMConfig(
        vocab_size=19, d_model=64, n_heads=8, d_ff=256, max_seq_len=32, n_prelude=1,
        n_coda=1, init_std=0.1,
    )  # fmt: skip


def _default_depth() -> dict[str, Any]:
    """The STARS addition sampler: clamp(round(LogNormal(2, 0.7)), 1, 100)."""
    return {"kind": "lognormal", "mu": 2.0, "sigma": 0.7, "lo": 1, "hi": 100}


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``eqloop.train``)."""

    # -- model and data ------------------------------------------------------------------
    model: LoopLMConfig = field(default_factory=_default_model)  # vocab >= 19 for arithmetic
    task: str = "addition"  # one of eqloop.data.TASKS
    digits: int = 3  # operand length of train and test problems
    n_train: int = 100000  # distinct training problems (of 900k 3-digit additions)
    n_test: int = 1000  # distinct test problems for exact-match evaluation
    seed: int = 0  # seeds the weights, data draw and order, depth draws and penalty vectors
    # Start from the weights of this checkpoint or run directory (same model config) instead
    # of a random init; optimiser, schedule and depth sampler start fresh. None: random init.
    init_from: str | None = None
    data_cache_dir: str | None = None  # dataset cache (None: eqloop.data.default_cache_dir())
    # -- optimisation --------------------------------------------------------------------
    batch_size: int = 64  # global batch; DDP ranks each take batch_size / world_size rows
    steps: int = 1500  # optimisation steps
    lr: float = 3e-3  # peak learning rate of AdamW
    weight_decay: float = 0.01  # AdamW weight decay on matrices (not on biases, norms)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW moment decay rates
    warmup_steps: int = 100  # linear learning-rate warm-up from lr / warmup_steps
    schedule: str = "cosine"  # after warm-up: "cosine" decay to min_lr_ratio * lr | "constant"
    min_lr_ratio: float = 0.1  # final learning rate of the cosine schedule, relative to lr
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    # -- loops ---------------------------------------------------------------------------
    depth: dict[str, Any] = field(default_factory=_default_depth)  # make_depth_sampler kwargs
    backward: str = "unroll"  # "unroll" (paper: through all loops) | ift | phantom | truncated
    backward_options: dict[str, Any] = field(default_factory=dict)  # extra fixed_point kwargs
    # -- STARS penalty -------------------------------------------------------------------
    lam: float = 0.1  # loss = (1 - lam) * CE + lam * JSRR once the penalty is on; in [0, 1]
    penalty_start: int = 400  # first step with the penalty (paper: after 20% of training)
    penalty_every: int = 1  # apply the penalty every n-th step from penalty_start on
    power_steps: int = 1  # Jacobian products per penalty (paper: 1)
    penalty_target: float | None = None  # hinge relu(||J v|| - target)^2; None: ||J v||^2
    # Where the penalty's Jacobian is taken: "trajectory" (paper: the state after the sampled
    # loops) | "fixed_point" (the core's equilibrium, solved from that state without a graph).
    penalty_at: str = "trajectory"
    # > 0: the product starts from the dominant Ritz vector of this many Arnoldi steps, so
    # ||J v|| estimates rho(J) (forward-mode product); 0: a random vector (paper).
    penalty_arnoldi: int = 0
    # -- evaluation, checkpoints, logging ------------------------------------------------
    eval_every: int = 500  # exact-match evaluation every n steps (0: only at the end)
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # loop counts
    checkpoint_every: int = 500  # checkpoint every n steps (0: only at the end)
    out_dir: str = "runs/eqloop"  # run directory: config, metrics.jsonl, checkpoints/
    resume: bool = False  # continue from out_dir's latest checkpoint if there is one
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda"
    progress: bool = True  # tqdm progress bar (rank 0)

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            self.model = LoopLMConfig.from_dict(self.model)
        self.betas = tuple(self.betas)
        self.eval_loops = list(self.eval_loops)

    # -- checks ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the field and what is allowed."""
        if not isinstance(self.model, LoopLMConfig):
            raise ValueError(f"model must be a LoopLMConfig or a dict, got {self.model!r}")
        self.model.validate()
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid tasks: {list(TASKS)}")
        for name, low in (
            ("digits", 1),
            ("n_train", 1),
            ("n_test", 1),
            ("seed", 0),
            ("batch_size", 1),
            ("steps", 1),
            ("warmup_steps", 0),
            ("penalty_start", 0),
            ("penalty_every", 1),
            ("power_steps", 1),
            ("penalty_arnoldi", 0),
            ("eval_every", 0),
            ("checkpoint_every", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.n_train < self.batch_size:
            raise ValueError(f"n_train ({self.n_train}) must be >= batch_size ({self.batch_size})")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)):
            raise ValueError(f"lam must be a number in [0, 1], got {self.lam!r}")
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam must lie in [0, 1], got {self.lam!r}")
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        target = self.penalty_target
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, float)) or not target >= 0
        ):
            raise ValueError(f"penalty_target must be None or a number >= 0, got {target!r}")
        if self.penalty_at not in PENALTY_POINTS:
            raise ValueError(
                f"unknown penalty_at {self.penalty_at!r}; valid: {list(PENALTY_POINTS)}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {list(SCHEDULES)}")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"unknown backward {self.backward!r}; valid: {list(BACKWARD_MODES)}")
        if self.backward == "unroll" and self.backward_options:
            raise ValueError(
                f"backward_options {sorted(self.backward_options)} need backward != 'unroll'"
            )
        if not self.eval_loops or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.eval_loops
        ):
            raise ValueError(f"eval_loops must be integers >= 0, got {self.eval_loops!r}")
        if not isinstance(self.depth, Mapping) or "kind" not in self.depth:
            raise ValueError(f"depth must be a dict with a 'kind' key, got {self.depth!r}")
        self.make_sampler()  # raises ValueError on bad kinds and parameters
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ValueError(f"init_from must be a path string or None, got {self.init_from!r}")
        if not self.device.startswith(("auto", "cpu", "cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")

    def make_sampler(self) -> Any:
        """A fresh depth sampler (seeded with ``seed``) from the ``depth`` dict."""
        params = {k: v for k, v in self.depth.items() if k != "kind"}
        return make_depth_sampler(self.depth["kind"], seed=self.seed, **params)

    def make_dataset(self, split: str) -> Any:
        """The run's ``"train"`` (``n_train`` rows) or ``"test"`` split, a ``datasets.Dataset``.

        Both come from one seeded draw, so they are disjoint (see ``eqloop.data``).
        """
        n = {"train": self.n_train, "test": self.n_test}.get(split)
        if n is None:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return make_arithmetic_dataset(
            self.task, self.digits, n, self.seed, split=split, cache_dir=self.data_cache_dir
        )

    # -- conversion ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict (``model`` nested)."""
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config; missing keys take their defaults.

        Raises:
            ValueError: unknown keys (the valid ones are listed) or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}; valid keys are {sorted(known)}")
        config = cls(**copy.deepcopy(dict(data)))
        config.validate()
        return config


def _parse_value(text: str) -> Any:
    """JSON if it parses (numbers, booleans, lists, objects, null), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a config dict; dotted keys reach nested dicts.

    Values are parsed as JSON when possible (``lam=0.1``, ``resume=true``,
    ``eval_loops=[1,4,16]``, ``depth={"kind":"fixed","t":8}``), else kept as strings
    (``task=addition``). ``model.d_model=64`` and ``depth.hi=16`` set nested entries.

    Returns:
        A new dict; ``data`` is not modified.

    Raises:
        ValueError: an override without ``=`` or a dotted key whose parent is not a dict.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        *parents, leaf = key.strip().split(".")
        node = out
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if isinstance(child, LoopLMConfig):
                child = node[part] = child.to_dict()
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[: i + 1])} is not a dict")
            node = child
        node[leaf] = _parse_value(text.strip())
    return out


def _read_toml(file: Path) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError(f"reading {file} needs Python >= 3.11 (tomllib); use JSON") from None
    return tomllib.loads(file.read_text())


def read_config_file(
    path: str | os.PathLike[str], valid: Mapping[str, Any], *, kind: str, toml: bool
) -> dict[str, Any]:
    """The top-level object of a config file, checked against the valid keys.

    Args:
        path: a ``.json`` file, or ``.toml`` when ``toml`` is true.
        valid: the defaults; only their keys may appear in the file.
        kind: the config's name in the unknown-keys message (``"TrainConfig"``).
        toml: accept TOML files.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, not an object, or unknown keys.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such config file: {file}")
    try:
        is_toml = toml and file.suffix == ".toml"
        loaded = _read_toml(file) if is_toml else json.loads(file.read_text())
    except ValueError as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"cannot parse config file {file}: {err}") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {file} must hold an object{'/table' if toml else ''}")
    unknown = sorted(set(loaded) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {kind} keys in {file}: {unknown}; valid keys are {sorted(valid)}"
        )
    return loaded


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> TrainConfig:
    """A validated :class:`TrainConfig` from defaults, an optional file and overrides.

    Args:
        path: a ``.json`` or ``.toml`` file holding a (partial) config; nested tables or
            objects for ``model`` and ``depth``.
        overrides: ``key=value`` strings applied after the file (see
            :func:`apply_overrides`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, unknown keys or invalid values.
    """
    data: dict[str, Any] = TrainConfig().to_dict()
    if path is not None:
        loaded = read_config_file(path, data, kind="TrainConfig", toml=True)
        model = {**data["model"], **loaded.pop("model", {})}
        data.update(loaded, model=model)
    return TrainConfig.from_dict(apply_overrides(data, overrides))
