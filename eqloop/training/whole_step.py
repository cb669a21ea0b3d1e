"""The training loss at a fixed loop count, compiled whole: :class:`WholeStep`.

:func:`eqloop.core.compiling.compile_model` compiles the per-loop step so that any number of
loop counts share its graphs. At a fixed depth the whole unrolled forward, the
cross-entropy and the forward-mode STARS penalty compile as one graph per loop count
instead, which is what ``eqloop train --compile`` uses there (see docs/compiling.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from eqloop.core import compiling
from eqloop.core.stars import jsrr_penalty, random_unit
from eqloop.models.looplm.modeling import LoopLM

if TYPE_CHECKING:  # config imports the models' configs only; kept out of the import graph
    from eqloop.training.config import TrainConfig

__all__ = ["WholeStep"]


class WholeStep:
    """The training loss of one batch at a known loop count, compiled as one graph per count.

    :func:`compile_model` compiles the per-loop step, so that any number of loop counts
    shares its graphs; but on a CPU most of a step is matrix products and attention, which
    the compiled step calls as eager does, and only the elementwise work between them is
    fused. When the loop count of a step is known and takes few values (training at a
    fixed depth), the whole unrolled forward, the cross-entropy and the forward-mode STARS
    penalty (``jsrr_penalty(..., product="jvp")``) can be one graph instead, which torch
    unrolls and fuses across loops. This object runs that loss: one graph per loop count
    (and per penalty on/off), for at most ``max_counts`` loop counts; :meth:`covers` says
    whether a step can run here (the caller runs its ordinary path otherwise).

    The loss is the one :func:`eqloop.recipes.train.train_step` computes with ``backward="unroll"``:
    ``CE`` (targets -100 ignored), and with the penalty ``(1 - lam) * CE + lam * P`` where
    ``P`` is the jvp penalty at the detached final state from a random unit vector drawn
    (eagerly) from the caller's generator, as the eager penalty draws it.

    Args:
        model: the LoopLM whose loss is computed (called directly: not under DDP, whose
            gradient hooks a compiled call of the bare module would bypass).
        lam: penalty weight in ``[0, 1]``.
        penalty: whether steps with the penalty run here (False: only steps without it,
            e.g. when the run takes the paper's vjp penalty, which cannot be compiled).
        power_steps: Jacobian products per penalty (``jsrr_penalty``'s).
        target: ``jsrr_penalty``'s hinge target (None: ``||J v||^2``).
        max_counts: most loop counts compiled; None: torch's recompile limit
            (``torch._dynamo.config.recompile_limit``), past which torch would stop
            compiling the function.
        **compile_kwargs: passed to :func:`eqloop.core.compiling.compile_function`
            (``fullgraph=True`` and ``dynamic=False`` unless given: a static loop count per
            graph; under inductor without a ``mode``, ``options`` gets
            ``max_autotune=True`` unless it says otherwise).
    """

    def __init__(
        self,
        model: LoopLM,
        *,
        lam: float,
        penalty: bool = True,
        power_steps: int = 1,
        target: float | None = None,
        max_counts: int | None = None,
        **compile_kwargs: Any,
    ) -> None:
        if not isinstance(model, LoopLM):
            raise TypeError(f"WholeStep needs an eqloop LoopLM, got {type(model).__name__}")
        limit = torch._dynamo.config.recompile_limit
        self.max_counts = limit if max_counts is None else max_counts
        if not 1 <= self.max_counts <= limit:
            raise ValueError(
                f"max_counts must lie in [1, torch._dynamo.config.recompile_limit={limit}], "
                f"got {max_counts}; raise the torch limit first for more loop counts"
            )
        self.model, self.lam, self.penalty = model, lam, penalty
        self.power_steps, self.target = power_steps, target
        self.counts: set[int] = set()  # loop counts compiled so far
        # The uncompiled step for the penalty's jvp, bound here: the trace cannot build it.
        self._eager_step = compiling.eager_core_step(model)
        options = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        if options.get("backend", "inductor") == "inductor" and "mode" not in options:
            # Autotuned GEMMs: on the CPU inductor's templated micro-GEMMs beat the library
            # bmm for attention's many tiny products (head_dim 8, 13 tokens: up to 10x).
            options["options"] = {"max_autotune": True, **(options.get("options") or {})}
        self._loss = compiling.compile_function(self._whole_loss, **options)

    @classmethod
    def for_training(cls, model: LoopLM, config: TrainConfig) -> WholeStep | None:
        """The whole loss of a run, or None when its steps do not fit one.

        A run fits when it trains at a fixed depth (``depth`` of kind ``"fixed"``), through
        the unrolled loops from z0 (``backward="unroll"``, no ``solve``, no
        ``random_start``), with the penalty (if any)
        at the trajectory's end from a random vector (``penalty_at="trajectory"``,
        ``penalty_arnoldi=0``). Steps with the paper's vjp penalty stay on the ordinary
        path (``penalty=False``); random depth keeps :func:`compile_model`'s per-loop step,
        whose graphs do not grow with the loop count.

        Args:
            model: the run's LoopLM (after :func:`compile_model`).
            config: the run's ``TrainConfig``.
        """
        fits = (
            config.depth.get("kind") == "fixed"
            and config.solve is None
            and not config.random_start
            and config.backward == "unroll"
            and config.penalty_at == "trajectory"
            and not config.penalty_arnoldi
        )
        if not fits:
            return None
        return cls(
            model,
            lam=config.lam,
            penalty=config.penalty_product == "jvp",
            power_steps=config.power_steps,
            target=config.penalty_target,
        )

    def covers(self, loops: int | None, penalty_on: bool) -> bool:
        """Whether a step at ``loops`` loops (with the penalty or not) runs here."""
        if loops is None or (penalty_on and not self.penalty):
            return False
        return loops in self.counts or len(self.counts) < self.max_counts

    def __call__(
        self,
        inputs: Tensor,
        targets: Tensor,
        loops: int,
        penalty_on: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The step's loss.

        Args:
            inputs: (B, S) token ids.
            targets: (B, S) next tokens, -100 where no loss is taken.
            loops: loop count (one of at most ``max_counts`` values, see :meth:`covers`).
            penalty_on: add the STARS penalty (weight ``lam``).
            generator: draws the penalty's random start vector.

        Returns:
            ``(loss, ce, penalty, rho)``: the 0-d loss with its graph, the detached 0-d
            cross-entropy, penalty and mean ``||J v||`` (the last two None without the
            penalty).

        Raises:
            ValueError: the step is not covered (see :meth:`covers`): a new loop count past
                ``max_counts``, or the penalty when built with ``penalty=False``.
        """
        if not self.covers(loops, penalty_on):
            raise ValueError(
                f"WholeStep does not cover loops={loops}, penalty_on={penalty_on}: it compiles "
                f"at most max_counts={self.max_counts} loop counts (has {sorted(self.counts)})"
                f" and the penalty only when built with penalty=True (it is {self.penalty}); "
                "check covers() first"
            )
        self.counts.add(loops)
        v = None
        if penalty_on:  # drawn eagerly, the same stream as the eager penalty's start vector
            p = next(self.model.parameters())
            shape = (*inputs.shape, self.model.config.d_model)
            v = random_unit(torch.empty(shape, dtype=p.dtype, device=p.device), generator)
        return self._loss(inputs, targets, loops, v)

    def _whole_loss(
        self, inputs: Tensor, targets: Tensor, loops: int, v: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The traced function: forward at ``loops`` loops, CE and the jvp penalty."""
        # On the CPU attention runs as plain products and a softmax (the math kernel),
        # which inductor fuses and autotunes, instead of the fused flash kernel, an opaque
        # call that is slow for small heads; other devices keep their fused kernels.
        cpu = inputs.device.type == "cpu"
        with sdpa_kernel(SDPBackend.MATH) if cpu else contextlib.nullcontext():
            logits, info = self.model(inputs, loops=loops, return_info=True)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if v is None:
            return ce, ce.detach(), None, None
        result = jsrr_penalty(
            dataclasses.replace(info.f, step=self._eager_step),
            info.z.detach(),
            product="jvp",
            power_steps=self.power_steps,
            v=v,
            target=self.target,
            return_details=True,
        )
        loss = (1 - self.lam) * ce + self.lam * result.penalty
        return loss, ce.detach(), result.penalty.detach(), result.rho.detach().mean()
