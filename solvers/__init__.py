"""Batched, device-agnostic fixed-point solvers for PyTorch.

>>> import solvers
>>> res = solvers.solve(f, z0, "anderson", max_iter=50, tol=1e-5)   # doctest: +SKIP

Solvers: ``fixed_point``, ``anderson``, ``broyden`` (eqloop's own), plus adapters
``torchdeq.*`` and ``scipy.*`` that return the same :class:`SolveResult`.
Third-party solvers plug in with :func:`register`.
"""

from ._base import IterativeSolver, Problem, Solver
from ._driver import residuals
from ._registry import DRIVER_OPTIONS, available, make_solver, register, solve
from ._result import SolveError, SolveResult, Status
from .adapters import register_adapters
from .anderson import Anderson
from .broyden import Broyden
from .fixed_point import FixedPointIteration

register("fixed_point", FixedPointIteration)
register("anderson", Anderson)
register("broyden", Broyden)
register_adapters()

__all__ = [
    "DRIVER_OPTIONS",
    "Anderson",
    "Broyden",
    "FixedPointIteration",
    "IterativeSolver",
    "Problem",
    "SolveError",
    "SolveResult",
    "Solver",
    "Status",
    "available",
    "make_solver",
    "register",
    "residuals",
    "solve",
]
