"""Naive fixed-point iteration with optional damping: z <- (1 - tau) z + tau f(z)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import checks
from ._base import IterativeSolver


class FixedPointIteration(IterativeSolver):
    """Picard iteration, optionally damped.

    Args:
        tau: damping in (0, 1]; ``tau=1`` is the plain iteration ``z <- f(z)``.
    """

    name = "fixed_point"

    def __init__(self, tau: float = 1.0) -> None:
        self.tau = checks.number("tau (damping)", tau, low=0.0, low_open=True, high=1.0)

    def hyperparameters(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def init(self, z0: Tensor) -> None:
        return None

    def step(self, state: None, z: Tensor, fz: Tensor, k: int) -> tuple[None, Tensor]:
        if self.tau == 1.0:
            return None, fz
        return None, torch.lerp(z, fz, self.tau)
