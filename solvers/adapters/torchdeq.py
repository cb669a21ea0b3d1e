"""torchdeq's solvers behind the ``solvers.solve`` interface, for comparison.

torchdeq is imported when a solve runs, not when eqloop is imported. torchdeq checks
its stopping criterion on the host at every step and stops when the whole batch is
below tolerance; per-sample step counts are taken from its trace.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .._base import Problem
from .._driver import result_from_trace
from .._result import SolveResult
from ._common import CountingMap, ExternalSolver, reject_compaction


class TorchDEQSolver(ExternalSolver):
    """One of torchdeq's solvers (``fixed_point_iter``, ``anderson``, ``broyden``).

    Args:
        kind: which torchdeq solver.
        **hyperparameters: passed to it under torchdeq's names (see ``KINDS``).
    """

    PACKAGE = "torchdeq"
    #: torchdeq solver name -> its hyperparameters and their torchdeq defaults.
    KINDS: ClassVar[dict[str, dict[str, Any]]] = {
        "fixed_point_iter": {"tau": 1.0},
        "anderson": {"m": 6, "lam": 1e-4, "tau": 1.0},
        "broyden": {"LBFGS_thres": None, "ls": False},
    }

    def run(self, problem: Problem) -> SolveResult:
        reject_compaction(problem, self.name)
        from torchdeq.solver import get_solver

        fn = CountingMap(problem)
        solver = get_solver(self.kind)
        # torchdeq's anderson spends two evaluations before its loop starts.
        max_iter = max(problem.max_iter, 3) if self.kind == "anderson" else problem.max_iter
        z, _, info = solver(
            fn, problem.z0, max_iter=max_iter, tol=problem.tol,
            stop_mode=problem.stop_mode, **self.options,
        )
        # torchdeq's traces start with a 1e8 placeholder and are padded after an early stop.
        # Its anderson records no residual for the two evaluations before its loop.
        lead = 2 if self.kind == "anderson" else 0
        steps = fn.calls - lead
        abs_trace, rel_trace = (
            info[key][:, 1:][:, :steps].to(problem.z0.dtype) for key in ("abs_trace", "rel_trace")
        )
        return result_from_trace(
            problem, self.name, z.reshape(problem.z0.shape), abs_trace, rel_trace, fn.calls,
            unrecorded=lead,
        )


