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
Where the loop count is fixed (training at a fixed depth) that is the faster choice:
:class:`eqloop.training.whole_step.WholeStep` compiles the training loss (unrolled
forward, cross-entropy, the forward-mode STARS penalty) as one graph per loop count, for a
bounded number of counts.

Every function eqloop compiles goes through :func:`compile_function`, which works around
PyTorch's efficient zero tensors under inductor (see :class:`MaterializeZeroTensors`): the
STARS penalty's forward-mode product (:func:`eqloop.core.stars.jsrr_penalty` with
``compile_options``) compiles with it.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from eqloop.models.looped import CoreMap, LoopedLM

__all__ = [
    "MaterializeZeroTensors",
    "compile_function",
    "compile_model",
    "eager_core_step",
    "eager_map",
]

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
          uncompiled), e.g. ``CoreMap(eager_core_step(model), info.f.args)``; the
          forward-mode penalty compiles as a whole instead (``jsrr_penalty(...,
          product="jvp", compile_options={})``).
        * Compile after moving/casting the model and after copying it: a deep copy keeps
          its own compiled step (rebound to the copy), but ``torch.save(model)`` (pickling
          the whole module) is not supported; save the ``state_dict`` as eqloop does.
        * Calling it again recompiles with the new ``compile_kwargs``.

    Args:
        model: any :class:`~eqloop.models.looped.LoopedLM` (``LoopLM``, Ouro, Huginn).
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
    step = compile_function(type(model).core_step, **compile_kwargs)
    model.core_step = types.MethodType(step, model)  # type: ignore[method-assign]
    return model


def eager_core_step(model: LoopedLM) -> Callable[..., Tensor]:
    """``model``'s uncompiled ``core_step``, bound to ``model`` (compiled or not).

    The same map as ``model.core_step`` on the same parameters, for what a compiled step
    cannot do: higher-order derivatives and forward-mode AD (the STARS penalty).

    Args:
        model: any :class:`~eqloop.models.looped.LoopedLM`.

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
        A :class:`~eqloop.models.looped.CoreMap` with ``f``'s arguments and the class's step.
    """
    return dataclasses.replace(f, step=eager_core_step(model))


class MaterializeZeroTensors(CustomGraphPass):
    """Inductor pass: ``aten._efficientzerotensor`` nodes become ``aten.full(size, 0)``.

    PyTorch's forward-mode derivative formulas give every input without a tangent (in a
    JVP of a model: its parameters) an "efficient" zero tensor, a tensor flagged as zero
    with no storage (``linear``'s formula ``x_t W^T + x W_t^T`` with ``W_t = 0``). AOT
    autograd keeps them in the backward graph as ``_efficientzerotensor`` calls, and
    inductor runs that op as a fallback, then reuses its buffer for a later result,
    which fails at run time: "ZeroTensors are immutable" (torch 2.13). Replaced by an
    ordinary zero tensor before lowering, the graph computes the same values (a product
    with zeros is zero) and inductor may write into the buffer.
    """

    def __call__(self, graph: fx.Graph) -> None:
        """Rewrite ``graph`` in place (runs on every post-grad graph inductor compiles)."""
        for node in graph.nodes:
            if (
                node.op == "call_function"
                and node.target is torch.ops.aten._efficientzerotensor.default
            ):
                # Same keywords (dtype, layout, device, pin_memory); the fill value 0.
                node.target = torch.ops.aten.full.default
                node.args = (node.args[0], 0.0)

    def uuid(self) -> str:
        """Key of the pass in inductor's compiled-graph cache."""
        return "eqloop.core.compiling.MaterializeZeroTensors/1"


def compile_function(fn: Callable[..., Any], **compile_kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(fn, **compile_kwargs)``, with :class:`MaterializeZeroTensors` under inductor.

    The one place where eqloop calls :func:`torch.compile`. With the inductor backend
    (the default) the pass is added to ``options["post_grad_custom_pre_pass"]``; other
    backends get ``compile_kwargs`` unchanged.

    Args:
        fn: the function (or unbound method) to compile.
        **compile_kwargs: passed to :func:`torch.compile`.

    Returns:
        The compiled function.

    Raises:
        ValueError: ``options`` already set ``post_grad_custom_pre_pass`` under inductor.
    """
    if compile_kwargs.get("backend", "inductor") == "inductor":
        options = dict(compile_kwargs.get("options") or {})
        if options.get("post_grad_custom_pre_pass") is not None:
            raise ValueError(
                "compile options: post_grad_custom_pre_pass is taken by eqloop's "
                "MaterializeZeroTensors pass; leave it unset"
            )
        options["post_grad_custom_pre_pass"] = MaterializeZeroTensors()
        compile_kwargs = {**compile_kwargs, "options": options}
    return torch.compile(fn, **compile_kwargs)
