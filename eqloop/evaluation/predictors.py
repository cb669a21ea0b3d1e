"""Predictors: the ways of running a looped LM that evaluation scores.

A :class:`Predictor` maps token ids (B, S) to logits (B, S, V) through the model's own
``forward`` (:class:`eqloop.models.looped.LoopedLM`), so one predictor serves eqloop's LoopLM,
Ouro and Huginn alike:

* :func:`unrolled`: ``model(tokens, loops=T)``;
* :func:`early_exit`: ``model(tokens, loops=T, exit_threshold=eps)``, each sequence
  stopping once its step is small;
* :func:`equilibrium`: ``model(tokens, solver=..., max_iter=..., tol=..., stop_mode=...,
  start_loops=..., compact=..., **hyperparameters)``, reading out at the fixed point.
  Every option reaches the solve; the predictor counts the sequences that converged
  (reported next to the accuracy) instead of warning at every call.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import solvers
from eqloop.core.backward import ConvergenceWarning
from eqloop.core.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_STOP_MODE, EQUILIBRIUM_TOL
from eqloop.models.looped import LoopedLM, LoopInfo
from solvers import checks

__all__ = [
    "Predictor",
    "check_solve_options",
    "early_exit",
    "equilibrium",
    "model_device",
    "unrolled",
]


@dataclass
class Predictor:
    """One way of running a looped LM: token ids (B, S) -> logits (B, S, V).

    Build it with :func:`unrolled`, :func:`early_exit` or :func:`equilibrium`.

    Attributes:
        model: the looped LM.
        loops: loop count of unrolled mode (None at equilibrium).
        exit_threshold: unrolled mode: per-sequence early exit (see ``LoopedLM.loop``).
        solver: equilibrium mode: the registered solver name.
        solve_options: equilibrium mode: ``max_iter``, ``tol``, ``stop_mode``,
            ``start_loops``, ``compact`` and the solver's hyperparameters, all passed to
            ``model(tokens, solver=..., ...)``.
        stage: the model's stage options (e.g. Huginn's ``init_scale``), every call.
        solved: sequences solved to equilibrium so far.
        converged: of those, the sequences whose solve converged.
    """

    model: LoopedLM
    loops: int | None = None
    exit_threshold: float | None = None
    solver: str | None = None
    solve_options: dict[str, Any] = field(default_factory=dict)
    stage: dict[str, Any] = field(default_factory=dict)
    solved: int = 0
    converged: int = 0

    def __call__(self, tokens: Tensor) -> Tensor:
        """(B, S) token ids -> (B, S, V) logits."""
        return self.run(tokens)[0]

    def run(self, tokens: Tensor) -> tuple[Tensor, LoopInfo]:
        """(B, S) token ids -> ``(logits, info)``: (B, S, V) logits and the model's
        :class:`~eqloop.models.looped.LoopInfo` (final state, map, the solve's result)."""
        if self.solver is None:
            return self.model(
                tokens,
                loops=self.loops,
                exit_threshold=self.exit_threshold,
                return_info=True,
                **self.stage,
            )
        with warnings.catch_warnings():  # counted below and reported with the accuracy
            warnings.simplefilter("ignore", ConvergenceWarning)
            logits, info = self.model(
                tokens, solver=self.solver, return_info=True, **self.solve_options, **self.stage
            )
        self.solved += tokens.shape[0]
        self.converged += int(info.result.converged.sum())
        return logits, info

    @property
    def converged_share(self) -> float | None:
        """Share of the sequences solved so far that converged (None before any solve)."""
        return self.converged / self.solved if self.solved else None

    @property
    def cache_loops(self) -> int | None:
        """The loop count at which KV-cached decoding reproduces this predictor: its
        ``loops`` in plain unrolled mode, None with early exit or at equilibrium."""
        if self.solver is None and not self.exit_threshold:
            return self.loops
        return None


def unrolled(model: LoopedLM, loops: int, *, stage: Mapping[str, Any] | None = None) -> Predictor:
    """Predictor running the core ``loops`` times (``stage``: the model's stage options)."""
    return Predictor(model, loops=checks.integer("loops", loops, low=0), stage=dict(stage or {}))


def early_exit(
    model: LoopedLM, loops: int, threshold: float, *, stage: Mapping[str, Any] | None = None
) -> Predictor:
    """Predictor running at most ``loops`` loops, each sequence stopping once its relative
    step ``||z_t - z_{t-1}|| / ||z_t||`` is at most ``threshold``."""
    return Predictor(
        model,
        loops=checks.integer("loops", loops, low=0),
        exit_threshold=checks.number("threshold", threshold, low=0.0),
        stage=dict(stage or {}),
    )


def check_solve_options(solver: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Check an equilibrium solve's settings before any work and fill in the defaults.

    Args:
        solver: a registered solver name.
        options: ``max_iter``, ``tol``, ``stop_mode`` (defaults in :mod:`eqloop.core.defaults`),
            ``start_loops`` (loops run before the solver starts, default 0: without input
            injection the start selects which fixed point the solver finds), ``solvers``
            driver options (e.g. ``compact``) and the solver's hyperparameters.

    Returns:
        The options with ``max_iter``, ``tol``, ``stop_mode`` and ``start_loops`` set.

    Raises:
        ValueError, TypeError: an unknown solver, option or a value out of range (the
            message names it).
    """
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver name, got {type(solver).__name__}")
    options = {
        "max_iter": EQUILIBRIUM_MAX_ITER,
        "tol": EQUILIBRIUM_TOL,
        "stop_mode": EQUILIBRIUM_STOP_MODE,
        "start_loops": 0,
        **options,
    }
    checks.integer("max_iter", options["max_iter"], low=1)
    checks.number("tol", options["tol"], low=0)
    checks.choice("stop_mode", options["stop_mode"], ("abs", "rel"))
    checks.integer("start_loops", options["start_loops"], low=0)
    named = ("max_iter", "tol", "stop_mode", "start_loops", *solvers.DRIVER_OPTIONS)
    hyperparameters = {k: v for k, v in options.items() if k not in named}
    solvers.make_solver(solver, **hyperparameters)  # unknown names and options raise here
    return options


def equilibrium(
    model: LoopedLM,
    solver: str,
    *,
    max_iter: int = EQUILIBRIUM_MAX_ITER,
    tol: float = EQUILIBRIUM_TOL,
    stop_mode: str = EQUILIBRIUM_STOP_MODE,
    start_loops: int = 0,
    compact: bool = True,
    stage: Mapping[str, Any] | None = None,
    **solver_options: Any,
) -> Predictor:
    """Predictor reading out at the fixed point ``model(tokens, solver=...)`` finds.

    Args:
        model: the looped LM.
        solver: a name from ``solvers.available()``.
        max_iter, tol, stop_mode: the solve's budget and stopping test.
        start_loops: loops run before the solver starts (0: the loop's own initial
            state). Without input injection many fixed points exist and the start alone
            selects one; a few loops put the solver in the basin of the loop's limit.
        compact: converged sequences leave the working batch early.
        stage: the model's stage options (e.g. ``{"attention_mask": ...}``).
        **solver_options: the solver's hyperparameters (e.g. ``m=6``) and other
            ``solvers`` driver options.

    Raises:
        ValueError, TypeError: an unknown solver or option, or a value out of range.
    """
    options = check_solve_options(
        solver,
        dict(
            max_iter=max_iter,
            tol=tol,
            stop_mode=stop_mode,
            start_loops=start_loops,
            compact=checks.boolean("compact", compact),
            **solver_options,
        ),
    )
    return Predictor(model, solver=solver, solve_options=options, stage=dict(stage or {}))


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device
