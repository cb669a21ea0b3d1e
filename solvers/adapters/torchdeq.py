"""torchdeq's solvers behind the ``solvers.solve`` interface, for comparison.

torchdeq is imported when a solve runs, not when eqloop is imported. torchdeq checks
its stopping criterion on the host at every step and stops when the whole batch is
below tolerance; per-sample step counts are taken from its trace. The budget
``max_iter`` covers torchdeq's evaluations and the one that measures its answer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._base import Problem
from .._driver import result_from_trace
from .._result import SolveResult
from ._common import BudgetExhausted, CountingMap, ExternalSolver, reject_compaction

#: Evaluations torchdeq makes beyond its ``max_iter`` (Broyden evaluates z0 first) and
#: the smallest ``max_iter`` with which it takes a step (Anderson spends two first).
_EXTRA = {"fixed_point_iter": 0, "anderson": 0, "broyden": 1}
_FIRST_STEP = {"fixed_point_iter": 1, "anderson": 3, "broyden": 1}
#: The solvers whose linear algebra has no float16/bfloat16 kernels.
_NEEDS_32_BIT = ("anderson",)


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
        z0 = problem.z0
        if self.kind in _NEEDS_32_BIT and z0.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"{self.name} cannot solve in {z0.dtype} (torch.linalg.solve has no "
                "16-bit kernels); use 'anderson', or cast z0 to float32"
            )
        from torchdeq.solver import get_solver

        # One evaluation of the budget is kept for measuring the returned point.
        fn = CountingMap(problem, budget=problem.max_iter - 1)
        inner = fn.budget - _EXTRA[self.kind]
        if inner < _FIRST_STEP[self.kind]:  # too small a budget for one torchdeq step
            empty = z0.new_empty(z0.shape[0], 0)
            return result_from_trace(problem, self.name, z0, empty, empty, fn.calls)
        try:
            z, _, info = get_solver(self.kind)(
                fn,
                z0,
                max_iter=inner,
                tol=problem.tol,
                stop_mode=problem.stop_mode,
                **self.options,
            )
        except BudgetExhausted:  # only a line search can overrun: keep the last point
            nan = z0.new_full((z0.shape[0], fn.calls), float("nan"))
            return result_from_trace(
                problem, self.name, fn.last_z, nan, nan, fn.calls, fz=fn.last_fz
            )
        # torchdeq's traces start with a 1e8 placeholder and are padded after an early stop.
        # Its anderson records no residual for the two evaluations before its loop, its
        # broyden none for the evaluation of z0.
        lead = {"fixed_point_iter": 0, "anderson": 2, "broyden": 1}[self.kind]
        steps = fn.calls - lead
        abs_trace, rel_trace = (
            info[key][:, 1:][:, :steps].to(z0.dtype) for key in ("abs_trace", "rel_trace")
        )
        return result_from_trace(
            problem,
            self.name,
            z.reshape(z0.shape),
            abs_trace,
            rel_trace,
            fn.calls,
            unrecorded=lead,
        )
