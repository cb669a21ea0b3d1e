"""What the pretrained looped LMs share: the LoopLM protocol on top of four stages.

Every architecture implements four stages on a :class:`~eqloop.pretrained.layers.Context`
(positions, masks and KV cache of one call)::

    tokens (B, S) -> _inject -> x (B, S, d)          embedding (+ Huginn's prelude)
    x -> _initial_state -> z0 (B, S, d)              Ouro: z0 = x; Huginn: noise or zeros
    z_{t+1} = _core(z_t, x, loop=t)                  one loop: f(z; x)
    z_T -> _readout -> logits (B, S, V)              head (+ Huginn's ln_f, coda, ln_f)

and this class turns them into the protocol of :class:`eqloop.LoopLM`: ``model(tokens,
loops=T)``, ``model(tokens, solver="anderson", ...)``, ``core_map``, ``unroll``, plus
``generate``, ``save_pretrained`` and the public stage methods ``inject``,
``initial_state``, ``core_step`` and ``readout`` (each builds its own context; the
loops build it once).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eqloop import defaults
from eqloop.pretrained.config import HuginnConfig, OuroConfig
from eqloop.pretrained.layers import Context, KVCache, make_context
from solvers import checks

__all__ = ["LoopOutput", "PretrainedLoopedLM"]


@dataclass(frozen=True)
class LoopOutput:
    """What ``model(..., return_info=True)`` returns besides the logits.

    Attributes:
        z: (B, S, d) the state read out (z_T, or z* in equilibrium mode).
        x: (B, S, d) the input of the loop (Ouro: the embeddings; Huginn: the prelude's
            output e that every step concatenates with the state).
        loops: loops run (``None`` in equilibrium mode, where the count lives in
            ``result``).
        exit_pdf: Ouro only: (B, S, T) exit distribution over the T loops.
        exit_loop: Ouro threshold exit only: (B, S) int64, the 1-based loop each token
            was decoded from.
        result: equilibrium mode: the ``FixedPointInfo`` of the solve.
    """

    z: Tensor
    x: Tensor
    loops: int | None
    exit_pdf: Tensor | None = None
    exit_loop: Tensor | None = None
    result: Any = None


def split_loops(loops: Any, default: int) -> tuple[int, int]:
    """``loops`` as ``(steps without grad, steps with grad)``.

    ``None`` -> ``(0, default)``; an int T -> ``(0, T)`` (every loop differentiable);
    a pair ``(n, k)`` -> n loops under ``torch.no_grad()`` then k with a graph (Huginn's
    training split; note that upstream Huginn reads a plain int as ``(T, 0)``).
    """
    if loops is None:
        return 0, default
    if isinstance(loops, (tuple, list)):
        if len(loops) != 2:
            raise ValueError(
                "loops must be an int or a pair (steps without grad, steps with grad), "
                f"got {loops!r}"
            )
        return (
            checks.integer("loops[0] (steps without grad)", loops[0], low=0),
            checks.integer("loops[1] (steps with grad)", loops[1], low=0),
        )
    return 0, checks.integer("loops", loops, low=0)


class PretrainedLoopedLM(nn.Module):
    """Base class of :class:`OuroForCausalLM` and :class:`HuginnForCausalLM`.

    Subclasses set ``config`` and implement ``_inject``, ``_initial_state``, ``_core``,
    ``_readout`` and ``_sliding_window``. Parameter names are upstream's, so
    ``state_dict()`` keys are the safetensors keys of the published checkpoints.
    """

    config: OuroConfig | HuginnConfig

    # ------------------------------------------------------------ subclass interface

    def _inject(self, tokens: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    def _initial_state(
        self, x: Tensor, ctx: Context, init_scale: float | None, generator: torch.Generator | None
    ) -> Tensor:
        raise NotImplementedError

    def _core(self, z: Tensor, x: Tensor, ctx: Context, loop: int | None = None) -> Tensor:
        raise NotImplementedError

    def _readout(self, z: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    def _sliding_window(self) -> int | None:
        return None

    # -------------------------------------------------------------------- properties

    @property
    def model_type(self) -> str:
        """config.json's ``model_type``: ``"ouro"`` or ``"huginn_raven"``."""
        return self.config.model_type

    @property
    def trained_loops(self) -> int:
        """Loops the checkpoint was trained with (Ouro ``total_ut_steps``, Huginn
        ``mean_recurrence``); the default of ``loops``."""
        return self.config.trained_loops

    @property
    def vocab_size(self) -> int:
        """Columns of the logits (Huginn: ``padded_vocab_size``)."""
        return self._embedding().weight.shape[0]

    def _embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Number of scalars in the parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------- context, checks

    def _check_tokens(self, tokens: Any) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(
                "tokens must have shape (batch, seq_len) with seq_len >= 1, "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.device.type != "meta" and tokens.numel():
            low, high = int(tokens.min()), int(tokens.max())  # one host sync per call
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"tokens must lie in [0, {self.vocab_size}), got values in [{low}, {high}]"
                )
        return tokens

    def _check_mask(self, attention_mask: Any, shape: tuple[int, ...]) -> Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                "attention_mask must be a tensor of 0/1 (or bool), "
                f"got {type(attention_mask).__name__}"
            )
        if tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(
                f"attention_mask must have the shape of the tokens {tuple(shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask

    def _context(
        self,
        batch: int,
        seq_len: int,
        like: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Context:
        param = self._embedding().weight
        return make_context(
            seq_len,
            batch=batch,
            head_dim=self.config.head_size,
            rope_base=self._rope_base(),
            device=like.device,
            dtype=param.dtype,
            attention_mask=attention_mask,
            cache=cache,
            sliding_window=self._sliding_window(),
        )

    def _rope_base(self) -> float:
        raise NotImplementedError

    def _check_state(self, name: str, t: Any, like: Tensor | None = None) -> Tensor:
        d = self._embedding().weight.shape[1]
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor")
        if t.dim() != 3 or t.shape[-1] != d:
            raise ValueError(f"{name} must have shape (batch, seq_len, {d}), got {tuple(t.shape)}")
        if like is not None and t.shape != like.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but x has shape {tuple(like.shape)}"
            )
        return t

    # ------------------------------------------------------------ public stage methods

    def inject(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The input of the loop, x (B, S, d), from token ids (B, S)."""
        tokens = self._check_tokens(tokens)
        mask = self._check_mask(attention_mask, tokens.shape)
        return self._inject(tokens, self._context(*tokens.shape, tokens, mask))

    def initial_state(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        init_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The state z0 (B, S, d) the loop starts from (see the subclass)."""
        x = self._check_state("x", x)
        mask = self._check_mask(attention_mask, x.shape[:2])
        return self._initial_state(x, self._context(*x.shape[:2], x, mask), init_scale, generator)

    def core_step(self, z: Tensor, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """One loop ``f(z; x)``: (B, S, d) -> (B, S, d); sequences never mix.

        ``attention_mask`` (B, S) may be passed as a per-sample solver argument:
        ``solvers.solve(model.core_step, z0, args=(x, mask), compact=True)``.
        """
        z = self._check_state("z", z)
        x = self._check_state("x", x, like=z)
        mask = self._check_mask(attention_mask, z.shape[:2])
        return self._core(z, x, self._context(*z.shape[:2], z, mask))

    def readout(self, z: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, S, V) decoded from a state z (B, S, d)."""
        z = self._check_state("z", z)
        mask = self._check_mask(attention_mask, z.shape[:2])
        return self._readout(z, self._context(*z.shape[:2], z, mask))

    # ---------------------------------------------------------- the map f and its loops

    def _prepare(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        init_scale: float | None,
        generator: torch.Generator | None,
        cache: KVCache | None = None,
    ) -> tuple[Context, Tensor, Tensor]:
        tokens = self._check_tokens(tokens)
        mask = self._check_mask(attention_mask, tokens.shape)
        ctx = self._context(*tokens.shape, tokens, mask, cache)
        x = self._inject(tokens, ctx)
        return ctx, x, self._initial_state(x, ctx, init_scale, generator)

    def core_map(
        self,
        tokens: Tensor,
        *,
        attention_mask: Tensor | None = None,
        init_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """The fixed-point map of a batch and its starting point, for ``solvers.solve``.

        Args:
            tokens: (B, S) token ids.
            attention_mask: (B, S) 1 for real tokens, 0 for padding.
            init_scale: Huginn only: scale of the random initial state (0: zeros).
            generator: Huginn only: random generator of the initial state.

        Returns:
            ``(f, z0)``: ``f`` maps (B, S, d) -> (B, S, d) and closes over the whole
            batch (call it on full batches); ``z0`` is (B, S, d).
        """
        ctx, x, z0 = self._prepare(tokens, attention_mask, init_scale, generator)

        def f(z: Tensor) -> Tensor:
            return self._core(z, x, ctx)

        return f, z0

    def unroll(
        self,
        tokens: Tensor,
        loops: int,
        *,
        attention_mask: Tensor | None = None,
        init_scale: float | None = None,
        generator: torch.Generator | None = None,
        return_states: bool = False,
    ) -> Tensor | list[Tensor]:
        """Apply the loop ``loops`` times from z0.

        Returns:
            z_T (B, S, d), or the list ``[z_0, ..., z_T]`` with ``return_states``.
        """
        loops = checks.integer("loops", loops, low=0)
        ctx, x, z = self._prepare(tokens, attention_mask, init_scale, generator)
        states = [z]
        for t in range(loops):
            z = self._core(z, x, ctx, t)
            if return_states:
                states.append(z)
        return states if return_states else z

    def _iterate(
        self,
        z: Tensor,
        x: Tensor,
        ctx: Context,
        no_grad: int,
        with_grad: int,
        on_state: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """``no_grad`` loops without a graph, then ``with_grad`` loops with one.

        ``on_state(t, z_t)`` is called after every loop t = 1..T.
        """
        with torch.no_grad():
            for t in range(no_grad):
                z = self._core(z, x, ctx, t)
                if on_state is not None:
                    on_state(t + 1, z)
        for t in range(no_grad, no_grad + with_grad):
            z = self._core(z, x, ctx, t)
            if on_state is not None:
                on_state(t + 1, z)
        return z

    def _solve(
        self,
        z0: Tensor,
        x: Tensor,
        ctx: Context,
        solver: Any,
        tol: float | None,
        max_iter: int | None,
        backward: Any,
        stop_mode: str | None,
        options: dict[str, Any],
    ) -> tuple[Tensor, Any]:
        from eqloop.implicit import fixed_point  # lazy: the model does not need the solvers

        def f(z: Tensor) -> Tensor:
            return self._core(z, x, ctx)

        return fixed_point(
            f,
            z0,
            solver=solver,
            backward="ift" if backward is None else backward,
            max_iter=defaults.EQUILIBRIUM_MAX_ITER if max_iter is None else max_iter,
            tol=defaults.EQUILIBRIUM_TOL if tol is None else tol,
            stop_mode=defaults.EQUILIBRIUM_STOP_MODE if stop_mode is None else stop_mode,
            return_result=True,
            **options,
        )

    # ------------------------------------------------------------------------ forward

    def forward(
        self,
        tokens: Tensor,
        loops: int | tuple[int, int] | None = None,
        *,
        attention_mask: Tensor | None = None,
        solver: Any = None,
        tol: float | None = None,
        max_iter: int | None = None,
        backward: Any = None,
        stop_mode: str | None = None,
        init_scale: float | None = None,
        generator: torch.Generator | None = None,
        return_info: bool = False,
        **solver_options: Any,
    ) -> Tensor | tuple[Tensor, LoopOutput]:
        """Logits of every position after ``loops`` loops, or at the loop's equilibrium.

        Args:
            tokens: (B, S) token ids.
            loops: T loops, all differentiable; a pair ``(n, k)`` runs n loops without a
                graph and then k with one; ``None`` means :attr:`trained_loops`.
            attention_mask: (B, S) 1 for real tokens, 0 for padding (anywhere); logits
                at padded positions are meaningless.
            solver: a registered solver name or object: solve ``z* = f(z*)`` with
                ``eqloop.fixed_point`` instead of unrolling (``loops`` must be None).
            tol, max_iter, stop_mode: of the solve (defaults in ``eqloop.defaults``).
            backward: gradient of the solve: ``"ift"`` (default), ``"phantom"``,
                ``"truncated"``, ``"unroll"`` or a backward object.
            init_scale: Huginn: scale of the random initial state (default 1, upstream's;
                0 gives zeros). Ouro has no such option (z0 is the embedding).
            generator: random generator of Huginn's initial state.
            return_info: also return a :class:`LoopOutput`.
            **solver_options: passed to ``eqloop.fixed_point`` (e.g. ``m=6``).

        Returns:
            logits (B, S, V), or ``(logits, info)``.
        """
        if solver is None:
            extra = {
                k: v
                for k, v in dict(
                    tol=tol, max_iter=max_iter, backward=backward, stop_mode=stop_mode
                ).items()
                if v is not None
            }
            extra.update(solver_options)
            if extra:
                raise TypeError(
                    f"solver options {sorted(extra)} need equilibrium mode (pass solver=...)"
                )
        elif loops is not None:
            raise ValueError("loops and solver are mutually exclusive: pass one of them")
        ctx, x, z = self._prepare(tokens, attention_mask, init_scale, generator)
        result = None
        if solver is None:
            no_grad, with_grad = split_loops(loops, self.trained_loops)
            z = self._iterate(z, x, ctx, no_grad, with_grad)
            count: int | None = no_grad + with_grad
        else:
            z, result = self._solve(
                z, x, ctx, solver, tol, max_iter, backward, stop_mode, solver_options
            )
            count = None
        logits = self._readout(z, ctx)
        if return_info:
            return logits, LoopOutput(z=z, x=x, loops=count, result=result)
        return logits

    # ------------------------------------------------------------- generation, saving

    def generate(self, input_ids: Tensor, **options: Any) -> Any:
        """Autoregressive decoding with a KV cache; see :func:`eqloop.pretrained.generate`."""
        from eqloop.pretrained.generation import generate

        return generate(self, input_ids, **options)

    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
    ) -> Path:
        """Write config.json and the weights (upstream key names) to a directory.

        See :func:`eqloop.pretrained.save_pretrained`.
        """
        from eqloop.pretrained.io import save_pretrained

        return save_pretrained(self, path, max_shard_size=max_shard_size, overwrite=overwrite)
