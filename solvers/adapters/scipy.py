"""SciPy's quasi-Newton root finders behind the ``solvers.solve`` interface.

SciPy solves ``g(z) = f(z) - z = 0`` for the whole batch as one vector in float64 on
the host. Its stopping test is given eqloop's per-sample residual (the worst sample
must meet ``tol``), so tolerances mean the same as for every other solver. A sample
whose image turns non-finite is taken out of the problem (SciPy sees its residual as
zero from then on), so the healthy samples keep iterating. ``max_iter`` is a hard
budget of evaluations, line searches included. This is a reference for comparison,
not a fast path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from .._base import Problem
from .._driver import norms, relative, result_from_trace
from .._result import SolveResult
from ._common import BudgetExhausted, CountingMap, ExternalSolver, reject_compaction


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
        # Every point SciPy asks for is measured in g, so the answer, which SciPy
        # evaluated, needs no evaluation of its own: SciPy gets the whole budget.
        fn = CountingMap(problem, budget=problem.max_iter)
        abs_rows: list[torch.Tensor] = []
        rel_rows: list[torch.Tensor] = []
        dead = torch.zeros(batch, 1, dtype=torch.bool, device=z0.device)
        seen: dict[str, Any] = {}  # "res": live residuals of the last point; "best": ...

        def g(x: np.ndarray) -> np.ndarray:
            nonlocal dead
            z = torch.from_numpy(x).to(device=z0.device, dtype=z0.dtype).view(shape)
            with torch.no_grad():
                try:
                    fz = fn(z)
                except Exception as error:  # re-raised below; SciPy must not swallow it
                    seen["error"] = error
                    raise
                zf, fzf = z.reshape(batch, -1), fz.reshape(batch, -1)
                abs_r, norm_fz = norms(zf, fzf, keepdim=True)
                rel_r = relative(abs_r, norm_fz, problem.eps)
                abs_rows.append(abs_r)
                rel_rows.append(rel_r)
                res = rel_r if problem.stop_mode == "rel" else abs_r
                dead = dead | ~(res.isfinite() & norm_fz.isfinite())
                seen["res"] = res.masked_fill(dead, 0.0)
                gx = (fzf - zf).masked_fill(dead, 0.0)
            worst = float(seen["res"].max())
            seen["last"] = (x.copy(), z, fz)
            if "best" not in seen or worst < seen["best"][0]:
                seen["best"] = (worst, seen["last"])
            return gx.reshape(-1).cpu().double().numpy()

        def worst_live_residual(_: np.ndarray) -> float:
            return float(seen["res"].max())

        method = getattr(scipy.optimize, self.kind)
        x0 = z0.detach().reshape(-1).cpu().double().numpy()
        try:
            x = method(
                g,
                x0,
                maxiter=problem.max_iter,
                f_tol=max(problem.tol, 1e-300),
                tol_norm=worst_live_residual,
                **self.options,
            )
        except scipy.optimize.NoConvergence as stopped:
            x = stopped.args[0]
        except BudgetExhausted:
            x = None
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            if "error" in seen:  # raised by f (e.g. a wrong output shape), not by SciPy
                raise seen["error"] from None
            x = None  # SciPy gave up on a singular step
        traces = (torch.cat(abs_rows, dim=1), torch.cat(rel_rows, dim=1))
        last_x, last_z, last_fz = seen["last"]
        if x is not None and np.array_equal(np.asarray(x), last_x):
            return result_from_trace(problem, self.name, last_z, *traces, fn.calls, fz=last_fz)
        if x is None or fn.calls == problem.max_iter:
            # Interrupted, or no evaluation left to measure SciPy's answer: the best
            # point seen (lowest worst-sample residual), which was evaluated.
            _, (_, best_z, best_fz) = seen["best"]
            return result_from_trace(problem, self.name, best_z, *traces, fn.calls, fz=best_fz)
        z = torch.as_tensor(np.asarray(x), dtype=z0.dtype, device=z0.device).view(shape)
        return result_from_trace(problem, self.name, z, *traces, fn.calls)
