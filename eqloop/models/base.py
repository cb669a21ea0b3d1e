"""What the pretrained looped LMs share: eqloop's looped-LM protocol over four stages.

:class:`PretrainedLoopedLM` is a :class:`eqloop.models.looped.LoopedLM`: the loop itself
(unrolled through the solvers driver, or to equilibrium through ``eqloop.fixed_point``),
``core_map`` and ``unroll`` are the base class's. Each architecture implements four
private stages on a :class:`~eqloop.models.layers.Context` (the positions, masks and
KV cache of one call)::

    tokens (B, S) -> _inject -> x (B, S, d)          embedding (+ Huginn's prelude)
    x -> _initial_state -> z0 (B, S, d)              Ouro: z0 = x; Huginn: noise or zeros
    z_{t+1} = _core(z_t, x, loop=t)                  one loop: f(z; x)
    z_T -> _readout -> logits (B, S, V)              head (+ Huginn's ln_f, coda, ln_f)

and this class exposes them as the protocol's public stages (``inject``,
``initial_state``, ``core_step``, ``readout``), which take the ``attention_mask`` as a
stage option; ``core_step(z, x, attention_mask)`` gets the mask as a per-sample argument,
so a solver may drop converged sequences (``solvers.solve(f.step, z0, args=f.args,
compact=True)``).

Generation and diagnostics are generic: they never ask which architecture they have. What
differs (Ouro's gate exits, Huginn's exit criteria, adaptive loop and random start) sits
behind the public **decode-step interface** every model implements::

    decode_options(exit, exit_threshold, init_scale=...) -> DecodeOptions   checked once
    decode_start(tokens, mask, options, generator) -> start | None   host-side draws
    decode_step(tokens, mask, cache, loops, options, start) -> (logits, loops_used)
    decode_call(tokens, mask, cache, loops, options, generator)   reserve, step, advance
    decode_recompute(sequences, mask, loops, options, generator)  no-cache reference
    start_options(init_scale, generator) -> dict   stage options of a reproducible start
    gate_logits(z) -> (B, S) | None                 a learned exit gate, if the model has one

``decode_step`` is a pure tensor function of its arguments (no host reads, no random
draws), so ``generate(compile=True)`` compiles it; ``decode_call`` may override the
default (Huginn: a one-token call with an exit criterion loops on the host until every
row exited).

Beyond the base class: ``loops=(n, k)`` runs n loops without a graph and then k with one
(Huginn's training split). The concrete models add ``generate`` and ``save_pretrained``
through the mixins of :mod:`eqloop.models.generation` and
:mod:`eqloop.models.saving` (which import this module, never the reverse).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from eqloop.core.backward import Truncated
from eqloop.models.config import PretrainedConfig
from eqloop.models.layers import Context, KVCache, make_context
from eqloop.models.looped import CoreMap, LoopedLM, LoopInfo, all_true
from solvers import checks

__all__ = ["DecodeOptions", "PretrainedLoopInfo", "PretrainedLoopedLM", "split_loops"]


@dataclass(frozen=True)
class PretrainedLoopInfo(LoopInfo):
    """:class:`eqloop.models.looped.LoopInfo` plus Ouro's exit gate.

    Attributes:
        exit_pdf: Ouro's gated exits only: (B, S, T) exit distribution over the T loops.
        exit_loop: Ouro's threshold exit only: (B, S) int64, the 1-based loop each token
            was decoded from.
    """

    exit_pdf: Tensor | None = None
    exit_loop: Tensor | None = None


@dataclass(frozen=True)
class DecodeOptions:
    """The exit rule of one decoding call, as :meth:`PretrainedLoopedLM.decode_options`
    checked it (defaults filled in).

    Attributes:
        exit: the architecture's exit mode (Ouro: ``"last" | "threshold" | "expected"``;
            Huginn: ``"none"`` or an exit criterion).
        exit_threshold: the threshold that mode uses, or ``None``.
        init_scale: the initial-state scale of a model with a random start (Huginn), or
            ``None`` (the model's default; always ``None`` for Ouro).
    """

    exit: str
    exit_threshold: float | None = None
    init_scale: float | None = None


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


class PretrainedLoopedLM(LoopedLM):
    """Base class of :class:`OuroForCausalLM` and :class:`HuginnForCausalLM`.

    Subclasses set ``config`` and implement the private stages ``_inject``,
    ``_initial_state``, ``_core``, ``_readout`` and ``_rope_base``,
    :meth:`get_input_embeddings` and the decode-step interface (module docstring).
    Parameter names are upstream's, so ``state_dict()`` keys are the safetensors keys of
    the published checkpoints.
    """

    config: PretrainedConfig
    stage_options = ("attention_mask",)

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

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding: weight (V, d), V = :attr:`vocab_size`, d the state width
        (transformers' name for it)."""
        raise NotImplementedError

    def _rope_base(self) -> float:
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
        ``mean_recurrence``)."""
        return self.config.trained_loops

    @property
    def default_loops(self) -> int:
        """Loops ``forward`` runs when ``loops`` is not given: :attr:`trained_loops`."""
        return self.trained_loops

    @property
    def vocab_size(self) -> int:
        """Columns of the logits (Huginn: ``padded_vocab_size``)."""
        return self.get_input_embeddings().weight.shape[0]

    def num_parameters(self) -> int:
        """Number of scalars in the parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------- context, checks

    def check_input_ids(self, tokens: Any) -> Tensor:
        """Token ids (B, S) checked for this model, returned unchanged.

        ``LoopedLM.check_tokens`` against the embedding's rows, and at least one sequence
        (the stages reshape by batch size, which fails on an empty batch). On the meta
        device, where values cannot be read, only the type and shape are checked.

        Raises:
            TypeError, ValueError: not an integer (B, S) tensor of ids in [0, V), B >= 1.
        """
        if isinstance(tokens, Tensor) and tokens.is_meta:
            self.check_tokens(torch.zeros(tokens.shape, dtype=tokens.dtype), self.vocab_size)
        else:
            self.check_tokens(tokens, self.vocab_size)
        if tokens.shape[0] == 0:
            raise ValueError(
                f"tokens must hold at least one sequence (batch >= 1), got shape "
                f"{tuple(tokens.shape)}"
            )
        return tokens

    def check_attention_mask(self, attention_mask: Any, shape: tuple[int, ...]) -> Tensor | None:
        """The padding mask (B, S) = ``shape`` as a bool tensor (True at real tokens), or
        ``None`` for ``None``.

        A 0/1 mask of any dtype costs one host read to check its values; a bool mask is
        binary by construction and costs none, so the entry points (:meth:`_prepare`,
        generation, diagnostics) convert once and the stages they call check for free.
        Any other value is refused: an additive mask (0 to attend, a large negative
        number for padding) read as 0/1 would swap padding and tokens.
        """
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
        if attention_mask.dtype == torch.bool:
            return attention_mask
        if not attention_mask.is_meta:  # meta tensors have no values to read
            binary = (attention_mask == 0) | (attention_mask == 1)
            if not all_true(binary, "attention_mask must hold only 0/1 (or True/False)"):
                other = attention_mask[~binary][0].item()
                raise ValueError(
                    "attention_mask must be 1 (or True) at real tokens and 0 (or False) at "
                    f"padding, got the value {other!r}; an additive mask (0 to attend, a "
                    "large negative number at padding) converts with attention_mask == 0"
                )
        return attention_mask != 0

    def _prepare(
        self, inputs: Tensor, options: dict[str, Any], *, tokens_only: bool = False
    ) -> tuple[Tensor, CoreMap, Tensor]:
        """``LoopedLM._prepare`` with the mask checked once: ``options`` (the stage
        options of ``forward``/``core_map``/``unroll``) gets the bool mask in place, so the
        stages, the loop and ``forward``'s readout all receive it."""
        mask = options.get("attention_mask")
        if mask is not None and isinstance(inputs, Tensor) and inputs.dim() >= 2:
            options["attention_mask"] = self.check_attention_mask(mask, tuple(inputs.shape[:2]))
        return super()._prepare(inputs, options, tokens_only=tokens_only)

    def _check_state(self, name: str, t: Any, like: Tensor | None = None) -> Tensor:
        d = self.get_input_embeddings().weight.shape[1]
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor")
        if t.dim() != 3 or t.shape[-1] != d:
            raise ValueError(f"{name} must have shape (batch, seq_len, {d}), got {tuple(t.shape)}")
        if like is not None and t.shape != like.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but x has shape {tuple(like.shape)}"
            )
        return t

    def _context(
        self,
        batch: int,
        seq_len: int,
        like: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Context:
        """Rotary angles, masks and cache for ``seq_len`` new tokens of ``batch`` rows."""
        return make_context(
            seq_len,
            batch=batch,
            head_dim=self.config.head_size,
            rope_base=self._rope_base(),
            device=like.device,
            dtype=self.get_input_embeddings().weight.dtype,
            attention_mask=attention_mask,
            cache=cache,
            sliding_window=self._sliding_window(),
        )

    # ------------------------------------------------------- the protocol's stages

    def inject(self, tokens: Tensor, *, attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        """The input of the loop, x (B, S, d), from token ids (B, S).

        Other stage options (Huginn's ``init_scale``, ``generator``) do not concern it.
        """
        tokens = self.check_input_ids(tokens)
        mask = self.check_attention_mask(attention_mask, tokens.shape)
        return self._inject(tokens, self._context(*tokens.shape, tokens, mask))

    def initial_state(
        self,
        x: Tensor,
        *,
        attention_mask: Tensor | None = None,
        init_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The state z0 (B, S, d) the loop starts from (Ouro: x; Huginn: see its class)."""
        x = self._check_state("x", x)
        mask = self.check_attention_mask(attention_mask, x.shape[:2])
        return self._initial_state(x, self._context(*x.shape[:2], x, mask), init_scale, generator)

    def step_args(
        self, x: Tensor, *, attention_mask: Tensor | None = None, **_: Any
    ) -> tuple[Tensor, ...]:
        """``(x,)``, or ``(x, attention_mask)`` for a padded batch: per-sample tensors
        (the mask as bool, so the loop's ``core_step`` calls never read it again)."""
        mask = self.check_attention_mask(attention_mask, x.shape[:2])
        return (x,) if mask is None else (x, mask)

    def core_step(self, z: Tensor, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """One loop ``f(z; x)``: (B, S, d) -> (B, S, d); sequences never mix."""
        z = self._check_state("z", z)
        x = self._check_state("x", x, like=z)
        mask = self.check_attention_mask(attention_mask, z.shape[:2])
        return self._core(z, x, self._context(*z.shape[:2], z, mask))

    def readout(self, z: Tensor, *, attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        """Logits (B, S, V) decoded from a state z (B, S, d)."""
        z = self._check_state("z", z)
        mask = self.check_attention_mask(attention_mask, z.shape[:2])
        return self._readout(z, self._context(*z.shape[:2], z, mask))

    # ------------------------------------------------------------------------ forward

    def forward(
        self, tokens: Tensor, loops: int | tuple[int, int] | None = None, **options: Any
    ) -> Tensor | tuple[Tensor, LoopInfo]:
        """Logits after ``loops`` loops or at the loop's equilibrium (``LoopedLM.forward``).

        Besides the base class's arguments: ``loops=(n, k)`` runs n loops without a graph
        and then k with one; ``attention_mask`` (B, S) marks real tokens (1) and padding
        (0) anywhere (logits at padded positions are meaningless); Huginn also takes
        ``init_scale`` and ``generator`` for its initial state.
        """
        if not isinstance(loops, (tuple, list)):
            return super().forward(tokens, loops, **options)
        no_grad, with_grad = split_loops(loops, self.default_loops)
        if with_grad:  # the loop's truncated backprop: the last k loops with a graph
            return super().forward(
                tokens, no_grad + with_grad, backward=Truncated(with_grad), **options
            )
        # (n, 0), upstream's int num_steps: no loop keeps a graph, the readout does
        stage = {k: options.pop(k) for k in self.stage_options if k in options}
        return_info = checks.boolean("return_info", options.pop("return_info", False))
        self._check_unrolled_options({}, options)
        x, f, z0 = self._prepare(tokens, stage, tokens_only=True)
        with torch.no_grad():
            result = self.loop(f, z0, no_grad)
        z = z0 if result is None else result.z
        logits = self.readout(z, **stage)
        if return_info:
            used = torch.full((z.shape[0],), no_grad, device=z.device)
            return logits, PretrainedLoopInfo(z, x, f, used, result)
        return logits

    # ---------------------------------------------------- the decode-step interface

    def decode_options(
        self,
        exit: str | None = None,
        exit_threshold: float | None = None,
        *,
        init_scale: float | None = None,
        use_cache: bool = True,
        compiled: bool = False,
    ) -> DecodeOptions:
        """Check the exit options of a decoding call and fill in their defaults.

        Args:
            exit: the architecture's exit mode, or ``None`` for its default.
            exit_threshold: that mode's threshold, or ``None`` for its default.
            init_scale: the initial-state scale (only models with a random start take one).
            use_cache: whether the call decodes with a KV cache (some exits need one).
            compiled: whether :meth:`decode_step` will be compiled (host-side exits
                cannot be).

        Raises:
            TypeError, ValueError: an option this model does not take, or a bad value
                (named in the message).
        """
        raise NotImplementedError

    def decode_start(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        options: DecodeOptions,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """The random draws :meth:`decode_step` needs, made on the host before it (a
        compiled step cannot hold a draw from a generator); ``None`` when there are none.

        Args:
            tokens: (B, n) the new tokens of the call.
            attention_mask: (B, n) bool, or ``None``.
            options: from :meth:`decode_options`.
            generator: random generator.

        Returns:
            ``None`` here; Huginn: its initial state (B, n, d).
        """
        return None

    def decode_step(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        cache: KVCache,
        loops: int,
        options: DecodeOptions,
        start: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One cached forward pass over the new tokens, between ``cache.reserve`` and
        ``cache.advance``: a pure tensor function (no host reads, no random draws), which
        ``generate(compile=...)`` compiles.

        Args:
            tokens: (B, n) the new tokens (the prompt, then one token per row).
            attention_mask: (B, n) bool for a padded prompt, else ``None``.
            cache: the call's KV cache (its ``reserve(n)`` already made).
            loops: loops per token (the most, for an adaptive exit).
            options: from :meth:`decode_options`.
            start: what :meth:`decode_start` returned.

        Returns:
            logits (B, V) at the last position, and (B,) int64 the loops behind them.
        """
        raise NotImplementedError

    def decode_call(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        cache: KVCache,
        loops: int,
        options: DecodeOptions,
        generator: torch.Generator | None = None,
        step: Callable[..., tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One cached call: :meth:`decode_start`, ``cache.reserve``, the step
        (:meth:`decode_step`, or ``step``, its compiled form, with the same arguments),
        ``cache.advance``. Arguments and result as in :meth:`decode_step`."""
        start = self.decode_start(tokens, attention_mask, options, generator)
        cache.reserve(tokens.shape[1])
        run = self.decode_step if step is None else step
        out = run(tokens, attention_mask, cache, loops, options, start)
        cache.advance(tokens.shape[1])
        return out

    def decode_recompute(
        self,
        sequences: Tensor,
        attention_mask: Tensor | None,
        loops: int,
        options: DecodeOptions,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The reference :meth:`decode_call` is tested against: a full forward pass over
        ``sequences`` (B, S) with no cache. Returns the logits (B, V) at the last position
        and (B,) int64 the loops behind them."""
        raise NotImplementedError

    def start_options(
        self, init_scale: float | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """The stage options (of ``forward``/``core_map``) of a reproducible loop start:
        ``{}`` for a model whose loop starts from its input (the default); Huginn: its
        ``init_scale`` (0 by default: zeros) and ``generator``.

        Raises:
            TypeError: ``init_scale`` for a model without a random start.
        """
        if init_scale is not None:
            raise TypeError(
                f"init_scale is not an option of {type(self).__name__}: its loop starts from "
                "its input, not from a random state"
            )
        return {}

    def upstream_buffers(self) -> dict[str, Tensor]:
        """Tensors upstream's files hold that eqloop recomputes rather than loads (the
        config's ``RECOMPUTED_KEYS``), as upstream writes them; ``save_pretrained`` adds
        them. ``{}`` by default; Huginn: its rotary table ``freqs_cis``."""
        return {}

    def gate_logits(self, z: Tensor) -> Tensor | None:
        """The logits (B, S) of a learned exit gate at the state z (B, S, d), or ``None``
        for a model without one (the default; Ouro has one)."""
        return None

    def _cached_loops(
        self, z: Tensor, x: Tensor, ctx: Context, loops: int, on_state: Any = None
    ) -> Tensor:
        """``loops`` loops on one context: the KV-cache path of generation, which the
        protocol's ``core_step`` cannot take (each loop writes its own cache slots).
        ``on_state(t, z_t)`` is called after loop t = 1..T."""
        for t in range(loops):
            z = self._core(z, x, ctx, t)
            if on_state is not None:
                on_state(t + 1, z)
        return z
