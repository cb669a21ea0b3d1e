"""Anderson acceleration (type II) with a ridge scaled to the problem."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import checks
from ._base import IterativeSolver


@dataclass
class AndersonState:
    """Ring buffers of the last ``m`` iterates (zero in slots not yet written).

    The residuals and everything computed from them are float32 for float16/bfloat16
    iterates: their Gram matrix would overflow 16 bits, and torch.linalg has no 16-bit
    solver.

    Attributes:
        zs: (B, m, n) iterates z_i (empty when ``tau == 1``: then they are not needed).
        fzs: (B, m, n) images f(z_i).
        gs: (B, m, n) residual vectors g_i = f(z_i) - z_i.
        gram: (B, m, m) Gram matrix of the residuals, kept up to date row by row.
        eye: (m, m) identity; row k is the plain step's weights when slot k is newest.
        diff_t: (m, m, m) ``diff_t[k] = N_k^T`` for ``N_k = 1 e_k^T - I``, whose top-left
            (h, h) block maps residuals to differences from the newest one,
            ``(N_k g)_i = g_k - g_i``.
        slots: (m,) slot numbers ``0 .. m - 1``, to mask the slots not yet written.
    """

    zs: Tensor
    fzs: Tensor
    gs: Tensor
    gram: Tensor
    eye: Tensor
    diff_t: Tensor
    slots: Tensor


class Anderson(IterativeSolver):
    """Anderson acceleration: mix the last ``m`` images with least-squares weights.

    The next iterate is ``sum_i alpha_i f(z_i)`` with weights summing to one that
    minimise the mixed residual ``||sum_i alpha_i g_i||``, written in difference form
    with a ridge ``lam * s`` on the differences, where ``s`` is their mean squared norm.
    Scaling the ridge by ``s`` keeps it relative: a fixed absolute ridge (torchdeq's
    ``lam=1e-4``) dominates once residuals are small and the method stalls. When the
    small linear system is singular or its solution is not finite, the step falls back
    to a plain (damped) iteration for that sample.

    Args:
        m: number of past iterates kept (memory), at least 1.
        lam: relative ridge regularisation, non-negative.
        tau: mixing (damping) in (0, 1]; the step is
            ``sum_i alpha_i (tau f(z_i) + (1 - tau) z_i)``.
    """

    name = "anderson"

    def __init__(self, m: int = 6, lam: float = 1e-2, tau: float = 1.0) -> None:
        self.m = checks.integer("m (Anderson memory)", m, low=1)
        self.lam = checks.number("lam (relative ridge)", lam, low=0.0)
        self.tau = checks.number("tau (mixing)", tau, low=0.0, low_open=True, high=1.0)

    def hyperparameters(self) -> dict[str, Any]:
        return {"m": self.m, "lam": self.lam, "tau": self.tau}

    def init(self, z0: Tensor) -> AndersonState:
        b, n = z0.shape
        # The buffers start at zero and every product runs over all m slots: a slot not
        # yet written holds zeros and is masked out of the least-squares system, so it
        # gets weight exactly 0. Full-size operands keep every shape independent of the
        # iteration count, which torch.compile may otherwise trace as a dynamic size
        # (inductor miscompiled those slices). With tau = 1 the step only mixes images,
        # so the iterates need no storage.
        zs = z0.new_zeros(b, self.m if self.tau != 1.0 else 0, n)
        work = torch.float32 if z0.dtype in (torch.float16, torch.bfloat16) else z0.dtype
        eye = torch.eye(self.m, dtype=work, device=z0.device)
        return AndersonState(
            zs=zs,
            fzs=z0.new_zeros(b, self.m, n),
            gs=z0.new_zeros(b, self.m, n, dtype=work),
            gram=z0.new_zeros(b, self.m, self.m, dtype=work),
            eye=eye,
            diff_t=eye.unsqueeze(2) - eye,  # diff_t[k, i, j] = [i == k] - [i == j]
            slots=torch.arange(self.m, dtype=work, device=z0.device),
        )

    def step(self, state: AndersonState, z: Tensor, fz: Tensor, k: int) -> tuple[Any, Tensor]:
        i, used = k % self.m, min(k + 1, self.m)
        g = fz - z
        if self.tau != 1.0:
            state.zs[:, i] = z
        state.fzs[:, i] = fz
        state.gs[:, i] = g
        # A (B, 1, n) x (B, n, m) bmm is ~2x faster than bmm against a column, or than
        # broadcast-and-sum, for these thin products on CPU. Unwritten slots give 0.
        row = torch.bmm(state.gs[:, i : i + 1], state.gs.mT)  # (B, 1, m)
        state.gram[:, i : i + 1] = row
        state.gram[:, :, i : i + 1] = row.mT
        if used == 1:
            return state, self._mix(z, fz)
        alpha = self._weights(state.gram, state, i, used).to(fz.dtype)
        mixed = state.fzs if self.tau == 1.0 else torch.lerp(state.zs, state.fzs, self.tau)
        return state, torch.bmm(alpha, mixed).squeeze(1)

    def _mix(self, z: Tensor, fz: Tensor) -> Tensor:
        return fz if self.tau == 1.0 else torch.lerp(z, fz, self.tau)

    def _weights(self, gram: Tensor, state: AndersonState, newest: int, h: int) -> Tensor:
        """Mixing weights from the residual Gram matrix.

        Solves ``min_gamma ||g_k - sum_i gamma_i (g_k - g_i)||^2 + ridge ||gamma||^2``
        (the difference form), so the ridge pulls towards the plain step ``f(z_k)``
        rather than towards an average of old iterates. With ``N = 1 e_k^T - I`` the
        normal equations are ``(N H N^T + ridge I) gamma = (N H)_{:, k}`` for the Gram
        matrix ``H_ij = g_i . g_j``, and the weights are ``alpha = e_k - N^T gamma``,
        which sum to one for any ``gamma``. The rows of ``N`` of slots not yet written
        are zeroed, so, like row ``k``, their equations read ``ridge gamma_i = 0``: their
        ``gamma`` and weight are exactly 0 and the rest solves the ``h``-slot system.

        Args:
            gram: (B, m, m) Gram matrix of the residuals in memory (0 in unwritten slots).
            state: the solver state (for the constant ``eye``, ``diff_t`` and ``slots``).
            newest: slot ``k`` of the newest residual.
            h: slots in use (slots ``0 .. h - 1`` while the memory fills).

        Returns:
            (B, 1, m) weights summing to one, 0 for unwritten slots.
        """
        n_t = state.diff_t[newest]  # (m, m) N^T
        if h < self.m:
            n_t = n_t * (state.slots < h)  # zero the columns of N^T (rows of N) not in use
        # N H = (H N^T)^T as H is symmetric: a (B, m, m) x (m, m) product folds into one
        # mm, while (m, m) x (B, m, m) broadcasts into a ~2x slower bmm.
        n_gram = (gram @ n_t).mT.contiguous()  # rows g_k - g_i dotted with every g_j
        system = n_gram @ n_t  # (g_k - g_i) . (g_k - g_j); row and column k are zero
        diagonal = system.diagonal(dim1=1, dim2=2)
        ridge = diagonal.sum(dim=1, keepdim=True) * (self.lam / (h - 1))
        diagonal.add_(ridge.clamp_(min=torch.finfo(gram.dtype).tiny))  # system is fresh
        gamma, _ = torch.linalg.solve_ex(system, n_gram[:, :, newest : newest + 1])  # no sync
        # A singular system (e.g. a frozen sample repeating itself) gives a non-finite
        # gamma; zeroing it falls back to the plain step f(z_k) for that sample.
        gamma = gamma.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return state.eye[newest] - gamma.mT @ n_t.mT
