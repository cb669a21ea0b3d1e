"""The training configuration: :class:`TrainConfig` (and its forward solve, :class:`SolveConfig`).

:class:`TrainConfig` is one dataclass (a :class:`~eqloop.config.ConfigBase`), loaded from
JSON or TOML by :func:`eqloop.config.load_config_data`, overridable by flags.

Example::

    config = load_config("add3.json", overrides=["lam=0.1", "model.d_model=64",
                                                 'depth={"kind": "fixed", "t": 8}'])

Command-line values are parsed by the type of the field they set (see
:mod:`eqloop.config`): ``resume=no`` is ``False``, ``betas=0.9,0.95`` a tuple,
``eval_loops=1,2,4`` a list, and text that does not fit the type is an error naming the
field. Every check runs in :meth:`TrainConfig.validate`, before a training run writes
anything.

This module imports the model, data and backward layers only inside the functions that
need them, so reading and printing a configuration stays cheap.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from eqloop.config import (
    ConfigBase,
    apply_overrides,
    load_config_data,
)
from solvers import checks

if TYPE_CHECKING:
    from eqloop.core.backward import Backward
    from eqloop.data import Examples
    from eqloop.models.looplm.modeling import LoopLMConfig
    from eqloop.training.depth import DepthSampler

__all__ = [
    "PENALTY_POINTS",
    "SCHEDULES",
    "SOLVE_BACKWARDS",
    "SolveConfig",
    "TrainConfig",
    "TrainingConfigMixin",
    "apply_overrides",
    "check_backward",
    "check_device",
    "check_penalty_start",
    "check_run_options",
    "load_config",
    "penalty_start_step",
]

SCHEDULES: tuple[str, ...] = ("cosine", "constant")
PENALTY_POINTS: tuple[str, ...] = ("trajectory", "fixed_point")

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

SOLVE_BACKWARDS: tuple[str, ...] = ("ift", "phantom")
"""Backward modes that take their gradient at the point a training solve returned."""


@dataclass
class SolveConfig(ConfigBase):
    """The forward solve of a training step that trains at the fixed point.

    With ``TrainConfig.solve`` set, every step solves the core to its equilibrium z*
    (from the loop's z0, after ``start_loops`` plain loops) instead of running the
    sampled loop count, and the backward mode (``ift`` or ``phantom``) takes its gradient
    at the point the solver returned. Sequences whose solve ends without meeting ``tol``
    are counted in the step's metrics (``fwd_converged``), never silently treated as
    fixed points; with ``skip_unconverged`` they also add nothing to the step's CE, so no
    implicit gradient is taken at a point that is not a fixed point (the penalty still
    sees them).
    """

    solver: str = "anderson"  # a registered solver (solvers.available())
    tol: float = 1e-4  # tolerance on the residual chosen by stop_mode; > 0
    max_iter: int = 30  # budget of f-evaluations of the solve (after start_loops)
    start_loops: int = 0  # plain loops run before the solver starts (no graph under ift/phantom)
    stop_mode: str = "rel"  # "rel" (||f(z) - z|| / ||f(z)||) | "abs" (||f(z) - z||)
    solver_options: dict[str, Any] = field(default_factory=dict)  # hyperparameters, e.g. {"m": 5}
    skip_unconverged: bool = False  # unconverged sequences add no CE (their tokens weigh 0)

    config_name: ClassVar[str] = "solve"  # as its messages name its fields: solve.<field>

    def validate(self) -> None:
        """Check every field (messages name them as ``solve.<field>``).

        Raises:
            TypeError: a field of the wrong type.
            ValueError: an unknown solver (the registered ones are listed) or stop mode,
                ``tol <= 0``, ``max_iter < 1``, ``start_loops < 0``, or solver options
                the solver does not take.
        """
        import solvers

        checks.choice("solve.solver", self.solver, solvers.available())
        checks.number("solve.tol", self.tol, low=0, low_open=True)
        checks.integer("solve.max_iter", self.max_iter, low=1)
        checks.integer("solve.start_loops", self.start_loops, low=0)
        checks.choice("solve.stop_mode", self.stop_mode, ("rel", "abs"))
        if not isinstance(self.skip_unconverged, bool):
            raise TypeError(
                f"solve.skip_unconverged must be true or false, got {self.skip_unconverged!r}"
            )
        if not isinstance(self.solver_options, dict):
            raise TypeError(
                f'solve.solver_options must be a dict such as {{"m": 5}}, got '
                f"{self.solver_options!r}"
            )
        try:
            solvers.make_solver(self.solver, **self.solver_options)
        except (TypeError, ValueError) as err:
            raise type(err)(f"solve.solver_options: {err}") from None


def check_backward(
    backward: str,
    options: Any,
    solve: Any,
    *,
    modes: tuple[str, ...] | None = None,
) -> None:
    """Check a config's ``backward``, ``backward_options`` and ``solve`` (train, finetune).

    Args:
        backward: the backward mode's name.
        options: its ``backward_options`` (a dict of the mode's fields).
        solve: the ``solve`` section: None or a :class:`SolveConfig`; with it, the
            backward must take its gradient at the solver's point (:data:`SOLVE_BACKWARDS`).
        modes: the names the config accepts (default: every mode of ``eqloop.core.backward``).

    Raises:
        TypeError: ``solve`` or ``options`` of the wrong type, or an option the mode lacks.
        ValueError: an unknown mode, a bad ``solve`` field, a backward that cannot follow a
            solve, or a bad option value.
    """
    from eqloop.core.backward import BACKWARD_MODES, make_backward

    checks.choice("backward", backward, modes or BACKWARD_MODES)
    if solve is not None:
        if not isinstance(solve, SolveConfig):
            raise TypeError(
                f"solve must be None or a dict of SolveConfig fields such as "
                f'{{"solver": "anderson", "tol": 1e-4}}, got {solve!r}'
            )
        solve.validate()
        if backward not in SOLVE_BACKWARDS:
            raise ValueError(
                f"solve trains at the fixed point the solver returns, so backward must "
                f"be one of {SOLVE_BACKWARDS}, got {backward!r}; for backprop "
                "through the sampled loops ('unroll', 'truncated') set solve=null"
            )
    if not isinstance(options, dict):
        raise TypeError(f"backward_options must be a dict, got {options!r}")
    try:
        make_backward(backward, **options)
    except TypeError as err:  # a field the mode does not have, or of the wrong type
        raise TypeError(f"backward_options: {err}") from None
    except ValueError as err:
        raise ValueError(f"backward_options: {err}") from None


def _default_model() -> LoopLMConfig:
    """The CPU recipe's LoopLM: prelude, one post-sandwich core block, coda; d=64.

    (The paper's addition model is one d=512, 8-head, FFN-1024 block.) ``init_std=0.1``
    instead of 0.02 shortens the initial loss plateau of such a narrow model severalfold.
    """
    from eqloop.models.looplm.modeling import LoopLMConfig

    return LoopLMConfig(
        vocab_size=19,
        d_model=64,
        n_heads=8,
        d_ff=256,
        max_seq_len=32,
        n_prelude=1,
        n_coda=1,
        init_std=0.1,
    )


def _default_depth() -> dict[str, Any]:
    """The STARS addition sampler: clamp(round(LogNormal(2, 0.7)), 1, 100)."""
    return {"kind": "lognormal", "mu": 2.0, "sigma": 0.7, "lo": 1, "hi": 100}


def _model_type_names() -> dict[str, Any]:
    """The names TrainConfig's type hints use that this module imports lazily."""
    from eqloop.models.looplm.modeling import LoopLMConfig

    return {"LoopLMConfig": LoopLMConfig}


class TrainingConfigMixin:
    """What a training config builds from the fields ``TrainConfig`` and ``FinetuneConfig``
    share: the backward mode (``backward``, ``backward_options``) and the depth sampler
    (``depth``, ``seed``)."""

    backward: str
    backward_options: dict[str, Any]
    depth: dict[str, Any]
    seed: int

    def make_backward(self) -> Backward:
        """The backward mode object (``eqloop.core.backward``) of ``backward`` and its options."""
        from eqloop.core.backward import make_backward

        return make_backward(self.backward, **self.backward_options)

    def make_sampler(self) -> DepthSampler:
        """A fresh depth sampler (seeded with ``seed``) from the ``depth`` dict.

        Raises:
            TypeError: ``depth`` is not a dict with a ``"kind"`` key.
            ValueError: an unknown kind or bad parameters (:func:`make_depth_sampler`).
        """
        from eqloop.training.depth import make_depth_sampler

        if not isinstance(self.depth, Mapping) or "kind" not in self.depth:
            raise TypeError(f"depth must be a dict with a 'kind' key, got {self.depth!r}")
        params = {k: v for k, v in self.depth.items() if k != "kind"}
        return make_depth_sampler(self.depth["kind"], seed=self.seed, **params)


@dataclass
class TrainConfig(TrainingConfigMixin, ConfigBase, type_names=_model_type_names):
    """Everything that defines a training run (see ``eqloop.recipes.train``)."""

    # -- model and data ------------------------------------------------------------------
    model: LoopLMConfig = field(default_factory=_default_model)  # vocab >= 19 for arithmetic
    task: str = "addition"  # one of eqloop.data.TASKS
    digits: int = 3  # operand length of train and test problems
    # Write operands least-significant digit first, like the answer: every answer digit
    # then finds its operand digits at one fixed distance (one rotary attention pattern).
    reverse_operands: bool = False
    n_train: int = 100000  # distinct training problems (of 900k 3-digit additions)
    n_test: int = 1000  # distinct test problems for exact-match evaluation
    seed: int = 0  # seeds the weights, data draw and order, depth draws and penalty vectors
    # Start from the weights of this checkpoint or run directory (same model config) instead
    # of a random init; optimiser, schedule and depth sampler start fresh. None: random init.
    init_from: str | None = None
    data_cache_dir: str | None = None  # example cache (None: eqloop.data.default_cache_dir())
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
    backward_options: dict[str, Any] = field(default_factory=dict)  # its fields, e.g. {"k": 4}
    # Train at the fixed point: each step solves the core to equilibrium with these
    # settings (the depth sampler is then not drawn) and backward ("ift" or "phantom")
    # takes the gradient there. None: run the sampled loop count (the paper).
    solve: SolveConfig | None = None
    # Share of each batch's sequences whose loop starts from a random state
    # (eqloop.random_start: Gaussian at the per-token RMS of one loop) instead of z0, so the
    # map learns to reach the same fixed point from any start (needs input injection).
    random_start: float = 0.0
    # -- STARS penalty -------------------------------------------------------------------
    lam: float = 0.1  # loss = (1 - lam) * CE + lam * JSRR once the penalty is on; in [0, 1]
    # First step with the penalty: a fraction of ``steps`` in (0, 1) (paper: after 20% of
    # training) or an absolute step (an integer >= 0).
    penalty_start: float | int = 0.2
    penalty_every: int = 1  # apply the penalty every n-th step from penalty_start on
    power_steps: int = 1  # Jacobian products per penalty (paper: 1)
    penalty_target: float | None = None  # hinge relu(||J v|| - target)^2; None: ||J v||^2
    # Where the penalty's Jacobian is taken: "trajectory" (paper: the state after the sampled
    # loops) | "fixed_point" (the core's equilibrium, solved from that state without a graph).
    penalty_at: str = "trajectory"
    # > 0: the product starts from the dominant Ritz vector of this many Arnoldi steps, so
    # ||J v|| estimates rho(J) (forward-mode product); 0: a random vector (paper).
    penalty_arnoldi: int = 0
    # The penalty's Jacobian product: "vjp" (paper: ||v^T J||^2, a double backward) | "jvp"
    # (||J v||^2: forward mode, then one backward; the same expectation for a random v).
    # With compile, "jvp" runs compiled (jsrr_penalty's compile_options); "vjp" stays eager
    # (torch.compile has no double backward). penalty_arnoldi > 0 always takes "jvp".
    penalty_product: str = "vjp"
    # -- evaluation, checkpoints, logging ------------------------------------------------
    eval_every: int = 500  # exact-match evaluation every n steps (0: only at the end)
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # loop counts
    checkpoint_every: int = 500  # checkpoint every n steps (0: only at the end)
    out_dir: str = "runs/eqloop"  # run directory: config, metrics.jsonl, checkpoints/
    resume: bool = False  # continue the run in out_dir from its newest checkpoint
    overwrite: bool = False  # delete the run already in out_dir and start over
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:<index>"
    progress: bool = True  # tqdm progress bar (rank 0)
    # Read the step statistics from the device every n steps (and before an evaluation, a
    # checkpoint or the end): metrics.jsonl gets every step's record then, and a
    # non-finite loss stops the run at that read, naming its step (see
    # eqloop.training.step_stats). 1: read after every step (a host sync per step).
    log_every: int = 10
    # Run the model's per-loop step compiled (torch.compile through eqloop.compile_model,
    # forward and backward) and the "jvp" penalty as one compiled graph ("vjp" runs on the
    # eager step); the results equal eager ones to float tolerance.
    compile: bool = False

    # -- checks ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every field.

        Raises:
            TypeError: a field of the wrong type (the message names it).
            ValueError: a value out of range, an unknown choice or conflicting fields.
        """
        from eqloop.core.stars import PRODUCTS
        from eqloop.data import TASKS
        from eqloop.models.looplm.modeling import LoopLMConfig

        if not isinstance(self.model, LoopLMConfig):
            raise TypeError(f"model must be a LoopLMConfig or a dict, got {self.model!r}")
        self.model.validate()
        checks.choice("task", self.task, TASKS)
        for name, low in (
            ("digits", 1),
            ("n_train", 1),
            ("n_test", 1),
            ("seed", 0),
            ("batch_size", 1),
            ("steps", 1),
            ("warmup_steps", 0),
            ("penalty_every", 1),
            ("power_steps", 1),
            ("penalty_arnoldi", 0),
            ("eval_every", 0),
            ("checkpoint_every", 0),
            ("log_every", 1),
        ):
            checks.integer(name, getattr(self, name), low=low)
        check_penalty_start(self.penalty_start)
        if self.n_train < self.batch_size:
            raise ValueError(f"n_train ({self.n_train}) must be >= batch_size ({self.batch_size})")
        checks.number("lam", self.lam, low=0, high=1)
        checks.number("lr", self.lr, low=0, low_open=True)
        checks.number("weight_decay", self.weight_decay, low=0)
        checks.number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        checks.number("grad_clip", self.grad_clip, low=0)
        checks.number("random_start", self.random_start, low=0, high=1)
        if self.random_start and self.model.injection == "none":
            raise ValueError(
                "random_start > 0 needs input injection (model.injection 'add' or 'concat'): "
                "with injection='none' the input reaches the loop only through z0, which a "
                "random start replaces"
            )
        if self.penalty_target is not None:
            checks.number("penalty_target", self.penalty_target, low=0)
        checks.choice("penalty_at", self.penalty_at, PENALTY_POINTS)
        checks.choice("penalty_product", self.penalty_product, PRODUCTS)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise TypeError(f"betas must be two numbers like (0.9, 0.98), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            checks.number(f"betas[{i}]", beta, low=0, high=1, high_open=True)
        checks.choice("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.eval_loops, list) or not self.eval_loops:
            raise TypeError(
                f"eval_loops must be a non-empty list of integers, got {self.eval_loops!r}"
            )
        for t in self.eval_loops:
            checks.integer("eval_loops entries", t, low=0)
        self.make_sampler()  # raises TypeError/ValueError on a bad depth dict
        self._check_backward()
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise TypeError(f"out_dir must be a non-empty string, got {self.out_dir!r}")
        for name in ("data_cache_dir", "init_from"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a path or None, got {getattr(self, name)!r}")
        checks.boolean("reverse_operands", self.reverse_operands)
        check_run_options(self)

    def _check_backward(self) -> None:
        """Check ``backward``, ``backward_options`` and ``solve`` before any step."""
        check_backward(self.backward, self.backward_options, self.solve)

    def make_examples(self, split: str) -> Examples:
        """The run's ``"train"`` (``n_train`` rows) or ``"test"`` split.

        Both come from one seeded draw, so they are disjoint (see ``eqloop.data``).
        """
        from eqloop.data import make_arithmetic_examples

        n = {"train": self.n_train, "test": self.n_test}.get(split)
        if n is None:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return make_arithmetic_examples(
            self.task,
            self.digits,
            n,
            self.seed,
            split=split,
            reverse_operands=self.reverse_operands,
            cache_dir=self.data_cache_dir,
        )


def check_penalty_start(value: Any) -> None:
    """Check a ``penalty_start``: a step (an integer >= 0) or a fraction in (0, 1).

    Raises:
        TypeError: not a number.
        ValueError: a negative step, or a float outside (0, 1).
    """
    if isinstance(value, float):
        if not 0 < value < 1:
            raise ValueError(
                "penalty_start must be a fraction of training in (0, 1) such as 0.2, or a "
                f"step (an integer >= 0), got {value!r}"
            )
        return
    checks.integer("penalty_start", value, low=0)


def penalty_start_step(penalty_start: float | int, steps: int, *, lam: float = 0.0) -> int:
    """The first step (0-based) with the penalty: ``round(fraction * steps)`` or the step.

    A fraction follows ``steps``, so a resumed run that trains longer starts its penalty
    later in proportion.

    Args:
        penalty_start: a fraction of training in (0, 1) or a step (see TrainConfig).
        steps: the run's optimisation steps.
        lam: the penalty weight; with ``lam > 0`` a start at or after ``steps`` (the
            penalty is never applied) is warned about.
    """
    start = round(penalty_start * steps) if isinstance(penalty_start, float) else penalty_start
    if lam > 0 and start >= steps:
        warnings.warn(
            f"lam={lam} but the STARS penalty starts at step {start} and the run ends at "
            f"step {steps}: the penalty is never applied; set penalty_start to a fraction "
            "of training (e.g. 0.2) or a step below steps",
            stacklevel=4,  # the caller of train() / finetune()
        )
    return int(start)


def check_run_options(config: Any) -> None:
    """Check the run options every training config has (``TrainConfig``, ``FinetuneConfig``).

    Args:
        config: a config with ``device`` (a name :func:`check_device` accepts; whether
            this machine has it is checked when the run starts) and the flags ``resume``,
            ``overwrite``, ``progress`` and ``compile``.

    Raises:
        TypeError: ``device`` is not a non-empty string, or a flag is not a bool.
        ValueError: an unknown device name, or ``resume`` together with ``overwrite``.
    """
    if not isinstance(config.device, str) or not config.device:
        raise TypeError(f"device must be a non-empty string, got {config.device!r}")
    if not _DEVICE.fullmatch(config.device):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<n>', got {config.device!r}"
        )
    for name in ("resume", "overwrite", "progress", "compile"):
        checks.boolean(name, getattr(config, name))
    if config.resume and config.overwrite:
        raise ValueError(
            "resume and overwrite exclude each other: resume continues the run in "
            "out_dir, overwrite deletes it"
        )


def check_device(name: str) -> str:
    """The torch device meant by ``name``, checked against this machine.

    Args:
        name: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:<index>"``.

    Raises:
        ValueError: an unknown name, or CUDA asked for where torch cannot use it.
    """
    import torch

    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<n>', got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available (torch "
                f"{torch.__version__}, {torch.cuda.device_count()} GPUs visible); use cpu"
            )
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} GPUs are visible"
            )
    return name


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """A validated :class:`TrainConfig` from defaults, a file, overrides and values.

    Args:
        path: a ``.json`` or ``.toml`` file holding a (partial) config; nested tables or
            objects for ``model`` (merged into the defaults entry by entry) and ``depth``
            (replacing the default sampler whole); see
            :func:`eqloop.config.load_config_data`.
        overrides: ``key=value`` strings applied after the file, parsed by field type
            (see :func:`apply_overrides`).
        values: typed values applied last (the command line's own flags; see
            :func:`eqloop.config.load_config_data`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, unknown keys or invalid values.
        TypeError: values of the wrong type.
    """
    data = load_config_data(
        TrainConfig().to_dict(), path, overrides, schema=TrainConfig, values=values
    )
    return TrainConfig.from_dict(data)
