"""Name -> solver factory registry and the public ``solve`` entry point."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import Problem, Solver
from ._result import SolveResult

SolverFactory = Callable[..., Solver]

#: name -> (factory, the keyword hyperparameters it accepts or None for ``**kwargs``).
#: The names are read once here: ``inspect.signature`` costs ~50 us, a tenth of a small
#: solve's fixed cost.
_REGISTRY: dict[str, tuple[SolverFactory, frozenset[str] | None]] = {}

#: Keyword options of ``solve`` that configure the driver rather than the solver.
DRIVER_OPTIONS: dict[str, str] = {
    "args": "tuple of per-sample tensors (batch dim 0) passed to f after z",
    "eps": "added to ||f(z)|| in the relative residual (default 1e-9)",
    "check_every": "host check for early stop every k evaluations; None never checks",
    "compact": "pass only still-active samples to f (samples must be independent)",
    "diverge_ratio": "a sample diverges when its abs residual exceeds this x its first one",
    "raise_on_failure": "raise SolveError when any sample fails to converge",
}


def register(name: str, factory: SolverFactory, *, overwrite: bool = False) -> None:
    """Make a solver available to :func:`solve` by name.

    Args:
        name: the name users pass as ``solver=``.
        factory: called with the solver's hyperparameters as keywords; returns a
            :class:`~solvers.Solver`. Its signature lists the valid hyperparameters.
        overwrite: replace an existing registration instead of raising.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
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
    return factory(**hyperparameters)


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

    Args:
        f: maps a tensor of shape (B, ...) to the same shape; dimension 0 is the batch
            and samples converge (and stop) on their own. Called as ``f(z, *args)``.
        z0: (B, ...) floating-point initial guess.
        solver: a registered name (see :func:`available`) or a solver object such as
            ``solvers.Anderson(m=6)``.
        max_iter: budget of f-evaluations, at least 1.
        tol: tolerance on the residual chosen by ``stop_mode``; ``0`` runs the budget.
        stop_mode: ``"rel"`` (``||f(z)-z|| / (||f(z)|| + eps)``) or ``"abs"``.
        **options: driver options (``args``, ``eps``, ``check_every``, ``compact``,
            ``diverge_ratio``, ``raise_on_failure``) and, when ``solver`` is a name,
            that solver's hyperparameters (e.g. ``m``, ``lam``, ``tau``).

    Returns:
        A :class:`SolveResult` with the best iterate of each sample, residuals, traces,
        step counts and a readable ``status``.

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
    check_every: int | None = 1,
    compact: bool = False,
    diverge_ratio: float = 1e4,
    raise_on_failure: bool = False,
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
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every must be an integer >= 1 or None, got {check_every!r}")
    if compact and check_every is None:
        raise ValueError("compact=True needs check points: set check_every to an integer")
    if not diverge_ratio > 1:
        raise ValueError(f"diverge_ratio must be > 1, got {diverge_ratio!r}")
    args = tuple(args)
    for i, a in enumerate(args):
        if not isinstance(a, Tensor) or a.dim() < 1 or a.shape[0] != z0.shape[0]:
            raise ValueError(
                f"args[{i}] must be a tensor whose dimension 0 is the batch "
                f"({z0.shape[0]}), got {getattr(a, 'shape', type(a).__name__)}"
            )
    # Reading values synchronises; skipped when the caller asked for no host reads. The
    # extremes are NaN or infinite exactly when some entry is (one pass, no temporary).
    readable = check_every is not None and z0.device.type != "meta" and z0.numel() > 0
    if readable and not bool(torch.isfinite(torch.stack(torch.aminmax(z0))).all()):
        raise ValueError("z0 contains NaN or Inf; start the solve from a finite guess")
    return Problem(
        f=f, z0=z0, args=args, max_iter=max_iter, tol=float(tol), stop_mode=stop_mode,
        eps=float(eps), check_every=check_every, compact=bool(compact),
        diverge_ratio=float(diverge_ratio), raise_on_failure=bool(raise_on_failure),
    )
