"""Latent dynamics of a looped LM: along the unrolled loop and at its equilibrium.

* :func:`loop_diagnostics`: at chosen loop counts t, the step size
  ``||z_t - z_{t-1}||``, the state size ``||z_t||`` and the spectral radius ``rho`` of
  ``df/dz`` at ``z_t`` (per sequence, power iteration);
* :func:`equilibrium_diagnostics`: the solver's convergence at the equilibrium and a
  contraction certificate, the share of sequences whose estimated ``rho(J(z*))`` is
  below 1 (``z*`` is then locally attracting) with the distribution of ``rho``.

Norms are taken per sequence over the whole ``(S, d)`` state; the reports hold their
mean or :func:`quantiles`. Both work on any :class:`eqloop.models.looped.LoopedLM`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from eqloop.core.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_STOP_MODE, EQUILIBRIUM_TOL
from eqloop.core.stars import spectral_radius
from eqloop.evaluation.predictors import equilibrium
from eqloop.models.looped import LoopedLM
from solvers import checks

__all__ = ["equilibrium_diagnostics", "loop_diagnostics", "quantiles"]

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
    """Latent dynamics along the unrolled trajectory, at each loop count of ``loops``.

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
    wanted = sorted({checks.integer("loops", t, low=1) for t in loops})
    if not wanted:
        raise ValueError("loops must hold at least one loop count")
    out = []
    with torch.no_grad():
        f, previous = model.core_map(inputs)

        def record(t: int, z: Tensor) -> None:
            """The loop's per-state hook: a record at each wanted loop count."""
            nonlocal previous
            if t in wanted:
                step, size = _seq_norm(z - previous), _seq_norm(z)
                rho = spectral_radius(f, z, rho_method, rho_iters, generator=generator)
                out.append(
                    {
                        "loops": t,
                        "step_norm": float(step.mean()),
                        "rel_step": float((step / size.clamp_min(1e-30)).mean()),
                        "state_norm": float(size.mean()),
                        "rho": {
                            **quantiles(rho),
                            "share_below_1": float((rho < 1).float().mean()),
                        },
                    }
                )
                if on_record is not None:
                    on_record(t)
            previous = z

        model.loop(f, previous, wanted[-1], on_state=record)
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
