"""The one driver loop shared by every iterative solver, and the rules it stops by.

It owns calling ``f``, residuals, per-sample stopping (a stopped sample is frozen),
the returned iterate (best or last), traces, divergence/NaN detection and optional
batch compaction. Between check points it never reads a tensor on the host, so on
CUDA the loop queues work without synchronising; ``check_every=None`` removes every
check. Called under autograd, the iterates keep their graph (the bookkeeping does not
build one), so a solve with an out-of-place solver such as ``fixed_point`` is
differentiable through every step each sample took.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from ._problem import Problem
from ._result import SolveError, SolveResult, Status

#: A residual at most this many units of rounding (``finfo.eps``) of ``||f(z)||`` is
#: below what the dtype can resolve: ``f(z)`` and ``z`` agree to their last few bits.
ROUNDING_ULPS = 4.0


class Stepper(Protocol):
    """What the loop needs from a solver (see :class:`solvers.IterativeSolver`)."""

    name: str

    def init(self, z0: Tensor) -> Any:
        """Initial state for a flat batch ``z0`` (B, n)."""

    def step(self, state: Any, z: Tensor, fz: Tensor, k: int) -> tuple[Any, Tensor]:
        """The new state and the next (B, n) iterate."""


def residuals(z: Tensor, fz: Tensor, eps: float, *, keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sample residuals of a flat batch.

    Args:
        z: (B, n) iterate.
        fz: (B, n) its image ``f(z)``.
        eps: added to ``||f(z)||`` in the relative residual.
        keepdim: return (B, 1) columns instead of (B,) vectors.

    Returns:
        ``abs = ||f(z) - z||_2`` and ``rel = abs / (||f(z)||_2 + eps)``, each (B,), or
        (B, 1) with ``keepdim``. ``rel`` is NaN where ``||f(z)||`` overflows the dtype
        (there is no size left to compare with). Both are float32 for 16-bit inputs.
    """
    abs_r, norm_fz = norms(z, fz, keepdim=keepdim)
    return abs_r, relative(abs_r, norm_fz, eps)


def norms(z: Tensor, fz: Tensor, *, keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """``||f(z) - z||_2`` and ``||f(z)||_2`` per sample of a flat (B, n) batch.

    Returns (B,) tensors, or (B, 1) with ``keepdim``; float32 for 16-bit inputs, whose
    own resolution (1e-3 for float16) would swamp any useful tolerance.
    """
    dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else None
    abs_r = torch.linalg.vector_norm(fz - z, dim=1, keepdim=keepdim, dtype=dtype)
    return abs_r, torch.linalg.vector_norm(fz, dim=1, keepdim=keepdim, dtype=dtype)


def relative(abs_r: Tensor, norm_fz: Tensor, eps: float) -> Tensor:
    """``abs / (||f(z)|| + eps)``, NaN where ``||f(z)||`` is infinite (any shape)."""
    return torch.where(norm_fz.isinf(), math.nan, abs_r / (norm_fz + eps))


class _Evaluator:
    """Calls ``f`` on flat iterates; with compaction, only on the active samples."""

    def __init__(self, problem: Problem) -> None:
        self.f = problem.f
        self.shape = problem.z0.shape
        self.dtype = problem.z0.dtype
        self.device = problem.z0.device
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
        fz = check_image(self.f(z if flat else z.view(full_shape), *args), full_shape,
                         self.dtype, self.device)
        return fz if flat else fz.reshape(z.shape[0], -1)

    def compact_to(self, active: Tensor) -> None:
        """Restrict later calls to the samples marked in ``active`` (reads the host)."""
        index = active.nonzero().squeeze(1)
        if index.shape[0] == active.shape[0]:
            self.index, self.index_args = None, self.args
        else:
            self.index = index
            self.index_args = tuple(a.index_select(0, index) for a in self.args)


def check_image(
    fz: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``fz`` if it is a tensor of the iterate's shape, dtype and device; else raise.

    Only metadata is compared, so the check never reads values (no host sync).
    """
    if not isinstance(fz, Tensor):
        raise TypeError(f"f must return a Tensor, got {type(fz).__name__}")
    if fz.shape != shape:
        raise ValueError(
            f"f changed the shape: it maps {tuple(shape)} to {tuple(fz.shape)}; "
            "a fixed-point map must return a tensor of its input's shape"
        )
    if fz.dtype != dtype or fz.device != device:
        raise TypeError(
            f"f must return the dtype and device of z ({dtype} on {device}), got "
            f"{fz.dtype} on {fz.device}; cast its output (or z0) so that both agree"
        )
    return fz


def iterate(solver: Stepper, problem: Problem) -> SolveResult:
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
    last = problem.output == "last"
    tol, eps, check_every = problem.tol, problem.eps, problem.check_every
    # The bookkeeping reads detached views, so under autograd it builds no graph.
    tracking = torch.is_grad_enabled()

    state = solver.init(z)
    # Per-sample bookkeeping lives in (B, 1) columns, so it broadcasts against (B, n)
    # iterates without extra view ops (each op saved is ~1% of a small f call).
    trace_dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
    biggest = torch.finfo(trace_dtype).max
    active = torch.ones(batch, 1, dtype=torch.bool, device=z.device)
    best_res = torch.full((batch, 1), math.inf, dtype=trace_dtype, device=z.device)
    best_z = z
    abs_cols: list[Tensor] = []
    norm_cols: list[Tensor] = []
    limit = best_res  # replaced after the first evaluation

    # Only a tolerance or a finite divergence limit can stop a sample that stays finite.
    # Without them nothing is frozen (a non-finite sample keeps iterating), and without
    # check points either the loop keeps no mask at all: it is the plain loop plus the
    # residual trace, from which the result derives every status.
    freezes = tol > 0 or not math.isinf(problem.diverge_ratio)
    masks = freezes or check_every is not None
    for k in range(problem.max_iter):
        fz = evaluate(z)
        zb, fzb = (z.detach(), fz.detach()) if tracking else (z, fz)
        abs_r, norm_fz = norms(zb, fzb, keepdim=True)
        abs_cols.append(abs_r)
        norm_cols.append(norm_fz)
        if k == 0:
            limit = diverge_limit(abs_r, problem.diverge_ratio)
        # Best needs the relative residual with its overflow rule; last only its test.
        if not last:
            res = relative(abs_r, norm_fz, eps) if rel_mode else abs_r
        elif tol > 0:
            res = abs_r / (norm_fz + eps) if rel_mode else abs_r
        was_active = active
        if masks:
            # The rule of :func:`stopping`; NaN compares false, so it stops a sample too.
            keep = (abs_r <= limit) & (norm_fz <= biggest)
            active = active & (keep & (res > tol) if tol > 0 else keep)
        if last:
            # Every sample that entered this evaluation takes its step, the stopping
            # ones included, and keeps that state. lerp with a 0/1 weight is exact and
            # cheaper than where (forward and backward); it would turn a frozen state
            # into NaN only if f of that state were not finite.
            state, z_next = solver.step(state, z, fz, k)
            z = torch.lerp(z, z_next, was_active.to(z.dtype)) if freezes else z_next
            if check_every is not None and (k + 1) % check_every == 0:
                if not bool(active.any()):
                    break
                if problem.compact:
                    evaluate.compact_to(active.squeeze(1))
            continue
        improved = res < best_res
        best_res = torch.fmin(res, best_res)
        if check_every is not None and (k + 1) % check_every == 0:
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
        # Freeze stopped samples (lerp: see above). A non-finite proposal can only turn
        # an already stopped sample's z into NaN, which never becomes its best iterate.
        z = torch.lerp(z, z_next, active.to(z.dtype)) if freezes else z_next

    with torch.no_grad():
        abs_trace = torch.cat(abs_cols, dim=1)
        norm_trace = torch.cat(norm_cols, dim=1)
        nstep, status = stopping(abs_trace, norm_trace, limit.squeeze(1), problem)
        abs_trace, norm_trace = hold_after_stop(nstep, abs_trace, norm_trace)
        rel_trace = relative(abs_trace, norm_trace, eps)
        if last:
            pick = (nstep - 1).unsqueeze(1)
        else:
            # The best iterate was taken at the first minimum of the residual (NaN never
            # wins).
            res_trace = rel_trace if rel_mode else abs_trace
            pick = res_trace.nan_to_num(nan=math.inf).argmin(dim=1, keepdim=True)
    return finish(
        problem,
        SolveResult(
            z=(z if last else best_z).view(z0.shape),
            converged=status == Status.CONVERGED,
            nstep=nstep,
            abs_residual=abs_trace.gather(1, pick).squeeze(1),
            rel_residual=rel_trace.gather(1, pick).squeeze(1),
            abs_trace=abs_trace,
            rel_trace=rel_trace,
            nfe=evaluate.calls,
            sample_status=status,
            solver=solver.name,
            sample_evals=evaluate.sample_evals,
        ),
    )


def diverge_limit(first_abs: Tensor, ratio: float) -> Tensor:
    """The absolute residual above which a sample has diverged, from its first one.

    Clamped to the dtype's largest value, so an infinite residual always stops the
    sample; with ``ratio = inf`` only that (non-finite residuals) remains.
    """
    biggest = torch.finfo(first_abs.dtype).max
    if math.isinf(ratio):
        return torch.full_like(first_abs, biggest)
    return (first_abs * ratio).clamp(max=biggest)


def hold_after_stop(nstep: Tensor, *traces: Tensor) -> tuple[Tensor, ...]:
    """Traces whose entries after each sample's stop repeat its stopping value.

    A stopped sample is frozen, but later evaluations may still see it (until the next
    check point, or as a copy under compaction); this makes its trace say what it is.
    """
    after = torch.arange(traces[0].shape[1], device=nstep.device) >= nstep.unsqueeze(1)
    at = (nstep - 1).unsqueeze(1)
    return tuple(torch.where(after, t.gather(1, at), t) for t in traces)


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
    diverge = abs_trace[:, 0] * problem.diverge_ratio if abs_trace.shape[1] else abs_r
    n = res_trace.shape[1]
    stopped = ~((res_trace > problem.tol) & (abs_trace <= diverge.unsqueeze(1)))
    first = stopped.to(torch.uint8).argmax(dim=1)
    nstep = torch.where(stopped.any(dim=1), first + 1, n) + unrecorded
    if unrecorded:
        pad = abs_trace.new_full((batch, unrecorded), math.nan)
        abs_trace, rel_trace = torch.cat((pad, abs_trace), 1), torch.cat((pad, rel_trace), 1)
    final_res = rel_r if problem.stop_mode == "rel" else abs_r
    status = torch.full((batch,), int(Status.MAX_ITER), dtype=torch.int8, device=z.device)
    status[abs_r > diverge] = int(Status.DIVERGED)
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


def stopping(
    abs_trace: Tensor, norm_trace: Tensor, limit: Tensor, problem: Problem
) -> tuple[Tensor, Tensor]:
    """Each sample's step count and status from its residual trace.

    A sample stops at the first evaluation whose residual (in ``stop_mode``) is at most
    ``tol`` (never when ``tol = 0``, which asks for the whole budget), whose absolute
    residual exceeds ``limit`` or is not finite, or whose ``||f(z)||`` is not finite —
    exactly the loop's rule. Its status describes that evaluation (the
    last one if it never stopped): ``converged`` when the residual met ``tol``, unless
    the image's norm overflowed (``non-finite``) or the iterate ran away (``diverged``:
    a residual within :data:`ROUNDING_ULPS` of rounding while ``||f(z)||`` exceeds
    ``diverge_ratio`` times the start's size ``||f(z0)|| + ||f(z0) - z0||``, i.e.
    ``f(z)`` and ``z`` agree only because the dtype cannot tell them apart);
    ``non-finite`` for a NaN/Inf residual; ``diverged`` for one past ``limit``;
    ``max_iter`` when the budget ran out first.

    Args:
        abs_trace: (B, N) absolute residual per evaluation.
        norm_trace: (B, N) ``||f(z)||`` per evaluation.
        limit: (B,) absolute residual above which a sample has diverged.
        problem: for ``tol``, ``stop_mode``, ``eps`` and ``diverge_ratio``.

    Returns:
        ``nstep`` (B,) int64 and ``status`` (B,) int8 :class:`Status` codes.
    """
    n = abs_trace.shape[1]
    rel_trace = relative(abs_trace, norm_trace, problem.eps)
    res_trace = rel_trace if problem.stop_mode == "rel" else abs_trace
    keep = (abs_trace <= limit.unsqueeze(1)) & (norm_trace <= torch.finfo(norm_trace.dtype).max)
    stopped = ~(keep & (res_trace > problem.tol) if problem.tol > 0 else keep)
    first = stopped.to(torch.uint8).argmax(dim=1, keepdim=True)  # 0 when never stopped
    any_stop = stopped.gather(1, first).squeeze(1)
    at = torch.where(any_stop.unsqueeze(1), first, n - 1)
    res, rel, norm_fz = (t.gather(1, at).squeeze(1) for t in (res_trace, rel_trace, norm_trace))
    start = norm_trace[:, 0] + abs_trace[:, 0]
    return torch.where(any_stop, first.squeeze(1) + 1, n), status_of(
        res, rel, norm_fz, start, stopped=any_stop, problem=problem
    )


def status_of(
    res: Tensor, rel: Tensor, norm_fz: Tensor, start: Tensor, *, stopped: Tensor,
    problem: Problem,
) -> Tensor:
    """:class:`Status` codes (int8) of one evaluation per sample (see :func:`stopping`).

    Args:
        res: (B,) residual in the stop mode.
        rel: (B,) relative residual.
        norm_fz: (B,) ``||f(z)||``.
        start: (B,) the start's size ``||f(z0)|| + ||f(z0) - z0||``.
        stopped: (B,) bool, the sample stopped here (rather than running out of budget).
        problem: for ``tol``, the dtype and ``diverge_ratio``.
    """
    eps = torch.finfo(problem.z0.dtype).eps
    runaway = (rel <= ROUNDING_ULPS * eps) & (norm_fz > problem.diverge_ratio * start)
    met = res <= problem.tol
    code = torch.where(stopped | (met & runaway), int(Status.DIVERGED), int(Status.MAX_ITER))
    code = torch.where(res.isfinite() & norm_fz.isfinite(), code, int(Status.NON_FINITE))
    code = torch.where(met & norm_fz.isfinite() & ~runaway, int(Status.CONVERGED), code)
    return code.to(torch.int8)


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
