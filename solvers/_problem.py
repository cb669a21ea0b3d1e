"""The validated fixed-point problem every solver receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Problem:
    """A validated fixed-point problem and the driver settings for solving it.

    Attributes:
        f: the map; called as ``f(z, *args)`` with ``z`` of shape (B, ...).
        z0: (B, ...) initial guess.
        args: extra per-sample tensors (batch dimension 0) passed to ``f`` after ``z``.
        max_iter: budget of f-evaluations, a hard limit for every solver.
        tol: tolerance on the residual chosen by ``stop_mode``; ``0`` stops no sample
            on its residual, so every sample runs the whole budget.
        stop_mode: ``"abs"`` or ``"rel"``.
        eps: added to ``||f(z)||`` in the relative residual.
        check_every: host check for "all samples stopped" every this many
            evaluations; ``None`` never checks (no host synchronisation at all).
        compact: pass only the still-active samples to ``f`` (needs independent samples).
        diverge_ratio: a sample diverges once its absolute residual exceeds this
            multiple of its first absolute residual, or once its image has grown past
            this multiple of its start while its residual sits at rounding level;
            ``inf`` switches divergence off.
        raise_on_failure: raise :class:`SolveError` when any sample fails to converge.
        output: ``"best"`` returns each sample's lowest-residual iterate, ``"last"`` the
            state right after the step taken at the evaluation where it stopped.
    """

    f: Callable[..., Tensor]
    z0: Tensor
    args: tuple[Tensor, ...] = ()
    max_iter: int = 50
    tol: float = 1e-5
    stop_mode: str = "rel"
    eps: float = 1e-9
    check_every: int | None = 1
    compact: bool = False
    diverge_ratio: float = 1e4
    raise_on_failure: bool = False
    output: str = "best"
