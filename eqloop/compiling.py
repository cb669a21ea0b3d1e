"""Compile the hot part of a looped LM: its per-loop step.

A looped LM spends its time in the core map ``f(z) = core_step(z, *args)``, applied
``loops`` times (or until a solver converges). :func:`compile_model` compiles that one
step with :func:`torch.compile`, so the graph does not depend on the loop count: random
depth in training, evaluation at 1..128 loops, early exit, equilibrium solves and the
implicit (IFT) backward all reuse the same compiled step (one graph, or two when the
batch size changes and torch recompiles it with a dynamic batch dimension). Everything
around the step (injection, readout, the solver driver) stays eager.

Compiling the whole forward instead (``torch.compile(model, fullgraph=True)``) also works
and gives one graph per forward, but one per loop count, since torch unrolls the loop.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from eqloop.looped import CoreMap, LoopedLM

__all__ = ["compile_model", "eager_core_step", "eager_map"]

ModelT = TypeVar("ModelT", bound=LoopedLM)


def compile_model(model: ModelT, **compile_kwargs: Any) -> ModelT:
    """Compile ``model``'s per-loop step in place and return the model.

    Contract:
        * The model's ``core_step`` (the map ``f`` every loop, solver, backward mode and
          ``core_map`` uses) becomes ``torch.compile(type(model).core_step,
          **compile_kwargs)`` bound to ``model``; nothing else changes: same parameters,
          same ``state_dict``, same outputs as eager up to floating-point rounding, same
          errors for bad inputs (checks in the step that fail at trace time raise as in
          eager).
        * The number of compiled graphs does not grow with the loop count.
        * First-order gradients flow through the compiled step (training, IFT backward).
          Higher-order autodiff through it (``create_graph=True`` then a second backward,
          or forward-mode JVPs, as the STARS penalty takes) is not supported by
          ``torch.compile``: give such terms :func:`eager_core_step` (the same map,
          uncompiled), e.g. ``CoreMap(eager_core_step(model), info.f.args)``.
        * Compile after moving/casting the model and after copying it: a deep copy keeps
          its own compiled step (rebound to the copy), but ``torch.save(model)`` (pickling
          the whole module) is not supported; save the ``state_dict`` as eqloop does.
        * Calling it again recompiles with the new ``compile_kwargs``.

    Args:
        model: any :class:`~eqloop.looped.LoopedLM` (``LoopLM``, Ouro, Huginn).
        **compile_kwargs: passed to :func:`torch.compile` (``backend``, ``mode``,
            ``dynamic``, ``fullgraph``, ...).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a ``LoopedLM``.
    """
    if not isinstance(model, LoopedLM):
        raise TypeError(
            f"compile_model needs an eqloop LoopedLM (LoopLM, Ouro, Huginn), "
            f"got {type(model).__name__}"
        )
    # Compile the class's function and bind it to this model: a deep copy rebinds the
    # method to the copy (copy.deepcopy copies a bound method's __self__), and the
    # instance attribute shadows the class's method for every caller of model.core_step.
    step = torch.compile(type(model).core_step, **compile_kwargs)
    model.core_step = types.MethodType(step, model)  # type: ignore[method-assign]
    return model


def eager_core_step(model: LoopedLM) -> Callable[..., Tensor]:
    """``model``'s uncompiled ``core_step``, bound to ``model`` (compiled or not).

    The same map as ``model.core_step`` on the same parameters, for what a compiled step
    cannot do: higher-order derivatives and forward-mode AD (the STARS penalty).

    Args:
        model: any :class:`~eqloop.looped.LoopedLM`.

    Returns:
        ``core_step(z, *args)``: (B, S, d) and the ``step_args`` -> (B, S, d).
    """
    return types.MethodType(type(model).core_step, model)


def eager_map(model: LoopedLM, f: CoreMap) -> CoreMap:
    """``f`` (a map of ``model``) with the model's uncompiled step.

    For terms ``torch.compile`` cannot differentiate, such as the STARS penalty's double
    backward, in a model :func:`compile_model` has compiled. The same map as ``f`` when
    the model is not compiled.

    Args:
        model: the model whose ``core_step`` ``f`` applies.
        f: a map of one batch, from ``model.core_map`` or ``LoopInfo.f``.

    Returns:
        A :class:`~eqloop.looped.CoreMap` with ``f``'s arguments and the class's step.
    """
    return dataclasses.replace(f, step=eager_core_step(model))
