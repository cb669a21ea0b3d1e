"""Limited-memory ("good") Broyden method on g(z) = f(z) - z."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import checks
from ._base import IterativeSolver


@dataclass
class BroydenState:
    """Low-rank inverse-Jacobian estimate ``H = -I + sum_j u_j v_j^T`` and the last point.

    Attributes:
        us: (B, m, n) left factors u_j.
        vs: (B, m, n) right factors v_j.
        z: (B, n) previous iterate (None before the first step).
        g: (B, n) previous residual vector.
        h_g: (B, n) ``H g`` for the previous point and the current ``H``.
        rank: number of filled slots (pairs in use).
    """

    us: Tensor
    vs: Tensor
    z: Tensor | None = None
    g: Tensor | None = None
    h_g: Tensor | None = None
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
        self.m = checks.integer("m (Broyden memory)", m, low=1)
        self.tau = checks.number("tau (step length)", tau, low=0.0, low_open=True, high=1.0)

    def hyperparameters(self) -> dict[str, Any]:
        return {"m": self.m, "tau": self.tau}

    def init(self, z0: Tensor) -> BroydenState:
        b, n = z0.shape
        # Only the first ``rank`` pairs are ever read, and each is written first.
        return BroydenState(z0.new_empty(b, self.m, n), z0.new_empty(b, self.m, n))

    def step(self, state: BroydenState, z: Tensor, fz: Tensor, k: int) -> tuple[Any, Tensor]:
        g = fz - z
        if state.z is None:
            h_g = -g
        else:
            if state.rank == self.m:  # restart from -I (see the class docstring)
                state.rank = 0
                state.h_g = -state.g
            h_g = _apply(g, state.vs, state.us, state.rank)  # H g
            s, y = z - state.z, g - state.g
            # H y = H g_new - H g_old, reusing the product kept from the previous step.
            v = _apply(s, state.us, state.vs, state.rank)  # H^T s
            denom = (v * y).sum(dim=1, keepdim=True)
            # Frozen or stalled samples have s = y = 0: skip their update, don't divide by 0.
            inv = torch.where(denom.abs() > torch.finfo(denom.dtype).tiny, denom.reciprocal(), 0.0)
            u = (s - h_g + state.h_g) * inv
            state.us[:, state.rank] = u
            state.vs[:, state.rank] = v
            state.rank += 1
            # The updated H applied to g, without another pass over the factors.
            h_g = h_g + u * (v * g).sum(dim=1, keepdim=True)
        state.z, state.g, state.h_g = z, g, h_g
        return state, z - h_g if self.tau == 1.0 else z - self.tau * h_g


def _apply(x: Tensor, left: Tensor, right: Tensor, rank: int) -> Tensor:
    """``-x + sum_j (left_j . x) right_j`` over the first ``rank`` pairs; x is (B, n).

    With ``H = -I + U^T V`` (factors (B, m, n)), ``H x`` is ``_apply(x, vs, us, rank)``
    and ``H^T x`` is ``_apply(x, us, vs, rank)``. Both products are (B, 1, .)
    row-times-matrix bmm calls: on CPU they run ~2x faster than a bmm against a column
    or a broadcast-and-sum, and make no (B, r, n) temporary.
    """
    if rank == 0:
        return -x
    coef = torch.bmm(x.unsqueeze(1), left[:, :rank].mT)  # (B, 1, r)
    return torch.bmm(coef, right[:, :rank]).squeeze(1) - x
