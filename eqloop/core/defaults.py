"""Defaults that more than one module uses, each written once.

The equilibrium settings apply wherever eqloop solves a model's core to its fixed point
without being told how: ``model(tokens, solver=...)``, ``eqloop eval`` and the
evaluation and diagnostics functions.
"""

from __future__ import annotations

EQUILIBRIUM_SOLVER = "anderson"
"""Solver used to reach the equilibrium when none is named."""

EQUILIBRIUM_MAX_ITER = 100
"""Budget of f-evaluations of an equilibrium solve."""

EQUILIBRIUM_TOL = 1e-4
"""Tolerance of an equilibrium solve, on the relative residual."""

EQUILIBRIUM_STOP_MODE = "rel"
"""Residual the equilibrium tolerance applies to."""
