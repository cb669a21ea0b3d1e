"""Differentiable fixed-point solves ``z* = f(z*)``: :func:`fixed_point`.

The forward solve runs with any solver registered in :mod:`solvers`; the backward mode
(an object from :mod:`eqloop.core.backward`, or its name for the defaults) decides the graph
autograd sees::

    z = fixed_point(f, z0, solver="anderson", backward=IFT(max_iter=50), tol=1e-5)

Failures are reported, never hidden: a solve that ends ``diverged`` or ``non-finite``,
or ``max_iter`` while ``tol > 0``, emits a :class:`ConvergenceWarning` with its residuals
(reading the status synchronises with the device once per solve, so nothing is read when
``check_every=None``); NaNs propagate into the output and the gradients;
``return_result=True`` hands out the :class:`~solvers.SolveResult` of every solve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

import solvers
from eqloop.core.backward import (
    BACKWARD_MODES,
    DEFAULT_BACKWARD,
    IFT,
    Backward,
    ConvergenceWarning,
    FixedPointInfo,
    FixedPointProblem,
    default_backward_tol,
    make_backward,
    warn_if_failed,
)
from solvers import Solver, checks

__all__ = [
    "BACKWARD_MODES",
    "ConvergenceWarning",
    "FixedPointInfo",
    "default_backward_tol",
    "fixed_point",
]

# Keywords of earlier versions and what replaced them, for a helpful error.
_REPLACED = {
    "phantom_steps": "backward=eqloop.Phantom(steps=...)",
    "phantom_tau": "backward=eqloop.Phantom(tau=...)",
    "truncate_k": "backward=eqloop.Truncated(k=...)",
}


def fixed_point(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    solver: str | Solver = "anderson",
    backward: str | Backward = DEFAULT_BACKWARD,
    max_iter: int = 50,
    tol: float = 1e-5,
    stop_mode: str = "rel",
    backward_solver: str | Solver | None = None,
    backward_max_iter: int | None = None,
    backward_tol: float | None = None,
    args: Sequence[Tensor] = (),
    return_result: bool = False,
    **solver_options: Any,
) -> Tensor | tuple[Tensor, FixedPointInfo]:
    """Solve ``z = f(z, *args)`` and return ``z*`` with a gradient chosen by ``backward``.

    Args:
        f: batched map (B, ...) -> (B, ...) called as ``f(z, *args)``; samples along
            dimension 0 must be independent (the IFT adjoint solve stops each sample
            on its own). Its parameters and any tensors it captures (e.g. the injected
            ``x``) receive gradients.
        z0: (B, ...) floating-point starting point.
        solver: registered name (see ``solvers.available()``) or a solver object, for
            the forward solve. ``Unroll`` needs the plain iteration: ``"fixed_point"``
            or a ``solvers.FixedPointIteration`` (its ``tau`` damps the loops).
        backward: an :class:`~eqloop.core.backward.IFT`, :class:`~eqloop.core.backward.Phantom`,
            :class:`~eqloop.core.backward.Truncated` or :class:`~eqloop.core.backward.Unroll`
            object, or one of :data:`BACKWARD_MODES` for that mode's defaults.
        max_iter: budget of f-evaluations of the forward solve. For ``Truncated(k)``, the
            depth of the whole loop: ``max_iter - k`` loops of the solver without a
            graph, then ``k`` with one. For ``Unroll``, the most loops a sample runs.
        tol: tolerance on the residual chosen by ``stop_mode``; ``0`` runs the whole
            budget.
        stop_mode: ``"rel"`` or ``"abs"``, as in ``solvers.solve``.
        backward_solver, backward_max_iter, backward_tol: shorthand for the fields
            ``solver``, ``max_iter`` and ``tol`` of an ``IFT`` backward (the public API
            of earlier versions): ``backward="ift", backward_tol=1e-8`` is
            ``backward=IFT(tol=1e-8)``. Only with an IFT backward; given with an ``IFT``
            object they replace its fields.
        args: extra per-sample tensors (batch dimension 0) passed to ``f`` after ``z``;
            they receive gradients like captured inputs.
        return_result: also return a :class:`FixedPointInfo`.
        **solver_options: the forward solver's hyperparameters (e.g. ``m``, ``lam``,
            ``tau``) and ``solvers.solve`` driver options (``eps``, ``check_every``,
            ``compact``, ``diverge_ratio``, ``raise_on_failure``). The IFT adjoint solve
            shares ``eps``, ``check_every``, ``diverge_ratio`` and ``raise_on_failure``.

    Returns:
        ``z`` of the shape of ``z0``, or ``(z, info)`` with ``return_result=True``.

    Raises:
        TypeError / ValueError: bad arguments; the message names the argument and, for
            choices, lists the valid values.
        solvers.SolveError: with ``raise_on_failure=True``, when a solve (forward or,
            during backward, adjoint) does not converge.
    """
    replaced = sorted(set(solver_options) & set(_REPLACED))
    if replaced:
        raise TypeError(
            f"fixed_point() no longer takes {replaced}: use "
            + ", ".join(_REPLACED[name] for name in replaced)
        )
    if not callable(f):
        raise TypeError(f"f must be callable (the fixed-point map), got {type(f).__name__}")
    if not isinstance(z0, Tensor) or not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point torch.Tensor, got {_describe(z0)}")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have a non-empty batch dimension 0, got shape {tuple(z0.shape)}")
    mode = _with_ift_fields(
        make_backward(backward),
        {"solver": backward_solver, "max_iter": backward_max_iter, "tol": backward_tol},
    )
    checks.boolean("return_result", return_result)
    driver = {k: solver_options.pop(k) for k in list(solver_options) if k in solvers.DRIVER_OPTIONS}
    problem = FixedPointProblem(
        f=f,
        z0=z0,
        args=tuple(args),
        max_iter=checks.integer("max_iter", max_iter, low=1),
        tol=checks.number("tol", tol, low=0.0),
        stop_mode=checks.choice("stop_mode", stop_mode, ("rel", "abs")),
        solver=_forward_solver(solver, solver_options),
        driver=driver,
    )
    mode.check(problem)
    z, info = mode.run(problem)
    if info.forward is not None and problem.reads_host:
        warn_if_failed(info.forward, "forward", mode.name, problem.tol)
    return (z, info) if return_result else z


def _with_ift_fields(mode: Backward, given: dict[str, Any]) -> Backward:
    """``mode`` with the ``backward_*`` shorthand keywords applied to its IFT fields."""
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return mode
    if not isinstance(mode, IFT):
        keywords = sorted(f"backward_{name}" for name in given)
        raise TypeError(
            f"{keywords} configure the IFT adjoint solve, but backward is {mode.name!r}; "
            "drop them or use backward='ift'"
        )
    return dataclasses.replace(mode, **given)


def _forward_solver(solver: str | Solver, hyperparameters: dict[str, Any]) -> Solver:
    """The forward solver from a name and its hyperparameters, or an object as it is."""
    if isinstance(solver, Solver):
        if hyperparameters:
            raise ValueError(
                f"unknown option(s) {sorted(hyperparameters)}: solver is a solver object, so "
                f"its hyperparameters belong in its constructor; driver options are "
                f"{sorted(solvers.DRIVER_OPTIONS)}"
            )
        return solver
    if isinstance(solver, str):
        return solvers.make_solver(solver, **hyperparameters)
    raise TypeError(
        f"solver must be a registered solver name or a solvers.Solver, got {type(solver).__name__}"
    )


def _describe(value: Any) -> str:
    """Short description of a bad argument for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype}"
    return type(value).__name__
