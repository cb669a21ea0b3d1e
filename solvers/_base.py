"""The small interface every solver implements.

A solver is an object that holds hyperparameters. Solvers that run inside eqloop's
driver loop (:func:`solvers._driver.iterate`) implement :class:`IterativeSolver`:

* ``init(z0)`` builds the solver's state for a flat batch ``z0`` of shape (B, n);
* ``step(state, z, fz, k)`` receives the current iterate ``z`` and its image ``fz``
  (both (B, n)) at iteration ``k`` and proposes the next iterate.

The driver owns everything else: calling ``f``, residuals, per-sample stopping and
freezing, the best iterate, traces and status. Solvers that own their loop (the
torchdeq and SciPy adapters) implement :class:`Solver` directly.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ._result import SolveResult


@dataclass(frozen=True)
class Problem:
    """A validated fixed-point problem and the driver settings for solving it.

    Attributes:
        f: the map; called as ``f(z, *args)`` with ``z`` of shape (B, ...).
        z0: (B, ...) initial guess.
        args: extra per-sample tensors (batch dimension 0) passed to ``f`` after ``z``.
        max_iter: budget of f-evaluations.
        tol: tolerance on the residual chosen by ``stop_mode``.
        stop_mode: ``"abs"`` or ``"rel"``.
        eps: added to ``||f(z)||`` in the relative residual.
        check_every: host check for "all samples stopped" every this many
            evaluations; ``None`` never checks (no host synchronisation at all).
        compact: pass only the still-active samples to ``f`` (needs independent samples).
        diverge_ratio: a sample diverges once its absolute residual exceeds this
            multiple of its first absolute residual.
        raise_on_failure: raise :class:`SolveError` when any sample fails to converge.
    """

    f: Callable[..., Tensor]
    z0: Tensor
    args: tuple[Tensor, ...] = ()
    max_iter: int = 50
    tol: float = 1e-5
    stop_mode: str = "rel"
    eps: float = 1e-9
    check_every: int | None = 1
    compact: bool = False
    diverge_ratio: float = 1e4
    raise_on_failure: bool = False


class Solver(abc.ABC):
    """Anything ``solvers.solve`` can run."""

    #: Registered name, used in results and error messages.
    name: str = "solver"

    @abc.abstractmethod
    def run(self, problem: Problem) -> SolveResult:
        """Solve ``problem`` and return the result."""

    def hyperparameters(self) -> dict[str, Any]:
        """The solver's hyperparameters by name (for tables and JSON)."""
        return {}


class IterativeSolver(Solver):
    """A solver that proposes one iterate at a time inside the shared driver loop."""

    @abc.abstractmethod
    def init(self, z0: Tensor) -> Any:
        """Return the initial state for a flat batch ``z0`` of shape (B, n)."""

    @abc.abstractmethod
    def step(self, state: Any, z: Tensor, fz: Tensor, k: int) -> tuple[Any, Tensor]:
        """Propose the next iterate.

        Args:
            state: what ``init`` or the previous ``step`` returned.
            z: (B, n) current iterate.
            fz: (B, n) ``f(z)``.
            k: zero-based index of this evaluation.

        Returns:
            The new state and the next iterate, shape (B, n).
        """

    def run(self, problem: Problem) -> SolveResult:
        from ._driver import iterate

        return iterate(self, problem)
