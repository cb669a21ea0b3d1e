"""torch.compile: compiled solves equal eager ones, and how many graphs a solve makes.

Compile time dominates these tests, so the problems are tiny and the inductor runs that
are not needed to catch a regression are ``slow``. Anderson with check points is in
the default run: inductor used to miscompile its history slices once dynamo traced the
iteration count as a dynamic integer (wrong iterates from k = 6 on, in float64).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from problems import make_problem
from torch import Tensor
from torch._dynamo.testing import CompileCounter

import solvers

SOLVERS = ("fixed_point", "anderson", "broyden")


def solve_fn(solver: str, check_every: int | None, max_iter: int) -> Callable[..., tuple]:
    """A function of (z0, *args) solving the float64 ``affine`` problem to 1e-10."""
    p = make_problem("affine", torch.float64)

    def run(z0: Tensor, *args: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        res = solvers.solve(
            p.f, z0, solver, args=args, tol=1e-10, max_iter=max_iter, check_every=check_every
        )
        return res.z, res.nstep, res.sample_status, res.abs_trace

    return run


def inputs() -> tuple[Tensor, ...]:
    p = make_problem("affine", torch.float64)
    return (p.z0, *p.args)


def _case(solver: str, check_every: int | None, slow: bool) -> object:
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(solver, check_every, marks=marks, id=f"{solver}-{check_every}")


# Anderson is the solver that went wrong; the rest run with -m slow (~1-2 min each on a
# loaded 2-core CPU; the unrolled check_every=None graphs are the slowest to compile).
CASES = [_case(s, c, slow=not (s == "anderson" and c == 4)) for s in SOLVERS for c in (None, 1, 4)]


@pytest.mark.parametrize(("solver", "check_every"), CASES)
def test_compiled_solve_equals_eager(solver: str, check_every: int | None) -> None:
    """Inductor's solve takes the same steps and returns the same iterate as eager.

    The budget (40) lets Anderson's memory (m = 6) wrap around and every sample stop
    early (17-19 evaluations for Anderson, under 40 for all), so the check points end
    the loop; without check points the budget is 10 to keep the unrolled graph small.
    """
    max_iter = 10 if check_every is None else 40
    run = solve_fn(solver, check_every, max_iter)
    torch._dynamo.reset()
    compiled = torch.compile(run, backend="inductor", fullgraph=check_every is None)
    z, nstep, status, trace = compiled(*inputs())
    z_e, nstep_e, status_e, trace_e = run(*inputs())
    assert torch.equal(nstep, nstep_e) and torch.equal(status, status_e)
    if check_every is not None:
        assert (status_e == int(solvers.Status.CONVERGED)).all()
    torch.testing.assert_close(z, z_e, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(trace, trace_e, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("solver", SOLVERS)
def test_solve_without_check_points_is_one_graph(solver: str) -> None:
    """check_every=None compiles to one graph: no break and no host read (fullgraph)."""
    counter = CompileCounter()
    torch._dynamo.reset()
    torch.compile(solve_fn(solver, None, 12), backend=counter, fullgraph=True)(*inputs())
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize(("solver", "graphs"), [("fixed_point", 5), ("anderson", 9)])
def test_graphs_with_check_points(solver: str, graphs: int) -> None:
    """With check points (every 4) a solve is a fixed number of graphs, whatever the budget.

    ``solve``'s finiteness check of z0 (one ``.item()``) and every check point's host
    read break the graph. A break inside the loop makes dynamo run the loop itself in
    Python and compile what it calls as separate frames: for fixed_point that is 5
    graphs (before and after the z0 check, the loop's first evaluation and its recompile
    once the evaluation counter becomes dynamic, and the epilogue that builds the
    result); Anderson's step adds 4 (its first step and the filling and full memory
    branches, plus the recompile for a dynamic k), independent of ``m`` and of the
    number of steps: the history is written through an index tensor, so no graph is
    specialised on a slot.
    """
    for max_iter in (12, 24):
        counter = CompileCounter()
        torch._dynamo.reset()
        torch.compile(solve_fn(solver, 4, max_iter), backend=counter)(*inputs())
        assert counter.frame_count == graphs, max_iter
