"""Ouro (ByteDance Seed's looped LM): every decoder layer looped, an exit gate per loop.

Facts from ``/work/shared/PRETRAINED.md`` (read from the public model code)::

    z_0 = embed(tokens)
    z_{t+1} = norm(layer_L(... layer_1(z_t)))        one loop = all L layers + final norm
    logits_t = lm_head(z_t)
    lam_t = sigmoid(early_exit_gate(z_t))            per token, after each loop t = 1..T
    p_t = lam_t prod_{j<t} (1 - lam_j)  (t < T),    p_T = prod_{j<T} (1 - lam_j)

A decoder layer is pre-sandwich per sub-layer: ``h = x + N2(Attn(N1(x)))``,
``out = h + N4(MLP(N3(h)))`` with RMSNorms N1 = input_layernorm, N2 = input_layernorm_2,
N3 = post_attention_layernorm, N4 = post_attention_layernorm_2 and a SwiGLU MLP.
Attention is causal, grouped-query, with Llama-style rotary (rotate-half) and, on layers
marked "sliding_attention", a window of ``sliding_window`` keys. There is no input
injection: ``f(z) = norm(layers(z))`` and the tokens only set ``z_0``.

``model(tokens, loops=T)`` decodes the state after T loops (upstream's
``exit_at_step=T-1``). ``exit="threshold"`` decodes each token from the first loop
whose cumulative exit probability reaches ``exit_threshold`` (the last loop if none
does); ``exit="expected"`` returns ``sum_t p_t * lm_head(z_t)`` (upstream's
``use_weighted_exit``, also its training logits). All T loops are computed either way.

Defaults differ from upstream's on purpose: ``model(tokens)`` decodes the state after
``total_ut_steps`` loops, whereas upstream's forward decodes by the config's
``early_exit_threshold`` (or ``early_exit_step``) when they are set; with the usual
threshold 1.0 both give the last loop. ``exit="threshold"`` without a value uses the
config's threshold. Upstream's ``use_weighted_exit=True`` is shadowed by a configured
threshold (its "weighted" logits are then the threshold logits); ``exit="expected"`` is
always the weighted sum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eqloop.core.backward import Truncated
from eqloop.models.base import (
    DecodeOptions,
    PretrainedLoopedLM,
    PretrainedLoopInfo,
    split_loops,
)
from eqloop.models.exits import check_exit, exit_distribution, threshold_exit
from eqloop.models.generation import GenerationMixin
from eqloop.models.layers import Context, KVCache, RMSNorm, attend, rotate_half_pairs
from eqloop.models.ouro.config import OuroConfig
from eqloop.models.saving import SaveMixin
from solvers import checks

__all__ = ["EXIT_MODES", "OuroForCausalLM"]

EXIT_MODES = ("last", "threshold", "expected")
"""Values of ``exit`` in :meth:`OuroForCausalLM.forward` and in Ouro's generation."""


class OuroAttention(nn.Module):
    """Grouped-query causal self-attention with rotate-half rotary embeddings."""

    def __init__(self, config: OuroConfig, layer: int) -> None:
        super().__init__()
        d, e = config.hidden_size, config.head_size
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            e,
        )
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, self.n_heads * e, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * e, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * e, bias=False)
        self.o_proj = nn.Linear(self.n_heads * e, d, bias=False)

    def forward(self, h: Tensor, ctx: Context, kind: str, loop: int | None) -> Tensor:
        """(B, S, d) -> (B, S, d); ``loop`` names the cache slot ``(loop, layer)``."""
        batch, seq, _ = h.shape
        q = self.q_proj(h).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(batch, seq, self.n_kv_heads, self.head_dim)
        q = rotate_half_pairs(q, ctx.cos, ctx.sin).transpose(1, 2)
        k = rotate_half_pairs(k, ctx.cos, ctx.sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if ctx.cache is not None:
            if loop is None:
                raise ValueError("a cached forward pass needs the loop index of every step")
            k, v = ctx.cache.update((loop, self.layer), k, v)
        y = attend(q, k, v, ctx.masks[kind], dropout=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class OuroMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        d, m = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, S, d) -> (B, S, d)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OuroDecoderLayer(nn.Module):
    """``h = x + N2(Attn(N1(x)))``, ``out = h + N4(MLP(N3(h)))``."""

    def __init__(self, config: OuroConfig, layer: int) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.attention_type = config.attention_kinds[layer]
        self.self_attn = OuroAttention(config, layer)
        self.mlp = OuroMLP(config)
        self.input_layernorm = RMSNorm(d, eps)
        self.input_layernorm_2 = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm_2 = RMSNorm(d, eps)

    def forward(self, x: Tensor, ctx: Context, loop: int | None) -> Tensor:
        """(B, S, d) -> (B, S, d)."""
        h = x + self.input_layernorm_2(
            self.self_attn(self.input_layernorm(x), ctx, self.attention_type, loop)
        )
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))


class OuroModel(nn.Module):
    """The parameters under upstream's ``model.`` prefix."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            OuroDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)


class OuroForCausalLM(GenerationMixin, SaveMixin, PretrainedLoopedLM):
    """An Ouro checkpoint as a looped LM (see the module docstring).

    Build it with :func:`eqloop.models.load` (weights from a directory) or from an
    :class:`OuroConfig` (random weights: :meth:`init_weights`).

    Example:
        >>> from eqloop.models import OuroConfig, OuroForCausalLM
        >>> cfg = OuroConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = OuroForCausalLM(cfg).eval()
        >>> model(torch.randint(0, 64, (2, 5)), loops=3).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        if not isinstance(config, OuroConfig):
            raise TypeError(f"config must be an OuroConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.generation_config: dict = {}  # generation_config.json, kept for saving
        self.model = OuroModel(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def init_weights(
        self, generator: torch.Generator | None = None, std: float | None = None
    ) -> None:
        """Random weights: N(0, std^2) matrices (``initializer_range``, 0.02), unit norms,
        zero gate bias."""
        std = float(self.config.extra.get("initializer_range", 0.02)) if std is None else std
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, std, generator=generator)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)

    # ------------------------------------------------------------------- the stages

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def _rope_base(self) -> float:
        return self.config.rope_theta

    def _sliding_window(self) -> int | None:
        if "sliding_attention" in self.config.attention_kinds:
            return self.config.sliding_window
        return None

    def _inject(self, tokens: Tensor, ctx: Context) -> Tensor:
        return ctx.zero_padding(self.model.embed_tokens(tokens))

    def _initial_state(
        self, x: Tensor, ctx: Context, init_scale: float | None, generator: torch.Generator | None
    ) -> Tensor:
        self.start_options(init_scale)  # refuses init_scale
        return x

    def _core(self, z: Tensor, x: Tensor, ctx: Context, loop: int | None = None) -> Tensor:
        # Padded positions hold zeros already; zeroing them here too stops a tangent
        # there (a Jacobian-vector product) from passing RMSNorm's 1/sqrt(eps) gain at
        # zero layer after layer, which overflows float16 into NaN.
        h = ctx.zero_padding(z)
        for layer in self.model.layers:
            h = layer(h, ctx, loop)
        return ctx.zero_padding(self.model.norm(h))

    def head(self, z: Tensor) -> Tensor:
        """``lm_head(z)``: (B, S, d) -> (B, S, V) (the embedding matrix when tied)."""
        if self.lm_head is None:
            return F.linear(z, self.model.embed_tokens.weight)
        return self.lm_head(z)

    def _readout(self, z: Tensor, ctx: Context) -> Tensor:
        return self.head(z)

    def gate_logits(self, z: Tensor) -> Tensor:
        """Exit-gate logits ``early_exit_gate(z)``: (B, S, d) -> (B, S) (any leading
        dimensions)."""
        return self.model.early_exit_gate(z).squeeze(-1)

    def _exit_threshold(self, exit: str, exit_threshold: float | None) -> float | None:
        """Check ``exit`` and return the threshold of ``exit="threshold"`` (the config's
        ``early_exit_threshold`` by default), else ``None``; forward and generation share it."""
        check_exit(exit, exit_threshold, EXIT_MODES, ("threshold",))
        if exit != "threshold":
            return None
        threshold = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        if threshold is None:
            raise ValueError("exit='threshold' needs exit_threshold (the config sets none)")
        return checks.number("exit_threshold", threshold, low=0.0, high=1.0)

    # ----------------------------------------------------------- decode-step interface

    def start_options(
        self, init_scale: float | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """``{}``: Ouro's loop starts from the embeddings (see the base class)."""
        if init_scale is not None:
            raise TypeError("init_scale is a Huginn option: Ouro's loop starts from the embeddings")
        return {}

    def decode_options(
        self,
        exit: str | None = None,
        exit_threshold: float | None = None,
        *,
        init_scale: float | None = None,
        use_cache: bool = True,
        compiled: bool = False,
    ) -> DecodeOptions:
        """Ouro's exits (``"last"`` by default, ``"threshold"``, ``"expected"``): all loops
        run, the gate picks the logits; every exit works with and without the cache and
        compiles (see the base class)."""
        self.start_options(init_scale)
        exit = "last" if exit is None else exit
        return DecodeOptions(exit, self._exit_threshold(exit, exit_threshold))

    def decode_step(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        cache: KVCache,
        loops: int,
        options: DecodeOptions,
        start: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """All ``loops`` loops over the new tokens (B, n); the gate picks each row's logits
        (B, V) at the last position and the loop (B,) they came from (see the base class)."""
        ctx = self._context(*tokens.shape, tokens, attention_mask, cache)
        x = self._inject(tokens, ctx)
        states: list[Tensor] = []
        self._cached_loops(x, x, ctx, loops, on_state=lambda t, s: states.append(s[:, -1]))
        stacked = torch.stack(states, dim=1)  # (B, T, d): the last position after each loop
        batch = tokens.shape[0]
        if options.exit == "last":
            return self.head(stacked[:, -1]), torch.full((batch,), loops, device=tokens.device)
        pdf = exit_distribution(self.gate_logits(stacked)[:, None])[:, 0]  # (B, T)
        if options.exit == "expected":
            logits = (self.head(stacked) * pdf[..., None].to(stacked.dtype)).sum(dim=1)
            return logits, torch.full((batch,), loops, device=tokens.device)
        index = threshold_exit(pdf[:, None], options.exit_threshold)[:, 0]
        return self.head(stacked[torch.arange(batch, device=tokens.device), index]), index + 1

    def decode_recompute(
        self,
        sequences: Tensor,
        attention_mask: Tensor | None,
        loops: int,
        options: DecodeOptions,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with the exit of ``options`` over the whole ``sequences``."""
        logits, info = self(
            sequences,
            loops,
            attention_mask=attention_mask,
            exit=options.exit,
            exit_threshold=options.exit_threshold,
            return_info=True,
        )
        exit_loop = getattr(info, "exit_loop", None)  # set by the threshold exit only
        used = (
            exit_loop[:, -1]
            if exit_loop is not None
            else torch.full((sequences.shape[0],), loops, device=sequences.device)
        )
        return logits[:, -1], used

    # ---------------------------------------------------------------------- forward

    def forward(  # type: ignore[override]
        self,
        tokens: Tensor,
        loops: int | tuple[int, int] | None = None,
        *,
        exit: str = "last",
        exit_threshold: float | None = None,
        attention_mask: Tensor | None = None,
        return_info: bool = False,
        **options: Any,
    ) -> Tensor | tuple[Tensor, PretrainedLoopInfo]:
        """Logits after ``loops`` loops, with Ouro's exit rules (see the module docstring).

        Args:
            tokens: (B, S) token ids.
            loops: T, a pair (n, k) (n loops without a graph, then k with one), or None
                for ``total_ut_steps``.
            exit: ``"last"`` decodes z_T; ``"threshold"`` decodes each token from its
                exit loop; ``"expected"`` returns the exit-probability-weighted logits.
            exit_threshold: for ``"threshold"``; default ``early_exit_threshold`` of the
                config.
            attention_mask: (B, S) 1 for real tokens, 0 for padding.
            return_info: also return a :class:`PretrainedLoopInfo` (with the exit
                distribution for the gated modes).
            **options: as in :meth:`eqloop.models.looped.LoopedLM.forward` (``solver=...`` etc.),
                with ``exit="last"`` only.

        Returns:
            logits (B, S, V), or ``(logits, info)``.
        """
        threshold = self._exit_threshold(exit, exit_threshold)
        if exit == "last":
            return super().forward(
                tokens, loops, attention_mask=attention_mask, return_info=return_info, **options
            )
        if options:
            raise TypeError(
                f"exit={exit!r} decodes from every loop of an unrolled run; "
                f"options {sorted(options)} do not apply (equilibrium mode uses exit='last')"
            )
        no_grad, with_grad = split_loops(loops, self.default_loops)
        if no_grad + with_grad < 1:
            raise ValueError(f"exit={exit!r} needs at least one loop")
        x, f, z0 = self._prepare(tokens, {"attention_mask": attention_mask}, tokens_only=True)
        states: list[Tensor] = []  # z_1 .. z_T: every loop is decoded or weighted

        def keep(t: int, z: Tensor) -> None:
            if t:
                states.append(z)

        with torch.set_grad_enabled(torch.is_grad_enabled() and with_grad > 0):
            backward = Truncated(with_grad) if with_grad else None
            self.loop(f, z0, no_grad + with_grad, backward=backward, on_state=keep)
        z = states[-1]
        stacked = torch.stack(states, dim=2)  # (B, S, T, d)
        pdf = exit_distribution(self.gate_logits(stacked))
        exit_loop = None
        if exit == "threshold":
            index = threshold_exit(pdf, threshold)
            chosen = stacked.gather(2, index[..., None, None].expand(-1, -1, 1, stacked.shape[-1]))
            logits = self.head(chosen.squeeze(2))
            exit_loop = index + 1
        else:
            logits = (self.head(stacked) * pdf[..., None].to(stacked.dtype)).sum(dim=2)
        if return_info:
            used = torch.full((z.shape[0],), len(states), device=z.device)
            info = PretrainedLoopInfo(z, x, f, used, None, exit_pdf=pdf, exit_loop=exit_loop)
            return logits, info
        return logits
