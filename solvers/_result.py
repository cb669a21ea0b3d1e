"""The result of a fixed-point solve and the readable status codes it carries."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor


class Status(enum.IntEnum):
    """Why a sample stopped. The overall status of a solve is the worst over samples.

    A map with no fixed point never ends ``CONVERGED``: a residual that is within a few
    units of rounding of ``||f(z)||`` while ``||f(z)||`` has grown past ``diverge_ratio``
    times the start's size ``||z0|| + ||f(z0) - z0||`` only says that the dtype can no
    longer tell ``f(z)`` from ``z`` (``z + 1 == z`` in float32 once ``z > 2**24``), so such
    a sample is ``DIVERGED``. A contraction with rate L has ``||z*|| <= (||z0|| +
    ||f(z0) - z0||) / (1 - L)``, so the rule cannot fire on one unless L > 1 - 1 /
    diverge_ratio.
    """

    CONVERGED = 0  # the residual reached the tolerance (and is not rounding of a runaway)
    MAX_ITER = 1  # the iteration budget ran out first
    DIVERGED = 2  # the residual grew past diverge_ratio x its first value, or ran away
    NON_FINITE = 3  # f produced NaN/Inf, or ||f(z)|| overflowed the dtype

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``"non-finite"``."""
        return _LABELS[self]


_LABELS = {
    Status.CONVERGED: "converged",
    Status.MAX_ITER: "max_iter",
    Status.DIVERGED: "diverged",
    Status.NON_FINITE: "non-finite",
}


class SolveError(RuntimeError):
    """Raised by ``solvers.solve(..., raise_on_failure=True)`` when a sample fails."""


@dataclass(frozen=True)
class SolveResult:
    """Outcome of a batched fixed-point solve of ``z = f(z)``.

    Attributes:
        z: (B, ...) each sample's returned iterate: the best (lowest residual in
            ``stop_mode``), or with ``output="last"`` the state after its stopping step.
        converged: (B,) bool, the sample's residual reached the tolerance.
        nstep: (B,) int64, f-evaluations the sample needed (up to and including the
            evaluation that met the tolerance; the whole budget otherwise).
        abs_residual: (B,) ``||f(z) - z||_2`` at the returned ``z`` (with
            ``output="last"``: at the iterate whose step was returned).
        rel_residual: (B,) ``abs_residual / (||f(z)||_2 + eps)``, NaN where ``||f(z)||``
            overflowed.
        abs_trace: (B, N) absolute residual after each of the N evaluations; entries
            after a sample stopped repeat its stopping value, NaN marks an evaluation an
            external solver made without recording it. float32 for 16-bit iterates.
        rel_trace: (B, N) relative residual after each of the N evaluations.
        nfe: total number of calls of ``f``.
        sample_status: (B,) int8 codes of :class:`Status`, one per sample.
        solver: name of the solver that produced the result.
        sample_evals: number of single-sample evaluations of ``f`` (``nfe * B`` unless the
            batch was compacted to the samples still active).
    """

    z: Tensor
    converged: Tensor
    nstep: Tensor
    abs_residual: Tensor
    rel_residual: Tensor
    abs_trace: Tensor
    rel_trace: Tensor
    nfe: int
    sample_status: Tensor
    solver: str
    sample_evals: int

    @property
    def status(self) -> str:
        """Overall status: ``converged``, ``max_iter``, ``diverged`` or ``non-finite``.

        The worst status over the batch wins (non-finite > diverged > max_iter >
        converged). Reading it synchronises with the device.
        """
        if self.sample_status.numel() == 0:
            return Status.CONVERGED.label
        return Status(int(self.sample_status.max())).label

    def status_counts(self) -> dict[str, int]:
        """Number of samples per status label (synchronises with the device)."""
        counts = torch.bincount(self.sample_status.long().cpu(), minlength=len(Status))
        return {s.label: int(counts[s]) for s in Status}

    def __repr__(self) -> str:
        # The default dataclass repr prints whole tensors; a summary is more useful.
        b = self.converged.shape[0]
        if self.z.device.type == "meta":  # values cannot be read there
            return f"SolveResult(solver={self.solver!r}, batch={b}, nfe={self.nfe}, device=meta)"
        return (
            f"SolveResult(solver={self.solver!r}, status={self.status!r}, "
            f"converged={int(self.converged.sum())}/{b}, nfe={self.nfe}, "
            f"max_rel_residual={float(self.rel_residual.max()) if b else 0.0:.3e})"
        )
