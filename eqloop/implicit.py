"""Differentiable fixed-point solves ``z* = f(z*)`` with pluggable backward modes.

The forward solve always runs under ``torch.no_grad()`` with any solver registered in
:mod:`solvers`; what differs between modes is the graph that autograd sees:

========== ============================================================ ===================
mode       gradient                                                      f-graphs kept
========== ============================================================ ===================
ift        implicit function theorem: the adjoint ``g = J^T g + v`` is    1
           solved with a registered solver, then ``g`` is pushed through
           one application ``f(z*)`` to the parameters and inputs
phantom    ``k`` damped steps ``z <- (1 - tau) z + tau f(z)`` from the      ``phantom_steps``
           detached ``z*``, backpropagated through
truncated  the solver runs ``max_iter - k`` loops without a graph, then    ``truncate_k``
           ``k`` plain loops ``z <- f(z)`` with one (Huginn)
unroll     plain loops ``z <- f(z)`` from ``z0`` with autograd on all of   loops run
           them, until every sample meets ``tol`` or ``max_iter`` loops
========== ============================================================ ===================

``J = df/dz`` at ``z*`` and ``v`` is the gradient arriving at the output. Memory saved
for backward therefore does not grow with the loop count for ``ift`` and ``phantom``,
is capped at ``k`` loops for ``truncated`` and grows linearly for ``unroll``.

Values returned (``B`` = batch, shapes as ``z0``):

* ``ift``: exactly the solver's best iterate ``z*`` (the one ``solvers.solve`` returns);
  its gradient flows through one extra application ``f(z*)`` that carries a hook.
* ``phantom``: the result of the ``k`` damped steps from ``z*``.
* ``truncated``: ``f^k`` of the solver's result (``f^k(z0)`` when ``max_iter <= k``).
* ``unroll``: ``f^T(z0)`` for the ``T`` loops run.

Inside ``torch.no_grad()`` (or inference mode) no graph is built: ``ift`` and
``phantom`` return ``z*``, ``truncated`` and ``unroll`` return the value above.

Higher-order derivatives through ``ift`` are not supported: under ``create_graph=True``
the first-order gradient is still right but the adjoint solution is a constant.

Failures are reported, never hidden: a solve that ends ``diverged`` or ``non-finite``,
or ``max_iter`` while ``tol > 0``, emits a :class:`ConvergenceWarning` with its residuals
(reading the status synchronises with the device once per solve, so nothing is read when
``check_every=None``); NaNs propagate into the output and the gradients;
``return_result=True`` hands out the :class:`~solvers.SolveResult` of every solve.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import solvers
from solvers import FixedPointIteration, Solver, SolveResult, Status

__all__ = [
    "BACKWARD_MODES",
    "DEFAULT_BACKWARD_MAX_ITER",
    "DEFAULT_PHANTOM_STEPS",
    "DEFAULT_PHANTOM_TAU",
    "DEFAULT_TRUNCATE_K",
    "ConvergenceWarning",
    "FixedPointInfo",
    "default_backward_tol",
    "fixed_point",
]

BACKWARD_MODES: tuple[str, ...] = ("ift", "phantom", "truncated", "unroll")
"""Valid values of ``backward`` in :func:`fixed_point`."""

DEFAULT_BACKWARD_MAX_ITER = 100
"""Budget of the ``ift`` adjoint solve, in VJPs (``backward_max_iter=None``)."""

DEFAULT_PHANTOM_STEPS = 5
"""Damped steps of the ``phantom`` mode (``phantom_steps=None``)."""

DEFAULT_PHANTOM_TAU = 1.0
"""Damping of the ``phantom`` steps (``phantom_tau=None``); 1 means plain steps."""

DEFAULT_TRUNCATE_K = 8
"""Loops with a graph in the ``truncated`` mode (``truncate_k=None``), Huginn's k."""


def default_backward_tol(dtype: torch.dtype) -> float:
    """Default relative tolerance of the ``ift`` adjoint solve for a state of ``dtype``.

    ``max(1e-10, 10 * eps)``: 1e-10 in float64, about 1.2e-6 in float32, 9.8e-3 in
    float16 and 7.8e-2 in bfloat16. Ten machine epsilons is about as far as an adjoint
    residual computed in that precision goes down; float64 stops at 1e-10, where the
    gradient error is already far below what a float64 comparison resolves.
    """
    return max(1e-10, 10 * torch.finfo(dtype).eps)


# Driver options of solvers.solve that also configure the ift adjoint solve. ``args``
# and ``compact`` belong to the forward solve only: the adjoint map is a VJP of the
# whole batch.
_ADJOINT_DRIVER_OPTIONS = ("eps", "check_every", "diverge_ratio", "raise_on_failure")
# Driver options the plain loop of ``unroll`` understands.
_UNROLL_DRIVER_OPTIONS = ("eps", "check_every", "raise_on_failure")

Map = Callable[..., Tensor]
"""A batched map called as ``f(z, *args)``: (B, ...) -> (B, ...), samples along dim 0."""


class ConvergenceWarning(UserWarning):
    """A forward or adjoint solve of :func:`fixed_point` did not converge.

    Silence it with ``warnings.simplefilter("ignore", ConvergenceWarning)``.
    """


@dataclass
class FixedPointInfo:
    """What :func:`fixed_point` reports with ``return_result=True``.

    Attributes:
        backward_mode: the mode used, one of :data:`BACKWARD_MODES`.
        forward: the solve that produced ``z*``. For ``unroll`` it describes the plain
            loop (solver ``"unroll"``; its residuals are those of the last iterate fed
            to ``f``, i.e. the size of the last step, and ``z`` is the returned value).
            ``None`` for ``truncated`` when ``max_iter <= truncate_k`` (no loop ran
            without a graph).
        backward: the ``ift`` adjoint solve of the most recent backward pass through
            the result; ``None`` until one has run, and always for the other modes.
        grad_steps: applications of ``f`` kept in the autograd graph (0 when no graph
            was built).
    """

    backward_mode: str
    forward: SolveResult | None
    backward: SolveResult | None = None
    grad_steps: int = 0


def fixed_point(
    f: Map,
    z0: Tensor,
    *,
    solver: str | Solver = "anderson",
    backward: str = "ift",
    max_iter: int = 50,
    tol: float = 1e-5,
    stop_mode: str = "rel",
    backward_solver: str | Solver | None = None,
    backward_max_iter: int | None = None,
    backward_tol: float | None = None,
    phantom_steps: int | None = None,
    phantom_tau: float | None = None,
    truncate_k: int | None = None,
    args: Sequence[Tensor] = (),
    return_result: bool = False,
    **solver_options: Any,
) -> Tensor | tuple[Tensor, FixedPointInfo]:
    """Solve ``z = f(z, *args)`` and return ``z*`` with a gradient chosen by ``backward``.

    Args:
        f: batched map (B, ...) -> (B, ...) called as ``f(z, *args)``; samples along
            dimension 0 must be independent (the ``ift`` adjoint solve stops each sample
            on its own). Its parameters and any tensors it captures (e.g. the injected
            ``x``) receive gradients.
        z0: (B, ...) floating-point starting point.
        solver: registered name (see ``solvers.available()``) or a solver object, for
            the forward solve. ``backward="unroll"`` needs the plain iteration:
            ``"fixed_point"`` or a ``solvers.FixedPointIteration`` (its ``tau`` damps
            the unrolled loops).
        backward: one of :data:`BACKWARD_MODES` (see the module docstring).
        max_iter: budget of f-evaluations of the forward solve. For ``truncated``, the
            depth of the whole loop: ``max_iter - truncate_k`` loops of the solver
            without a graph (it is given one more evaluation to measure the residual of
            the iterate it returns), then ``truncate_k`` with one. For ``unroll``, the
            number of unrolled loops.
        tol: tolerance on the residual chosen by ``stop_mode``; ``0`` runs the whole
            budget. ``unroll`` checks it every ``check_every`` loops and stops once every
            sample meets it (samples are not frozen individually).
        stop_mode: ``"rel"`` or ``"abs"``, as in ``solvers.solve``.
        backward_solver: ``ift`` only: solver of the adjoint fixed point. ``None`` reuses
            the forward solver with the same hyperparameters; a name builds that solver
            with its default hyperparameters (pass an object to set them).
        backward_max_iter: ``ift`` only: adjoint budget in VJPs; ``None`` means
            :data:`DEFAULT_BACKWARD_MAX_ITER` (100).
        backward_tol: ``ift`` only: tolerance on the adjoint's relative residual
            ``||J^T g + v - g|| / ||J^T g + v||`` (always relative: the gradient's scale
            is the loss's); ``None`` means :func:`default_backward_tol` of ``z0``'s dtype
            (1e-10 in float64, about 1.2e-6 in float32).
        phantom_steps: ``phantom`` only: number of damped steps ``k >= 1``; ``None``
            means :data:`DEFAULT_PHANTOM_STEPS` (5).
        phantom_tau: ``phantom`` only: damping ``tau`` in (0, 1]; ``None`` means
            :data:`DEFAULT_PHANTOM_TAU` (1.0).
        truncate_k: ``truncated`` only: loops with a graph, ``k >= 1``; ``None`` means
            :data:`DEFAULT_TRUNCATE_K` (8).
        args: extra per-sample tensors (batch dimension 0) passed to ``f`` after ``z``;
            they receive gradients like captured inputs.
        return_result: also return a :class:`FixedPointInfo`.
        **solver_options: the forward solver's hyperparameters (e.g. ``m``, ``lam``,
            ``tau``) and ``solvers.solve`` driver options (``eps``, ``check_every``,
            ``compact``, ``diverge_ratio``, ``raise_on_failure``). The adjoint solve
            shares ``eps``, ``check_every``, ``diverge_ratio`` and ``raise_on_failure``.

    Returns:
        ``z`` of the shape of ``z0``, or ``(z, info)`` with ``return_result=True``.

    Raises:
        TypeError / ValueError: bad arguments; the message names the argument and, for
            choices, lists the valid values. Options that do not apply to the chosen
            ``backward`` mode are errors, not silently ignored.
        solvers.SolveError: with ``raise_on_failure=True``, when a solve (forward or,
            during backward, adjoint) does not converge.
    """
    _check_common(f, z0, backward, max_iter, tol, stop_mode, return_result)
    given = {
        "backward_solver": backward_solver,
        "backward_max_iter": backward_max_iter,
        "backward_tol": backward_tol,
        "phantom_steps": phantom_steps,
        "phantom_tau": phantom_tau,
        "truncate_k": truncate_k,
    }
    _reject_foreign_options(backward, given)
    driver = {k: solver_options.pop(k) for k in list(solver_options) if k in solvers.DRIVER_OPTIONS}
    forward_solver = _build_solver("solver", solver, solver_options)
    if backward == "unroll":
        _check_unroll(forward_solver, driver)
    run = _Run(
        f=f,
        z0=z0,
        args=tuple(args),
        max_iter=max_iter,
        tol=float(tol),
        stop_mode=stop_mode,
        solver=forward_solver,
        driver=driver,
    )

    if backward == "ift":
        adjoint_solver = (
            forward_solver
            if backward_solver is None
            else _build_solver("backward_solver", backward_solver, {})
        )
        z, info = _ift(
            run,
            adjoint_solver,
            _positive_int("backward_max_iter", _or(backward_max_iter, DEFAULT_BACKWARD_MAX_ITER)),
            _tolerance("backward_tol", _or(backward_tol, default_backward_tol(z0.dtype))),
        )
    elif backward == "phantom":
        steps = _positive_int("phantom_steps", _or(phantom_steps, DEFAULT_PHANTOM_STEPS))
        z, info = _phantom(run, steps, _damping(_or(phantom_tau, DEFAULT_PHANTOM_TAU)))
    elif backward == "truncated":
        z, info = _truncated(run, _positive_int("truncate_k", _or(truncate_k, DEFAULT_TRUNCATE_K)))
    else:
        z, info = _unroll(run)
    if info.forward is not None:
        _warn_if_failed(info.forward, "forward", run.tol, driver, stacklevel=3)
    return (z, info) if return_result else z


# ------------------------------------------------------------------------ the four modes


@dataclass(frozen=True)
class _Run:
    """The forward problem and settings shared by the four modes."""

    f: Map
    z0: Tensor
    args: tuple[Tensor, ...]
    max_iter: int
    tol: float
    stop_mode: str
    solver: Solver
    driver: dict[str, Any]

    def solve(self, max_iter: int) -> SolveResult:
        """Forward solve without a graph."""
        with torch.no_grad():
            return solvers.solve(
                self.f,
                self.z0,
                self.solver,
                max_iter=max_iter,
                tol=self.tol,
                stop_mode=self.stop_mode,
                args=self.args,
                **self.driver,
            )

    def step(self, z: Tensor) -> Tensor:
        """One application ``f(z, *args)``."""
        return self.f(z, *self.args)


def _ift(
    run: _Run, adjoint_solver: Solver, max_iter: int, tol: float
) -> tuple[Tensor, FixedPointInfo]:
    """Solve without a graph; attach the implicit gradient to one extra application of f.

    The output is ``z* + (f(z*) - f(z*).detach())``: its value is exactly ``z*``, and a
    hook on it replaces the arriving gradient ``v`` by the adjoint solution
    ``g = J^T g + v``, which autograd then carries through ``f(z*)`` to the parameters,
    captured inputs and ``args`` of ``f``.
    """
    result = run.solve(run.max_iter)
    info = FixedPointInfo("ift", result)
    z_star = result.z
    if not torch.is_grad_enabled():
        return z_star, info
    z_leaf = z_star.detach().requires_grad_()
    fz = run.step(z_leaf)
    if not _reaches_other_leaves(fz, z_leaf):
        return z_star, info  # nothing in f requires grad: an ordinary constant

    out = z_star + (fz - fz.detach())
    # On ``out``, not on ``fz``: the VJPs inside the hook start at ``fz`` and must not
    # run into the hook again.
    driver = {k: run.driver[k] for k in _ADJOINT_DRIVER_OPTIONS if k in run.driver}
    out.register_hook(_AdjointHook(fz, z_leaf, adjoint_solver, max_iter, tol, driver, info))
    info.grad_steps = 1
    return out, info


class _AdjointHook:
    """Replaces the gradient ``v`` arriving at ``z*`` by the solution of ``g = J^T g + v``.

    Args:
        fz: (B, ...) ``f(z*)`` with its graph; every VJP reuses it (``retain_graph``).
        z_leaf: (B, ...) the detached ``z*`` that ``fz`` was computed from.
        solver: solver of the adjoint fixed point.
        max_iter: its budget in VJPs.
        tol: its tolerance on the relative residual.
        driver: ``solvers.solve`` driver options of the adjoint solve.
        info: receives the adjoint ``SolveResult`` as ``info.backward``.
    """

    def __init__(
        self,
        fz: Tensor,
        z_leaf: Tensor,
        solver: Solver,
        max_iter: int,
        tol: float,
        driver: dict[str, Any],
        info: FixedPointInfo,
    ) -> None:
        self.fz, self.z_leaf, self.solver = fz, z_leaf, solver
        self.max_iter, self.tol, self.driver, self.info = max_iter, tol, driver, info

    def vjp(self, g: Tensor) -> Tensor:
        """``J^T g`` for every sample: (B, ...) -> (B, ...)."""
        (out,) = torch.autograd.grad(
            self.fz, self.z_leaf, g, retain_graph=True, materialize_grads=True
        )
        return out

    def __call__(self, v: Tensor | None) -> Tensor | None:
        if v is None:  # an undefined gradient stays undefined
            return None
        reads_host = self.driver.get("check_every", solvers.Problem.check_every) is not None
        if reads_host and not bool(v.isfinite().all()):
            warnings.warn(
                "eqloop.fixed_point: the gradient arriving at z* contains NaN or Inf; "
                "skipping the adjoint solve and passing it on unchanged",
                ConvergenceWarning,
                stacklevel=2,
            )
            return v
        adjoint = solvers.solve(
            lambda g: self.vjp(g) + v,
            v,
            self.solver,
            max_iter=self.max_iter,
            tol=self.tol,
            stop_mode="rel",
            **self.driver,
        )
        self.info.backward = adjoint
        _warn_if_failed(adjoint, "adjoint (backward)", self.tol, self.driver, stacklevel=2)
        return adjoint.z


def _phantom(run: _Run, steps: int, tau: float) -> tuple[Tensor, FixedPointInfo]:
    """``steps`` damped steps with a graph from the detached solution."""
    result = run.solve(run.max_iter)
    info = FixedPointInfo("phantom", result)
    z = result.z
    if not torch.is_grad_enabled():
        return z, info
    for _ in range(steps):
        fz = run.step(z)
        z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
    info.grad_steps = steps if z.requires_grad else 0
    return z, info


def _truncated(run: _Run, k: int) -> tuple[Tensor, FixedPointInfo]:
    """``max_iter - k`` loops of the solver without a graph, then ``k`` plain loops.

    The solver gets ``max_iter - k + 1`` evaluations: it returns an iterate whose residual
    it has measured, so its last evaluation only checks the iterate it returns. With
    ``solver="fixed_point"`` and ``tol=0`` the value is exactly ``f^max_iter(z0)``.
    """
    free = run.max_iter - k
    result = run.solve(free + 1) if free >= 1 else None
    z = run.z0 if result is None else result.z
    tracked = min(k, run.max_iter)
    for _ in range(tracked):
        z = run.step(z)
    return z, FixedPointInfo("truncated", result, grad_steps=tracked if z.requires_grad else 0)


def _unroll(run: _Run) -> tuple[Tensor, FixedPointInfo]:
    """Plain (optionally damped) loops from ``z0`` with autograd on every one of them.

    The residual of each iterate is the size of the step it takes, measured without a
    graph; the host reads it only every ``check_every`` loops and only when ``tol > 0``.
    """
    tau = run.solver.tau
    check_every = run.driver.get("check_every", solvers.Problem.check_every)
    eps = run.driver.get("eps", solvers.Problem.eps)
    z = run.z0
    batch = z.shape[0]
    trace = z.new_empty(run.max_iter, batch, 2)
    loops = 0
    while loops < run.max_iter:
        fz = run.step(z)
        with torch.no_grad():
            abs_r, rel_r = solvers.residuals(z.reshape(batch, -1), fz.reshape(batch, -1), eps)
            trace[loops] = torch.stack((abs_r, rel_r), dim=1)
        z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
        loops += 1
        if run.tol > 0 and check_every is not None and loops % check_every == 0:
            res = rel_r if run.stop_mode == "rel" else abs_r
            if bool(((res <= run.tol) | ~res.isfinite()).all()):
                break
    result = _loop_result(z.detach(), trace[:loops], run.tol, run.stop_mode)
    if run.driver.get("raise_on_failure", False) and result.status != Status.CONVERGED.label:
        raise solvers.SolveError(
            f"unroll: not every sample converged ({result.status_counts()}); max relative "
            f"residual {float(result.rel_residual.max()):.3e} after {loops} loops"
        )
    return z, FixedPointInfo("unroll", result, grad_steps=loops if z.requires_grad else 0)


def _loop_result(z: Tensor, trace: Tensor, tol: float, stop_mode: str) -> SolveResult:
    """A :class:`SolveResult` for the unrolled loop from its (N, B, 2) residual trace.

    A sample is ``converged`` when its last residual meets ``tol``, ``non-finite`` when
    that residual is NaN or Inf, and ``max_iter`` otherwise; ``nstep`` counts the loops
    up to the first one that met ``tol`` (all of them if none did).
    """
    abs_trace, rel_trace = trace[..., 0].T, trace[..., 1].T  # (B, N)
    res_trace = rel_trace if stop_mode == "rel" else abs_trace
    n = res_trace.shape[1]
    met = res_trace <= tol
    nstep = torch.where(met.any(dim=1), met.to(torch.uint8).argmax(dim=1) + 1, n)
    last = res_trace[:, -1]
    status = torch.full_like(last, int(Status.MAX_ITER), dtype=torch.int8)
    status = torch.where(last.isfinite(), status, int(Status.NON_FINITE))
    status = torch.where(last <= tol, int(Status.CONVERGED), status).to(torch.int8)
    return SolveResult(
        z=z,
        converged=status == int(Status.CONVERGED),
        nstep=nstep,
        abs_residual=abs_trace[:, -1],
        rel_residual=rel_trace[:, -1],
        abs_trace=abs_trace,
        rel_trace=rel_trace,
        nfe=n,
        sample_status=status,
        solver="unroll",
        sample_evals=n * z.shape[0],
    )


# ----------------------------------------------------------------------------- helpers


def _reaches_other_leaves(out: Tensor, leaf: Tensor) -> bool:
    """Whether the graph of ``out`` reaches a tensor requiring grad other than ``leaf``.

    Walks the autograd graph on the host (no device work): every tensor that requires
    grad ends in an ``AccumulateGrad`` node holding it as ``variable``.
    """
    stack = [out.grad_fn]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", leaf) is not leaf:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def _warn_if_failed(
    result: SolveResult, stage: str, tol: float, driver: dict[str, Any], stacklevel: int
) -> None:
    """Emit a :class:`ConvergenceWarning` when a solve failed (one host read).

    ``max_iter`` counts as a failure only when ``tol > 0`` (``tol=0`` asks for the whole
    budget); ``diverged`` and ``non-finite`` always do. Skipped when ``check_every`` is
    ``None``, the caller's request for no host synchronisation.
    """
    if driver.get("check_every", solvers.Problem.check_every) is None:
        return
    status = result.status
    if status == Status.CONVERGED.label or (status == Status.MAX_ITER.label and tol == 0):
        return
    counts = {k: v for k, v in result.status_counts().items() if v}
    warnings.warn(
        f"eqloop.fixed_point: the {stage} solve ({result.solver}) ended with status "
        f"{status!r} (samples per status: {counts}); max abs residual "
        f"{float(result.abs_residual.max()):.3e}, max rel residual "
        f"{float(result.rel_residual.max()):.3e} after {result.nfe} evaluations (tol={tol}). "
        "Raise the iteration budget, loosen the tolerance, or check that f is contractive.",
        ConvergenceWarning,
        stacklevel=stacklevel + 1,
    )


def _build_solver(name: str, solver: str | Solver, hyperparameters: dict[str, Any]) -> Solver:
    """A solver object from a registered name (validating its hyperparameters) or as is."""
    if isinstance(solver, Solver):
        if hyperparameters:
            raise ValueError(
                f"unknown option(s) {sorted(hyperparameters)}: {name} is a solver object, so "
                f"its hyperparameters belong in its constructor; driver options are "
                f"{sorted(solvers.DRIVER_OPTIONS)}"
            )
        return solver
    if isinstance(solver, str):
        return solvers.make_solver(solver, **hyperparameters)
    raise TypeError(
        f"{name} must be a registered solver name or a solvers.Solver, got {type(solver).__name__}"
    )


def _check_common(
    f: Map,
    z0: Tensor,
    backward: str,
    max_iter: int,
    tol: float,
    stop_mode: str,
    return_result: bool,
) -> None:
    """Validate the arguments every mode uses (the solvers validate the rest)."""
    if not callable(f):
        raise TypeError(f"f must be callable (the fixed-point map), got {type(f).__name__}")
    if not isinstance(z0, Tensor) or not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point torch.Tensor, got {_describe(z0)}")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have a non-empty batch dimension 0, got shape {tuple(z0.shape)}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {backward!r}")
    _positive_int("max_iter", max_iter)
    _tolerance("tol", tol)
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if not isinstance(return_result, bool):
        raise TypeError(f"return_result must be a bool, got {return_result!r}")


def _reject_foreign_options(backward: str, given: dict[str, Any]) -> None:
    """Options meant for another backward mode are errors, never silently ignored."""
    owners = {"backward_": "ift", "phantom_": "phantom", "truncate_": "truncated"}
    for option, value in given.items():
        owner = next(mode for prefix, mode in owners.items() if option.startswith(prefix))
        if value is not None and owner != backward:
            raise ValueError(
                f"{option} applies to backward={owner!r} only, but backward={backward!r}"
            )


def _check_unroll(solver: Solver, driver: dict[str, Any]) -> None:
    """``unroll`` differentiates the plain loop: it needs that solver and its own driver."""
    if not isinstance(solver, FixedPointIteration):
        raise ValueError(
            "backward='unroll' backpropagates through the plain loop z <- f(z), so solver "
            f"must be 'fixed_point' or a solvers.FixedPointIteration, got {solver.name!r}; "
            "use backward='ift', 'phantom' or 'truncated' with other solvers"
        )
    foreign = sorted(set(driver) - set(_UNROLL_DRIVER_OPTIONS))
    if foreign:
        raise ValueError(
            f"option(s) {foreign} do not apply to backward='unroll', which runs its own "
            f"loop; it takes {list(_UNROLL_DRIVER_OPTIONS)}"
        )


def _or(value: Any, default: Any) -> Any:
    """``default`` when ``value`` is None."""
    return default if value is None else value


def _positive_int(name: str, value: Any) -> int:
    """An integer >= 1, else ``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _tolerance(name: str, value: Any) -> float:
    """A finite number >= 0, else ``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _damping(value: Any) -> float:
    """The phantom damping, in (0, 1], else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"phantom_tau must lie in (0, 1], got {value!r}")
    return float(value)


def _describe(value: Any) -> str:
    """Short description of a bad argument for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype}"
    return type(value).__name__
