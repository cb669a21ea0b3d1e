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

Decoding (the base class's decode-step interface): ``exit="none"`` runs every step;
an exit criterion (:data:`HUGINN_EXITS`, :class:`ExitCriterion`) stops a new token's
loop once it holds (upstream's adaptive compute). Its state stays fixed while the rest
of the batch loops on, and the cache slots of the steps it skipped get the keys/values of
its last computed step (upstream's "latest" lookup rule), so later tokens attending to
it see what it computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eqloop.pretrained.base import DecodeOptions, PretrainedLoopedLM
from eqloop.pretrained.exits import check_exit
from eqloop.pretrained.generation import GenerationMixin
from eqloop.pretrained.huginn.config import HuginnConfig
from eqloop.pretrained.layers import (
    Context,
    KVCache,
    RMSNorm,
    attend,
    rotary_angles,
    rotate_interleaved_pairs,
)
from eqloop.pretrained.saving import SaveMixin
from solvers import checks

__all__ = ["HUGINN_EXITS", "ExitCriterion", "HuginnForCausalLM"]

HUGINN_EXITS: dict[str, float] = {
    "none": 0.0,
    "latent-diff": 0.03,
    "kl": 5e-4,
    "entropy-diff": 1e-3,
    "argmax-stability": 5,
}
"""Huginn's per-token exit criteria and their default thresholds (see ``ExitCriterion``)."""


class ExitCriterion:
    """Huginn's per-token exit test after every recurrent step (one new token per row).

    ``latent-diff``: ``||s_t - s_{t-1}|| / ||s_t|| < threshold``;
    ``kl``: ``KL(p_{t-1} || p_t) < threshold`` between the decoded distributions
    (p_0 uniform); ``entropy-diff``: ``|H(p_t) - H(p_{t-1})| < threshold`` (H_0 = 100);
    ``argmax-stability``: the argmax has not changed for ``threshold`` steps.
    """

    def __init__(self, name: str, threshold: float | None) -> None:
        criteria = [exit for exit in HUGINN_EXITS if exit != "none"]
        check_exit(name, threshold, HUGINN_EXITS, criteria)
        self.name = name
        default = HUGINN_EXITS[name]
        if name == "argmax-stability":
            value = default if threshold is None else threshold
            self.threshold: float = checks.integer("exit_threshold", value, low=1)
        else:
            value = default if threshold is None else threshold
            self.threshold = checks.number("exit_threshold", value, low=0.0)
        self.prev: Any = None
        self.count: Tensor | None = None

    @property
    def decodes(self) -> bool:
        """Whether the criterion needs the logits of every step."""
        return self.name in ("kl", "entropy-diff", "argmax-stability")

    def start(self, z0: Tensor, vocab: int) -> None:
        """Reset for a new token; ``z0``: (B, n, d) initial states."""
        batch = z0.shape[0]
        if self.name == "latent-diff":
            self.prev = z0
        elif self.name == "kl":
            self.prev = torch.full((batch, vocab), -math.log(vocab), device=z0.device)
        elif self.name == "entropy-diff":
            self.prev = torch.full((batch,), 100.0, device=z0.device)
        elif self.name == "argmax-stability":
            self.prev = torch.full((batch,), -1, dtype=torch.long, device=z0.device)
            self.count = torch.zeros(batch, dtype=torch.long, device=z0.device)

    def check(self, z: Tensor, logits: Tensor | None) -> Tensor:
        """(B,) bool: rows whose new token may stop. ``z``: (B, 1, d); ``logits``: (B, V)."""
        if self.name == "none":
            return torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        if self.name == "latent-diff":
            change = (z - self.prev).norm(dim=-1) / z.norm(dim=-1).clamp_min(
                torch.finfo(z.dtype).tiny
            )
            self.prev = z
            return change.mean(dim=1) < self.threshold
        log_p = F.log_softmax(logits.float(), dim=-1)
        if self.name == "kl":
            value = (self.prev.exp() * (self.prev - log_p)).sum(dim=-1)
            self.prev = log_p
            return value < self.threshold
        if self.name == "entropy-diff":
            entropy = -(log_p.exp() * log_p).sum(dim=-1)
            value = (entropy - self.prev).abs()
            self.prev = entropy
            return value < self.threshold
        top = logits.argmax(dim=-1)
        self.count = torch.where(top == self.prev, self.count + 1, torch.zeros_like(self.count))
        self.prev = top
        return self.count >= self.threshold


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

    def get_input_embeddings(self) -> nn.Embedding:
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

    def upstream_buffers(self) -> dict[str, Tensor]:
        """Upstream's persistent rotary table ``freqs_cis`` (block_size, head_dim / 2, 1, 2),
        written on save as upstream does (loading recomputes it instead)."""
        positions = torch.arange(self.config.block_size)[None]
        cos, sin = rotary_angles(positions, self.config.head_size, self.config.rope_base)
        return {"freqs_cis": torch.stack((cos, sin), dim=-1)[:, :, None].contiguous()}

    # ----------------------------------------------------------- decode-step interface

    def start_options(
        self, init_scale: float | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """``init_scale`` (default 0: the zero state, deterministic) and ``generator``."""
        return {"init_scale": 0.0 if init_scale is None else init_scale, "generator": generator}

    def decode_options(
        self,
        exit: str | None = None,
        exit_threshold: float | None = None,
        *,
        init_scale: float | None = None,
        use_cache: bool = True,
        compiled: bool = False,
    ) -> DecodeOptions:
        """``exit="none"`` (default) or an exit criterion of :data:`HUGINN_EXITS` (its
        default threshold filled in); a criterion needs the cache and cannot be compiled
        (the host decides after every step whether to go on)."""
        criterion = ExitCriterion("none" if exit is None else exit, exit_threshold)
        if not use_cache and criterion.name != "none":
            raise ValueError("Huginn's exit criteria need the cache (use_cache=True)")
        if compiled and criterion.name != "none":
            raise ValueError(
                f"compile does not apply to Huginn's exit={criterion.name!r}: the loop decides "
                "on the host after every step whether to go on; use exit='none' to compile"
            )
        threshold = None if criterion.name == "none" else criterion.threshold
        return DecodeOptions(criterion.name, threshold, init_scale)

    def decode_start(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        options: DecodeOptions,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The initial state (B, n, d) of the new tokens, drawn here, outside
        :meth:`decode_step`: a compiled step then holds no random draw (which
        ``torch.compile`` cannot capture with a generator) and draws the same numbers."""
        d = self.transformer.wte.weight.shape[1]
        like = self.transformer.wte.weight.new_empty(*tokens.shape, d)
        plain = self._context(*tokens.shape, tokens, attention_mask)  # no cache: padding only
        return self._initial_state(like, plain, options.init_scale, generator)

    def decode_step(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None,
        cache: KVCache,
        loops: int,
        options: DecodeOptions,
        start: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Every one of ``loops`` steps over the new tokens (B, n) from the initial state
        ``start`` (B, n, d): last-position logits (B, V) and steps run (B,)."""
        ctx = self._context(*tokens.shape, tokens, attention_mask, cache)
        x = self._inject(tokens, ctx)
        z = self._cached_loops(start, x, ctx, loops)
        used = torch.full((tokens.shape[0],), loops, device=tokens.device)
        return self._readout(z, ctx)[:, -1], used

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
        """The base class's cached call, except that one new token per row with an exit
        criterion loops until each row's criterion holds (host-side: the batch stops
        looping once every row exited)."""
        if options.exit == "none" or tokens.shape[1] > 1:
            return super().decode_call(
                tokens, attention_mask, cache, loops, options, generator, step
            )
        z0 = self.decode_start(tokens, attention_mask, options, generator)
        cache.reserve(1)
        ctx = self._context(*tokens.shape, tokens, attention_mask, cache)
        x = self._inject(tokens, ctx)
        criterion = ExitCriterion(options.exit, options.exit_threshold)
        z, used = self._adaptive_loops(z0, x, ctx, loops, criterion)
        logits = self._readout(z, ctx)[:, -1]
        cache.advance(1)
        return logits, used

    def _adaptive_loops(
        self, z: Tensor, x: Tensor, ctx: Context, loops: int, criterion: ExitCriterion
    ) -> tuple[Tensor, Tensor]:
        """Steps for one new token per row (z, x: (B, 1, d)) until each row's criterion
        holds (see the module docstring): the state (B, 1, d) and the steps run (B,)."""
        core_layers = len(self.transformer.core_block)
        active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        used = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        criterion.start(z, self.vocab_size)
        for t in range(loops):
            z_next = self._core(z, x, ctx, t)
            if t > 0:
                for j in range(core_layers):  # exited rows keep their last computed keys/values
                    ctx.cache.copy_rows((t, j), (t - 1, j), ~active, ctx.n_new)
            z = torch.where(active[:, None, None], z_next, z)
            used = used + active.long()
            logits = self._readout(z, ctx)[:, -1] if criterion.decodes else None
            active = active & ~criterion.check(z, logits)
            if not bool(active.any()):  # one host read per step: stop once every row exited
                everyone = torch.ones_like(active)
                for s in range(t + 1, loops):
                    for j in range(core_layers):
                        ctx.cache.copy_rows((s, j), (s - 1, j), everyone, ctx.n_new)
                break
        return z, used

    def decode_recompute(
        self,
        sequences: Tensor,
        attention_mask: Tensor | None,
        loops: int,
        options: DecodeOptions,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` over the whole ``sequences``, every step run."""
        logits = self(
            sequences,
            loops,
            attention_mask=attention_mask,
            init_scale=options.init_scale,
            generator=generator,
        )
        return logits[:, -1], torch.full((sequences.shape[0],), loops, device=sequences.device)


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
