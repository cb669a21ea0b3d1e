"""Exit rules shared by the architectures: :func:`check_exit` (the one check of an
``exit`` / ``exit_threshold`` pair) and the maths of a learned per-loop exit gate (Ouro's;
diagnostics applies it to any model whose ``gate_logits`` is not ``None``).

After each loop t = 1..T the gate gives ``lam_t = sigmoid(early_exit_gate(z_t))`` per
token; the exit probabilities are ``p_t = lam_t prod_{j<t}(1 - lam_j)`` for t < T and the
remaining mass at t = T, so they sum to 1 (see ``/work/shared/PRETRAINED.md``).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from solvers import checks

__all__ = ["check_exit", "exit_distribution", "threshold_exit"]


def check_exit(
    exit: str, exit_threshold: float | None, modes: Collection[str], thresholded: Collection[str]
) -> str:
    """The one check of an ``exit`` / ``exit_threshold`` pair, for Ouro and Huginn alike.

    Args:
        exit: the exit mode the caller chose.
        exit_threshold: the threshold the caller passed, or ``None``.
        modes: the valid modes (Ouro's ``EXIT_MODES``, Huginn's criteria).
        thresholded: the modes that take a threshold.

    Returns:
        ``exit``.

    Raises:
        ValueError: ``exit`` is not one of ``modes``, or a threshold is given with a mode
            that takes none (it would be ignored).
    """
    checks.choice("exit", exit, tuple(modes))
    if exit_threshold is not None and exit not in thresholded:
        needs = " | ".join(repr(mode) for mode in thresholded)
        raise ValueError(
            f"exit_threshold needs exit={needs}; exit={exit!r} uses no threshold, so "
            "drop exit_threshold or choose one of those exits"
        )
    return exit


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
