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
    return _norm(fz - z, keepdim), _norm(fz, keepdim)


def _norm(x: Tensor, keepdim: bool = False) -> Tensor:
    """Per-row 2-norm of a flat (B, n) batch, float32 for 16-bit dtypes (as the loop's)."""
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(x, dim=1, keepdim=keepdim, dtype=dtype)


def relative(abs_r: Tensor, norm_fz: Tensor, eps: float) -> Tensor:
    """``abs / (||f(z)|| + eps)``, NaN where ``||f(z)||`` is infinite (any shape)."""
    return abs_r / (norm_fz.nan_to_num(nan=math.nan, posinf=math.nan) + eps)


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
        fz = check_image(
            self.f(z if flat else z.view(full_shape), *args), full_shape, self.dtype, self.device
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
    # The bookkeeping reads detached views, so under autograd it builds no graph (the
    # residual norms are those of :func:`norms`, written out).
    tracking = torch.is_grad_enabled()

    state = solver.init(z)
    # Per-sample bookkeeping lives in (B, 1) columns, so it broadcasts against (B, n)
    # iterates without extra view ops.
    norm_dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else None
    trace_dtype = norm_dtype or z.dtype
    biggest = torch.finfo(trace_dtype).max
    # 1.0 while a sample iterates, 0.0 once it stopped: the weight that freezes it.
    active = torch.ones(batch, 1, dtype=z.dtype, device=z.device)
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
    rel_test = rel_mode and (tol > 0 or not last)  # last needs no residual without a tol
    for k in range(problem.max_iter):
        fz = evaluate(z)
        zb, fzb = (z.detach(), fz.detach()) if tracking else (z, fz)
        abs_r = torch.linalg.vector_norm(fzb - zb, dim=1, keepdim=True, dtype=norm_dtype)
        norm_fz = torch.linalg.vector_norm(fzb, dim=1, keepdim=True, dtype=norm_dtype)
        abs_cols.append(abs_r)
        norm_cols.append(norm_fz)
        if k == 0:
            limit = diverge_limit(abs_r, problem.diverge_ratio)
        # abs / inf = 0 where ||f(z)|| overflowed: that stops the sample as it must, and
        # :func:`stopping` reports it non-finite (with a NaN relative residual).
        res = abs_r / (norm_fz + eps) if rel_test else abs_r
        was_active = active
        if masks:
            # The rule of :func:`stopping`; NaN compares false, so it stops a sample too.
            keep = abs_r <= limit
            if tol > 0:
                keep = keep & (res > tol)
            if not (rel_mode and tol > 0):
                keep = keep & (norm_fz <= biggest)
            active = active * keep
        if last:
            # Every sample that entered this evaluation takes its step, the stopping
            # ones included, and keeps that state. lerp with a 0/1 weight is exact and
            # cheaper than where (forward and backward); it would turn a frozen state
            # into NaN only if f of that state were not finite.
            state, z_next = solver.step(state, z, fz, k)
            z = torch.lerp(z, z_next, was_active) if freezes else z_next
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
        z = torch.lerp(z, z_next, active) if freezes else z_next

    with torch.no_grad():
        abs_trace, norm_trace = torch.cat(abs_cols, dim=1), torch.cat(norm_cols, dim=1)
        nstep, status, rel_trace, res_trace = stopping(abs_trace, norm_trace, limit, problem)
        if last:
            pick = (nstep - 1).unsqueeze(1)
        else:
            # The loop took the best iterate at the first minimum of its residual (NaN
            # never wins; an overflowed ||f(z)|| counted as abs / inf = 0).
            pick = res_trace.nan_to_num(nan=math.inf).argmin(dim=1, keepdim=True)
        abs_residual = abs_trace.gather(1, pick).squeeze(1)
        rel_residual = rel_trace.gather(1, pick).squeeze(1)
        if last or not freezes:  # else a stopped sample's frozen z repeats its values
            abs_trace, rel_trace = hold_after_stop(nstep, abs_trace, rel_trace)
    return finish(
        problem,
        SolveResult(
            z=(z if last else best_z).view(z0.shape),
            converged=status == Status.CONVERGED,
            nstep=nstep,
            abs_residual=abs_residual,
            rel_residual=rel_residual,
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

    A frozen sample's later evaluations repeat its stopping value when its iterate is the
    one it stopped at; with ``output="last"`` it holds the next one, and a sample that is
    not frozen moves on, so then the trace is made to say where it stopped.
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
    fz: Tensor | None = None,
    unrecorded: int = 0,
) -> SolveResult:
    """Assemble a result for a solver that ran its own loop (the adapters).

    The returned point's residuals are measured here by the driver's definitions and
    its status follows the driver's rules (see :func:`stopping`), judged on that point:
    unless ``fz`` is given, one more call of ``f`` measures it (counted in ``nfe``, and
    its residual becomes the trace's last column). A sample whose recorded residual
    went non-finite and whose returned point did not converge is ``non-finite``.

    Args:
        problem: the problem that was solved.
        solver_name: name for the result.
        z: (B, ...) the point the solver returned.
        abs_trace: (B, N) absolute residual per evaluation, as the solver recorded it.
        rel_trace: (B, N) relative residual per evaluation.
        nfe: calls of ``f`` the solver made.
        fz: (B, ...) ``f(z)`` when the solver evaluated ``z`` itself (no measurement).
        unrecorded: evaluations the solver made before its trace starts; the returned
            traces get that many leading NaN columns, so column j is evaluation j + 1.
    """
    batch = z.shape[0]
    measure = fz is None
    if measure:
        fz = check_image(problem.f(z, *problem.args), z.shape, problem.z0.dtype, problem.z0.device)
        nfe += 1
    abs_r, norm_fz = norms(z.reshape(batch, -1), fz.reshape(batch, -1))
    rel_r = relative(abs_r, norm_fz, problem.eps)
    rel_mode = problem.stop_mode == "rel"
    recorded_abs = torch.cat((abs_trace, abs_r[:, None]), 1) if measure else abs_trace
    recorded_rel = torch.cat((rel_trace, rel_r[:, None]), 1) if measure else rel_trace
    recorded_res = recorded_rel if rel_mode else recorded_abs
    first_abs = recorded_abs[:, 0] if recorded_abs.shape[1] else abs_r
    limit = diverge_limit(first_abs, problem.diverge_ratio)
    keep = recorded_abs <= limit.unsqueeze(1)
    if keep.shape[1]:
        _, at = first_stop(keep & (recorded_res > problem.tol) if problem.tol > 0 else keep)
        nstep = at.squeeze(1) + 1 + unrecorded
    else:
        nstep = torch.full_like(limit, unrecorded, dtype=torch.int64)
    start = _norm(problem.z0.detach().reshape(batch, -1)) + first_abs
    status = status_of(
        rel_r if rel_mode else abs_r, rel_r, norm_fz, start, stopped=abs_r > limit, problem=problem
    )
    died = ~recorded_res.isfinite().all(dim=1)
    status = torch.where(
        died & (status == int(Status.MAX_ITER)), int(Status.NON_FINITE), status
    ).to(torch.int8)
    pad = recorded_abs.new_full((batch, unrecorded), math.nan)
    return finish(
        problem,
        SolveResult(
            z=z,
            converged=status == Status.CONVERGED,
            nstep=nstep,
            abs_residual=abs_r,
            rel_residual=rel_r,
            abs_trace=torch.cat((pad, recorded_abs), 1),
            rel_trace=torch.cat((pad, recorded_rel), 1),
            nfe=nfe,
            sample_status=status,
            solver=solver_name,
            sample_evals=nfe * batch,
        ),
    )


def finish(problem: Problem, result: SolveResult) -> SolveResult:
    """Apply ``raise_on_failure`` and hand the result back."""
    if problem.raise_on_failure:
        raise_if_failed(result)
    return result


def stopping(
    abs_trace: Tensor, norm_trace: Tensor, limit: Tensor, problem: Problem
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each sample's step count and status from its residual trace.

    A sample stops at the first evaluation whose residual (in ``stop_mode``) is at most
    ``tol`` (never when ``tol = 0``, which asks for the whole budget), whose absolute
    residual exceeds ``limit`` or is not finite, or whose ``||f(z)||`` is not finite —
    exactly the loop's rule. Its status describes that evaluation (the
    last one if it never stopped): ``converged`` when the residual met ``tol``, unless
    the image's norm overflowed (``non-finite``) or the iterate ran away (``diverged``:
    a residual within :data:`ROUNDING_ULPS` of rounding while ``||f(z)||`` exceeds
    ``diverge_ratio`` times the start's size ``||z0|| + ||f(z0) - z0||``, i.e.
    ``f(z)`` and ``z`` agree only because the dtype cannot tell them apart);
    ``non-finite`` for a NaN/Inf residual; ``diverged`` for one past ``limit``;
    ``max_iter`` when the budget ran out first.

    Args:
        abs_trace: (B, N) absolute residual per evaluation.
        norm_trace: (B, N) ``||f(z)||`` per evaluation.
        limit: (B, 1) absolute residual above which a sample has diverged.
        problem: for ``tol``, ``stop_mode``, ``eps`` and ``diverge_ratio``.

    Returns:
        ``nstep`` (B,) int64, ``status`` (B,) int8 :class:`Status` codes, the (B, N)
        relative residual trace and the (B, N) residual the loop compared with ``tol``
        (where ``||f(z)||`` overflowed, its relative residual is ``abs / inf = 0``).
    """
    rel_mode = problem.stop_mode == "rel"
    norm_ok = norm_trace <= torch.finfo(norm_trace.dtype).max  # False for Inf and NaN
    loop_rel = abs_trace / (norm_trace + problem.eps)
    res_trace = loop_rel if rel_mode else abs_trace
    # The loop's test (with a tolerance in rel mode it skips the norm test, which
    # changes nothing: an overflowed ||f(z)|| gives abs / inf = 0 <= tol).
    keep = (abs_trace <= limit) & norm_ok
    stopped, at = first_stop(keep & (res_trace > problem.tol) if problem.tol > 0 else keep)
    rel_trace = loop_rel.masked_fill(~norm_ok, math.nan)
    rel, norm_fz = rel_trace.gather(1, at).squeeze(1), norm_trace.gather(1, at).squeeze(1)
    res = rel if rel_mode else abs_trace.gather(1, at).squeeze(1)
    start = _norm(problem.z0.reshape(abs_trace.shape[0], -1)) + abs_trace[:, 0]
    status = status_of(res, rel, norm_fz, start, stopped=stopped, problem=problem)
    return at.squeeze(1) + 1, status, rel_trace, res_trace


def first_stop(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Where each sample stopped, from its (B, N) "keeps iterating" mask.

    Returns:
        ``stopped`` (B,) bool, the sample stopped, and ``at`` (B, 1), the index of its
        first ``False`` (the last index, N - 1, for a sample that never stopped).
    """
    stop = ~keep
    stop[:, -1] = True  # a sample that never stopped is described by its last evaluation
    at = stop.to(torch.uint8).argmax(dim=1, keepdim=True)
    return ~keep.gather(1, at).squeeze(1), at


def status_of(
    res: Tensor,
    rel: Tensor,
    norm_fz: Tensor,
    start: Tensor,
    *,
    stopped: Tensor,
    problem: Problem,
) -> Tensor:
    """:class:`Status` codes (int8) of one evaluation per sample (see :func:`stopping`).

    Args:
        res: (B,) residual in the stop mode.
        rel: (B,) relative residual.
        norm_fz: (B,) ``||f(z)||``.
        start: (B,) the start's size ``||z0|| + ||f(z0) - z0||``.
        stopped: (B,) bool, the sample stopped here (rather than running out of budget).
        problem: for ``tol``, the dtype and ``diverge_ratio``.
    """
    if problem.stop_mode == "rel":
        # The relative residual is NaN where ||f(z)|| overflowed, so it alone tells.
        met, bad = res <= problem.tol, ~(res <= torch.finfo(res.dtype).max)
    else:
        norm_ok = norm_fz <= torch.finfo(norm_fz.dtype).max  # False for Inf and NaN
        met = (res <= problem.tol) & norm_ok
        bad = ~(norm_ok & (res <= torch.finfo(res.dtype).max))
    diverged = stopped
    if not math.isinf(problem.diverge_ratio):
        eps = torch.finfo(problem.z0.dtype).eps
        runaway = (rel <= ROUNDING_ULPS * eps) & (norm_fz > problem.diverge_ratio * start)
        diverged = diverged | (met & runaway)
        met = met & ~runaway
    # MAX_ITER (1) or DIVERGED (2), then NON_FINITE and CONVERGED override in that order.
    code = diverged.to(torch.int8) + int(Status.MAX_ITER)
    return code.masked_fill_(bad, int(Status.NON_FINITE)).masked_fill_(met, int(Status.CONVERGED))


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
