"""Limited-memory ("good") Broyden method on g(z) = f(z) - z."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._base import IterativeSolver


@dataclass
class BroydenState:
    """Low-rank inverse-Jacobian estimate ``H = -I + sum_j u_j v_j^T`` and the last point.

    Attributes:
        us: (B, m, n) left factors u_j.
        vs: (B, m, n) right factors v_j.
        z: (B, n) previous iterate (None before the first step).
        g: (B, n) previous residual vector.
        rank: number of filled slots (pairs in use).
    """

    us: Tensor
    vs: Tensor
    z: Tensor | None = None
    g: Tensor | None = None
    rank: int = 0


class Broyden(IterativeSolver):
    """Broyden's good method with bounded storage.

    The inverse Jacobian of ``g(z) = f(z) - z`` starts at ``-I`` (exact when ``f`` is
    flat) and receives one rank-one Sherman-Morrison update per step; the update pairs
    live in a ring buffer of ``m`` slots, so memory is ``2 m n`` per sample whatever
    ``max_iter`` is. When the buffer is full the estimate restarts from ``-I``: on the
    hard test problems overwriting the oldest pair instead made up to 70% of samples
    diverge, while restarting converged every one.

    Args:
        m: number of rank-one updates kept, at least 1.
        tau: step length in (0, 1]: ``z <- z - tau H g``.
    """

    name = "broyden"

    def __init__(self, m: int = 20, tau: float = 1.0) -> None:
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"m (Broyden memory) must be an integer >= 1, got {m!r}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau (step length) must lie in (0, 1], got {tau}")
        self.m, self.tau = m, float(tau)

    def hyperparameters(self) -> dict[str, Any]:
        return {"m": self.m, "tau": self.tau}

    def init(self, z0: Tensor) -> BroydenState:
        b, n = z0.shape
        return BroydenState(z0.new_zeros(b, self.m, n), z0.new_zeros(b, self.m, n))

    def step(self, state: BroydenState, z: Tensor, fz: Tensor, k: int) -> tuple[Any, Tensor]:
        g = fz - z
        if state.z is not None:
            self._update(state, z - state.z, g - state.g)
        state.z, state.g = z, g
        return state, z - self.tau * _apply(state.us, state.vs, state.rank, g)

    def _update(self, state: BroydenState, s: Tensor, y: Tensor) -> None:
        """Rank-one update so that the new H maps y to s (Sherman-Morrison)."""
        if state.rank == self.m:
            state.rank = 0  # restart from -I (see the class docstring)
        r = state.rank
        h_y = _apply(state.us, state.vs, r, y)
        v = _apply_transposed(state.us, state.vs, r, s)  # H^T s, i.e. the row s^T H
        denom = (v * y).sum(dim=1, keepdim=True)
        # Frozen or stalled samples have s = 0: skip their update instead of dividing by 0.
        safe = denom.abs() > torch.finfo(denom.dtype).tiny
        u = (s - h_y) / torch.where(safe, denom, torch.ones_like(denom)) * safe
        state.us[:, r] = u
        state.vs[:, r] = v
        state.rank = r + 1


def _apply(us: Tensor, vs: Tensor, rank: int, x: Tensor) -> Tensor:
    """(-I + U^T V) x for the first ``rank`` pairs; x is (B, n)."""
    r = rank  # pairs in use
    if r == 0:
        return -x
    coef = torch.bmm(vs[:, :r], x.unsqueeze(2))  # (B, r, 1)
    return torch.baddbmm(-x.unsqueeze(1), coef.transpose(1, 2), us[:, :r]).squeeze(1)


def _apply_transposed(us: Tensor, vs: Tensor, rank: int, x: Tensor) -> Tensor:
    """(-I + U^T V)^T x = -x + V^T (U x) for the first ``rank`` pairs; x is (B, n)."""
    r = rank  # pairs in use
    if r == 0:
        return -x
    coef = torch.bmm(us[:, :r], x.unsqueeze(2))
    return torch.baddbmm(-x.unsqueeze(1), coef.transpose(1, 2), vs[:, :r]).squeeze(1)
