"""What the adapters share: hyperparameter checking and the budgeted, checked map."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor

from .._base import Problem, Solver
from .._driver import check_image


def merge_hyperparameters(
    solver_name: str, defaults: dict[str, Any], given: dict[str, Any]
) -> dict[str, Any]:
    """Defaults overridden by ``given``; unknown names raise ``ValueError``."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for solver {solver_name!r}; "
            f"its hyperparameters are {sorted(defaults)}"
        )
    return {**defaults, **given}


def reject_compaction(problem: Problem, solver_name: str) -> None:
    """The adapters own their loops, so they cannot pass a subset of samples to f."""
    if problem.compact:
        raise ValueError(
            f"compact=True is not supported by {solver_name!r}, which runs its own loop; "
            "use one of eqloop's solvers ('fixed_point', 'anderson', 'broyden')"
        )


class BudgetExhausted(Exception):
    """Raised into an external solver's loop when it asks for one evaluation too many."""


class CountingMap:
    """Calls ``f(z, *args)``, checks the output and counts the calls against a budget.

    The last evaluated pair is kept (by reference, no copy), so a solver that returns
    the point it evaluated last needs no extra evaluation to measure it.

    Args:
        problem: the problem whose ``f`` and ``args`` are called.
        budget: calls allowed; one more raises :class:`BudgetExhausted`.
    """

    def __init__(self, problem: Problem, budget: int) -> None:
        self.f: Callable[..., Tensor] = problem.f
        self.args = problem.args
        self.dtype, self.device = problem.z0.dtype, problem.z0.device
        self.budget = budget
        self.calls = 0
        self.last_z: Tensor | None = None
        self.last_fz: Tensor | None = None

    def __call__(self, z: Tensor) -> Tensor:
        if self.calls >= self.budget:
            raise BudgetExhausted
        self.calls += 1
        # The adapters' libraries would reshape, broadcast or cast a wrong output silently.
        fz = check_image(self.f(z, *self.args), z.shape, self.dtype, self.device)
        self.last_z, self.last_fz = z, fz
        return fz


class ExternalSolver(Solver):
    """A solver from another package, picked by ``kind`` from the subclass's ``KINDS``.

    Args:
        kind: which of the package's solvers.
        **hyperparameters: passed to it under the package's names.
    """

    #: the package's prefix in registered names, e.g. ``"torchdeq"``.
    PACKAGE: ClassVar[str] = ""
    #: solver name -> its hyperparameters and their defaults.
    KINDS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, kind: str, **hyperparameters: Any) -> None:
        if kind not in self.KINDS:
            raise ValueError(
                f"unknown {self.PACKAGE} solver {kind!r}; choose from {sorted(self.KINDS)}"
            )
        self.kind = kind
        self.name = f"{self.PACKAGE}.{kind}"
        self.options = merge_hyperparameters(self.name, self.KINDS[kind], hyperparameters)

    @classmethod
    def factory(cls, kind: str) -> Callable[..., ExternalSolver]:
        """A registry factory for ``kind``."""

        def make(**hyperparameters: Any) -> ExternalSolver:
            return cls(kind, **hyperparameters)

        return make

    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.options)
