"""Backward modes of :func:`eqloop.fixed_point`: how a fixed point gets its gradient.

Each mode is a small frozen dataclass holding its settings; ``run`` performs the forward
solve and builds the graph autograd sees (the adjoint as an object, as in optimistix):

================================== ========================================= =============
mode                               gradient                                  f-graphs kept
================================== ========================================= =============
``IFT(solver, max_iter, tol)``     implicit function theorem: the adjoint    1
                                   ``g = J^T g + v`` is solved with a
                                   registered solver, then pushed through
                                   one application ``f(z*)``
``Phantom(steps=5, tau=1.0)``      ``steps`` damped steps                    ``steps``
                                   ``z <- (1 - tau) z + tau f(z)`` from the
                                   detached ``z*``, backpropagated through
``Truncated(k=8)``                 ``max_iter - k`` loops of the solver      ``k``
                                   without a graph, then ``k`` plain loops
                                   ``z <- f(z)`` with one (Huginn)
``Unroll()``                       every loop of the plain iteration from    loops run
                                   ``z0``, each sample until it meets
                                   ``tol`` or the budget runs out
================================== ========================================= =============

``J = df/dz`` at ``z*`` and ``v`` is the gradient arriving at the output. Saved memory
therefore does not grow with the loop count for ``IFT`` and ``Phantom``, is capped at
``k`` loops for ``Truncated`` and grows linearly for ``Unroll``. The names ``"ift"``,
``"phantom"``, ``"truncated"`` and ``"unroll"`` stand for the modes' defaults.

Values returned (shapes as ``z0``):

* ``IFT``: exactly the solver's best iterate ``z*``; its gradient flows through one extra
  application ``f(z*)`` that carries a hook.
* ``Phantom``: the result of the ``steps`` damped steps from ``z*``.
* ``Truncated``: ``f^k`` of the solver's result (``f^max_iter(z0)`` when ``max_iter <= k``).
* ``Unroll``: per sample, the state after the last loop it ran (``f^T(z0)`` undamped).

Inside ``torch.no_grad()`` no graph is built: ``IFT`` and ``Phantom`` return ``z*``,
``Truncated`` and ``Unroll`` the value above. Higher-order derivatives through ``IFT``
are not supported: under ``create_graph=True`` the adjoint solution is a constant.
"""

from __future__ import annotations

import abc
import inspect
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

import solvers
from solvers import FixedPointIteration, Solver, SolveResult, Status, checks

__all__ = [
    "BACKWARDS",
    "BACKWARD_MODES",
    "DEFAULT_BACKWARD",
    "IFT",
    "Backward",
    "ConvergenceWarning",
    "FixedPointInfo",
    "FixedPointProblem",
    "Phantom",
    "Truncated",
    "Unroll",
    "default_backward_tol",
    "make_backward",
    "plain_loops",
    "warn_if_failed",
]

# Driver options of solvers.solve that also configure the IFT adjoint solve. ``args`` and
# ``compact`` belong to the forward solve only: the adjoint map is a VJP of the whole batch.
_ADJOINT_DRIVER_OPTIONS = ("eps", "check_every", "diverge_ratio", "raise_on_failure")


class ConvergenceWarning(UserWarning):
    """A forward or adjoint solve of :func:`eqloop.fixed_point` did not converge.

    It points at the first caller outside eqloop, solvers and torch. Silence it with
    ``warnings.simplefilter("ignore", ConvergenceWarning)``.
    """


def default_backward_tol(dtype: torch.dtype) -> float:
    """Default relative tolerance of the IFT adjoint solve for a state of ``dtype``.

    ``max(1e-10, 10 * eps)``: 1e-10 in float64, about 1.2e-6 in float32, 9.8e-3 in
    float16 and 7.8e-2 in bfloat16. Ten machine epsilons is about as far as an adjoint
    residual computed in that precision goes down; float64 stops at 1e-10, where the
    gradient error is already far below what a float64 comparison resolves.
    """
    return max(1e-10, 10 * torch.finfo(dtype).eps)


@dataclass
class FixedPointInfo:
    """What :func:`eqloop.fixed_point` reports with ``return_result=True``.

    Attributes:
        backward_mode: the mode's name, one of :data:`BACKWARD_MODES`.
        forward: the solve that produced the output (for ``unroll`` the plain loop with
            a graph). ``None`` for ``truncated`` when ``max_iter <= k`` (no loop ran
            without a graph).
        backward: the IFT adjoint solve of the most recent backward pass through the
            result; ``None`` until one has run, and always for the other modes.
        grad_steps: applications of ``f`` kept in the autograd graph (0 without a graph).
    """

    backward_mode: str
    forward: SolveResult | None
    backward: SolveResult | None = None
    grad_steps: int = 0


@dataclass(frozen=True)
class FixedPointProblem:
    """The validated forward problem every mode solves.

    Attributes:
        f: the map, called as ``f(z, *args)`` on (B, ...) states.
        z0: (B, ...) starting point.
        args: per-sample tensors (batch dimension 0) passed to ``f`` after ``z``.
        max_iter: budget of f-evaluations of the forward solve.
        tol: tolerance on the residual chosen by ``stop_mode``.
        stop_mode: ``"rel"`` or ``"abs"``.
        solver: the forward solver.
        driver: ``solvers.solve`` driver options (``eps``, ``check_every``, ...).
    """

    f: Callable[..., Tensor]
    z0: Tensor
    args: tuple[Tensor, ...]
    max_iter: int
    tol: float
    stop_mode: str
    solver: Solver
    driver: dict[str, Any]

    def solve(self, max_iter: int) -> SolveResult:
        """The forward solve without a graph, with a budget of ``max_iter``."""
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

    @property
    def reads_host(self) -> bool:
        """Whether the caller allows host reads (``check_every`` is not ``None``)."""
        return self.driver.get("check_every", solvers.Problem.check_every) is not None


def plain_loops(
    f: Callable[..., Tensor], z: Tensor, loops: int, args: tuple[Tensor, ...] = ()
) -> SolveResult:
    """Exactly ``loops`` applications ``z <- f(z, *args)`` through the solvers driver.

    No tolerance, no divergence stop and no host read: ``result.z`` is ``f^loops(z)``,
    differentiable when grad mode is on.
    """
    return solvers.solve(
        f,
        z,
        FixedPointIteration(),
        max_iter=loops,
        tol=0.0,
        args=args,
        output="last",
        diverge_ratio=math.inf,
        check_every=None,
    )


class Backward(abc.ABC):
    """A backward mode: runs the forward solve of a problem and attaches a gradient."""

    name: ClassVar[str]

    def check(self, problem: FixedPointProblem) -> None:  # noqa: B027 (most modes take any)
        """Raise ``ValueError`` when the mode cannot handle ``problem``."""

    @abc.abstractmethod
    def run(self, problem: FixedPointProblem) -> tuple[Tensor, FixedPointInfo]:
        """The output (shape of ``z0``) and the :class:`FixedPointInfo` of the solve."""

    def reaches_start(self, max_iter: int) -> bool:
        """Whether the gradient flows back to ``z0`` in a solve of budget ``max_iter``.

        Loops run before the solve (``LoopedLM.forward(start_loops=...)``) need their
        graph only then.
        """
        return True


@dataclass(frozen=True)
class IFT(Backward):
    """Implicit function theorem: solve the adjoint ``g = J^T g + v`` in backward.

    Args:
        solver: solver of the adjoint fixed point; ``None`` reuses the forward solver,
            a name builds that solver with its default hyperparameters (pass an object
            to set them).
        max_iter: adjoint budget in vector-Jacobian products.
        tol: tolerance on the adjoint's relative residual ``||J^T g + v - g|| /
            ||J^T g + v||`` (relative: the gradient's scale is the loss's); ``None``
            means :func:`default_backward_tol` of the state's dtype.
    """

    name: ClassVar[str] = "ift"
    solver: str | Solver | None = None
    max_iter: int = 100
    tol: float | None = None

    def __post_init__(self) -> None:
        if self.solver is not None and not isinstance(self.solver, Solver):
            if not isinstance(self.solver, str):
                raise TypeError(
                    "IFT.solver must be None, a registered solver name or a solvers.Solver, "
                    f"got {type(self.solver).__name__}"
                )
            checks.choice("IFT.solver", self.solver, solvers.available())
        object.__setattr__(self, "max_iter", checks.integer("IFT.max_iter", self.max_iter, low=1))
        if self.tol is not None:
            object.__setattr__(self, "tol", checks.number("IFT.tol", self.tol, low=0.0))

    def reaches_start(self, max_iter: int) -> bool:
        """Never: the gradient is taken at z* alone."""
        return False

    def run(self, problem: FixedPointProblem) -> tuple[Tensor, FixedPointInfo]:
        """Solve without a graph; attach the implicit gradient to one application of f.

        The output is ``z* + (f(z*) - f(z*).detach())``: its value is exactly ``z*``, and
        a hook on it replaces the arriving gradient ``v`` by the adjoint solution, which
        autograd then carries through ``f(z*)`` to the parameters, captured inputs and
        ``args`` of ``f``.
        """
        result = problem.solve(problem.max_iter)
        info = FixedPointInfo(self.name, result)
        if not torch.is_grad_enabled():
            return result.z, info
        return self._attach(problem, result.z, info), info

    # Eager under torch.compile: the hook's VJPs need autograd's own graph of f(z*) in
    # z*, which a compiled graph does not expose, and dynamo cannot trace a hook that
    # calls torch.autograd.grad. The solve before and the readout after stay compiled.
    @torch.compiler.disable
    def _attach(self, problem: FixedPointProblem, z_star: Tensor, info: FixedPointInfo) -> Tensor:
        """``z* + (f(z*) - f(z*).detach())`` with the adjoint hook, or ``z*`` itself when
        nothing in ``f`` requires grad; ``info.grad_steps`` counts the f application."""
        z_leaf = z_star.detach().requires_grad_()
        fz = problem.f(z_leaf, *problem.args)
        if not _reaches_other_leaves(fz, z_leaf):
            return z_star  # nothing in f requires grad: an ordinary constant
        out = z_star + (fz - fz.detach())
        # On ``out``, not on ``fz``: the VJPs inside the hook start at ``fz`` and must not
        # run into the hook again.
        out.register_hook(_AdjointHook(self, problem, fz, z_leaf, info))
        info.grad_steps = 1
        return out


class _AdjointHook:
    """Replaces the gradient ``v`` arriving at ``z*`` by the solution of ``g = J^T g + v``.

    Args:
        mode: the IFT settings.
        problem: the forward problem (its solver and driver options).
        fz: (B, ...) ``f(z*)`` with its graph; every VJP reuses it (``retain_graph``).
        z_leaf: (B, ...) the detached ``z*`` that ``fz`` was computed from.
        info: receives the adjoint ``SolveResult`` as ``info.backward``.
    """

    def __init__(
        self,
        mode: IFT,
        problem: FixedPointProblem,
        fz: Tensor,
        z_leaf: Tensor,
        info: FixedPointInfo,
    ) -> None:
        solver = problem.solver if mode.solver is None else mode.solver
        self.solver = solvers.make_solver(solver) if isinstance(solver, str) else solver
        self.max_iter = mode.max_iter
        self.tol = default_backward_tol(z_leaf.dtype) if mode.tol is None else mode.tol
        self.driver = {k: problem.driver[k] for k in _ADJOINT_DRIVER_OPTIONS if k in problem.driver}
        self.reads_host = problem.reads_host
        self.fz, self.z_leaf, self.info = fz, z_leaf, info

    def vjp(self, g: Tensor) -> Tensor:
        """``J^T g`` for every sample: (B, ...) -> (B, ...)."""
        (out,) = torch.autograd.grad(
            self.fz, self.z_leaf, g, retain_graph=True, materialize_grads=True
        )
        return out

    def __call__(self, v: Tensor | None) -> Tensor | None:
        if v is None:  # an undefined gradient stays undefined
            return None
        if self.reads_host and not bool(v.isfinite().all()):
            _warn(
                "eqloop.fixed_point: the gradient arriving at z* contains NaN or Inf; "
                "skipping the adjoint solve and passing it on unchanged"
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
        if self.reads_host:
            warn_if_failed(adjoint, "adjoint (backward)", "ift", self.tol)
        return adjoint.z


@dataclass(frozen=True)
class Phantom(Backward):
    """Phantom gradient: ``steps`` damped steps with a graph from the detached ``z*``.

    Args:
        steps: number of steps ``k >= 1``.
        tau: damping in (0, 1]; 1 means plain steps ``z <- f(z)``.
    """

    name: ClassVar[str] = "phantom"
    steps: int = 5
    tau: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", checks.integer("Phantom.steps", self.steps, low=1))
        tau = checks.number("Phantom.tau", self.tau, low=0.0, high=1.0, low_open=True)
        object.__setattr__(self, "tau", tau)

    def reaches_start(self, max_iter: int) -> bool:
        """Never: the gradient is taken at z* alone."""
        return False

    def run(self, problem: FixedPointProblem) -> tuple[Tensor, FixedPointInfo]:
        result = problem.solve(problem.max_iter)
        info = FixedPointInfo(self.name, result)
        z = result.z
        if not torch.is_grad_enabled():
            return z, info
        for _ in range(self.steps):
            fz = problem.f(z, *problem.args)
            z = fz if self.tau == 1.0 else torch.lerp(z, fz, self.tau)
        info.grad_steps = self.steps if z.requires_grad else 0
        return z, info


@dataclass(frozen=True)
class Truncated(Backward):
    """Backpropagate through the last ``k`` loops only (Huginn's truncated backprop).

    The solver runs ``max_iter - k`` loops without a graph (given one more evaluation, so
    that it returns an iterate whose residual it measured), then ``k`` plain loops run
    with one. With ``solver="fixed_point"`` and ``tol=0`` the value is exactly
    ``f^max_iter(z0)``.

    Args:
        k: loops with a graph, ``k >= 1``.
    """

    name: ClassVar[str] = "truncated"
    k: int = 8

    def reaches_start(self, max_iter: int) -> bool:
        """Only when every loop of the solve has a graph (``max_iter <= k``)."""
        return max_iter <= self.k

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", checks.integer("Truncated.k", self.k, low=1))

    def run(self, problem: FixedPointProblem) -> tuple[Tensor, FixedPointInfo]:
        free = problem.max_iter - self.k
        result = problem.solve(free + 1) if free >= 1 else None
        z = problem.z0 if result is None else result.z
        tracked = min(self.k, problem.max_iter)
        z = plain_loops(problem.f, z, tracked, problem.args).z
        return z, FixedPointInfo(self.name, result, grad_steps=tracked if z.requires_grad else 0)


@dataclass(frozen=True)
class Unroll(Backward):
    """Backpropagate through every loop of the (optionally damped) plain iteration.

    The forward solver must be ``"fixed_point"`` (its ``tau`` damps the loops); each
    sample stops on its own when it meets ``tol`` (driver options apply as in
    ``solvers.solve``) and returns its state after the last loop it ran.
    """

    name: ClassVar[str] = "unroll"

    def check(self, problem: FixedPointProblem) -> None:
        if not isinstance(problem.solver, FixedPointIteration):
            raise ValueError(
                "backward='unroll' backpropagates through the plain loop z <- f(z), so solver "
                f"must be 'fixed_point' or a solvers.FixedPointIteration, got "
                f"{problem.solver.name!r}; use backward='ift', 'phantom' or 'truncated' with "
                "other solvers"
            )

    def run(self, problem: FixedPointProblem) -> tuple[Tensor, FixedPointInfo]:
        result = solvers.solve(
            problem.f,
            problem.z0,
            problem.solver,
            max_iter=problem.max_iter,
            tol=problem.tol,
            stop_mode=problem.stop_mode,
            args=problem.args,
            output="last",
            **problem.driver,
        )
        z = result.z
        return z, FixedPointInfo(self.name, result, grad_steps=result.nfe if z.requires_grad else 0)


BACKWARDS: dict[str, type[Backward]] = {
    mode.name: mode for mode in (IFT, Phantom, Truncated, Unroll)
}
"""Each backward mode's class by name."""

BACKWARD_MODES: tuple[str, ...] = tuple(BACKWARDS)
"""The names accepted as ``backward=``: ``("ift", "phantom", "truncated", "unroll")``."""

DEFAULT_BACKWARD = IFT.name
"""The backward mode of :func:`eqloop.fixed_point` (and of a model's solve) when none is given."""


def make_backward(backward: str | Backward, **options: Any) -> Backward:
    """A backward mode from its name and fields (as configs and the CLI give them).

    Args:
        backward: one of :data:`BACKWARD_MODES`, or a :class:`Backward` object (returned
            as it is).
        **options: the mode's fields, e.g. ``make_backward("ift", max_iter=50)``.

    Raises:
        ValueError: unknown mode name.
        TypeError: ``backward`` is neither a name nor a mode, or an option is not a field
            of the mode (the message names it and lists the fields).
    """
    if isinstance(backward, Backward):
        if options:
            raise TypeError(
                f"options {sorted(options)} given with a {type(backward).__name__} object: "
                "set its fields in its constructor instead"
            )
        return backward
    if not isinstance(backward, str):
        raise TypeError(
            f"backward must be a mode name {BACKWARD_MODES} or a backward object such as "
            f"eqloop.IFT(), got {type(backward).__name__}"
        )
    if backward not in BACKWARDS:
        raise ValueError(
            f"backward must be one of {BACKWARD_MODES} (or a backward object such as "
            f"eqloop.IFT(max_iter=50)), got {backward!r}"
        )
    mode = BACKWARDS[backward]
    valid = [f.name for f in fields(mode)] if options else []  # no fields() while tracing
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for backward {backward!r}: {mode.__name__} takes "
            f"{valid if valid else 'no options'}"
        )
    return mode(**options)


# ----------------------------------------------------------------------------- helpers


def warn_if_failed(result: SolveResult, stage: str, mode: str, tol: float) -> None:
    """Emit a :class:`ConvergenceWarning` when a solve failed (one host read).

    ``max_iter`` counts as a failure only when ``tol > 0`` (``tol=0`` asks for the whole
    budget); ``diverged`` and ``non-finite`` always do.
    """
    status = result.status
    if status == Status.CONVERGED.label or (status == Status.MAX_ITER.label and tol == 0):
        return
    counts = {k: v for k, v in result.status_counts().items() if v}
    _warn(
        f"eqloop.fixed_point (backward={mode}): the {stage} solve ({result.solver}) ended "
        f"with status {status!r} (samples per status: {counts}); max abs residual "
        f"{float(result.abs_residual.max()):.3e}, max rel residual "
        f"{float(result.rel_residual.max()):.3e} after {result.nfe} evaluations (tol={tol}). "
        "Raise the iteration budget, loosen the tolerance, or check that f is contractive."
    )


# The packages whose frames a warning skips: eqloop (two levels up from eqloop/core/),
# solvers and torch.
_PACKAGE_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # eqloop/
    os.path.dirname(os.path.abspath(solvers.__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def _warn(message: str) -> None:
    """Warn at the first frame outside eqloop, solvers and torch: the user's call."""
    frame = inspect.currentframe()
    if frame is None:  # an interpreter without frame objects: point at our caller
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
        return
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
        frame = frame.f_back
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message,
        ConvergenceWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )


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
