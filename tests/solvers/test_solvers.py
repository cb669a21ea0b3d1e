"""Tests of the ``solvers`` package: every solver on a catalogue of problems with known
answers, per-sample stopping and freezing, compaction, sync-freedom, bad input, the
registry, and the safeguards of Anderson and Broyden.

Problems and their answers live in ``tests/problems.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from problems import DOTTIE, PROBLEMS, FixedPointProblem, make_problem
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import solvers
from solvers import Status

OURS = ("fixed_point", "anderson", "broyden")
ADAPTERS = (
    "torchdeq.fixed_point_iter",
    "torchdeq.anderson",
    "torchdeq.broyden",
    "scipy.anderson",
    "scipy.broyden1",
)
ALL_SOLVERS = OURS + ADAPTERS
DTYPES = {"f32": torch.float32, "f64": torch.float64}
#: Relative tolerance per dtype for the catalogue runs.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
#: torchdeq's Anderson uses an absolute ridge (lam=1e-4) that dominates once residuals
#: are tiny; on the slowest sample of ``mixed_rates`` it stalls above 1e-10 in float64.
TOL_OVERRIDE = {("torchdeq.anderson", torch.float64): 1e-8}
MAX_ITER = 400


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@functools.cache
def solved(solver: str, problem: str, dtype: torch.dtype) -> tuple[FixedPointProblem, Any]:
    """Solve catalogue ``problem`` with ``solver`` once and cache (problem, result)."""
    p = make_problem(problem, dtype)
    tol = TOL_OVERRIDE.get((solver, dtype), TOL[dtype])
    res = solvers.solve(p.f, p.z0, solver, max_iter=MAX_ITER, tol=tol, args=p.args)
    return p, res


def _catalogue_tol(solver: str, dtype: torch.dtype) -> float:
    return TOL_OVERRIDE.get((solver, dtype), TOL[dtype])


CATALOGUE = [
    pytest.param(s, p, d, id=f"{s}-{p}-{dn}")
    for s in ALL_SOLVERS
    for p in PROBLEMS
    for dn, d in DTYPES.items()
]


# ---------------------------------------------------------------------------------------
# The catalogue itself
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_catalogue_answers_are_fixed_points(name: str) -> None:
    """Each catalogue answer satisfies z* = f(z*) to float64 rounding."""
    p = make_problem(name, torch.float64)
    scale = torch.linalg.vector_norm(p.z_star.flatten(1), dim=1)
    assert (p.residual(p.z_star) <= 1e-13 * (1 + scale)).all()
    assert p.z0.shape == p.z_star.shape
    assert 0 < p.lipschitz < 1


def test_cosine_answer_is_the_dottie_number() -> None:
    """The cos problem's answer is the Dottie number, 0.739085133215..."""
    assert math.isclose(math.cos(DOTTIE), DOTTIE, rel_tol=0, abs_tol=1e-15)
    assert str(DOTTIE).startswith("0.739085133215")


# ---------------------------------------------------------------------------------------
# Every solver x every problem x dtype
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("solver", "problem", "dtype"), CATALOGUE)
def test_solves_to_known_answer(solver: str, problem: str, dtype: torch.dtype) -> None:
    """The returned z is within the residual-implied bound of the known answer."""
    p, res = solved(solver, problem, dtype)
    tol = _catalogue_tol(solver, dtype)
    assert res.status == "converged"
    assert res.converged.dtype == torch.bool and bool(res.converged.all())
    assert res.z.shape == p.z0.shape and res.z.dtype == dtype
    assert res.solver == solver
    # ||z - z*|| <= ||f(z) - z|| / (1 - L) and ||f(z) - z|| <= tol * (||f(z)|| + eps).
    scale = torch.linalg.vector_norm(p.z_star.flatten(1), dim=1)
    bound = 2 * tol * scale / (1 - p.lipschitz) + 100 * _eps(dtype) * scale
    err = p.error(res.z)
    assert (err <= bound).all(), f"error {err.tolist()} exceeds bound {bound.tolist()}"


@pytest.mark.parametrize(("solver", "problem", "dtype"), CATALOGUE)
def test_result_bookkeeping(solver: str, problem: str, dtype: torch.dtype) -> None:
    """nstep, nfe, traces and residual fields agree with each other and with f."""
    p, res = solved(solver, problem, dtype)
    tol = _catalogue_tol(solver, dtype)
    b = p.z0.shape[0]
    n = res.abs_trace.shape[1]
    for name in ("converged", "nstep", "abs_residual", "rel_residual", "sample_status"):
        assert getattr(res, name).shape == (b,), name
    assert res.abs_trace.shape == res.rel_trace.shape == (b, n)
    assert res.nstep.dtype == torch.int64
    assert res.abs_trace.dtype == res.rel_trace.dtype == dtype

    # nstep: 1 <= nstep <= N <= nfe, and it is the first trace index meeting tol, +1.
    assert (res.nstep >= 1).all() and (res.nstep <= n).all() and n <= res.nfe
    hits = res.rel_trace <= tol  # default stop_mode is "rel"
    assert hits.any(dim=1).all()
    first = hits.to(torch.uint8).argmax(dim=1)
    assert torch.equal(res.nstep, first + 1)
    assert n == res.nfe <= MAX_ITER  # one trace column per evaluation, within the budget
    assert res.sample_evals == res.nfe * b
    if solver in OURS:
        assert res.nfe == int(res.nstep.max())  # stops as soon as the last sample does

    # Residual fields are those of the returned z, recomputed here.
    fz = p.f(res.z, *p.args).flatten(1)
    abs_r = torch.linalg.vector_norm(fz - res.z.flatten(1), dim=1)
    rel_r = abs_r / (torch.linalg.vector_norm(fz, dim=1) + 1e-9)
    slack = 50 * _eps(dtype) * torch.linalg.vector_norm(fz, dim=1)
    assert ((res.abs_residual - abs_r).abs() <= 1e-3 * abs_r + slack).all()
    assert torch.allclose(
        res.rel_residual,
        res.abs_residual / (torch.linalg.vector_norm(fz, dim=1) + 1e-9),
        rtol=1e-4,
        atol=0,
    )
    assert ((res.rel_residual - rel_r).abs() <= 1e-3 * rel_r + 50 * _eps(dtype)).all()
    assert (res.rel_residual <= tol).all()
    assert (res.sample_status == int(Status.CONVERGED)).all()
    if solver in OURS:
        # The returned z is the iterate at the best trace entry, which is the stopping one.
        at_stop = res.abs_trace.gather(1, (res.nstep - 1).unsqueeze(1)).squeeze(1)
        assert torch.equal(res.abs_residual, at_stop)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("solver", OURS)
def test_stop_modes(solver: str, stop_mode: str, dtype: torch.dtype) -> None:
    """Both stop modes stop on their own residual, and the answer is right."""
    p = make_problem("tanh_net", dtype)
    tol = TOL[dtype]
    res = solvers.solve(p.f, p.z0, solver, tol=tol, stop_mode=stop_mode, args=p.args)
    trace = res.abs_trace if stop_mode == "abs" else res.rel_trace
    reported = res.abs_residual if stop_mode == "abs" else res.rel_residual
    assert res.status == "converged"
    assert (reported <= tol).all()
    at_stop = trace.gather(1, (res.nstep - 1).unsqueeze(1)).squeeze(1)
    before = torch.arange(trace.shape[1]) < (res.nstep - 1).unsqueeze(1)
    assert (at_stop <= tol).all() and (trace[before] > tol).all()
    # abs: ||z - z*|| <= tol / (1 - L); rel: the same times ||f(z)|| (about ||z*||).
    scale = torch.linalg.vector_norm(p.z_star.flatten(1), dim=1).clamp(min=1.0)
    bound = 2 * tol * scale / (1 - p.lipschitz) + 100 * _eps(dtype) * scale
    assert (p.error(res.z) <= bound).all()


# ---------------------------------------------------------------------------------------
# Agreement with the reference implementations
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["affine", "cosine", "tanh_net", "mixed_rates"])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("anderson", "scipy.anderson"), ("broyden", "scipy.broyden1")],
    ids=["anderson-vs-scipy.anderson", "broyden-vs-scipy.broyden1"],
)
def test_agrees_with_scipy(ours: str, theirs: str, problem: str) -> None:
    """eqloop's Anderson/Broyden and SciPy's find the same z on the same problem."""
    p = make_problem(problem, torch.float64)
    tol = 1e-11
    a = solvers.solve(p.f, p.z0, ours, max_iter=MAX_ITER, tol=tol, args=p.args)
    b = solvers.solve(p.f, p.z0, theirs, max_iter=MAX_ITER, tol=tol, args=p.args)
    assert a.status == b.status == "converged"
    scale = torch.linalg.vector_norm(a.z.flatten(1), dim=1)
    gap = torch.linalg.vector_norm((a.z - b.z).flatten(1), dim=1)
    assert (gap <= 4 * tol * scale / (1 - p.lipschitz)).all()


@pytest.mark.parametrize("problem", ["affine", "cosine", "tanh_net", "mixed_rates"])
def test_fixed_point_matches_torchdeq_step_for_step(problem: str) -> None:
    """Plain iteration: same per-sample nstep and residual traces as torchdeq's."""
    p = make_problem(problem, torch.float64)
    ours = solvers.solve(p.f, p.z0, "fixed_point", max_iter=MAX_ITER, tol=1e-9, args=p.args)
    theirs = solvers.solve(
        p.f, p.z0, "torchdeq.fixed_point_iter", max_iter=MAX_ITER, tol=1e-9, args=p.args
    )
    assert torch.equal(ours.nstep, theirs.nstep)
    for i, k in enumerate(ours.nstep.tolist()):
        for trace in ("abs_trace", "rel_trace"):
            torch.testing.assert_close(
                getattr(ours, trace)[i, :k],
                getattr(theirs, trace)[i, :k],
                rtol=1e-6,
                atol=1e-14,
            )


# ---------------------------------------------------------------------------------------
# Per-sample stopping and freezing
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("solver", OURS)
def test_samples_stop_on_their_own_and_freeze(solver: str, stop_mode: str) -> None:
    """Slow samples need more steps; a stopped sample's trace and z stay frozen."""
    p = make_problem("mixed_rates", torch.float64)
    res = solvers.solve(
        p.f, p.z0, solver, max_iter=MAX_ITER, tol=1e-10, stop_mode=stop_mode, args=p.args
    )
    assert res.status == "converged"
    nstep = res.nstep.tolist()
    # rates are (0.02, 0.3, 0.7, 0.9): the fastest sample stops first, the slowest last.
    assert nstep[0] < nstep[-1] and len(set(nstep)) > 1
    if solver == "fixed_point":
        assert nstep == sorted(nstep) and len(set(nstep)) == len(nstep)
    assert res.nfe == max(nstep)
    for i, k in enumerate(nstep):
        for trace in (res.abs_trace, res.rel_trace):
            tail = trace[i, k - 1 :]
            assert torch.equal(tail, tail[:1].expand_as(tail)), f"sample {i} moved after stop"
    # The returned z is the iterate at the stopping step: its residual is the trace's there.
    fz = p.f(res.z, *p.args)
    abs_r = torch.linalg.vector_norm((fz - res.z).flatten(1), dim=1)
    at_stop = res.abs_trace.gather(1, (res.nstep - 1).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(abs_r, at_stop, rtol=1e-6, atol=1e-15)


def test_fixed_point_frozen_z_is_the_stopping_iterate() -> None:
    """For plain iteration, sample i's z is exactly f applied nstep_i - 1 times to z0."""
    p = make_problem("mixed_rates", torch.float64)
    res = solvers.solve(p.f, p.z0, "fixed_point", max_iter=MAX_ITER, tol=1e-10, args=p.args)
    iterates = [p.z0]
    for _ in range(int(res.nstep.max())):
        iterates.append(p.f(iterates[-1], *p.args))
    for i, k in enumerate(res.nstep.tolist()):
        torch.testing.assert_close(res.z[i], iterates[k - 1][i], rtol=0, atol=0)


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_fixed_point_nstep_closed_form(stop_mode: str) -> None:
    """On f(z) = r z + 1 from z0 = 0 the residual after k steps is known in closed form.

    ``z_k = (1 - r^k) / (1 - r)``, so ``abs_k = r^k`` and ``rel_k = r^k (1 - r) /
    (1 - r^(k+1))``; nstep is one plus the first k with residual <= tol.
    """
    rates = [0.1, 0.5, 0.8, 0.95]
    tol = 2e-7
    r = torch.tensor(rates, dtype=torch.float64).unsqueeze(1)
    res = solvers.solve(
        lambda z, r: r * z + 1,
        torch.zeros(4, 1, dtype=torch.float64),
        "fixed_point",
        max_iter=1000,
        tol=tol,
        stop_mode=stop_mode,
        args=(r,),
    )

    def residual(rate: float, k: int) -> float:
        return rate**k if stop_mode == "abs" else rate**k * (1 - rate) / (1 - rate ** (k + 1))

    expected = []
    for rate in rates:
        k = next(k for k in range(1000) if residual(rate, k) <= tol)
        # Not a borderline case: rounding (~1e-15) cannot move the stopping step.
        assert residual(rate, k) < 0.99 * tol < 1.01 * tol < residual(rate, k - 1)
        expected.append(k + 1)
    assert res.nstep.tolist() == expected
    assert res.nfe == max(expected)


@pytest.mark.parametrize("solver", OURS)
def test_samples_are_independent(solver: str) -> None:
    """Solving the batch gives each sample what solving it alone gives."""
    p = make_problem("mixed_rates", torch.float64)
    batch = solvers.solve(p.f, p.z0, solver, max_iter=MAX_ITER, tol=1e-10, args=p.args)
    for i in range(p.z0.shape[0]):
        alone = solvers.solve(
            p.f,
            p.z0[i : i + 1],
            solver,
            max_iter=MAX_ITER,
            tol=1e-10,
            args=tuple(a[i : i + 1] for a in p.args),
        )
        assert int(alone.nstep) == int(batch.nstep[i])
        torch.testing.assert_close(alone.z[0], batch.z[i], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", OURS)
def test_check_every_changes_only_the_cost(solver: str) -> None:
    """Checking less often (or never) runs more evaluations but returns the same result."""
    p = make_problem("mixed_rates", torch.float64)
    kw: dict[str, Any] = {"max_iter": 300, "tol": 1e-10, "args": p.args}
    every = solvers.solve(p.f, p.z0, solver, **kw)
    sparse = solvers.solve(p.f, p.z0, solver, check_every=7, **kw)
    never = solvers.solve(p.f, p.z0, solver, check_every=None, **kw)
    assert never.nfe == 300 and never.abs_trace.shape == (4, 300)
    assert sparse.nfe % 7 == 0 and every.nfe <= sparse.nfe < every.nfe + 7
    for other in (sparse, never):
        assert torch.equal(other.nstep, every.nstep)
        assert torch.equal(other.converged, every.converged)
        assert torch.equal(other.z, every.z)
        assert torch.equal(other.abs_residual, every.abs_residual)


# ---------------------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("solver", OURS)
def test_compaction_same_answer_fewer_evaluations(solver: str, dtype: torch.dtype) -> None:
    """compact=True calls f on the active samples only; the answer does not change."""
    p = make_problem("mixed_rates", dtype)
    seen: list[int] = []

    def f(z: Tensor, r: Tensor, b: Tensor) -> Tensor:
        assert z.shape[0] == r.shape[0] == b.shape[0]
        seen.append(z.shape[0])
        return p.f(z, r, b)

    kw: dict[str, Any] = {"max_iter": MAX_ITER, "tol": TOL[dtype], "args": p.args}
    full = solvers.solve(f, p.z0, solver, **kw)
    seen.clear()
    compact = solvers.solve(f, p.z0, solver, compact=True, **kw)
    assert compact.status == full.status == "converged"
    torch.testing.assert_close(compact.z, full.z, rtol=100 * _eps(dtype), atol=100 * _eps(dtype))
    assert torch.equal(compact.nstep, full.nstep)
    assert compact.nfe == full.nfe
    assert full.sample_evals == full.nfe * 4
    # Each sample is evaluated exactly until it stops.
    assert compact.sample_evals == int(compact.nstep.sum()) < full.sample_evals
    assert seen == sorted(seen, reverse=True) and seen[0] == 4
    assert seen[-1] == int((compact.nstep == compact.nstep.max()).sum())
    assert sum(seen) == compact.sample_evals


def test_compaction_needs_check_points() -> None:
    """compact=True with check_every=None is an error (compaction reads the host)."""
    p = make_problem("mixed_rates", torch.float64)
    with pytest.raises(ValueError, match="check_every"):
        solvers.solve(p.f, p.z0, "anderson", compact=True, check_every=None, args=p.args)


def test_auto_check_every_reads_the_host_every_iteration_only_on_cpu() -> None:
    """The default check_every reads the host every evaluation on the CPU (free) and
    every ACCELERATOR_CHECK_EVERY (> 1) elsewhere, where each read is a device sync; the
    meta device stands in for CUDA (same code path: any non-CPU device)."""
    from solvers._registry import ACCELERATOR_CHECK_EVERY
    from solvers._registry import make_problem as problem_of

    kw = {"max_iter": 5, "tol": 1e-5, "stop_mode": "rel"}
    assert problem_of(torch.tanh, torch.zeros(2, 3), **kw).check_every == 1
    on_meta = problem_of(torch.tanh, torch.zeros(2, 3, device="meta"), **kw)
    assert on_meta.check_every == ACCELERATOR_CHECK_EVERY > 1
    assert (
        problem_of(torch.tanh, torch.zeros(2, 3, device="meta"), check_every=None, **kw).check_every
        is None
    )
    with pytest.raises(TypeError, match=r"check_every \(or 'auto', or None\)"):
        problem_of(torch.tanh, torch.zeros(2, 3), check_every="never", **kw)


@pytest.mark.parametrize("solver", OURS)
@pytest.mark.parametrize("name", ["affine", "tanh_net"])
def test_check_every_changes_only_the_evaluations_run(solver: str, name: str) -> None:
    """Reading the host every 4 evaluations instead of every one (the CUDA default)
    returns the same iterates, steps and status; at most 3 more evaluations run."""
    p = make_problem(name, torch.float64)
    kw = {"args": p.args, "tol": 1e-10, "max_iter": 200}
    every = solvers.solve(p.f, p.z0, solver, check_every=1, **kw)
    sparse = solvers.solve(p.f, p.z0, solver, check_every=4, **kw)
    assert every.status == "converged"
    torch.testing.assert_close(sparse.z, every.z, rtol=0, atol=0)
    assert torch.equal(sparse.nstep, every.nstep)
    assert torch.equal(sparse.sample_status, every.sample_status)
    assert every.nfe <= sparse.nfe <= every.nfe + 3


@pytest.mark.parametrize("solver", ADAPTERS)
def test_adapters_reject_compaction(solver: str) -> None:
    """Adapters own their loops, so compact=True is refused, naming the solver."""
    p = make_problem("mixed_rates", torch.float64)
    with pytest.raises(ValueError, match=re.escape(solver)):
        solvers.solve(p.f, p.z0, solver, compact=True, args=p.args)


# ---------------------------------------------------------------------------------------
# Unrolled loops: output="last", gradients through the driver, no divergence stop
# ---------------------------------------------------------------------------------------


def _unroll_map(
    requires_grad: bool = True,
) -> tuple[Callable[..., Tensor], Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """``f(z, r, x) = tanh(r * (z W^T) + x) + c`` in float64, ``||W||_2 = 1``.

    Sample i contracts at rate at most r_i = (0.1, 0.4, 0.7, 0.9), so with a tolerance
    the samples exit after very different numbers of steps. Returns ``(f, z0, args,
    leaves)``: ``W`` and ``c`` are captured by ``f``, ``r`` and ``x`` are args; with
    ``requires_grad`` every leaf (``z0`` included) requires grad.
    """
    g = torch.Generator().manual_seed(7)
    d = 5
    w = torch.randn(d, d, generator=g, dtype=torch.float64)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    c = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    r = torch.tensor([[0.1], [0.4], [0.7], [0.9]], dtype=torch.float64)
    x = torch.randn(4, d, generator=g, dtype=torch.float64)
    z0 = torch.randn(4, d, generator=g, dtype=torch.float64)
    leaves = tuple(t.requires_grad_(requires_grad) for t in (w, c, r, x, z0))

    def f(z: Tensor, r: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(r * (z @ w.T) + x) + c

    return f, z0, (r, x), leaves


def _hand_loop(
    f: Callable[..., Tensor],
    z0: Tensor,
    args: tuple[Tensor, ...],
    loops: int,
    tol: float,
    tau: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The plain loop with per-sequence early exit, written out: a sample takes its step
    ``lerp(z, f(z), tau)`` until ``||f(z) - z|| / (||f(z)|| + 1e-9) <= tol`` (the step that
    meets it included), then keeps its state. Returns ``(z, steps per sample)``."""
    z = z0
    active = torch.ones(z0.shape[0], 1, dtype=torch.bool)
    steps = torch.zeros(z0.shape[0], dtype=torch.long)
    for _ in range(loops):
        fz = f(z, *args)
        with torch.no_grad():
            rel = torch.linalg.vector_norm(fz - z, dim=1, keepdim=True) / (
                torch.linalg.vector_norm(fz, dim=1, keepdim=True) + 1e-9
            )
        z = torch.where(active, fz if tau == 1.0 else torch.lerp(z, fz, tau), z)
        steps += active.squeeze(1)
        if tol > 0:
            active = active & (rel > tol)
    return z, steps


@pytest.mark.parametrize("check_every", [1, 3, None], ids=["check1", "check3", "never"])
@pytest.mark.parametrize("problem", ["tanh_net", "mixed_rates", "affine_2d"])
def test_last_output_is_f_applied_max_iter_times(problem: str, check_every: int | None) -> None:
    """fixed_point, tol=0, output="last": res.z is exactly f^T(z0), for every sample."""
    p = make_problem(problem, torch.float64)
    loops = 23
    res = solvers.solve(
        p.f,
        p.z0,
        "fixed_point",
        max_iter=loops,
        tol=0.0,
        args=p.args,
        output="last",
        check_every=check_every,
    )
    z = p.z0
    for _ in range(loops):
        z = p.f(z, *p.args)
    assert torch.equal(res.z, z)
    assert res.nfe == loops and res.nstep.tolist() == [loops] * p.z0.shape[0]
    # The residuals describe the final evaluation, at f^(T-1)(z0).
    assert torch.equal(res.abs_residual, res.abs_trace[:, -1])
    assert res.status == "max_iter"  # tol=0 asks for the budget; nothing stops early


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_last_output_early_exit(tau: float, compact: bool) -> None:
    """With a tolerance, a sample keeps the state after the step that met it; its
    residual fields describe that evaluation and later samples keep iterating."""
    f, z0, args, _ = _unroll_map(requires_grad=False)
    tol = 1e-6
    res = solvers.solve(
        f,
        z0,
        solvers.FixedPointIteration(tau=tau),
        max_iter=200,
        tol=tol,
        args=args,
        output="last",
        compact=compact,
    )
    expected, steps = _hand_loop(f, z0, args, 200, tol, tau)
    assert res.status == "converged"
    assert res.nstep.tolist() == steps.tolist()
    assert len(set(steps.tolist())) >= 3  # the rates exit at different steps
    torch.testing.assert_close(res.z, expected, rtol=0, atol=0 if not compact else 1e-15)
    # nstep counts the steps in res.z; the residual is that of the iterate before it.
    before = z0
    for k in range(int(res.nstep.max())):
        fz = f(before, *args)
        for i in torch.nonzero(res.nstep == k + 1).flatten().tolist():
            abs_r = torch.linalg.vector_norm(fz[i] - before[i])
            torch.testing.assert_close(res.abs_residual[i], abs_r, rtol=1e-12, atol=1e-14)
            assert res.rel_residual[i] <= tol < res.rel_trace[i, k - 1]
        before = torch.lerp(before, fz, tau)


@pytest.mark.parametrize(
    "solver", [solvers.Anderson(m=3), solvers.Broyden(m=4)], ids=["anderson", "broyden"]
)
def test_last_output_is_the_solvers_next_iterate(solver: solvers.IterativeSolver) -> None:
    """For any solver, "last" is its proposal after the final evaluation: the same
    init/step sequence run by hand gives the same tensor."""
    p = make_problem("tanh_net", torch.float64)
    res = solvers.solve(p.f, p.z0, solver, max_iter=7, tol=0.0, args=p.args, output="last")
    state, z = solver.init(p.z0), p.z0
    for k in range(7):
        state, z = solver.step(state, z, p.f(z, *p.args), k)
    assert torch.equal(res.z, z)


def _gradients(z: Tensor, leaves: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    weights = torch.linspace(-1.0, 2.0, z.numel(), dtype=z.dtype).reshape(z.shape)
    return torch.autograd.grad((z * weights).sum(), leaves)


@pytest.mark.parametrize(
    ("tol", "compact", "check_every"),
    [
        (0.0, False, None),
        (0.0, False, 1),
        (1e-4, False, 1),
        (1e-4, True, 1),
        (1e-4, True, 2),
        (1e-4, False, None),
    ],
    ids=[
        "tol0-never",
        "tol0-check1",
        "exit-full",
        "exit-compact",
        "exit-compact-check2",
        "exit-never",
    ],
)
def test_gradient_through_the_driver_equals_the_hand_loop(
    tol: float, compact: bool, check_every: int | None
) -> None:
    """Gradients from res.z reach f's captured parameters, args and z0 through every step
    a sample took: equal to the hand-written loop's (float64), early exit included."""
    f, z0, args, leaves = _unroll_map()
    loops = 40 if tol > 0 else 12  # 12 loops keep d z / d z0 well above rounding
    res = solvers.solve(
        f,
        z0,
        "fixed_point",
        max_iter=loops,
        tol=tol,
        args=args,
        output="last",
        compact=compact,
        check_every=check_every,
    )
    expected, steps = _hand_loop(f, z0, args, loops, tol)
    assert res.nstep.tolist() == steps.tolist()
    if tol > 0:
        assert steps.min() < steps.max() < loops  # the samples exit early, at different steps
    for ours, theirs in zip(_gradients(res.z, leaves), _gradients(expected, leaves), strict=True):
        # Bit-identical; compaction evaluates f on sub-batches, which rounds differently.
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12 if compact else 0.0)
        assert ours.abs().max() > 1e-6  # every leaf gets a real gradient
    # The bookkeeping built no graph.
    for name in ("abs_trace", "rel_trace", "abs_residual", "rel_residual"):
        assert getattr(res, name).grad_fn is None and not getattr(res, name).requires_grad


def test_gradcheck_through_unrolled_driver() -> None:
    """torch.autograd.gradcheck of res.z (output="last", tol=0) w.r.t. args and z0."""
    f, z0, args, _ = _unroll_map()
    r, x = args

    def run(r: Tensor, x: Tensor, z0: Tensor) -> Tensor:
        return solvers.solve(
            f, z0, "fixed_point", max_iter=6, tol=0.0, args=(r, x), output="last", check_every=None
        ).z

    assert torch.autograd.gradcheck(run, (r, x, z0))


def test_diverge_ratio_inf_runs_every_loop() -> None:
    """diverge_ratio=inf: a growing residual never stops a sample, so T loops are T."""
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    kw: dict[str, Any] = {"max_iter": 40, "tol": 0.0, "output": "last"}
    cut = solvers.solve(lambda z: 2 * z + 1, z0, "fixed_point", **kw)
    assert cut.status == "diverged" and cut.nstep.tolist() == [15, 15]  # 2^14 > 1e4 x 1
    full = solvers.solve(lambda z: 2 * z + 1, z0, "fixed_point", diverge_ratio=math.inf, **kw)
    assert full.nfe == 40 and full.nstep.tolist() == [40, 40]
    assert full.status == "max_iter"
    assert torch.equal(full.z, torch.full_like(z0, 2.0**40 - 1))  # z_k = 2^k - 1, exact
    # NaN still stops a sample (and only that sample), whatever diverge_ratio says.
    bad = torch.tensor([[True], [False]])
    res = solvers.solve(
        lambda z: torch.where(bad, math.nan, 0.5 * z),
        z0 + 1,
        "fixed_point",
        diverge_ratio=math.inf,
        **kw,
    )
    assert res.sample_status.tolist() == [Status.NON_FINITE, Status.MAX_ITER]
    assert res.nstep.tolist() == [1, 40]


# ---------------------------------------------------------------------------------------
# Sync-freedom
# ---------------------------------------------------------------------------------------


class _SyncSpy(TorchDispatchMode):
    """Records aten ops that read tensor values on the host (a device sync on CUDA)."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select")

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func.__name__.split(".")[0] in self.SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("output", ["best", "last"])
@pytest.mark.parametrize("tol", [0.0, 1e-6], ids=["tol0", "tol1e-6"])
@pytest.mark.parametrize("shape", [(4, 3, 2), (1, 5)], ids=["B4x3x2", "B1x5"])
@pytest.mark.parametrize("solver", OURS)
def test_runs_on_meta_device(solver: str, shape: tuple[int, ...], tol: float, output: str) -> None:
    """check_every=None reads no values, so the solve runs on 'meta' with right shapes."""
    z0 = torch.empty(shape, device=torch.device("meta"))
    x = torch.empty(shape, device="meta")
    res = solvers.solve(
        lambda z, x: torch.tanh(0.5 * z + x),
        z0,
        solver,
        max_iter=9,
        tol=tol,
        check_every=None,
        args=(x,),
        output=output,
    )
    b = shape[0]
    assert res.z.shape == shape and res.z.device.type == "meta"
    assert res.converged.shape == (b,) and res.converged.dtype == torch.bool
    assert res.nstep.shape == (b,) and res.nstep.dtype == torch.int64
    assert res.abs_residual.shape == res.rel_residual.shape == (b,)
    assert res.abs_trace.shape == res.rel_trace.shape == (b, 9)
    assert res.sample_status.shape == (b,)
    assert all(
        t.device.type == "meta"
        for t in (res.converged, res.nstep, res.abs_trace, res.rel_trace, res.sample_status)
    )
    assert res.nfe == 9 and res.sample_evals == 9 * b


@pytest.mark.parametrize("output", ["best", "last"])
@pytest.mark.parametrize("solver", OURS)
def test_no_host_reads_without_check_points(solver: str, output: str) -> None:
    """With check_every=None no aten op reads a value on the host (CPU dispatch spy)."""
    p = make_problem("tanh_net", torch.float32)
    with _SyncSpy() as spy:
        res = solvers.solve(
            p.f, p.z0, solver, max_iter=12, tol=1e-5, check_every=None, args=p.args, output=output
        )
    assert spy.syncs == []
    assert res.nfe == 12
    # The spy does see host reads: the default check_every=1 makes some.
    with _SyncSpy() as spy:
        solvers.solve(p.f, p.z0, solver, max_iter=12, tol=1e-5, args=p.args)
    assert spy.syncs


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def _affine() -> tuple[Callable[[Tensor], Tensor], Tensor]:
    return (lambda z: 0.5 * z + 1), torch.zeros(3, 4)


BAD_CALLS: list[Any] = [
    pytest.param({"f": 3}, TypeError, r"\bf\b.*callable", id="f-not-callable"),
    pytest.param({"z0": [0.0, 1.0]}, TypeError, "z0", id="z0-not-tensor"),
    pytest.param(
        {"z0": torch.zeros(3, 4, dtype=torch.long)}, TypeError, "floating", id="z0-integer"
    ),
    pytest.param({"z0": torch.zeros(0, 4)}, ValueError, "batch", id="empty-batch"),
    pytest.param({"z0": torch.tensor(1.0)}, ValueError, "batch", id="z0-scalar"),
    pytest.param({"z0": torch.tensor([[0.0, math.nan]])}, ValueError, "NaN or Inf", id="z0-nan"),
    pytest.param({"z0": torch.tensor([[0.0], [math.inf]])}, ValueError, "NaN or Inf", id="z0-inf"),
    pytest.param({"solver": "newton"}, ValueError, "unknown solver 'newton'", id="unknown-solver"),
    pytest.param({"solver": 3}, TypeError, "solver", id="solver-wrong-type"),
    pytest.param(
        {"solver": "anderson", "mem": 3},
        ValueError,
        r"'mem'.*'lam'.*'m'.*'tau'",
        id="unknown-option",
    ),
    pytest.param(
        {"solver": "scipy.anderson", "m": 3},
        ValueError,
        r"\['m'\].*'M'",
        id="unknown-option-adapter",
    ),
    pytest.param(
        {"solver": solvers.Anderson(m=3), "lam": 0.1},
        ValueError,
        "lam",
        id="options-with-solver-object",
    ),
    pytest.param({"tol": -1e-6}, ValueError, "tol", id="negative-tol"),
    pytest.param({"tol": math.nan}, ValueError, "tol", id="nan-tol"),
    pytest.param({"tol": "1e-5"}, TypeError, "tol", id="string-tol"),
    pytest.param({"stop_mode": "max"}, ValueError, "stop_mode", id="bad-stop-mode"),
    pytest.param({"max_iter": 0}, ValueError, "max_iter", id="max-iter-0"),
    pytest.param({"max_iter": -3}, ValueError, "max_iter", id="max-iter-negative"),
    pytest.param({"max_iter": 2.5}, TypeError, "max_iter", id="max-iter-float"),
    pytest.param({"max_iter": True}, TypeError, "max_iter", id="max-iter-bool"),
    pytest.param({"check_every": 0}, ValueError, "check_every", id="check-every-0"),
    pytest.param({"eps": 0.0}, ValueError, "eps", id="eps-0"),
    pytest.param({"diverge_ratio": 1.0}, ValueError, "diverge_ratio", id="diverge-ratio-1"),
    pytest.param({"args": (torch.zeros(2, 4),)}, ValueError, r"args\[0\]", id="args-wrong-batch"),
    pytest.param({"args": (1.0,)}, ValueError, r"args\[0\]", id="args-not-tensor"),
    pytest.param({"solver": "anderson", "m": 0}, ValueError, "m", id="anderson-m-0"),
    pytest.param(
        {"solver": "anderson", "lam": -1.0}, ValueError, "lam", id="anderson-negative-lam"
    ),
    pytest.param({"solver": "broyden", "tau": 1.5}, ValueError, "tau", id="broyden-tau-1.5"),
    pytest.param({"solver": "fixed_point", "tau": 0.0}, ValueError, "tau", id="fixed-point-tau-0"),
    # Issue 10 row 4: every argument goes through solvers.checks.
    pytest.param({"tol": True}, TypeError, "tol.*bool", id="tol-bool"),
    pytest.param({"tol": math.inf}, ValueError, "tol.*finite", id="tol-inf"),
    pytest.param({"eps": math.inf}, ValueError, "eps", id="eps-inf"),
    pytest.param({"check_every": True}, TypeError, "check_every", id="check-every-bool"),
    pytest.param({"compact": 1}, TypeError, "compact", id="compact-int"),
    pytest.param(
        {"raise_on_failure": "yes"}, TypeError, "raise_on_failure", id="raise-on-failure-str"
    ),
    pytest.param({"diverge_ratio": math.nan}, ValueError, "diverge_ratio", id="diverge-ratio-nan"),
    pytest.param({"output": "first"}, ValueError, "output.*'best'.*'last'", id="bad-output"),
    pytest.param({"args": torch.zeros(3, 4)}, TypeError, "args.*tuple", id="args-bare-tensor"),
    pytest.param(
        {"args": (torch.zeros(3, 4, device="meta"),)},
        ValueError,
        r"args\[0\].*meta.*cpu",
        id="args-other-device",
    ),
    pytest.param({"solver": "anderson", "m": True}, TypeError, "m", id="anderson-m-bool"),
    pytest.param({"solver": "anderson", "m": 2.0}, TypeError, "m", id="anderson-m-float"),
    pytest.param({"solver": "anderson", "lam": "0.1"}, TypeError, "lam", id="anderson-lam-str"),
    pytest.param({"solver": "broyden", "m": 0}, ValueError, "m", id="broyden-m-0"),
    pytest.param(
        {"solver": "fixed_point", "tau": math.nan}, ValueError, "tau", id="fixed-point-tau-nan"
    ),
]


@pytest.mark.parametrize(("overrides", "error", "pattern"), BAD_CALLS)
def test_bad_input_raises(overrides: dict[str, Any], error: type, pattern: str) -> None:
    """Bad arguments raise TypeError/ValueError whose message names the culprit."""
    f, z0 = _affine()
    call: dict[str, Any] = {"f": f, "z0": z0, "solver": "anderson", **overrides}
    with pytest.raises(error, match=pattern):
        solvers.solve(call.pop("f"), call.pop("z0"), call.pop("solver"), **call)


def test_unknown_solver_lists_every_available_name() -> None:
    """The error for an unknown solver name lists every registered name."""
    f, z0 = _affine()
    with pytest.raises(ValueError) as info:
        solvers.solve(f, z0, "anderzon")
    for name in solvers.available():
        assert name in str(info.value)


def test_unknown_option_lists_driver_options() -> None:
    """The error for an unknown option also lists the driver options."""
    f, z0 = _affine()
    with pytest.raises(ValueError) as info:
        solvers.solve(f, z0, "broyden", lam=0.1)
    message = str(info.value)
    assert "'lam'" in message and "'m'" in message and "'tau'" in message
    for option in solvers.DRIVER_OPTIONS:
        assert option in message


@pytest.mark.parametrize(
    ("f", "error", "pattern"),
    [
        pytest.param(lambda z: z[:, :2] + 1, ValueError, "shape", id="drops-columns"),
        pytest.param(
            lambda z: (0.5 * z + 1).reshape(4, 3), ValueError, "shape", id="same-numel-reshaped"
        ),
        pytest.param(lambda z: (0.5 * z + 1).unsqueeze(1), ValueError, "shape", id="adds-dim"),
        pytest.param(lambda z: 1.0, TypeError, "Tensor", id="returns-float"),
        # Issue 10 row 4: a wrong dtype or device is named, not a raw torch error later.
        pytest.param(
            lambda z: (0.5 * z + 1).double(), TypeError, "dtype.*float64", id="returns-float64"
        ),
        pytest.param(
            lambda z: (0.5 * z + 1).long(), TypeError, "dtype.*int64", id="returns-integer"
        ),
        pytest.param(
            lambda z: torch.empty(z.shape, device="meta"),
            TypeError,
            "device.*meta",
            id="returns-other-device",
        ),
    ],
)
@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_bad_map_output_raises(
    solver: str, f: Callable[[Tensor], Any], error: type, pattern: str
) -> None:
    """A map that changes the shape (or returns no tensor) is refused by every solver."""
    with pytest.raises(error, match=pattern):
        solvers.solve(f, torch.zeros(3, 4), solver, max_iter=5)


# ---------------------------------------------------------------------------------------
# Failures: divergence, non-finite values, max_iter
# ---------------------------------------------------------------------------------------

DIVERGING = [
    pytest.param("fixed_point", id="fixed_point"),
    pytest.param(solvers.FixedPointIteration(tau=0.5), id="fixed_point-tau0.5"),
    pytest.param(solvers.Anderson(m=1), id="anderson-m1"),  # m=1 is plain iteration
    pytest.param("torchdeq.fixed_point_iter", id="torchdeq.fixed_point_iter"),
]


@pytest.mark.parametrize("solver", DIVERGING)
def test_diverging_map_reports_diverged(solver: Any) -> None:
    """Iterating f(z) = 2z + 1 blows up: status 'diverged', and no exception."""
    res = solvers.solve(lambda z: 2 * z + 1, torch.zeros(3, 2), solver, max_iter=60)
    assert res.status == "diverged"
    assert not bool(res.converged.any())
    assert (res.sample_status == int(Status.DIVERGED)).all()
    assert torch.isfinite(res.z).all()
    assert res.status_counts()["diverged"] == 3


@pytest.mark.parametrize(("stop_mode", "best"), [("abs", 0.0), ("rel", 2.0**14 - 1)])
def test_divergence_step_closed_form(stop_mode: str, best: float) -> None:
    """Iterating 2z + 1 from 0: z_k = 2^k - 1 and abs residual 2^k, which passes 1e4 x
    its first value at k = 14. The best iterate is z0 for the abs residual, but the last
    one for the rel residual (z_k + 1) / (2 z_k + 1), which decreases towards 1/2.
    """
    res = solvers.solve(
        lambda z: 2 * z + 1,
        torch.zeros(2, 1, dtype=torch.float64),
        "fixed_point",
        max_iter=200,
        stop_mode=stop_mode,
    )
    assert res.status == "diverged"
    assert res.nstep.tolist() == [15, 15] and res.nfe == 15
    assert res.abs_trace[0].tolist() == [2.0**k for k in range(15)]
    assert res.z.flatten().tolist() == [best, best]


@pytest.mark.parametrize("solver", DIVERGING)
def test_diverging_map_raises_on_request(solver: Any) -> None:
    """raise_on_failure=True turns a diverged solve into SolveError with the counts."""
    with pytest.raises(solvers.SolveError, match="diverged"):
        solvers.solve(
            lambda z: 2 * z + 1, torch.zeros(3, 2), solver, max_iter=60, raise_on_failure=True
        )


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_raise_on_failure_is_silent_when_converged(solver: str) -> None:
    """raise_on_failure=True does not raise when every sample converges."""
    p = make_problem("cosine", torch.float64)
    res = solvers.solve(p.f, p.z0, solver, max_iter=MAX_ITER, tol=1e-8, raise_on_failure=True)
    assert res.status == "converged"


@pytest.mark.parametrize("solver", DIVERGING[:3])  # Anderson/Broyden solve 2z + 1 = z
def test_mixed_batch_statuses(solver: Any) -> None:
    """One sample converges while another diverges: per-sample statuses, worst overall."""
    a = torch.tensor([[0.5], [2.0], [0.1]])
    res = solvers.solve(lambda z, a: a * z + 1, torch.zeros(3, 1), solver, max_iter=200, args=(a,))
    assert res.converged.tolist() == [True, False, True]
    assert res.sample_status.tolist() == [Status.CONVERGED, Status.DIVERGED, Status.CONVERGED]
    assert res.status == "diverged"
    assert res.status_counts() == {"converged": 2, "max_iter": 0, "diverged": 1, "non-finite": 0}
    torch.testing.assert_close(res.z[[0, 2]], torch.tensor([[2.0], [1 / 0.9]]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_nan_map_reports_non_finite(solver: str) -> None:
    """A map whose first value is NaN gives status 'non-finite' and no exception."""
    res = solvers.solve(lambda z: z * math.nan, torch.ones(3, 2), solver, max_iter=20)
    assert res.status == "non-finite"
    assert not bool(res.converged.any())
    assert (res.sample_status == int(Status.NON_FINITE)).all()


@pytest.mark.parametrize("solver", OURS)
def test_map_turning_nan_later(solver: str) -> None:
    """log(z) from 0.5 goes negative, then NaN: stop at step 2, keep the finite best z."""
    res = solvers.solve(torch.log, torch.full((3, 2), 0.5), solver, max_iter=20)
    assert res.status == "non-finite"
    assert res.nstep.tolist() == [2, 2, 2] and res.nfe == 2
    assert torch.isfinite(res.z).all()
    torch.testing.assert_close(res.z, torch.full((3, 2), 0.5))
    assert torch.isfinite(res.abs_trace[:, 0]).all() and torch.isnan(res.abs_trace[:, 1]).all()
    with pytest.raises(solvers.SolveError, match="non-finite"):
        solvers.solve(torch.log, torch.full((3, 2), 0.5), solver, raise_on_failure=True)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_nan_in_one_sample_leaves_others_alone(solver: str) -> None:
    """A sample whose map returns NaN stops; the others still converge to their answer
    (issue 10 row 3: SciPy's adapters used to end the healthy samples early)."""
    bad = torch.tensor([[False], [True], [False]])
    res = solvers.solve(
        lambda z: torch.where(bad, math.nan, torch.cos(z)),
        torch.zeros(3, 1, dtype=torch.float64),
        solver,
        max_iter=100,
        tol=1e-10,
    )
    assert res.sample_status.tolist() == [Status.CONVERGED, Status.NON_FINITE, Status.CONVERGED]
    assert res.status == "non-finite"
    torch.testing.assert_close(
        res.z[[0, 2]], torch.full((2, 1), DOTTIE, dtype=torch.float64), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_budget_exhausted_reports_max_iter(solver: str) -> None:
    """Too small a budget: status 'max_iter', converged all false, nstep = the trace length."""
    p = make_problem("cosine", torch.float64)
    res = solvers.solve(p.f, p.z0, solver, max_iter=4, tol=1e-12)
    assert res.status == "max_iter"
    assert not bool(res.converged.any())
    assert (res.nstep == res.abs_trace.shape[1]).all()
    if solver in OURS:
        assert res.nfe == 4


# ---------------------------------------------------------------------------------------
# No false "converged", hard budgets (issue 10, rows 1-3)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_norm_overflow_reports_non_finite(solver: str) -> None:
    """Row 1: ||f(z)|| overflows float32 (2 * 4e18 in 16 entries), so rel = abs / inf would
    read 0; the sample is non-finite, its relative residual NaN, never converged."""
    res = solvers.solve(lambda z: 2 * z, torch.full((2, 16), 4e18), solver, max_iter=20)
    assert res.status == "non-finite"
    assert not bool(res.converged.any())
    assert torch.isnan(res.rel_residual).all()


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_runaway_iterate_is_not_converged(solver: str) -> None:
    """Row 2: z + 1 + 0.1 sin z has no fixed point, but Anderson and Broyden race z to
    ~1e8, where z + 1 rounds to z in float32: a zero residual that is only rounding. A
    residual at rounding level of an image grown past diverge_ratio times the start is
    'diverged'; no solver may call it converged."""
    res = solvers.solve(
        lambda z: z + 1 + 0.1 * torch.sin(z),
        torch.ones(4, 8),
        solver,
        max_iter=50,
        tol=1e-6,
        stop_mode="abs",
    )
    assert not bool(res.converged.any()), res.status_counts()
    if solver in ("anderson", "broyden"):  # the rule itself, not only an exhausted budget
        assert res.status == "diverged" and res.nfe < 50
        assert (res.abs_residual == 0).all()  # what used to be reported as converged
        assert (res.z.norm(dim=1) > 1e4 * 8**0.5 * 2).all()


def test_doubling_map_is_never_converged() -> None:
    """Row 2: plain iteration of 2z + 1 with divergence detection pushed out of reach
    used to stop 'converged' at step 62 (||f(z)|| overflowed, rel = abs / inf = 0)."""
    res = solvers.solve(
        lambda z: 2 * z + 1, torch.zeros(2, 16), "fixed_point", max_iter=200, diverge_ratio=1e300
    )
    assert res.status == "non-finite" and res.nstep.tolist() == [62, 62]
    assert not bool(res.converged.any())


@pytest.mark.parametrize("solver", OURS)
def test_far_fixed_point_at_rounding_level_still_converges(solver: str) -> None:
    """Row 2's rule needs both symptoms: z* = 2e6 from z0 = 0 (1x its start's size) solved
    to a residual of a few float32 ulps stays converged, with the right answer."""
    tol = 4 * torch.finfo(torch.float32).eps
    res = solvers.solve(lambda z: 0.5 * z + 1e6, torch.zeros(3, 4), solver, max_iter=200, tol=tol)
    assert res.status == "converged"
    assert (res.rel_residual <= tol).all()
    torch.testing.assert_close(res.z, torch.full((3, 4), 2e6), rtol=1e-6, atol=0)


@pytest.mark.parametrize("max_iter", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_max_iter_is_a_hard_budget(solver: str, max_iter: int) -> None:
    """Row 3: max_iter bounds the calls of f for every solver, line searches and the
    adapters' measurement of their answer included (scipy.anderson made 155 for 50)."""
    calls = 0

    def f(z: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return z + 1

    res = solvers.solve(f, torch.zeros(2, 16), solver, max_iter=max_iter)
    assert calls == res.nfe <= max_iter
    assert res.abs_trace.shape == (2, res.nfe) and (res.nstep <= res.nfe).all()
    assert not bool(res.converged.any())  # SciPy's 155 evaluations had reached rel <= tol


# ---------------------------------------------------------------------------------------
# Input checks and 16-bit dtypes (issue 10, row 4)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("solver", [s for s in ALL_SOLVERS if s != "torchdeq.anderson"])
def test_half_precision_z0(solver: str, dtype: torch.dtype) -> None:
    """Row 4: float16/bfloat16 solve (Anderson's small system in float32); the residuals
    are float32, the answer is z0's dtype and within 16-bit rounding of the Dottie number."""
    p = make_problem("cosine", dtype)
    res = solvers.solve(p.f, p.z0, solver, max_iter=100, tol=1e-2)
    assert res.status == "converged"
    assert res.z.dtype == dtype and res.abs_trace.dtype == torch.float32
    assert (res.z.float() - DOTTIE).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_refused_by_name_where_unsupported(dtype: torch.dtype) -> None:
    """Row 4: torchdeq's Anderson has no 16-bit linear solve: refused up front, naming the
    dtype and the alternative, not a NotImplementedError from inside torch."""
    p = make_problem("cosine", dtype)
    with pytest.raises(TypeError, match=f"{dtype}.*'anderson'"):
        solvers.solve(p.f, p.z0, "torchdeq.anderson")


@pytest.mark.usefixtures("registry")
def test_register_rejects_a_class_that_is_not_a_solver() -> None:
    """Row 4: register("bad", object) fails at registration naming the problem; a function
    returning no Solver fails at construction, naming the registration."""
    with pytest.raises(TypeError, match="'bad'.*object.*not a solvers.Solver"):
        solvers.register("bad", object)
    assert "bad" not in solvers.available()
    solvers.register("bad_function", lambda: 3)
    f, z0 = _affine()
    with pytest.raises(TypeError, match="'bad_function' returned int"):
        solvers.solve(f, z0, "bad_function")
    with pytest.raises(TypeError, match="overwrite"):
        solvers.register("half_step", HalfStep, overwrite=1)


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------

CONTRACT_NAMES = (
    "fixed_point",
    "anderson",
    "broyden",
    "torchdeq.fixed_point_iter",
    "torchdeq.anderson",
    "torchdeq.broyden",
    "scipy.anderson",
    "scipy.broyden1",
)


class HalfStep(solvers.IterativeSolver):
    """A third-party solver: z <- z + step (f(z) - z)."""

    name = "half_step"

    def __init__(self, step: float = 0.5) -> None:
        self.step_size = step

    def init(self, z0: Tensor) -> None:
        return None

    def step(self, state: None, z: Tensor, fz: Tensor, k: int) -> tuple[None, Tensor]:
        return None, z + self.step_size * (fz - z)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the registry, restored after the test."""
    from solvers import _registry

    copy = dict(_registry._REGISTRY)
    monkeypatch.setattr(_registry, "_REGISTRY", copy)
    return copy


def test_available_has_the_contract_names() -> None:
    """available() is a tuple holding the 8 names DESIGN.md promises."""
    names = solvers.available()
    assert isinstance(names, tuple)
    assert set(CONTRACT_NAMES) <= set(names)


@pytest.mark.usefixtures("registry")
def test_register_third_party_solver() -> None:
    """A registered IterativeSolver subclass is usable by name, with its options."""
    solvers.register("half_step", HalfStep)
    assert "half_step" in solvers.available()
    p = make_problem("cosine", torch.float64)
    res = solvers.solve(p.f, p.z0, "half_step", step=0.8, max_iter=200, tol=1e-10)
    assert res.status == "converged" and res.solver == "half_step"
    assert (p.error(res.z) < 1e-8).all()
    with pytest.raises(ValueError, match=r"'stride'.*'step'"):
        solvers.solve(p.f, p.z0, "half_step", stride=0.8)


@pytest.mark.usefixtures("registry")
def test_register_duplicate_name_errors() -> None:
    """Registering a taken name raises unless overwrite=True."""
    with pytest.raises(ValueError, match="already registered"):
        solvers.register("anderson", HalfStep)
    solvers.register("half_step", HalfStep)
    with pytest.raises(ValueError, match="half_step"):
        solvers.register("half_step", HalfStep)
    solvers.register("anderson", HalfStep, overwrite=True)
    f, z0 = _affine()
    assert solvers.solve(f, z0, "anderson").solver == "half_step"


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize(
    ("name", "factory"),
    [("", HalfStep), (3, HalfStep), ("x", 3)],
    ids=["empty-name", "int-name", "non-callable-factory"],
)
def test_register_bad_arguments(name: Any, factory: Any) -> None:
    """register() refuses empty or non-string names and non-callable factories."""
    with pytest.raises(TypeError):
        solvers.register(name, factory)


def test_solvers_import_graph_has_no_cycle() -> None:
    """No module of the package imports, directly or through others, one that imports it
    back (function-level imports included): the graph of relative imports is acyclic."""
    import ast
    from pathlib import Path

    root = Path(solvers.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(("solvers", *parts)).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                edges.add(target)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt == "solvers" or nxt not in graph:
                continue  # the package root re-exports; submodules never import it
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert "solvers._driver" in graph["solvers._base"]  # the graph was really read


def test_registry_fixture_restores(registry: dict) -> None:
    """Sanity: the fixture isolates registrations from other tests."""
    from solvers import _registry

    assert _registry._REGISTRY is registry
    assert "half_step" not in solvers.available()


# ---------------------------------------------------------------------------------------
# Solver objects and hyperparameters
# ---------------------------------------------------------------------------------------

SOLVER_OBJECTS = [
    pytest.param(solvers.FixedPointIteration(tau=0.7), id="fixed_point-tau0.7"),
    pytest.param(solvers.Anderson(m=2), id="anderson-m2"),
    pytest.param(solvers.Anderson(m=8, lam=0.0), id="anderson-m8-lam0"),
    pytest.param(solvers.Anderson(m=4, tau=0.6), id="anderson-tau0.6"),
    pytest.param(solvers.Broyden(m=2), id="broyden-m2"),
    pytest.param(solvers.Broyden(m=30, tau=0.8), id="broyden-m30-tau0.8"),
]


@pytest.mark.parametrize("solver", SOLVER_OBJECTS)
def test_solver_objects_with_hyperparameters(solver: solvers.Solver) -> None:
    """Solver objects with non-default hyperparameters still find the answer."""
    p = make_problem("tanh_net", torch.float64)
    res = solvers.solve(p.f, p.z0, solver, max_iter=MAX_ITER, tol=1e-10, args=p.args)
    assert res.status == "converged" and res.solver == solver.name
    assert (p.error(res.z) <= 1e-8).all()
    assert solver.hyperparameters()


def test_solve_result_is_frozen_and_summarised() -> None:
    """SolveResult is a frozen dataclass whose repr is a one-line summary."""
    f, z0 = _affine()
    res = solvers.solve(f, z0, "anderson")
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.nfe = 0  # type: ignore[misc]
    text = repr(res)
    assert "anderson" in text and "converged" in text and "\n" not in text


# ---------------------------------------------------------------------------------------
# Safeguards and memory
# ---------------------------------------------------------------------------------------

SINGULAR_HISTORY = [
    pytest.param(solvers.Anderson(), id="anderson"),
    pytest.param(solvers.Anderson(lam=0.0), id="anderson-lam0"),
    pytest.param(solvers.Anderson(m=3, tau=0.5), id="anderson-tau0.5"),
    pytest.param(solvers.Broyden(), id="broyden"),
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("start", ["at-c", "at-0"])
@pytest.mark.parametrize("solver", SINGULAR_HISTORY)
def test_singular_history_stays_finite(
    solver: solvers.Solver, start: str, dtype: torch.dtype
) -> None:
    """A constant map repeats its iterates (zero residual differences): no NaN appears."""
    c = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]], dtype=dtype)
    z0 = c.clone() if start == "at-c" else torch.zeros_like(c)
    res = solvers.solve(lambda z: c.clone(), z0, solver, max_iter=12, tol=0.0, check_every=None)
    assert torch.isfinite(res.z).all()
    assert torch.isfinite(res.abs_trace).all() and torch.isfinite(res.rel_trace).all()
    torch.testing.assert_close(res.z, c)
    assert res.status == "converged"


@pytest.mark.parametrize("solver", SINGULAR_HISTORY)
def test_frozen_samples_repeat_without_nan(solver: solvers.Solver) -> None:
    """Stopped samples keep being stepped (check_every=None) on repeated iterates: no NaN."""
    p = make_problem("mixed_rates", torch.float64)
    res = solvers.solve(
        p.f, p.z0, solver, max_iter=MAX_ITER, tol=1e-10, check_every=None, args=p.args
    )
    assert torch.isfinite(res.abs_trace).all() and torch.isfinite(res.z).all()
    assert res.status == "converged"
    scale = torch.linalg.vector_norm(p.z_star, dim=1)
    assert (p.error(res.z) <= 2e-10 * scale / (1 - p.lipschitz)).all()


class _Recording:
    """Mixin that records the shapes of the solver state at every step."""

    shapes: list[tuple[tuple[int, ...], ...]]

    def step(self, state: Any, z: Tensor, fz: Tensor, k: int) -> tuple[Any, Tensor]:
        state, z_next = super().step(state, z, fz, k)  # type: ignore[misc]
        tensors = [v for v in vars(state).values() if isinstance(v, Tensor)]
        self.shapes.append(tuple(tuple(t.shape) for t in tensors))
        if isinstance(state.__dict__.get("rank"), int):
            assert 0 <= state.rank <= self.m  # type: ignore[attr-defined]
        return state, z_next


class RecordingBroyden(_Recording, solvers.Broyden):
    """Broyden that records its state shapes."""


class RecordingAnderson(_Recording, solvers.Anderson):
    """Anderson that records its state shapes."""


@pytest.mark.parametrize("max_iter", [10, 80])
@pytest.mark.parametrize("cls", [RecordingBroyden, RecordingAnderson], ids=["broyden", "anderson"])
def test_memory_is_bounded(cls: type, max_iter: int) -> None:
    """State tensors hold m slots whatever max_iter is; a full memory still converges."""
    m = 3
    solver = cls(m=m)
    solver.shapes = []
    p = make_problem("tanh_net", torch.float64)
    b, n = p.z0.shape
    res = solvers.solve(
        p.f, p.z0, solver, max_iter=max_iter, tol=0.0, check_every=None, args=p.args
    )
    assert res.nfe == max_iter and len(solver.shapes) == max_iter - 1
    first = solver.shapes[0]
    assert all(s == first for s in solver.shapes)  # nothing grows
    # (B, m, n) histories and (B, m, m) Gram matrices; Anderson keeps no iterates
    # (a (B, 0, n) buffer) when tau == 1, and one (m, m, m) constant.
    big = [s for s in first if len(s) == 3 and s[1] > 0 and s != (m, m, m)]
    assert big and all(s[0] == b and s[1] == m and s[2] in (n, m) for s in big)
    assert all(s[1] in (0, m) for s in first if len(s) == 3)
    if max_iter == 80:  # m = 3 is far fewer than the steps taken; it still converges
        assert (res.abs_residual <= 1e-12).all()
        assert (p.error(res.z) <= 1e-10).all()


@pytest.mark.parametrize("cls", [solvers.Anderson, solvers.Broyden], ids=["anderson", "broyden"])
def test_history_buffers_are_written_before_read(cls: type) -> None:
    """The ring buffers start uninitialised (torch.empty); filling them with NaN first
    must change nothing, so no step reads a slot it has not written."""

    class Poisoned(cls):  # type: ignore[misc, valid-type]
        def init(self, z0: Tensor) -> Any:
            state = super().init(z0)
            for value in vars(state).values():
                if isinstance(value, Tensor) and value.dim() == 3 and value.shape[0] == z0.shape[0]:
                    value.fill_(math.nan)
            return state

    p = make_problem("tanh_net", torch.float64)
    kwargs = {"max_iter": 40, "tol": 1e-12, "args": p.args}
    clean = solvers.solve(p.f, p.z0, cls(m=3), **kwargs)
    poisoned = solvers.solve(p.f, p.z0, Poisoned(m=3), **kwargs)
    assert clean.status == "converged"
    torch.testing.assert_close(poisoned.z, clean.z, rtol=0, atol=0)
    assert torch.equal(poisoned.nstep, clean.nstep)


# ---------------------------------------------------------------------------------------
# Heavier: many random problems (python -m pytest -m slow)
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("solver", OURS)
def test_random_tanh_networks(solver: str) -> None:
    """Random contractive tanh networks (d=32, B=16, 20 seeds): right answer, with and
    without compaction, against a long float64 iteration."""
    for seed in range(20):
        g = torch.Generator().manual_seed(100 + seed)
        d, b = 32, 16
        w = torch.randn(d, d, generator=g, dtype=torch.float64)
        w = w * (0.9 / torch.linalg.matrix_norm(w, ord=2))
        x = 2 * torch.randn(b, d, generator=g, dtype=torch.float64)

        def f(z: Tensor, x: Tensor, w: Tensor = w) -> Tensor:
            return torch.tanh(z @ w.T + x)

        z_star = torch.zeros(b, d, dtype=torch.float64)
        for _ in range(1000):  # 0.9 ** 1000 ~ 1e-46
            z_star = f(z_star, x)
        z0 = torch.zeros_like(z_star)
        for compact in (False, True):
            res = solvers.solve(f, z0, solver, max_iter=500, tol=1e-10, args=(x,), compact=compact)
            assert res.status == "converged", (seed, compact)
            scale = torch.linalg.vector_norm(z_star, dim=1)
            err = torch.linalg.vector_norm(res.z - z_star, dim=1)
            assert (err <= 2e-10 * scale / (1 - 0.9) + 1e-13).all(), (seed, compact)
