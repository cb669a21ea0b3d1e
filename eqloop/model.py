"""The looped language model: a decoder-only transformer whose middle is a recurrent core.

Data flow (B = batch, S = sequence length, d = ``d_model``, V = ``vocab_size``)::

    tokens (B, S) -> embedding -> prelude blocks -> x (B, S, d)          LoopLM.inject
                                        z0 (B, S, d)                     LoopLM.initial_state
    z_{t+1} = f(z_t; x) = core_blocks(inject(z_t, x))  for t < T         LoopLM.core_step
        or  z* = fixed_point(f, z0)                                       (equilibrium mode)
    z_T (B, S, d) -> coda blocks -> final norm -> tied head -> logits (B, S, V)   LoopLM.readout

The file reads top to bottom: the config, the blocks, the model. The loop itself (unrolled,
early exit, equilibrium) is the protocol every looped LM shares, in :mod:`eqloop.looped`;
``model.core_map(tokens)`` hands out ``f``, the one object the solvers, the backward
modes, the spectral-radius estimator and the benchmarks share.

Higher-order autodiff: PyTorch's fused CPU attention kernel has no double backward and no
forward-mode derivative (torch 2.13), so anything that differentiates a gradient (the STARS
penalty, ``torch.autograd.functional.jvp``, ``torch.func.jvp``) must run the forward pass
inside :func:`sdpa_math`, which selects the math attention kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from eqloop.config import ConfigBase
from eqloop.files import atomic_path, read_json, staged_directory, write_json_atomic
from eqloop.looped import LoopedLM
from solvers import checks

__all__ = [
    "INIT_STATES",
    "INJECTIONS",
    "NORMS",
    "NORM_PLACEMENTS",
    "POSITIONS",
    "Block",
    "CausalSelfAttention",
    "LoopLM",
    "LoopLMConfig",
    "Rotary",
    "apply_rotary",
    "rotary_tables",
    "sdpa_math",
]

POSITIONS = ("learned", "rope")
INJECTIONS = ("add", "concat", "none")
INIT_STATES = ("zeros", "input", "random")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post", "pre_sandwich", "post_sandwich")

_NORM_EPS = 1e-5
_CONFIG_FILE = "config.json"  # the files of LoopLM.save_pretrained (Hugging Face layout)
_WEIGHTS_FILE = "model.safetensors"


# ----------------------------------------------------------------------------- config


@dataclass
class LoopLMConfig(ConfigBase):
    """Hyperparameters of a :class:`LoopLM`. Defaults follow the STARS addition setup.

    ``to_dict``/``from_dict`` (unknown keys are errors naming them) come from
    :class:`eqloop.training.config.ConfigBase`; a config is validated when it is made.
    """

    # config.json's model_type in LoopLM.save_pretrained's directory (as OuroConfig's "ouro")
    model_type: ClassVar[str] = "looplm"

    vocab_size: int = 32  # number of token ids; set it from the tokenizer
    d_model: int = 512  # width of the residual stream and of the recurrent state z
    n_heads: int = 8  # attention heads; must divide d_model
    d_ff: int = 1024  # hidden width of the MLP
    dropout: float = 0.0  # dropout on embeddings, attention weights and sublayer outputs
    max_seq_len: int = 64  # longest sequence accepted (size of the position tables)
    positions: str = "learned"  # "learned" absolute embeddings | "rope" rotary in attention
    rope_base: float = 10000.0  # rotary base frequency (theta); used when positions="rope"
    n_prelude: int = 0  # blocks applied once before the loop: embedding -> x
    n_core: int = 1  # blocks in the shared recurrent core, applied `loops` times
    n_coda: int = 0  # blocks applied once after the loop: z -> final norm -> head
    # How x enters every loop: "add" z + x | "concat" W[z; x] (Huginn) | "none": f(z) = core(z),
    # the input only sets z0 = x (the STARS paper's and Ouro's loop).
    injection: str = "add"
    # z0: "zeros" | "input" (z0 = x) | "random" N(0, init_std^2); None picks "input" for
    # injection="none" (the only start through which the input reaches the loop), else "zeros".
    init_state: str | None = None
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    # Where the norms sit in each sublayer (see Sublayer); the paper's names: "pre" pre_norm,
    # "post" post_norm, "pre_sandwich" sandwich_branch, "post_sandwich" sandwich_dual (STARS).
    norm_placement: str = "post_sandwich"
    bias: bool = True  # biases in Linear layers and LayerNorms
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    default_loops: int = 8  # loops used by forward() when `loops` is not given
    init_std: float = 0.02  # std of the normal init of Linear and Embedding weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_state is None:
            self.init_state = "input" if self.injection == "none" else "zeros"
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``TypeError``/``ValueError`` naming the field."""
        for name, low in (
            ("vocab_size", 1),
            ("d_model", 1),
            ("n_heads", 1),
            ("d_ff", 1),
            ("max_seq_len", 1),
            ("n_prelude", 0),
            ("n_core", 1),
            ("n_coda", 0),
            ("default_loops", 0),
        ):
            checks.integer(f"LoopLMConfig.{name}", getattr(self, name), low=low)
        for name, choices in (
            ("positions", POSITIONS),
            ("injection", INJECTIONS),
            ("init_state", INIT_STATES),
            ("norm", NORMS),
            ("norm_placement", NORM_PLACEMENTS),
        ):
            checks.choice(f"LoopLMConfig.{name}", getattr(self, name), choices)
        for name in ("bias", "tie_embeddings"):
            checks.boolean(f"LoopLMConfig.{name}", getattr(self, name))
        checks.number("LoopLMConfig.dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        checks.number("LoopLMConfig.init_std", self.init_std, low=0.0, low_open=True)
        checks.number("LoopLMConfig.rope_base", self.rope_base, low=1.0, low_open=True)
        if self.injection == "none" and self.init_state != "input":
            raise ValueError(
                "LoopLMConfig.injection='none' needs init_state='input' (or None): without "
                f"injection the input reaches the loop only through z0 = x, got "
                f"init_state={self.init_state!r}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LoopLMConfig.n_heads ({self.n_heads}) must divide d_model ({self.d_model})"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(
                "LoopLMConfig.positions='rope' needs an even head size d_model // n_heads, got "
                f"{self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads


# ------------------------------------------------------------------------ building blocks


def rotary_tables(
    seq_len: int, head_dim: int, base: float, *, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cosines and sines of the rotary angles ``pos * base^(-2i / head_dim)``.

    Computed in float64 for float64 tables and in float32 otherwise, then cast to ``dtype``.

    Returns:
        ``(cos, sin)``, each of shape (seq_len, head_dim // 2).
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=work) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=work), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs ``(x_i, x_{i + e/2})`` of every position by its angle.

    Args:
        x: (..., S, e) queries or keys, ``e`` even.
        cos, sin: (S, e // 2) from :func:`rotary_tables`.

    Returns:
        (..., S, e), the rotated features; dot products between rotated queries and keys
        depend only on the distance between their positions.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Rotary(nn.Module):
    """The rotary tables of positions ``0 .. max_seq_len - 1``, built once.

    They are non-persistent buffers, so they follow ``.to()``; after every move or cast
    they are recomputed on the new device in the new dtype, so a float64 model has
    float64-accurate tables whatever dtype it was built in.
    """

    def __init__(self, config: LoopLMConfig) -> None:
        super().__init__()
        self.table_args = (config.max_seq_len, config.head_dim, config.rope_base)
        cos, sin = rotary_tables(
            *self.table_args, device=torch.device("cpu"), dtype=torch.get_default_dtype()
        )
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Rotary:
        super()._apply(fn, recurse)
        self.cos, self.sin = rotary_tables(
            *self.table_args, device=self.cos.device, dtype=self.cos.dtype
        )
        return self

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of the first ``seq_len`` positions, each (seq_len, head_dim // 2)."""
        return self.cos[:seq_len], self.sin[:seq_len]


def _make_norm(config: LoopLMConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, eps=_NORM_EPS, bias=config.bias)
    return nn.RMSNorm(config.d_model, eps=_NORM_EPS)


@contextmanager
def sdpa_math() -> Iterator[None]:
    """Run attention with the math kernel so that higher-order derivatives work.

    The fused CPU kernel behind ``F.scaled_dot_product_attention`` implements only a first
    backward. Forward passes run inside this context record plain softmax(QK^T)V ops, so
    ``torch.autograd.grad(..., create_graph=True)`` followed by a second backward, and
    forward-mode AD (JVPs), work through them. Only the forward pass needs to be inside.

    Example:
        >>> with sdpa_math():                                    # doctest: +SKIP
        ...     fz = f(z)
        >>> (vjp,) = torch.autograd.grad(fz, z, v, create_graph=True)  # doctest: +SKIP
        >>> vjp.pow(2).sum().backward()                          # doctest: +SKIP
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: LoopLMConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, S, d) -> (B, S, d); ``rope`` is ``(cos, sin)`` of shape (S, head_dim // 2)."""
        q, k, v = rearrange(self.qkv(x), "b s (qkv h e) -> qkv b h s e", qkv=3, h=self.n_heads)
        if rope is not None:
            cos, sin = (table.to(q.dtype) for table in rope)  # a no-op outside autocast
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_dropout(self.proj(rearrange(y, "b h s e -> b s (h e)")))


class MLP(nn.Module):
    """Position-wise feed-forward layer d -> d_ff -> d with a GELU."""

    def __init__(self, config: LoopLMConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc_out = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, S, d) -> (B, S, d)."""
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x))))


class Sublayer(nn.Module):
    """A residual sublayer ``fn`` wrapped with the configured norm placement.

    ============== ====================== ====================
    placement      output                 norms
    ============== ====================== ====================
    pre            x + fn(N(x))           norm_in
    post           N(x + fn(x))           norm_out
    pre_sandwich   x + N'(fn(N(x)))       norm_in, norm_out
    post_sandwich  N'(x + fn(N(x)))       norm_in, norm_out
    ============== ====================== ====================
    """

    def __init__(self, fn: nn.Module, config: LoopLMConfig) -> None:
        super().__init__()
        self.placement = config.norm_placement
        self.fn = fn
        self.norm_in = _make_norm(config) if self.placement != "post" else None
        self.norm_out = _make_norm(config) if self.placement != "pre" else None

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        """(B, S, d) -> (B, S, d); extra ``args`` go to ``fn``."""
        h = self.fn(x if self.norm_in is None else self.norm_in(x), *args)
        if self.placement == "pre":
            return x + h
        if self.placement == "pre_sandwich":
            return x + self.norm_out(h)
        return self.norm_out(x + h)  # post, post_sandwich


class Block(nn.Module):
    """Transformer block: attention sublayer then MLP sublayer, each with its own norms."""

    def __init__(self, config: LoopLMConfig) -> None:
        super().__init__()
        self.attn = Sublayer(CausalSelfAttention(config), config)
        self.mlp = Sublayer(MLP(config), config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, S, d) -> (B, S, d)."""
        return self.mlp(self.attn(x, rope))


class Injection(nn.Module):
    """Combine the state z with the input x before the core: ``z + x``, ``W [z; x]`` or ``z``."""

    def __init__(self, config: LoopLMConfig) -> None:
        super().__init__()
        self.mode = config.injection
        self.adapter = (
            nn.Linear(2 * config.d_model, config.d_model, bias=config.bias)
            if self.mode == "concat"
            else None
        )

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """z, x: (B, S, d) -> (B, S, d)."""
        if self.mode == "none":
            return z
        if self.adapter is None:
            return z + x
        return self.adapter(torch.cat((z, x), dim=-1))


# ------------------------------------------------------------------------------ the model


class LoopLM(LoopedLM):
    """Decoder-only LM: embedding -> prelude -> recurrent core x T (or to equilibrium) -> coda.

    The stages are below; ``forward``, ``core_map`` and ``unroll`` come from
    :class:`~eqloop.looped.LoopedLM`. Every method is batched over sequences and never
    mixes them, so a solver may drop converged sequences from the batch.

    Example:
        >>> model = LoopLM(LoopLMConfig(vocab_size=16, d_model=32, n_heads=2, d_ff=64))
        >>> tokens = torch.randint(0, 16, (4, 8))
        >>> model(tokens, loops=3).shape
        torch.Size([4, 8, 16])
    """

    def __init__(self, config: LoopLMConfig) -> None:
        super().__init__()
        config.validate()  # catches fields changed after construction
        self.config = replace(config)  # a private copy: later edits do not reach the model
        c = self.config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model) if c.positions == "learned" else None
        self.rotary = Rotary(c) if c.positions == "rope" else None
        self.emb_dropout = nn.Dropout(c.dropout)
        self.prelude = nn.ModuleList(Block(c) for _ in range(c.n_prelude))
        self.injection = Injection(c)
        self.core = nn.ModuleList(Block(c) for _ in range(c.n_core))
        self.coda = nn.ModuleList(Block(c) for _ in range(c.n_coda))
        self.final_norm = _make_norm(c)
        # Tied: the head is F.linear with tok_emb.weight, so no parameter is stored twice
        # (keeps state_dict free of shared tensors, which safetensors refuses).
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    @property
    def default_loops(self) -> int:
        """``config.default_loops``."""
        return self.config.default_loops

    def num_parameters(self) -> int:
        """Number of trainable scalars (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    # -- the model directory (Hugging Face layout) ---------------------------------------

    def save_pretrained(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the model as a directory in the layout of Ouro's and Huginn's checkpoints.

        ``config.json`` holds ``model_type: "looplm"``, the :class:`LoopLMConfig` fields and
        the weights' ``torch_dtype``; ``model.safetensors`` the state dict. Load it with
        :func:`eqloop.pretrained.load` (or :meth:`from_pretrained`). The directory is
        written beside ``path`` and renamed into place (:func:`eqloop.files.staged_directory`),
        so it appears whole or not at all. Training state (optimizer, step) is not saved:
        it lives in the run's step checkpoints (:mod:`eqloop.checkpoint`).

        Args:
            path: the directory (created with its parents).
            overwrite: replace the whole directory if it exists and is not empty.

        Returns:
            The directory.

        Raises:
            FileExistsError: ``path`` is a file, or a non-empty directory without
                ``overwrite``.
        """
        from safetensors.torch import save_file

        checks.boolean("overwrite", overwrite)
        directory = Path(path)
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(f"{str(directory)!r} exists and is not a directory")
        if directory.is_dir() and any(directory.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{str(directory)!r} is not empty; pass overwrite=True to replace it"
            )
        weights = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        dtype = str(self.tok_emb.weight.dtype).removeprefix("torch.")
        config = {"model_type": self.config.model_type, "torch_dtype": dtype}
        config.update(self.config.to_dict())
        with staged_directory(directory) as staging:
            with atomic_path(staging / _WEIGHTS_FILE) as tmp:
                save_file(weights, str(tmp), metadata={"format": "pt"})
            write_json_atomic(staging / _CONFIG_FILE, config)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> LoopLM:
        """Load a directory written by :meth:`save_pretrained`, in eval mode.

        Args:
            path: the directory (``config.json`` and ``model.safetensors``).
            dtype: parameter dtype; None keeps the saved one.
            device: where the parameters go (default CPU).

        Raises:
            FileNotFoundError: no ``config.json`` or ``model.safetensors``.
            ValueError: a file eqloop cannot use, named in the message with the key: not
                JSON, another ``model_type``, unknown or invalid config fields, damaged
                weights, or weights that do not fit the config.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        directory = Path(path)
        config_file, weights_file = directory / _CONFIG_FILE, directory / _WEIGHTS_FILE
        for file in (config_file, weights_file):
            if not file.is_file():
                raise FileNotFoundError(f"{file} does not exist: not a saved LoopLM directory")
        data = read_json(config_file)
        expected = LoopLMConfig.model_type
        if not isinstance(data, dict) or data.get("model_type") != expected:
            found = data.get("model_type") if isinstance(data, dict) else data
            raise ValueError(f"{config_file}: model_type must be {expected!r}, got {found!r}")
        fields = {k: v for k, v in data.items() if k not in ("model_type", "torch_dtype")}
        try:
            config = LoopLMConfig.from_dict(fields)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{config_file}: {err}") from None
        try:
            weights = load_file(str(weights_file))
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{weights_file} is not a readable safetensors file ({err}): it is truncated "
                "or damaged"
            ) from None
        model = cls(config)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
            raise ValueError(f"{weights_file} does not fit {config_file}: {err}") from None
        saved = weights["tok_emb.weight"].dtype
        return model.to(device=device or "cpu", dtype=dtype or saved).eval()

    # -- the stages ----------------------------------------------------------------------

    def inject(self, tokens: Tensor) -> Tensor:
        """Embed tokens and run the prelude.

        Args:
            tokens: (B, S) integer ids in [0, vocab_size), S <= max_seq_len.

        Returns:
            x: (B, S, d), the input injected into every loop.
        """
        self.check_tokens(tokens, self.config.vocab_size, self.config.max_seq_len)
        seq_len = tokens.shape[1]
        h = self.tok_emb(tokens.long())
        if self.pos_emb is not None:
            h = h + self.pos_emb(torch.arange(seq_len, device=tokens.device))
        h = self.emb_dropout(h)
        rope = self._rope(seq_len)
        for block in self.prelude:
            h = block(h, rope)
        return h

    def initial_state(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The state z0 the loop starts from, per ``config.init_state``.

        Args:
            x: (B, S, d) input injection.
            generator: random generator for ``init_state="random"`` (global RNG if None).

        Returns:
            z0: (B, S, d): zeros, ``x`` itself, or N(0, init_std^2) noise.
        """
        mode = self.config.init_state
        if mode == "zeros":
            return torch.zeros_like(x)
        if mode == "input":
            return x
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return noise * self.config.init_std

    def core_step(self, z: Tensor, x: Tensor) -> Tensor:
        """One application of the recurrent core: ``f(z; x) = core_blocks(inject(z, x))``.

        With ``injection="none"`` the map is ``core_blocks(z)`` and ``x`` only fixes the
        shape check (the input entered through ``z0 = x``). A pure function of ``(z, x)``
        (in eval mode or with dropout 0) that treats every sequence independently.

        Args:
            z: (B, S, d) current state.
            x: (B, S, d) input injection from :meth:`inject`.

        Returns:
            (B, S, d) the next state.
        """
        self._check_state("z", z)
        self._check_state("x", x, like=z)
        h = self.injection(z, x)
        rope = self._rope(z.shape[1])
        for block in self.core:
            h = block(h, rope)
        return h

    def readout(self, z: Tensor) -> Tensor:
        """Coda, final norm and LM head.

        Args:
            z: (B, S, d) final state.

        Returns:
            logits: (B, S, V).
        """
        self._check_state("z", z)
        rope = self._rope(z.shape[1])
        for block in self.coda:
            z = block(z, rope)
        z = self.final_norm(z)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(z, weight)

    # -- checks --------------------------------------------------------------------------

    def _rope(self, seq_len: int) -> tuple[Tensor, Tensor] | None:
        return None if self.rotary is None else self.rotary(seq_len)

    def _check_state(self, name: str, t: Tensor, like: Tensor | None = None) -> None:
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor")
        if t.dim() != 3 or t.shape[-1] != self.config.d_model:
            raise ValueError(
                f"{name} must have shape (batch, seq_len, d_model={self.config.d_model}), "
                f"got {tuple(t.shape)}"
            )
        if like is not None and t.shape != like.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but x has shape {tuple(like.shape)}"
            )
