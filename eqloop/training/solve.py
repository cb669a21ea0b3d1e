"""Training at the fixed point, shared by ``eqloop train`` and ``eqloop finetune``.

With a :class:`~eqloop.training.config.SolveConfig` (the configs' ``solve``), a training forward
solves the model's loop to its equilibrium z* with the configured solver, tolerance and
budget, from z0 after ``start_loops`` plain loops, and the backward mode (``ift`` or
``phantom``) takes its gradient at the point the solver returned
(:func:`solve_forward`). What the solves did is kept as statistics of the step
(:func:`solve_stats`): ``fwd_converged`` (share of sequences that met the tolerance),
``fwd_nfe`` (f-evaluations), ``fwd_residual`` (the largest residual) and, with IFT,
``bwd_converged`` and ``bwd_nfe`` of the adjoint solve. An unconverged solve is never
silently taken as a fixed point: it shows in these shares, and the loops warn once per
run and kind (:func:`warn_unconverged`) instead of once per solve.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from eqloop.core.backward import ConvergenceWarning
from eqloop.data import IGNORE_INDEX

if TYPE_CHECKING:
    from eqloop.core.backward import Backward
    from eqloop.models.looped import CoreMap, LoopInfo
    from eqloop.training.config import SolveConfig

__all__ = [
    "converged_targets",
    "merge_solve_stats",
    "quiet_solves",
    "solve_forward",
    "solve_stats",
    "warn_unconverged",
]


def solve_forward(
    net: nn.Module,
    inputs: Tensor,
    solve: SolveConfig,
    backward: Backward,
    start: Callable[[CoreMap, Tensor], Tensor] | None = None,
) -> tuple[Tensor, LoopInfo]:
    """Logits at the fixed point of the loop, and the forward's LoopInfo.

    The loop is solved by ``solve.solver`` (``solve.tol``, ``solve.max_iter``,
    ``solve.stop_mode``, ``solve.solver_options``) from z0 after ``solve.start_loops``
    loops, converged sequences leaving the working batch (``compact=True``); ``backward``
    takes its gradient at the point the solver returned.

    Args:
        net: a looped LM (:class:`eqloop.models.looped.LoopedLM`), or a DDP wrapper of one.
        inputs: (B, S) token ids.
        solve: the solve's settings.
        backward: the backward mode (``IFT`` or ``Phantom``).
        start: ``(f, z0) -> z``, the state the solve starts from instead of z0 (see
            ``LoopedLM.forward``); None keeps z0.

    Returns:
        ``(logits, info)``: logits (B, S, V) and the LoopInfo, whose ``z`` is the (B, S, d)
        point returned, ``f`` the batch's map and ``fixed_point`` the solves' records
        (the IFT adjoint's after the backward pass).
    """
    return net(
        inputs,
        solver=solve.solver,
        tol=solve.tol,
        max_iter=solve.max_iter,
        stop_mode=solve.stop_mode,
        start_loops=solve.start_loops,
        start=start,
        backward=backward,
        return_info=True,
        compact=True,
        **solve.solver_options,
    )


def converged_targets(targets: Tensor, info: LoopInfo, solve: SolveConfig | None) -> Tensor:
    """``targets`` with the sequences whose forward solve did not converge ignored.

    Only with ``solve.skip_unconverged``; otherwise ``targets`` itself. Device-side (no
    host read).

    Args:
        targets: (B, S) next tokens, ``IGNORE_INDEX`` where no loss is taken.
        info: the forward's LoopInfo (its ``fixed_point.forward.converged`` is (B,)).
        solve: the run's ``solve`` settings (None: the forward ran loops).

    Returns:
        (B, S) targets, every position of an unconverged sequence set to ``IGNORE_INDEX``.
    """
    fixed = info.fixed_point
    if solve is None or not solve.skip_unconverged or fixed is None or fixed.forward is None:
        return targets
    converged = fixed.forward.converged.to(targets.device)
    return targets.masked_fill(~converged[:, None], IGNORE_INDEX)


def solve_stats(info: LoopInfo, solve: SolveConfig | None) -> dict[str, Tensor | int]:
    """What a forward's solves did, as device tensors (no host read) and host ints.

    Args:
        info: the forward's LoopInfo, read after the backward pass (the IFT adjoint
            solve appears in it then).
        solve: the run's ``solve`` (None: the forward ran loops; only an IFT adjoint is
            reported then).

    Returns:
        With ``solve``: ``fwd_converged`` (0-d, share of sequences whose forward solve met
        ``solve.tol``), ``fwd_nfe`` (f-evaluations of the solve, after the start loops)
        and ``fwd_residual`` (0-d, largest residual in ``solve.stop_mode`` over the batch).
        With an IFT backward: ``bwd_converged`` (0-d, share of sequences whose adjoint
        solve met its tolerance) and ``bwd_nfe`` (its vector-Jacobian products).
    """
    stats: dict[str, Tensor | int] = {}
    fixed = info.fixed_point
    if fixed is None:
        return stats
    if solve is not None and fixed.forward is not None:
        forward = fixed.forward
        residual = forward.rel_residual if solve.stop_mode == "rel" else forward.abs_residual
        stats["fwd_converged"] = forward.converged.float().mean()
        stats["fwd_nfe"] = forward.nfe
        stats["fwd_residual"] = residual.detach().max()
    if fixed.backward is not None:
        stats["bwd_converged"] = fixed.backward.converged.float().mean()
        stats["bwd_nfe"] = fixed.backward.nfe
    return stats


def merge_solve_stats(parts: Sequence[Mapping[str, Tensor | int]]) -> dict[str, Tensor | int]:
    """The statistics of a step made of several forwards (micro-batches).

    Shares of converged sequences are averaged over the forwards (they have equal
    sizes), f-evaluations summed, the residual is the largest.

    Args:
        parts: :func:`solve_stats` of each forward, all with the same keys.
    """
    if not parts:
        return {}
    merged: dict[str, Tensor | int] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key.endswith("_nfe"):  # host ints
            merged[key] = sum(values)
        elif key == "fwd_residual":  # 0-d tensors
            merged[key] = torch.stack(values).max()
        else:  # shares, 0-d tensors
            merged[key] = torch.stack(values).mean()
    return merged


@contextlib.contextmanager
def quiet_solves() -> Iterator[None]:
    """Silence ``ConvergenceWarning`` (a decorator of the training steps).

    A step's solves report through :func:`solve_stats`; the loops warn once per run with
    :func:`warn_unconverged` instead of once per unconverged solve.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def warn_unconverged(
    stats: Mapping[str, Any],
    step: int,
    solve: SolveConfig | None,
    backward_options: Mapping[str, Any],
    warned: set[str],
) -> None:
    """Warn, once per run and kind, when a step's forward or adjoint solve did not converge.

    Args:
        stats: the step's statistics read to the host (``fwd_converged``,
            ``bwd_converged``: shares of converged sequences).
        step: steps completed, counting this one (named in the message).
        solve: the run's ``solve`` settings (named in the fix).
        backward_options: the run's ``backward_options`` (named in the fix).
        warned: the kinds already warned about; updated.
    """
    for key, what, meaning, fix in (
        (
            "fwd_converged",
            "forward solve",
            "left out of the CE (solve.skip_unconverged)"
            if solve is not None and solve.skip_unconverged
            else "trained at the solver's best iterate, not at a fixed point",
            f"raise solve.max_iter or loosen solve.tol (now: {solve})",
        ),
        (
            "bwd_converged",
            "IFT adjoint solve",
            "given the adjoint's best iterate, not the implicit gradient",
            "raise max_iter or loosen tol in backward_options "
            f"(now: {dict(backward_options) or 'the defaults'})",
        ),
    ):
        share = stats.get(key)
        if share is None or share >= 1 or key in warned:
            continue
        warned.add(key)
        warnings.warn(
            f"step {step}: the {what} did not converge on {1 - share:.1%} of the sequences, "
            f"which are {meaning}. Every step's share is logged as {key!r} in "
            f"metrics.jsonl; this warning is not repeated. To fix: {fix}, or strengthen the "
            "contraction (lam, penalty_target).",
            ConvergenceWarning,
            stacklevel=5,  # the caller of train()/finetune() (via the loop's read)
        )
