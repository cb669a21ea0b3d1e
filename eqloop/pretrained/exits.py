"""Ouro's exit gate: the per-token exit distribution over loops and threshold exits.

After each loop t = 1..T the gate gives ``lam_t = sigmoid(early_exit_gate(z_t))`` per
token; the exit probabilities are ``p_t = lam_t prod_{j<t}(1 - lam_j)`` for t < T and the
remaining mass at t = T, so they sum to 1 (see ``/work/shared/PRETRAINED.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EXIT_MODES", "exit_distribution", "threshold_exit"]

EXIT_MODES = ("last", "threshold", "expected")
"""Values of ``exit`` in :meth:`OuroForCausalLM.forward` and in Ouro's generation."""


def exit_distribution(gates: Tensor) -> Tensor:
    """Per-token exit probabilities over the loops from the gate logits.

    Args:
        gates: (B, S, T) gate logits ``early_exit_gate(z_t)`` for t = 1..T.

    Returns:
        (B, S, T) float32, ``p_t = lam_t prod_{j<t}(1 - lam_j)`` for t < T and the
        remaining mass at t = T, so every token's row sums to 1.
    """
    lam = torch.sigmoid(gates.float())
    survive = torch.cumprod(1.0 - lam, dim=-1)  # prod_{j<=t} (1 - lam_j)
    before = torch.cat((torch.ones_like(survive[..., :1]), survive[..., :-1]), dim=-1)
    pdf = lam * before
    return torch.cat((pdf[..., :-1], before[..., -1:]), dim=-1)


def threshold_exit(pdf: Tensor, threshold: float) -> Tensor:
    """The 0-based loop each token exits at: the first whose cumulative probability
    reaches ``threshold``, or the last loop if none does.

    Args:
        pdf: (B, S, T) from :func:`exit_distribution`.
        threshold: in [0, 1].

    Returns:
        (B, S) int64 in [0, T).
    """
    reached = torch.cumsum(pdf, dim=-1) >= threshold
    first = reached.float().argmax(dim=-1)
    return torch.where(reached.any(dim=-1), first, torch.full_like(first, pdf.shape[-1] - 1))
