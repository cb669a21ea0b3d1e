"""Ouro's ``config.json`` (``model_type: "ouro"``, Qwen2-style keys).

One field per upstream key that changes the computation, named as upstream names it, so
``config.json`` maps onto it key by key; reading and writing are shared
(:func:`eqloop.models.config.config_from_dict` / ``config_to_dict``), and the
class-level tables below tell them what is special about this architecture's keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from solvers import checks

__all__ = ["OuroConfig"]

_NAME = "OuroConfig"  # how the error messages name this config


@dataclass
class OuroConfig:
    """An Ouro checkpoint's ``config.json`` (``model_type: "ouro"``, Qwen2-style keys)."""

    model_type: ClassVar[str] = "ouro"

    vocab_size: int = 49152  # rows of embed_tokens and of lm_head
    hidden_size: int = 2048  # width d of the residual stream (the looped state z)
    intermediate_size: int = 5632  # hidden width of the SwiGLU MLP
    num_hidden_layers: int = 24  # decoder layers; one loop applies all of them
    num_attention_heads: int = 16  # query heads
    num_key_value_heads: int = 16  # key/value heads (fewer than query heads: GQA)
    head_dim: int | None = None  # per-head width; None means hidden_size // heads
    hidden_act: str = "silu"  # MLP activation; only "silu" exists in Ouro
    max_position_embeddings: int = 65536  # longest sequence the rotary table is meant for
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    rope_theta: float = 1_000_000.0  # rotary base
    rope_scaling: dict[str, Any] | None = None  # only None / {"rope_type": "default"}
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens (no lm_head.weight saved)
    use_sliding_window: bool = False  # layers marked "sliding_attention" use a window
    sliding_window: int | None = None  # window width w: query i sees keys in (i - w, i]
    max_window_layers: int = 28  # Qwen2 rule for layer_types when those are not given
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"
    attention_dropout: float = 0.0  # dropout on attention weights in training
    total_ut_steps: int = 4  # loops the model was trained with (its default depth)
    early_exit_threshold: float | None = 1.0  # upstream's default cumulative exit threshold
    early_exit_step: int | None = None  # upstream's default forced exit loop (0-based)
    extra: dict[str, Any] = field(default_factory=dict)  # metadata keys, kept verbatim

    # Optional keys left out of config.json when None (upstream reads them with a default).
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = ("head_dim", "early_exit_step", "layer_types")
    # Upstream spellings read as another field ({json key: field}); Ouro has none.
    ALIASES: ClassVar[dict[str, str]] = {}
    # Keys that only steer training or initialisation: kept verbatim, never used.
    TRAINING_KEYS: ClassVar[frozenset[str]] = frozenset()
    # Upstream class names: only this value is implemented, kept verbatim.
    FIXED_KEYS: ClassVar[dict[str, str]] = {}
    # Prefix of the parameters under the head (upstream's base_model_prefix).
    BASE_MODEL_PREFIX: ClassVar[str] = "model"
    # Upstream's class name, written to config.json["architectures"] when absent.
    UPSTREAM_ARCHITECTURE: ClassVar[str] = "OuroForCausalLM"
    # Tensors upstream files may carry that eqloop recomputes instead of loading.
    RECOMPUTED_KEYS: ClassVar[tuple[str, ...]] = ()

    # Architecture keys of the tiny model ``write_tiny_checkpoint`` writes (tests, docs).
    TINY_DEFAULTS: ClassVar[dict[str, Any]] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }

    @classmethod
    def tiny_dict(cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The config.json object of a tiny model: :attr:`TINY_DEFAULTS` with ``overrides``."""
        return {"model_type": cls.model_type, **cls.TINY_DEFAULTS, **overrides}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError``/``TypeError`` naming the key."""
        name = _NAME
        self._validate_sizes()
        checks.choice(f"{name}.hidden_act", self.hidden_act, ("silu",))
        checks.number(f"{name}.rms_norm_eps", self.rms_norm_eps, low=0.0, low_open=True)
        checks.number(f"{name}.rope_theta", self.rope_theta, low=1.0, low_open=True)
        checks.number(
            f"{name}.attention_dropout", self.attention_dropout, low=0.0, high=1.0, high_open=True
        )
        self._validate_rope_scaling()
        checks.boolean(f"{name}.tie_word_embeddings", self.tie_word_embeddings)
        self._validate_attention_kinds()
        if self.early_exit_threshold is not None:
            checks.number(
                f"{name}.early_exit_threshold", self.early_exit_threshold, low=0.0, high=1.0
            )
        if self.early_exit_step is not None:
            checks.integer(
                f"{name}.early_exit_step", self.early_exit_step, low=0, high=self.total_ut_steps - 1
            )

    def _validate_sizes(self) -> None:
        """Check the sizes and head counts (and that they fit together) of :meth:`validate`."""
        name = _NAME
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "total_ut_steps",
        ):
            checks.integer(f"{name}.{key}", getattr(self, key), low=1)
        if self.head_dim is not None:
            checks.integer(f"{name}.head_dim", self.head_dim, low=1)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{name}: num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{name}: num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size}) when head_dim is not given"
            )
        if self.head_size % 2:
            raise ValueError(
                f"{name}: rotary embeddings need an even head_dim, got {self.head_size}"
            )

    def _validate_rope_scaling(self) -> None:
        """Check ``rope_scaling`` of :meth:`validate`: only plain rotary embeddings."""
        name = _NAME
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Mapping):
            raise TypeError(
                f"{name}.rope_scaling must be null or an object such as "
                f'{{"rope_type": "default"}}, got {self.rope_scaling!r}'
            )
        if self.rope_scaling is not None and dict(self.rope_scaling) not in (
            {"rope_type": "default"},
            {"type": "default"},
        ):
            raise ValueError(
                f"{name}.rope_scaling={self.rope_scaling!r} is not implemented by eqloop "
                "(only plain rotary embeddings, rope_scaling=null); loading it would give a "
                "different model"
            )

    def _validate_attention_kinds(self) -> None:
        """Check the sliding-window keys and ``layer_types`` of :meth:`validate`."""
        name = _NAME
        checks.boolean(f"{name}.use_sliding_window", self.use_sliding_window)
        if self.sliding_window is not None:
            checks.integer(f"{name}.sliding_window", self.sliding_window, low=1)
        checks.integer(f"{name}.max_window_layers", self.max_window_layers, low=0)
        if self.layer_types is None:
            return
        if (
            not isinstance(self.layer_types, list)
            or len(self.layer_types) != self.num_hidden_layers
        ):
            raise ValueError(
                f"{name}.layer_types must be a list of num_hidden_layers="
                f"{self.num_hidden_layers} entries, got {self.layer_types!r}"
            )
        for i, kind in enumerate(self.layer_types):
            checks.choice(f"{name}.layer_types[{i}]", kind, ("full_attention", "sliding_attention"))
        if "sliding_attention" in self.layer_types and not (
            self.use_sliding_window and self.sliding_window is not None
        ):
            raise ValueError(
                f"{name}.layer_types marks sliding-attention layers but use_sliding_window="
                f"{self.use_sliding_window} and sliding_window={self.sliding_window}: set both "
                "or mark every layer 'full_attention'"
            )

    @property
    def head_size(self) -> int:
        """Per-head width: ``head_dim`` if given, else ``hidden_size // num_attention_heads``."""
        return (
            self.head_dim
            if self.head_dim is not None
            else self.hidden_size // self.num_attention_heads
        )

    @property
    def attention_kinds(self) -> list[str]:
        """Per layer "full_attention" or "sliding_attention" (Qwen2's rule when not given)."""
        if self.layer_types is not None:
            return list(self.layer_types)
        sliding = self.use_sliding_window and self.sliding_window is not None
        return [
            "sliding_attention" if sliding and i >= self.max_window_layers else "full_attention"
            for i in range(self.num_hidden_layers)
        ]

    @property
    def trained_loops(self) -> int:
        """The loop count the checkpoint was trained with (``total_ut_steps``)."""
        return self.total_ut_steps

    @property
    def tied_head(self) -> tuple[str, str] | None:
        """``(head key, embedding key)`` when ``tie_word_embeddings``, else ``None``."""
        return ("lm_head.weight", "model.embed_tokens.weight") if self.tie_word_embeddings else None

    @property
    def layer_stacks(self) -> dict[str, tuple[str, int]]:
        """``{key prefix: (config key, layer count)}`` of the numbered layer lists."""
        return {"model.layers": ("num_hidden_layers", self.num_hidden_layers)}
