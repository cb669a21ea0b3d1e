"""Huginn (tomg-group-umd's depth-recurrent LM) and the retrofitted-recurrence checkpoints.

Facts from ``/work/shared/PRETRAINED.md`` (read from the public model code)::

    e = prelude(embed_scale * wte(tokens))                   x of the protocol
    s_0 = init_scale * embed_scale * TruncNormal(0, std, +-3 std)   (zeros for scale 0)
    s_{t+1} = core_blocks(adapter(concat[s_t, e]))            one step: f(s; e)
    logits = lm_head(ln_f(coda(ln_f(s_T))))

Every block is a sandwich block (eqloop's "post_sandwich"): ``h = N2(Attn(N1(x)) + x)``,
``out = N4(MLP(N3(h)) + h)``, RMSNorms ``norm_1..norm_4``, a gated SiLU MLP whose fused
``fc`` holds (gate, up). Attention splits the fused ``Wqkv`` into q, k, v, adds the
per-head ``qk_bias`` to q and k, applies rotary in the interleaved-pair (complex)
convention and runs causal SDPA.

``model(tokens, loops=T)`` is upstream's ``num_steps=T`` with every step differentiable;
``loops=(n, k)`` is upstream's ``num_steps=(n, k)``: n steps without a graph, then k
with one (a plain int upstream means ``(T, 0)``). ``init_scale=0.0`` starts from zeros,
deterministically (upstream's ``init_scale``; the default 1.0 draws the random state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eqloop.pretrained.base import PretrainedLoopedLM
from eqloop.pretrained.config import HuginnConfig
from eqloop.pretrained.generation import GenerationMixin
from eqloop.pretrained.layers import Context, RMSNorm, attend, rotate_interleaved_pairs
from eqloop.pretrained.saving import SaveMixin
from solvers import checks

__all__ = ["HuginnForCausalLM"]


class HuginnAttention(nn.Module):
    """Causal self-attention with a fused ``Wqkv``, per-head q/k biases, interleaved rotary."""

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        d, e = config.n_embd, config.head_size
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.num_key_value_heads, e
        self.split = (d, self.n_kv_heads * e, self.n_kv_heads * e)
        self.Wqkv = nn.Linear(d, sum(self.split), bias=False)
        if config.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.n_heads, e))
        else:
            self.qk_bias = None
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, h: Tensor, ctx: Context, slot: object | None) -> Tensor:
        """(B, S, d) -> (B, S, d); ``slot`` names the KV-cache slot of this call."""
        batch, seq, _ = h.shape
        q, k, v = self.Wqkv(h).split(self.split, dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.qk_bias is not None:
            q = q + self.qk_bias[0]
            k = k + self.qk_bias[1]
        q = rotate_interleaved_pairs(q, ctx.cos, ctx.sin).transpose(1, 2)
        k = rotate_interleaved_pairs(k, ctx.cos, ctx.sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if ctx.cache is not None:
            if slot is None:
                raise ValueError("a cached forward pass needs the loop index of every step")
            k, v = ctx.cache.update(slot, k, v)
        y = attend(q, k, v, ctx.masks["full_attention"])
        return self.proj(y.transpose(1, 2).reshape(batch, seq, -1))


class HuginnMLP(nn.Module):
    """``proj(silu(a) * b)`` with ``(a, b)`` the two halves of ``fc(x)``."""

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, S, d) -> (B, S, d)."""
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


class SandwichBlock(nn.Module):
    """``h = N2(Attn(N1(x)) + x)``, ``out = N4(MLP(N3(h)) + h)``."""

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        d, eps = config.n_embd, config.norm_eps
        self.norm_1 = RMSNorm(d, eps)
        self.attn = HuginnAttention(config)
        self.norm_2 = RMSNorm(d, eps)
        self.mlp = HuginnMLP(config)
        self.norm_3 = RMSNorm(d, eps)
        self.norm_4 = RMSNorm(d, eps)

    def forward(self, x: Tensor, ctx: Context, slot: object | None) -> Tensor:
        """(B, S, d) -> (B, S, d)."""
        h = self.norm_2(self.attn(self.norm_1(x), ctx, slot) + x)
        return self.norm_4(self.mlp(self.norm_3(h)) + h)


class HuginnTransformer(nn.Module):
    """The parameters under upstream's ``transformer.`` prefix."""

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.wte = nn.Embedding(config.padded_vocab_size, d)
        self.prelude = nn.ModuleList(
            SandwichBlock(config) for _ in range(config.n_layers_in_prelude)
        )
        self.adapter = nn.Linear(2 * d, d, bias=config.bias)
        self.core_block = nn.ModuleList(
            SandwichBlock(config) for _ in range(config.n_layers_in_recurrent_block)
        )
        self.coda = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_coda))
        self.ln_f = RMSNorm(d, config.norm_eps)


class HuginnForCausalLM(GenerationMixin, SaveMixin, PretrainedLoopedLM):
    """A Huginn checkpoint as a looped LM (see the module docstring).

    Example:
        >>> from eqloop.pretrained import HuginnConfig, HuginnForCausalLM
        >>> cfg = HuginnConfig(n_embd=32, n_heads=4, num_key_value_heads=4, n_layers=4,
        ...                    n_layers_in_prelude=1, n_layers_in_recurrent_block=2,
        ...                    n_layers_in_coda=1, intermediate_size=48, vocab_size=64,
        ...                    padded_vocab_size=64, block_size=64, mean_recurrence=4)
        >>> model = HuginnForCausalLM(cfg).eval()
        >>> model(torch.randint(0, 64, (2, 5)), loops=3, init_scale=0.0).shape
        torch.Size([2, 5, 64])
    """

    stage_options = ("attention_mask", "init_scale", "generator")

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        if not isinstance(config, HuginnConfig):
            raise TypeError(f"config must be a HuginnConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.generation_config: dict = {}  # generation_config.json, kept for saving
        self.transformer = HuginnTransformer(config)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        )

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random weights like upstream's scheme: truncated normals with
        ``init_values.std`` (``out_proj`` for the output projections), unit norms."""
        values = self.config.init_values or {}
        std = self.config.init_std
        out_std = float(values.get("out_proj", std))
        with torch.no_grad():
            for name, param in self.named_parameters():
                if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                    param.fill_(1.0)
                elif name.endswith("qk_bias") or name.endswith(".bias"):
                    param.zero_()
                else:
                    scale = (
                        out_std
                        if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight")
                        else std
                    )
                    _trunc_normal_(param, scale, generator)

    # ------------------------------------------------------------------- the stages

    def _embedding(self) -> nn.Embedding:
        return self.transformer.wte

    def _rope_base(self) -> float:
        return self.config.rope_base

    def _inject(self, tokens: Tensor, ctx: Context) -> Tensor:
        h = ctx.zero_padding(self.transformer.wte(tokens) * self.config.embed_scale)
        for i, block in enumerate(self.transformer.prelude):
            h = ctx.zero_padding(block(h, ctx, ("prelude", i)))
        return h

    def _initial_state(
        self, x: Tensor, ctx: Context, init_scale: float | None, generator: torch.Generator | None
    ) -> Tensor:
        scale = 1.0 if init_scale is None else checks.number("init_scale", init_scale, low=0.0)
        if scale == 0.0:
            return torch.zeros_like(x)
        std = self.config.init_std * scale
        state = torch.empty_like(x)
        _trunc_normal_(state, std, generator)
        return ctx.zero_padding(state * self.config.embed_scale)

    def _core(self, z: Tensor, x: Tensor, ctx: Context, loop: int | None = None) -> Tensor:
        # Zero padded positions as Ouro's core does (a tangent there overflows float16).
        h = self.transformer.adapter(torch.cat((ctx.zero_padding(z), x), dim=-1))
        for j, block in enumerate(self.transformer.core_block):
            h = block(h, ctx, None if loop is None else (loop, j))
        return ctx.zero_padding(h)

    def head(self, h: Tensor) -> Tensor:
        """``lm_head(h)`` (the embedding matrix when tied): (B, S, d) -> (B, S, V)."""
        if self.lm_head is None:
            return F.linear(h, self.transformer.wte.weight)
        return self.lm_head(h)

    def _readout(self, z: Tensor, ctx: Context) -> Tensor:
        h = self.transformer.ln_f(z)
        for i, block in enumerate(self.transformer.coda):
            h = block(h, ctx, ("coda", i))
        return self.head(self.transformer.ln_f(h))


def _trunc_normal_(t: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """Fill ``t`` in place with N(0, std^2) truncated at +-3 std (upstream's state init).

    Eager: torch's rejection sampler. While ``torch.compile`` traces, whose graphs cannot
    hold that sampler's host reads and data-dependent loop, the same distribution by
    inverse CDF: ``u`` uniform between the CDF values of -3 and 3, ``std * sqrt(2) *
    erfinv(2u - 1)``.
    """
    if torch.compiler.is_compiling():
        edge = math.erf(3 / math.sqrt(2))  # 2 * CDF(3) - 1
        with torch.no_grad():
            t.uniform_(-edge, edge, generator=generator).erfinv_().mul_(std * math.sqrt(2))
            return t.clamp_(-3 * std, 3 * std)
    with torch.no_grad():
        return nn.init.trunc_normal_(
            t, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator
        )
