"""Name -> solver factory registry and the public ``solve`` entry point."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import checks
from ._base import Problem, Solver
from ._result import SolveResult

SolverFactory = Callable[..., Solver]

#: name -> (factory, the keyword hyperparameters it accepts or None for ``**kwargs``).
#: The names are read once here: ``inspect.signature`` costs ~50 us, a tenth of a small
#: solve's fixed cost.
_REGISTRY: dict[str, tuple[SolverFactory, frozenset[str] | None]] = {}

#: ``check_every="auto"`` (the default) on any device but the CPU: a host read there
#: synchronises with the device (it waits for all queued work), so the loop reads only
#: every this many evaluations. Stopped samples are frozen either way, so this changes
#: no result, only how many evaluations run after the last sample stopped (at most
#: this minus one) and when ``compact`` drops stopped samples.
ACCELERATOR_CHECK_EVERY = 4

#: Keyword options of ``solve`` that configure the driver rather than the solver.
DRIVER_OPTIONS: dict[str, str] = {
    "args": "tuple of per-sample tensors (batch dim 0) passed to f after z",
    "eps": "added to ||f(z)|| in the relative residual (default 1e-9)",
    "check_every": "host check for early stop every k evaluations ('auto': 1 on CPU, "
    f"{ACCELERATOR_CHECK_EVERY} on CUDA/other devices); None never checks",
    "compact": "pass only still-active samples to f (samples must be independent)",
    "diverge_ratio": "a sample diverges when its abs residual exceeds this x its first one "
    "(or its iterate grows this much while its residual sits at rounding level); inf: never",
    "raise_on_failure": "raise SolveError when any sample fails to converge",
    "output": "'best' (lowest-residual iterate) or 'last' (the state after the step at "
    "which each sample stopped: f^T(z0) for fixed_point with tol=0)",
}


def register(name: str, factory: SolverFactory, *, overwrite: bool = False) -> None:
    """Make a solver available to :func:`solve` by name.

    Args:
        name: the name users pass as ``solver=``.
        factory: a :class:`~solvers.Solver` subclass, or a function called with the
            solver's hyperparameters as keywords that returns a Solver. Its signature
            lists the valid hyperparameters.
        overwrite: replace an existing registration instead of raising.

    Raises:
        TypeError: ``name`` is not a non-empty string, or ``factory`` is neither a
            Solver subclass nor a function (a class that is not a Solver fails here,
            not at solve time; what a function returns is checked when it is called).
        ValueError: ``name`` is taken and ``overwrite`` is false.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    overwrite = checks.boolean("overwrite", overwrite)
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    if isinstance(factory, type) and not issubclass(factory, Solver):
        raise TypeError(
            f"factory for {name!r} is the class {factory.__name__}, which is not a "
            "solvers.Solver: subclass solvers.IterativeSolver (init/step) or solvers.Solver "
            "(run), or register a function that returns one"
        )
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True")
    _REGISTRY[name] = (factory, _keyword_names(factory))


def available() -> tuple[str, ...]:
    """Names of every registered solver, in registration order."""
    return tuple(_REGISTRY)


def make_solver(name: str, **hyperparameters: Any) -> Solver:
    """Build the registered solver ``name`` with the given hyperparameters.

    Raises:
        ValueError: unknown name, or a hyperparameter the solver does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}")
    factory, valid = _REGISTRY[name]
    unknown = sorted(set(hyperparameters) - valid) if valid is not None else []
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for solver {name!r}; its hyperparameters are "
            f"{sorted(valid)} and the driver options are {sorted(DRIVER_OPTIONS)}"
        )
    solver = factory(**hyperparameters)
    if not isinstance(solver, Solver):
        raise TypeError(
            f"the factory registered as {name!r} returned {type(solver).__name__}, not a "
            "solvers.Solver; fix the registration"
        )
    return solver


def _keyword_names(factory: SolverFactory) -> frozenset[str] | None:
    """Keyword parameters a factory accepts, or None when it takes ``**kwargs``."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def solve(
    f: Callable[..., Tensor],
    z0: Tensor,
    solver: str | Solver = "anderson",
    *,
    max_iter: int = 50,
    tol: float = 1e-5,
    stop_mode: str = "rel",
    **options: Any,
) -> SolveResult:
    """Solve ``z = f(z)`` for every sample of a batch.

    Each sample stops on its own at the first evaluation whose residual meets ``tol``,
    is NaN/Inf, or exceeds ``diverge_ratio`` times its first residual; from then on it
    is frozen. ``status`` says why, per sample (see :class:`Status`).

    Args:
        f: maps a tensor of shape (B, ...) to the same shape, dtype and device;
            dimension 0 is the batch and samples converge (and stop) on their own.
            Called as ``f(z, *args)``.
        z0: (B, ...) floating-point initial guess (float16/bfloat16 work; residuals are
            then measured in float32).
        solver: a registered name (see :func:`available`) or a solver object such as
            ``solvers.Anderson(m=6)``.
        max_iter: budget of f-evaluations, at least 1: a hard limit for every solver,
            the adapters' own measurements and line searches included.
        tol: finite tolerance >= 0 on the residual chosen by ``stop_mode``; ``0`` stops
            no sample on its residual, so every sample runs the whole budget.
        stop_mode: ``"rel"`` (``||f(z)-z|| / (||f(z)|| + eps)``) or ``"abs"``.
        **options: driver options and, when ``solver`` is a name, that solver's
            hyperparameters (e.g. ``m``, ``lam``, ``tau``). The driver options:

            * ``args``: tuple of per-sample tensors (batch dimension 0, on z0's device)
              passed to ``f`` after ``z``.
            * ``eps`` (1e-9): added to ``||f(z)||`` in the relative residual.
            * ``check_every`` (``"auto"``): read the host every k evaluations to stop
              once every sample has stopped; ``None`` never reads it (no device
              synchronisation), running the whole budget with stopped samples frozen.
              ``"auto"`` is 1 for CPU tensors, where a read costs no synchronisation,
              and :data:`ACCELERATOR_CHECK_EVERY` (4) elsewhere: on CUDA every read
              waits for the device to drain its queue, so reading every evaluation
              would sync every iteration. The trade-off: up to k - 1 evaluations
              run after the last sample stopped (stopped samples are frozen, so ``z``,
              ``nstep``, residuals and status are the same for every k; ``nfe`` and
              time are not), and ``compact`` drops stopped samples only at reads.
              Under ``torch.compile`` each read is a graph break; ``None`` makes the
              whole solve one graph.
            * ``compact`` (False): pass only the still-active samples to ``f`` (from
              each check point on; the samples must be independent).
            * ``diverge_ratio`` (1e4): a sample diverges when its absolute residual
              exceeds this multiple of its first one, or when ``||f(z)||`` has grown
              past this multiple of ``||z0|| + ||f(z0) - z0||`` while its residual
              is within a few ulps of rounding (a runaway iterate, not a fixed point).
              ``math.inf`` switches both off: only NaN/Inf then stop a sample early.
            * ``raise_on_failure`` (False): raise :class:`SolveError` unless every
              sample converged.
            * ``output`` (``"best"``): which iterate ``res.z`` holds. ``"best"``: each
              sample's lowest-residual iterate (the first minimum). ``"last"``: the
              state right after the step taken at the evaluation where the sample
              stopped (the one that met ``tol``, or the final one), i.e. the solver's
              next iterate from it: ``f(z)`` for ``fixed_point`` (``lerp(z, f(z), tau)``
              when damped), so with ``tol=0`` and ``max_iter=T`` it is ``f^T(z0)``;
              with a tolerance a sample keeps ``f(z)`` from the evaluation where
              ``||f(z) - z|| / (||f(z)|| + eps) <= tol`` (early exit). Either way
              ``abs_residual``, ``rel_residual`` and ``nstep`` describe the evaluation
              whose ``z`` (best) or step (last) was returned.

    Returns:
        A :class:`SolveResult` with the returned iterate of each sample, residuals,
        traces, step counts and a readable ``status``.

    Gradients: called under autograd, ``res.z`` keeps its graph through every step each
    sample took (the bookkeeping builds none), so gradients reach ``f``'s parameters,
    tensors it captures, ``args`` and ``z0``; the freezing and compaction are
    differentiable. This holds for solvers whose ``step`` is out of place
    (``fixed_point``); Anderson and Broyden write their histories in place, so
    differentiate their solutions with ``eqloop.fixed_point(..., backward="ift")``.

    Raises:
        TypeError / ValueError: bad arguments; the message names the argument.
        SolveError: with ``raise_on_failure=True``, when a sample does not converge.
    """
    driver = {k: options.pop(k) for k in list(options) if k in DRIVER_OPTIONS}
    if isinstance(solver, Solver):
        if options:
            raise ValueError(
                f"unknown option(s) {sorted(options)}: a solver object was given, so its "
                f"hyperparameters belong in its constructor; driver options are "
                f"{sorted(DRIVER_OPTIONS)}"
            )
        solver_obj = solver
    elif isinstance(solver, str):
        solver_obj = make_solver(solver, **options)
    else:
        raise TypeError(
            f"solver must be a registered name or a solvers.Solver, got {type(solver).__name__}"
        )
    problem = make_problem(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **driver)
    return solver_obj.run(problem)


def make_problem(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    args: tuple[Tensor, ...] | list[Tensor] = (),
    eps: float = 1e-9,
    check_every: int | str | None = "auto",
    compact: bool = False,
    diverge_ratio: float = 1e4,
    raise_on_failure: bool = False,
    output: str = "best",
) -> Problem:
    """Validate the arguments of :func:`solve` and bundle them into a :class:`Problem`."""
    if not callable(f):
        raise TypeError(f"f must be callable (the fixed-point map), got {type(f).__name__}")
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must have a floating-point dtype, got {z0.dtype}")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have a non-empty batch dimension 0, got shape {tuple(z0.shape)}")
    max_iter = checks.integer("max_iter", max_iter, low=1)
    tol = checks.number("tol", tol, low=0.0)
    stop_mode = checks.choice("stop_mode", stop_mode, ("abs", "rel"))
    eps = checks.number("eps", eps, low=0.0, low_open=True)
    if check_every == "auto":
        check_every = default_check_every(z0.device)
    elif check_every is not None:
        check_every = checks.integer("check_every (or 'auto', or None)", check_every, low=1)
    compact = checks.boolean("compact", compact)
    if compact and check_every is None:
        raise ValueError("compact=True needs check points: set check_every to an integer")
    diverge_ratio = checks.number(
        "diverge_ratio", diverge_ratio, low=1.0, low_open=True, finite=False
    )
    raise_on_failure = checks.boolean("raise_on_failure", raise_on_failure)
    output = checks.choice("output", output, ("best", "last"))
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of tensors, got {type(args).__name__}")
    args = tuple(args)
    for i, a in enumerate(args):
        if not isinstance(a, Tensor) or a.dim() < 1 or a.shape[0] != z0.shape[0]:
            raise ValueError(
                f"args[{i}] must be a tensor whose dimension 0 is the batch "
                f"({z0.shape[0]}), got {getattr(a, 'shape', type(a).__name__)}"
            )
        if a.device != z0.device:
            raise ValueError(
                f"args[{i}] is on {a.device} but z0 is on {z0.device}; move both to one device"
            )
    # Reading values synchronises; skipped when the caller asked for no host reads. The
    # extremes are NaN or infinite exactly when some entry is (one pass, no temporary).
    readable = check_every is not None and z0.device.type != "meta" and z0.numel() > 0
    if readable and not math.isfinite(torch.stack(torch.aminmax(z0)).abs().amax().item()):
        raise ValueError("z0 contains NaN or Inf; start the solve from a finite guess")
    return Problem(
        f=f,
        z0=z0,
        args=args,
        max_iter=max_iter,
        tol=tol,
        stop_mode=stop_mode,
        eps=eps,
        check_every=check_every,
        compact=compact,
        diverge_ratio=diverge_ratio,
        raise_on_failure=raise_on_failure,
        output=output,
    )


def default_check_every(device: torch.device) -> int:
    """What ``check_every="auto"`` means on ``device``: 1 on the CPU, where a host read
    costs no synchronisation, else :data:`ACCELERATOR_CHECK_EVERY` (see :func:`solve`)."""
    return 1 if device.type == "cpu" else ACCELERATOR_CHECK_EVERY
