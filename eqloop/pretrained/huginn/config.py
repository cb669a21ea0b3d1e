"""Huginn's ``config.json`` (``model_type: "huginn_raven"``), also the retrofitted-recurrence
checkpoints'.

One field per upstream key that changes the computation, named as upstream names it, so
``config.json`` maps onto it key by key; reading and writing are shared
(:func:`eqloop.pretrained.config.config_from_dict` / ``config_to_dict``), and the
class-level tables below tell them what is special about this architecture's keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from solvers import checks

__all__ = ["HuginnConfig"]


@dataclass
class HuginnConfig:
    """A Huginn / retrofitted-recurrence checkpoint's ``config.json`` (``"huginn_raven"``)."""

    model_type: ClassVar[str] = "huginn_raven"

    n_embd: int = 5280  # width d of the residual stream and of the recurrent state
    n_heads: int = 55  # query heads (upstream also spells it num_attention_heads)
    num_key_value_heads: int = 55  # key/value heads
    head_dim: int | None = None  # must equal n_embd // n_heads when given
    n_layers: int = 8  # prelude + recurrent block + coda
    n_layers_in_prelude: int = 2  # blocks applied once to the embeddings
    n_layers_in_recurrent_block: int = 4  # blocks of the shared core applied every step
    n_layers_in_coda: int = 2  # blocks applied once after the loop
    intermediate_size: int = 17920  # hidden width of the gated MLP
    vocab_size: int = 65536  # size of the tokenizer's vocabulary
    padded_vocab_size: int = 65536  # rows of wte / lm_head (>= vocab_size)
    block_size: int = 4096  # length of upstream's rotary table
    mean_recurrence: int = 32  # recurrent steps the model was trained around (its default)
    mean_backprop_depth: int = 8  # steps with gradient in upstream training
    injection_type: str = "linear"  # adapter(concat[state, embedding]); only "linear"
    state_init: str = "like-init"  # truncated-normal start state; only "like-init"
    qk_bias: bool = True  # learned per-head biases added to queries and keys
    rope_base: float = 50000.0  # rotary base (interleaved-pair convention)
    tie_embeddings: bool = True  # lm_head reuses wte (no lm_head.weight saved)
    bias: bool = False  # bias of the adapter
    norm_eps: float = 1e-6  # epsilon of every RMSNorm
    init_values: dict[str, float] | None = None  # {std, out_proj, embedding, embed_scale}
    test_time_noise: float = 0.0  # only 0 (no noise) is implemented
    test_time_noise_type: str = "fixed"  # irrelevant while test_time_noise is 0
    extra: dict[str, Any] = field(default_factory=dict)  # metadata keys, kept verbatim

    # Optional keys left out of config.json when None (upstream reads them with a default).
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = ("head_dim", "init_values")
    # Upstream spellings read as another field ({json key: field}).
    ALIASES: ClassVar[dict[str, str]] = {"num_attention_heads": "n_heads"}
    # Keys that only steer training or initialisation: kept verbatim, never used.
    TRAINING_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "activation_checkpoint_impl",
            "architecture_class_name",
            "effective_expected_depth",
            "init_orthogonal",
            "init_strategy",
            "padding_multiple",
            "sampling_scheme",
        }
    )
    # Prefix of the parameters under the head (upstream's base_model_prefix).
    BASE_MODEL_PREFIX: ClassVar[str] = "transformer"
    # Upstream's class name, written to config.json["architectures"] when absent.
    UPSTREAM_ARCHITECTURE: ClassVar[str] = "RavenForCausalLM"
    # Tensors upstream files may carry that eqloop recomputes instead of loading.
    RECOMPUTED_KEYS: ClassVar[tuple[str, ...]] = ("freqs_cis",)
    # Upstream class names: only this value is implemented, kept verbatim.
    FIXED_KEYS: ClassVar[dict[str, str]] = {
        "block_class_name": "SandwichBlock",
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "norm_class_name": "RMSNorm_llama",
    }

    # Architecture keys of the tiny model ``write_tiny_checkpoint`` writes (tests, docs).
    TINY_DEFAULTS: ClassVar[dict[str, Any]] = {
        "vocab_size": 128,
        "padded_vocab_size": 128,
        "n_embd": 32,
        "n_heads": 4,
        "num_key_value_heads": 4,
        "n_layers": 4,
        "n_layers_in_prelude": 1,
        "n_layers_in_recurrent_block": 2,
        "n_layers_in_coda": 1,
        "intermediate_size": 48,
        "block_size": 512,
        "mean_recurrence": 4,
        "mean_backprop_depth": 2,
        "rope_base": 10000.0,
        "qk_bias": True,
        "tie_embeddings": True,
    }

    @classmethod
    def tiny_dict(cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The config.json object of a tiny model: :attr:`TINY_DEFAULTS` with ``overrides``,
        upstream's "takase" ``init_values`` for its width and expected depth (unless given),
        and ``padded_vocab_size = vocab_size`` when only the latter is given."""
        data = {"model_type": cls.model_type, **cls.TINY_DEFAULTS, **overrides}
        if "init_values" not in overrides:
            depth = (
                data["n_layers_in_prelude"]
                + data["n_layers_in_coda"]
                + (data["n_layers_in_recurrent_block"] * data["mean_recurrence"])
            )
            std = math.sqrt(2 / (5 * data["n_embd"]))
            data["init_values"] = {
                "std": std,
                "out_proj": std / math.sqrt(2 * depth),
                "embedding": std,
                "embed_scale": math.sqrt(data["n_embd"]),
            }
        if "padded_vocab_size" not in overrides and "vocab_size" in overrides:
            data["padded_vocab_size"] = data["vocab_size"]
        return data

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError``/``TypeError`` naming the key."""
        name = "HuginnConfig"
        for key in (
            "n_embd",
            "n_heads",
            "num_key_value_heads",
            "n_layers_in_recurrent_block",
            "intermediate_size",
            "vocab_size",
            "padded_vocab_size",
            "block_size",
            "mean_recurrence",
        ):
            checks.integer(f"{name}.{key}", getattr(self, key), low=1)
        for key in ("n_layers", "n_layers_in_prelude", "n_layers_in_coda", "mean_backprop_depth"):
            checks.integer(f"{name}.{key}", getattr(self, key), low=0)
        total = self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda
        if self.n_layers != total:
            raise ValueError(
                f"{name}.n_layers={self.n_layers} but prelude + recurrent block + coda = {total}"
            )
        if self.n_embd % self.n_heads:
            raise ValueError(f"{name}: n_heads ({self.n_heads}) must divide n_embd ({self.n_embd})")
        if self.head_dim is not None and self.head_dim != self.n_embd // self.n_heads:
            raise ValueError(
                f"{name}.head_dim={self.head_dim} is not implemented: Huginn's attention uses "
                f"n_embd // n_heads = {self.n_embd // self.n_heads}"
            )
        if self.head_size % 2:
            raise ValueError(
                f"{name}: rotary embeddings need an even head_dim, got {self.head_size}"
            )
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(
                f"{name}: num_key_value_heads ({self.num_key_value_heads}) must divide n_heads "
                f"({self.n_heads})"
            )
        if self.qk_bias and self.num_key_value_heads != self.n_heads:
            raise ValueError(
                f"{name}: qk_bias with grouped-query attention (num_key_value_heads="
                f"{self.num_key_value_heads} < n_heads={self.n_heads}) is not defined upstream "
                "(the key bias has one row per query head)"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"{name}.padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size "
                f"({self.vocab_size})"
            )
        checks.choice(f"{name}.injection_type", self.injection_type, ("linear",))
        checks.choice(f"{name}.state_init", self.state_init, ("like-init",))
        for key in ("qk_bias", "tie_embeddings", "bias"):
            checks.boolean(f"{name}.{key}", getattr(self, key))
        checks.number(f"{name}.rope_base", self.rope_base, low=1.0, low_open=True)
        checks.number(f"{name}.norm_eps", self.norm_eps, low=0.0, low_open=True)
        noise = checks.number(f"{name}.test_time_noise", self.test_time_noise)
        if noise != 0.0:
            raise ValueError(
                f"{name}.test_time_noise={self.test_time_noise!r} is not implemented by eqloop "
                "(only 0, no noise)"
            )
        if self.init_values is not None:
            if not isinstance(self.init_values, Mapping):
                raise TypeError(f"{name}.init_values must be a mapping, got {self.init_values!r}")
            for key, value in self.init_values.items():
                checks.number(f"{name}.init_values[{key!r}]", value, low=0.0)

    @property
    def head_size(self) -> int:
        """Per-head width ``n_embd // n_heads``."""
        return self.n_embd // self.n_heads

    @property
    def embed_scale(self) -> float:
        """Factor on the embeddings and the initial state (``init_values.embed_scale``, sqrt(d))."""
        values = self.init_values or {}
        return float(values.get("embed_scale", math.sqrt(self.n_embd)))

    @property
    def init_std(self) -> float:
        """Std of the random initial state before ``embed_scale``: ``init_values.std``."""
        values = self.init_values or {}
        return float(values.get("std", math.sqrt(2 / (5 * self.n_embd))))

    @property
    def trained_loops(self) -> int:
        """The loop count the checkpoint was trained around (``mean_recurrence``)."""
        return self.mean_recurrence

    @property
    def tied_head(self) -> tuple[str, str] | None:
        """``(head key, embedding key)`` when ``tie_embeddings``, else ``None``."""
        return ("lm_head.weight", "transformer.wte.weight") if self.tie_embeddings else None

    @property
    def layer_stacks(self) -> dict[str, tuple[str, int]]:
        """``{key prefix: (config key, layer count)}`` of the numbered block lists."""
        return {
            "transformer.prelude": ("n_layers_in_prelude", self.n_layers_in_prelude),
            "transformer.core_block": (
                "n_layers_in_recurrent_block",
                self.n_layers_in_recurrent_block,
            ),
            "transformer.coda": ("n_layers_in_coda", self.n_layers_in_coda),
        }
