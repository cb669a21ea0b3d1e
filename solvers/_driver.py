"""The one driver loop shared by every iterative solver.

It owns calling ``f``, residuals, per-sample stopping (a stopped sample is frozen),
the best iterate, traces, divergence/NaN detection and optional batch compaction.
Between check points it never reads a tensor on the host, so on CUDA the loop
queues work without synchronising; ``check_every=None`` removes every check.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._base import IterativeSolver, Problem
from ._result import SolveError, SolveResult, Status


def residuals(z: Tensor, fz: Tensor, eps: float, *, keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sample residuals of a flat batch.

    Args:
        z: (B, n) iterate.
        fz: (B, n) its image ``f(z)``.
        eps: added to ``||f(z)||`` in the relative residual.
        keepdim: return (B, 1) columns instead of (B,) vectors.

    Returns:
        ``abs = ||f(z) - z||_2`` and ``rel = abs / (||f(z)||_2 + eps)``, each (B,), or
        (B, 1) with ``keepdim``.
    """
    abs_r = torch.linalg.vector_norm(fz - z, dim=1, keepdim=keepdim)
    return abs_r, abs_r / (torch.linalg.vector_norm(fz, dim=1, keepdim=keepdim) + eps)


class _Evaluator:
    """Calls ``f`` on flat iterates; with compaction, only on the active samples."""

    def __init__(self, problem: Problem) -> None:
        self.f = problem.f
        self.shape = problem.z0.shape
        self.args = problem.args
        self.index: Tensor | None = None  # active samples; None means all
        self.index_args: tuple[Tensor, ...] = problem.args
        self.calls = 0
        self.sample_evals = 0
        self.last: Tensor | None = None

    def __call__(self, z: Tensor) -> Tensor:
        b = z.shape[0]
        if self.index is None:
            fz = self._call(z, self.args)
            self.sample_evals += b
        else:
            sub = self._call(z.index_select(0, self.index), self.index_args)
            fz = self.last.index_copy(0, self.index, sub)
            self.sample_evals += self.index.shape[0]
        self.calls += 1
        self.last = fz
        return fz

    def _call(self, z: Tensor, args: tuple[Tensor, ...]) -> Tensor:
        full_shape = (z.shape[0], *self.shape[1:])
        flat = len(full_shape) == 2  # (B, n) problems need no reshaping either way
        fz = self.f(z if flat else z.view(full_shape), *args)
        if not isinstance(fz, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(fz).__name__}")
        if fz.shape != full_shape:
            raise ValueError(
                f"f changed the shape: it maps {tuple(full_shape)} to {tuple(fz.shape)}; "
                "a fixed-point map must return a tensor of its input's shape"
            )
        return fz if flat else fz.reshape(z.shape[0], -1)

    def compact_to(self, active: Tensor) -> None:
        """Restrict later calls to the samples marked in ``active`` (reads the host)."""
        index = active.nonzero().squeeze(1)
        if index.shape[0] == active.shape[0]:
            self.index, self.index_args = None, self.args
        else:
            self.index = index
            self.index_args = tuple(a.index_select(0, index) for a in self.args)


def iterate(solver: IterativeSolver, problem: Problem) -> SolveResult:
    """Run ``solver`` on ``problem`` and assemble the result.

    Args:
        solver: proposes iterates through ``init``/``step``.
        problem: the validated problem and driver settings.

    Returns:
        The :class:`SolveResult`; ``z`` has the shape of ``problem.z0``.
    """
    z0 = problem.z0
    batch = z0.shape[0]
    z = z0.reshape(batch, -1)
    evaluate = _Evaluator(problem)
    rel_mode = problem.stop_mode == "rel"
    tol = problem.tol

    state = solver.init(z)
    # Per-sample bookkeeping lives in (B, 1) columns, so it broadcasts against (B, n)
    # iterates without extra view ops: at B=64, n=256 every op saved is ~1% of an f call.
    active = torch.ones(batch, 1, dtype=torch.bool, device=z.device)
    best_res = torch.full((batch, 1), math.inf, dtype=z.dtype, device=z.device)
    best_z = z
    abs_cols: list[Tensor] = []
    rel_cols: list[Tensor] = []
    diverge_limit = best_res  # replaced after the first evaluation

    for k in range(problem.max_iter):
        fz = evaluate(z)
        abs_r, rel_r = residuals(z, fz, problem.eps, keepdim=True)
        abs_cols.append(abs_r)
        rel_cols.append(rel_r)
        res = rel_r if rel_mode else abs_r
        if k == 0:
            # Clamped so that an infinite first residual also counts as a stop.
            diverge_limit = (abs_r * problem.diverge_ratio).clamp(max=torch.finfo(z.dtype).max)
        improved = res < best_res
        best_res = torch.fmin(res, best_res)
        # NaN compares false both ways, so a non-finite residual stops the sample too.
        active = active & (res > tol) & (abs_r <= diverge_limit)
        if problem.check_every is not None and (k + 1) % problem.check_every == 0:
            # One host read answers both "anyone left?" and "did every sample improve?";
            # the latter (the usual case) makes the best-iterate update a free rebind.
            any_active, all_improved = torch.stack((active.any(), improved.all())).tolist()
            best_z = z if all_improved else torch.where(improved, z, best_z)
            if not any_active:
                break
            if problem.compact:
                evaluate.compact_to(active.squeeze(1))
        else:
            best_z = torch.where(improved, z, best_z)
        if k + 1 == problem.max_iter:
            break
        state, z_next = solver.step(state, z, fz, k)
        # Freeze stopped samples. lerp with a 0/1 weight is exact and cheaper than where;
        # a non-finite proposal can only turn an already stopped sample's z into NaN,
        # which never becomes its best iterate and leaves its status unchanged.
        z = torch.lerp(z, z_next, active.to(z.dtype))

    abs_trace = torch.cat(abs_cols, dim=1)
    rel_trace = torch.cat(rel_cols, dim=1)
    res_trace = rel_trace if rel_mode else abs_trace
    # The best iterate was taken at the first minimum of the residual (NaN never wins).
    best = res_trace.nan_to_num(nan=math.inf).argmin(dim=1, keepdim=True)
    nstep, status = _stopping(res_trace, abs_trace, diverge_limit.squeeze(1), tol)
    return finish(
        problem,
        SolveResult(
            z=best_z.view(z0.shape),
            converged=status == Status.CONVERGED,
            nstep=nstep,
            abs_residual=abs_trace.gather(1, best).squeeze(1),
            rel_residual=rel_trace.gather(1, best).squeeze(1),
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            nfe=evaluate.calls,
            sample_status=status,
            solver=solver.name,
            sample_evals=evaluate.sample_evals,
        ),
    )


def result_from_trace(
    problem: Problem,
    solver_name: str,
    z: Tensor,
    abs_trace: Tensor,
    rel_trace: Tensor,
    nfe: int,
    *,
    unrecorded: int = 0,
) -> SolveResult:
    """Assemble a result for a solver that ran its own loop (the adapters).

    The residuals of the returned point are measured here with one more call of ``f``
    (counted in ``nfe``), so every solver reports residuals by the same definition.

    Args:
        problem: the problem that was solved.
        solver_name: name for the result.
        z: (B, ...) the point the solver returned.
        abs_trace: (B, N) absolute residual per evaluation, as the solver recorded it.
        rel_trace: (B, N) relative residual per evaluation.
        nfe: calls of ``f`` the solver made.
        unrecorded: evaluations the solver made before its trace starts; the returned
            traces get that many leading NaN columns, so column j is evaluation j + 1.
    """
    batch = z.shape[0]
    fz = problem.f(z, *problem.args).reshape(batch, -1)
    abs_r, rel_r = residuals(z.reshape(batch, -1), fz, problem.eps)
    res_trace = rel_trace if problem.stop_mode == "rel" else abs_trace
    diverge_limit = abs_trace[:, 0] * problem.diverge_ratio if abs_trace.shape[1] else abs_r
    nstep, _ = _stopping(res_trace, abs_trace, diverge_limit, problem.tol)
    nstep = nstep + unrecorded
    if unrecorded:
        pad = abs_trace.new_full((batch, unrecorded), math.nan)
        abs_trace, rel_trace = torch.cat((pad, abs_trace), 1), torch.cat((pad, rel_trace), 1)
    final_res = rel_r if problem.stop_mode == "rel" else abs_r
    status = torch.full((batch,), int(Status.MAX_ITER), dtype=torch.int8, device=z.device)
    status[abs_r > diverge_limit] = int(Status.DIVERGED)
    status[~torch.isfinite(final_res)] = int(Status.NON_FINITE)
    status[final_res <= problem.tol] = int(Status.CONVERGED)
    return finish(
        problem,
        SolveResult(
            z=z,
            converged=status == Status.CONVERGED,
            nstep=nstep,
            abs_residual=abs_r,
            rel_residual=rel_r,
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            nfe=nfe + 1,
            sample_status=status,
            solver=solver_name,
            sample_evals=(nfe + 1) * batch,
        ),
    )


def finish(problem: Problem, result: SolveResult) -> SolveResult:
    """Apply ``raise_on_failure`` and hand the result back."""
    if problem.raise_on_failure:
        raise_if_failed(result)
    return result


def _stopping(
    res_trace: Tensor, abs_trace: Tensor, diverge_limit: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """Derive each sample's step count and status from its residual trace.

    Args:
        res_trace: (B, N) residual in the stop mode.
        abs_trace: (B, N) absolute residual.
        diverge_limit: (B,) absolute residual above which a sample has diverged.
        tol: tolerance on ``res_trace``.

    Returns:
        ``nstep`` (B,) int64 and ``status`` (B,) int8 :class:`Status` codes.
    """
    n = res_trace.shape[1]
    stopped = ~((res_trace > tol) & (abs_trace <= diverge_limit.unsqueeze(1)))
    first = stopped.to(torch.uint8).argmax(dim=1, keepdim=True)  # 0 when never stopped
    any_stop = stopped.gather(1, first).squeeze(1)
    res_at_stop = res_trace.gather(1, first).squeeze(1)
    nstep = torch.where(any_stop, first.squeeze(1) + 1, n)
    code = torch.where(
        res_at_stop <= tol,
        int(Status.CONVERGED),
        torch.where(torch.isfinite(res_at_stop), int(Status.DIVERGED), int(Status.NON_FINITE)),
    )
    code = torch.where(any_stop, code, int(Status.MAX_ITER))
    return nstep, code.to(torch.int8)


def raise_if_failed(result: SolveResult) -> None:
    """Raise :class:`SolveError` naming the failures when any sample did not converge."""
    if result.status != Status.CONVERGED.label:
        counts = {k: v for k, v in result.status_counts().items() if v}
        raise SolveError(
            f"{result.solver}: not every sample converged ({counts}); "
            f"max relative residual {float(result.rel_residual.max()):.3e} after "
            f"{result.nfe} evaluations. Raise max_iter, loosen tol, or check that f is "
            "contractive."
        )
