"""Latent dynamics of a looped LM: along the unrolled loop and at its equilibrium.

* :func:`loop_dynamics`: THE per-loop computation. It runs the loop once (through
  :meth:`eqloop.models.looped.LoopedLM.loop` and its per-state hook) and records, at
  chosen loop counts t, the step ``||z_t - z_{t-1}||``, the state size ``||z_t||``, the
  mean per-token norm over real tokens, and when asked the spectral radius ``rho`` of
  ``df/dz`` at ``z_t`` and the readout's entropy, KL and argmax changes from loop t - 1;
* :func:`loop_diagnostics`: its summary for ``eqloop eval`` (means and quantiles);
  :func:`eqloop.evaluation.diagnostics.diagnose` is the pretrained models' report on it;
* :func:`equilibrium_diagnostics`: the solver's convergence at the equilibrium and a
  contraction certificate, the share of sequences whose estimated ``rho(J(z*))`` is
  below 1 (``z*`` is then locally attracting) with the distribution of ``rho``.

Norms are taken per sequence over the whole ``(S, d)`` state; the reports hold their
mean or :func:`quantiles`. All work on any :class:`eqloop.models.looped.LoopedLM`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from eqloop.core.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_STOP_MODE, EQUILIBRIUM_TOL
from eqloop.core.stars import spectral_radius
from eqloop.evaluation.predictors import equilibrium
from eqloop.models.looped import CoreMap, LoopedLM
from solvers import checks

__all__ = [
    "LoopRecord",
    "equilibrium_diagnostics",
    "loop_diagnostics",
    "loop_dynamics",
    "masked_mean",
    "quantiles",
    "token_kl",
]

_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def quantiles(values: Tensor) -> dict[str, float]:
    """Mean and the 0, 10, 25, 50, 75, 90, 100 % quantiles of a 1-D tensor."""
    values = values.detach().double().flatten()
    qs = torch.quantile(values, torch.tensor(_QUANTILES, dtype=torch.float64))
    out = {"mean": float(values.mean())}
    out.update({f"q{round(100 * q)}": float(v) for q, v in zip(_QUANTILES, qs, strict=True)})
    return out


def _seq_norm(z: Tensor) -> Tensor:
    """(B, S, d) -> (B,) Euclidean norm of each sequence's state."""
    return torch.linalg.vector_norm(z.flatten(1), dim=1)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """(B, S) values -> (B,) their mean over real tokens.

    Args:
        values: (B, S) per-token values.
        mask: (B, S) True / 1 at real tokens, False / 0 at padding; ``None``: all real.
    """
    valid = torch.ones_like(values) if mask is None else mask.to(values.device, values.dtype)
    return (values * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)


def token_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """(B, S, V) log-probabilities of p and q -> (B, S) ``KL(p || q)`` per token."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass
class LoopRecord:
    """The dynamics of the state z_t after loop t; every tensor is (B,), per sequence.

    Attributes:
        loop: t >= 1.
        step_norm: ``||z_t - z_{t-1}||`` over the sequence's whole (S, d) state.
        state_norm: ``||z_t||`` over the whole (S, d) state (padding included).
        token_norm: mean over real tokens of the per-token norm ``||z_t[i]||``.
        rho: spectral radius of ``df/dz`` at z_t (``None`` where not asked).
        entropy: mean over real tokens of the entropy (nats) of the readout's p_t.
        kl: mean over real tokens of ``KL(p_{t-1} || p_t)``, from t = 2.
        argmax_changed: share of real tokens whose argmax differs from loop t - 1,
            from t = 2. The readout-based fields are ``None`` without ``readout=True``.
    """

    loop: int
    step_norm: Tensor
    state_norm: Tensor
    token_norm: Tensor
    rho: Tensor | None = None
    entropy: Tensor | None = None
    kl: Tensor | None = None
    argmax_changed: Tensor | None = None


def loop_dynamics(
    model: LoopedLM,
    f: CoreMap,
    z0: Tensor,
    loops: Iterable[int],
    *,
    mask: Tensor | None = None,
    readout: bool = False,
    stage: Mapping[str, Any] | None = None,
    rho_loops: Iterable[int] = (),
    rho_method: str = "power",
    rho_iters: int = 30,
    rho_batch: int = 1,
    generator: torch.Generator | None = None,
    on_record: Callable[[int, Tensor], None] | None = None,
) -> list[LoopRecord]:
    """Run the loop once from z0 and record its dynamics at each loop count of ``loops``.

    Args:
        model: the looped LM (eval mode).
        f, z0: the batch's map and start, from ``model.core_map`` (z0 is (B, S, d)).
        loops: loop counts t >= 1 at which to record; the loop runs to the largest.
        mask: (B, S) True at real tokens, for the per-token means (``None``: all real).
        readout: also decode each recorded state (and the one before it) with
            ``model.readout`` for the entropy, KL and argmax changes.
        stage: the model's stage options the readout gets (e.g. ``attention_mask``).
        rho_loops: loop counts (among ``loops``) at which to estimate ``rho``.
        rho_method, rho_iters, generator: for :func:`eqloop.core.stars.spectral_radius`.
        rho_batch: the states of that many loops share one ``spectral_radius`` run
            (stacked along the batch, each Jacobian-vector product serves ``rho_batch x B``
            sequences: faster, with memory growing with it).
        on_record: called with ``(t, z_t)`` once loop t's record is made.

    Returns:
        One :class:`LoopRecord` per loop count, in increasing order.

    Raises:
        ValueError: no loop count, a count < 1, a ``rho_loops`` count not in ``loops``,
            or a ``mask`` of another shape than z0's (B, S).
    """
    wanted = sorted({checks.integer("loops", t, low=1) for t in loops})
    if not wanted:
        raise ValueError("loops must hold at least one loop count")
    rho_at = {checks.integer("rho_loops", t, low=1) for t in rho_loops}
    if not rho_at <= set(wanted):
        raise ValueError(
            f"rho_loops {sorted(rho_at - set(wanted))} are not recorded: pass them in loops too"
        )
    if mask is not None and tuple(mask.shape) != tuple(z0.shape[:2]):
        raise ValueError(
            f"mask must be (B, S) = {tuple(z0.shape[:2])} like z0's first two dimensions, "
            f"got shape {tuple(mask.shape)}"
        )
    checks.boolean("readout", readout)
    rho_batch = checks.integer("rho_batch", rho_batch, low=1)
    recorded, last_rho = set(wanted), max(rho_at, default=0)
    options = dict(stage or {})
    records: dict[int, LoopRecord] = {}
    pending: list[tuple[int, Tensor]] = []  # (loop, state) waiting for the batched rho
    previous, prev_log_p, prev_top = z0, None, None  # z_{t-1}, its log p and argmax

    def flush() -> None:
        """rho of the pending states, in one run of the map stacked k times along the
        batch (f treats sequences independently, so these are k x B separate problems)."""
        k = len(pending)
        stacked = CoreMap(f.step, tuple(a.repeat(k, *(1,) * (a.dim() - 1)) for a in f.args))
        states = torch.cat([z for _, z in pending], dim=0)
        radius = spectral_radius(stacked, states, rho_method, rho_iters, generator=generator)
        for (loop, _), r in zip(pending, radius.split(z0.shape[0]), strict=True):
            records[loop].rho = r
        pending.clear()

    def hook(t: int, z: Tensor) -> None:
        """The loop's per-state hook: a record at each wanted loop count."""
        nonlocal previous, prev_log_p, prev_top
        if t == 0:
            return
        log_p = top = None
        if readout and (t in recorded or t + 1 in recorded):  # p_t, or p_{t-1} of a record
            log_p = F.log_softmax(model.readout(z, **options).float(), dim=-1)
            top = log_p.argmax(dim=-1)
        if t in recorded:
            record = LoopRecord(
                t, _seq_norm(z - previous), _seq_norm(z), masked_mean(z.float().norm(dim=-1), mask)
            )
            if log_p is not None:
                record.entropy = masked_mean(-(log_p.exp() * log_p).sum(-1), mask)
                if prev_log_p is not None:
                    record.kl = masked_mean(token_kl(prev_log_p, log_p), mask)
                    record.argmax_changed = masked_mean((top != prev_top).float(), mask)
            records[t] = record
            if t in rho_at:
                pending.append((t, z))
                if len(pending) == rho_batch or t == last_rho:
                    flush()
            if on_record is not None:
                on_record(t, z)
        previous, prev_log_p, prev_top = z, log_p, top

    with torch.no_grad():
        model.loop(f, z0, wanted[-1], on_state=hook)
    return [records[t] for t in wanted]


def loop_diagnostics(
    model: LoopedLM,
    inputs: Tensor,
    loops: Sequence[int],
    *,
    rho_method: str = "power",
    rho_iters: int = 30,
    generator: torch.Generator | None = None,
    on_record: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Latent dynamics along the unrolled trajectory, at each loop count of ``loops``
    (the summary of :func:`loop_dynamics` that ``eqloop eval`` reports).

    Args:
        model: the looped LM (put it in eval mode).
        inputs: (B, S) token ids.
        loops: loop counts >= 1 at which to record.
        rho_method, rho_iters: passed to :func:`eqloop.core.stars.spectral_radius`.
        generator: random start vectors of the power iteration.
        on_record: called with each loop count once its record is made (progress bars).

    Returns:
        One dict per loop count: ``loops``, ``step_norm`` (mean ``||z_t - z_{t-1}||``),
        ``rel_step`` (mean ``||z_t - z_{t-1}|| / ||z_t||``), ``state_norm`` (mean
        ``||z_t||``) and ``rho`` (:func:`quantiles` of the per-sequence estimates, plus
        ``share_below_1``).
    """
    loops = list(loops)
    with torch.no_grad():
        f, z0 = model.core_map(inputs)
    records = loop_dynamics(
        model,
        f,
        z0,
        loops,
        rho_loops=loops,
        rho_method=rho_method,
        rho_iters=rho_iters,
        generator=generator,
        on_record=None if on_record is None else lambda t, _: on_record(t),
    )
    out = []
    for r in records:
        rho = cast(Tensor, r.rho)  # every recorded loop is in rho_loops
        out.append(
            {
                "loops": r.loop,
                "step_norm": float(r.step_norm.mean()),
                "rel_step": float((r.step_norm / r.state_norm.clamp_min(1e-30)).mean()),
                "state_norm": float(r.state_norm.mean()),
                "rho": {**quantiles(rho), "share_below_1": float((rho < 1).float().mean())},
            }
        )
    return out


def equilibrium_diagnostics(
    model: LoopedLM,
    inputs: Tensor,
    solver: str,
    *,
    max_iter: int = EQUILIBRIUM_MAX_ITER,
    tol: float = EQUILIBRIUM_TOL,
    stop_mode: str = EQUILIBRIUM_STOP_MODE,
    rho_method: str = "power",
    rho_iters: int = 30,
    generator: torch.Generator | None = None,
    start_loops: int = 0,
    **solver_options: Any,
) -> dict[str, Any]:
    """Solve the core to equilibrium and certify local contraction there.

    The solve is the one :func:`eqloop.evaluation.equilibrium` scores.

    Args:
        model: the looped LM (eval mode).
        inputs: (B, S) token ids.
        solver: a name from ``solvers.available()``.
        max_iter, tol, stop_mode, start_loops, **solver_options: see
            :func:`eqloop.evaluation.equilibrium`.
        rho_method, rho_iters, generator: for :func:`eqloop.core.stars.spectral_radius`.

    Returns:
        ``status`` (readable solver status), ``converged`` (share), ``nstep`` and
        ``rel_residual`` (quantiles), ``state_norm`` (mean ``||z*||``) and
        ``contraction``: ``share_rho_below_1`` (share of sequences with estimated
        ``rho(J(z*)) < 1``) and ``rho`` (its quantiles).
    """
    predict = equilibrium(
        model,
        solver,
        max_iter=max_iter,
        tol=tol,
        stop_mode=stop_mode,
        start_loops=start_loops,
        **solver_options,
    )
    with torch.no_grad():
        _, info = predict.run(inputs)
        result = info.result
        rho = spectral_radius(info.f, info.z, rho_method, rho_iters, generator=generator)
    return {
        "solver": solver,
        "status": str(result.status),
        "converged": float(result.converged.float().mean()),
        "nstep": quantiles(result.nstep.double()),
        "rel_residual": quantiles(result.rel_residual),
        "state_norm": float(_seq_norm(info.z).mean()),
        "contraction": {
            "share_rho_below_1": float((rho < 1).float().mean()),
            "rho": quantiles(rho),
        },
    }
