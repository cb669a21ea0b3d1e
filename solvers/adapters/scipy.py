"""SciPy's quasi-Newton root finders behind the ``solvers.solve`` interface.

SciPy solves ``g(z) = f(z) - z = 0`` for the whole batch as one vector in float64 on
the host. Its stopping test is given eqloop's per-sample residual (the worst sample
must meet ``tol``), so tolerances mean the same as for every other solver. This is a
reference for comparison, not a fast path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from .._base import Problem
from .._driver import residuals, result_from_trace
from .._result import SolveResult
from ._common import CountingMap, ExternalSolver, reject_compaction


class SciPySolver(ExternalSolver):
    """``scipy.optimize.anderson`` or ``scipy.optimize.broyden1``.

    Args:
        kind: ``"anderson"`` or ``"broyden1"``.
        **hyperparameters: passed to SciPy under its names (see ``KINDS``). ``alpha=1``
            makes the initial Jacobian of ``g`` equal to ``-I``, right for a fixed point.
    """

    PACKAGE = "scipy"
    KINDS: ClassVar[dict[str, dict[str, Any]]] = {
        "anderson": {"alpha": 1.0, "M": 5, "w0": 0.01, "line_search": "armijo"},
        "broyden1": {"alpha": 1.0, "max_rank": None, "line_search": "armijo"},
    }

    def run(self, problem: Problem) -> SolveResult:
        reject_compaction(problem, self.name)
        import scipy.optimize

        z0 = problem.z0
        batch, shape = z0.shape[0], z0.shape
        fn = CountingMap(problem)
        abs_rows: list[torch.Tensor] = []
        rel_rows: list[torch.Tensor] = []
        last: dict[str, Any] = {}

        def g(x: np.ndarray) -> np.ndarray:
            z = torch.from_numpy(x).to(device=z0.device, dtype=z0.dtype).view(shape)
            with torch.no_grad():
                try:
                    fz = fn(z).reshape(batch, -1)
                except Exception as error:  # re-raised below; SciPy must not swallow it
                    last["error"] = error
                    raise
            abs_r, rel_r = residuals(z.reshape(batch, -1), fz, problem.eps)
            abs_rows.append(abs_r)
            rel_rows.append(rel_r)
            last["res"] = rel_r if problem.stop_mode == "rel" else abs_r
            worst = float(last["res"].max())
            if "x" not in last or worst < last["worst"]:
                last["x"], last["worst"] = x.copy(), worst
            return (fz - z.reshape(batch, -1)).reshape(-1).cpu().double().numpy()

        def worst_sample_residual(_: np.ndarray) -> float:
            return float(last["res"].max())

        method = getattr(scipy.optimize, self.kind)
        x0 = z0.detach().reshape(-1).cpu().double().numpy()
        try:
            x = method(
                g, x0, maxiter=problem.max_iter, f_tol=max(problem.tol, 1e-300),
                tol_norm=worst_sample_residual, **self.options,
            )
        except scipy.optimize.NoConvergence as stopped:
            x = stopped.args[0]
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            if "error" in last:  # raised by f (e.g. a wrong output shape), not by SciPy
                raise last["error"] from None
            # SciPy gives up on non-finite or singular steps; report the best point seen.
            x = last.get("x", x0)
        z = torch.as_tensor(np.asarray(x), dtype=z0.dtype, device=z0.device).view(shape)
        abs_trace = torch.stack(abs_rows, dim=1)
        rel_trace = torch.stack(rel_rows, dim=1)
        return result_from_trace(problem, self.name, z, abs_trace, rel_trace, fn.calls)
