"""Adapters that expose torchdeq's and SciPy's solvers through ``solvers.solve``."""

from __future__ import annotations

from .._registry import register
from .scipy import SciPySolver
from .torchdeq import TorchDEQSolver


def register_adapters() -> None:
    """Register ``torchdeq.*`` and ``scipy.*`` names (their packages import lazily)."""
    for name in TorchDEQSolver.KINDS:
        register(f"torchdeq.{name}", TorchDEQSolver.factory(name))
    for name in SciPySolver.KINDS:
        register(f"scipy.{name}", SciPySolver.factory(name))


__all__ = ["SciPySolver", "TorchDEQSolver", "register_adapters"]
