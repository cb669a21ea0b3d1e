"""The small interface every solver implements.

A solver is an object that holds hyperparameters and receives a validated
:class:`Problem`. Solvers that run inside eqloop's driver loop
(:func:`solvers._driver.iterate`) implement :class:`IterativeSolver`:

* ``init(z0)`` builds the solver's state for a flat batch ``z0`` of shape (B, n);
* ``step(state, z, fz, k)`` receives the current iterate ``z`` and its image ``fz``
  (both (B, n)) at iteration ``k`` and proposes the next iterate.

The driver owns everything else: calling ``f``, residuals, per-sample stopping and
freezing, the best iterate, traces and status. Solvers that own their loop (the
torchdeq and SciPy adapters) implement :class:`Solver` directly.
"""

from __future__ import annotations

import abc
from typing import Any

from torch import Tensor

from ._driver import iterate
from ._problem import Problem
from ._result import SolveResult

__all__ = ["IterativeSolver", "Problem", "Solver"]


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
        return iterate(self, problem)
