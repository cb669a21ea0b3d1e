"""Configurations of the supported public looped LMs, read from a checkpoint's config.json.

Each architecture has a dataclass with one field per upstream key that changes the
computation; the names are upstream's, so ``config.json`` maps onto it key by key.
Reading is strict: a value eqloop does not implement (a rope scaling, another injection
type, test-time noise, ...) raises ``ValueError`` naming the key, and so does a key
eqloop does not know unless the caller passes ``strict=False``. Keys that describe the
checkpoint rather than the computation (``architectures``, ``auto_map``, token ids,
initialisation settings, ...) are kept verbatim in ``extra`` and written back on save,
so a config survives a load/save round trip unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from solvers import checks

__all__ = ["ARCHITECTURES", "HuginnConfig", "OuroConfig", "config_from_dict"]

# Keys that never change what the model computes; kept verbatim for the round trip.
_METADATA_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "bos_token_id",
        "dtype",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "tokenizer_class",
        "name",
        "hf_config",
    }
)


def _check_int(cls_name: str, key: str, value: Any, low: int) -> int:
    return checks.integer(f"{cls_name}.{key}", value, low=low)


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

    _optional: ClassVar[tuple[str, ...]] = ("head_dim", "early_exit_step", "layer_types")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError``/``TypeError`` naming the key."""
        name = "OuroConfig"
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
            _check_int(name, key, getattr(self, key), 1)
        if self.head_dim is not None:
            _check_int(name, "head_dim", self.head_dim, 1)
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
        checks.choice(f"{name}.hidden_act", self.hidden_act, ("silu",))
        checks.number(f"{name}.rms_norm_eps", self.rms_norm_eps, low=0.0, low_open=True)
        checks.number(f"{name}.rope_theta", self.rope_theta, low=1.0, low_open=True)
        checks.number(
            f"{name}.attention_dropout", self.attention_dropout, low=0.0, high=1.0, high_open=True
        )
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
        checks.boolean(f"{name}.tie_word_embeddings", self.tie_word_embeddings)
        checks.boolean(f"{name}.use_sliding_window", self.use_sliding_window)
        if self.sliding_window is not None:
            _check_int(name, "sliding_window", self.sliding_window, 1)
        _check_int(name, "max_window_layers", self.max_window_layers, 0)
        if self.layer_types is not None:
            if (
                not isinstance(self.layer_types, list)
                or len(self.layer_types) != self.num_hidden_layers
            ):
                raise ValueError(
                    f"{name}.layer_types must be a list of num_hidden_layers="
                    f"{self.num_hidden_layers} entries, got {self.layer_types!r}"
                )
            for i, kind in enumerate(self.layer_types):
                checks.choice(
                    f"{name}.layer_types[{i}]", kind, ("full_attention", "sliding_attention")
                )
            if "sliding_attention" in self.layer_types and not (
                self.use_sliding_window and self.sliding_window is not None
            ):
                raise ValueError(
                    f"{name}.layer_types marks sliding-attention layers but use_sliding_window="
                    f"{self.use_sliding_window} and sliding_window={self.sliding_window}: set both "
                    "or mark every layer 'full_attention'"
                )
        if self.early_exit_threshold is not None:
            checks.number(
                f"{name}.early_exit_threshold", self.early_exit_threshold, low=0.0, high=1.0
            )
        if self.early_exit_step is not None:
            checks.integer(
                f"{name}.early_exit_step", self.early_exit_step, low=0, high=self.total_ut_steps - 1
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
    def layer_stacks(self) -> dict[str, tuple[str, int]]:
        """``{key prefix: (config key, layer count)}`` of the numbered layer lists."""
        return {"model.layers": ("num_hidden_layers", self.num_hidden_layers)}


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

    _optional: ClassVar[tuple[str, ...]] = ("head_dim", "init_values")
    # Upstream class names and training-only settings: any value is accepted and kept.
    _fixed: ClassVar[dict[str, str]] = {
        "block_class_name": "SandwichBlock",
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "norm_class_name": "RMSNorm_llama",
    }

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
            _check_int(name, key, getattr(self, key), 1)
        for key in ("n_layers", "n_layers_in_prelude", "n_layers_in_coda", "mean_backprop_depth"):
            _check_int(name, key, getattr(self, key), 0)
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


ARCHITECTURES: dict[str, type[OuroConfig] | type[HuginnConfig]] = {
    OuroConfig.model_type: OuroConfig,
    HuginnConfig.model_type: HuginnConfig,
}
"""Supported ``model_type`` values and their config classes."""

# Upstream aliases: HuginnConfig reads "num_attention_heads" as "n_heads".
_ALIASES: dict[str, dict[str, str]] = {"huginn_raven": {"num_attention_heads": "n_heads"}}
# Huginn keys that only steer training or initialisation: kept verbatim, never used.
_TRAINING_KEYS: dict[str, frozenset[str]] = {
    "ouro": frozenset(),
    "huginn_raven": frozenset(
        {
            "activation_checkpoint_impl",
            "architecture_class_name",
            "effective_expected_depth",
            "init_orthogonal",
            "init_strategy",
            "padding_multiple",
            "sampling_scheme",
        }
    ),
}


def config_from_dict(data: Mapping[str, Any], *, strict: bool = True) -> OuroConfig | HuginnConfig:
    """Build the config of ``data["model_type"]`` from a parsed config.json.

    Args:
        data: the JSON object.
        strict: raise on keys eqloop does not know; with ``False`` they are kept in
            ``extra`` (and written back on save) but not used.

    Raises:
        ValueError: missing or unsupported ``model_type``, an unknown key (when
            ``strict``), or a value eqloop does not implement.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"config.json must hold a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json; eqloop loads "
            f"{', '.join(repr(k) for k in ARCHITECTURES)}"
        )
    cls = ARCHITECTURES[model_type]
    names = {f.name for f in fields(cls)} - {"extra"}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    unknown: list[str] = []
    aliases = _ALIASES.get(model_type, {})
    for key, value in data.items():
        if key == "model_type":
            continue
        target = aliases.get(key, key)
        if target in names:
            if target in kwargs and kwargs[target] != value:
                raise ValueError(
                    f"config.json gives {target!r} twice with different values "
                    f"({kwargs[target]!r} and {key}={value!r})"
                )
            if target != key:
                extra[key] = value  # keep the alias spelling for the round trip
            kwargs[target] = value
        elif key in _METADATA_KEYS or key in _TRAINING_KEYS[model_type]:
            extra[key] = value
        elif key in getattr(cls, "_fixed", {}):
            expected = cls._fixed[key]  # type: ignore[attr-defined]
            if value != expected:
                raise ValueError(
                    f"config.json {key}={value!r} is not implemented by eqloop (only {expected!r})"
                )
            extra[key] = value
        elif strict:
            unknown.append(key)
        else:
            extra[key] = value
    if unknown:
        raise ValueError(
            f"config.json has keys eqloop does not know for model_type {model_type!r}: "
            f"{sorted(unknown)}. If they do not change the architecture, load with "
            "strict_config=False (they are kept and written back on save)"
        )
    return cls(**kwargs, extra=extra)


def config_to_dict(config: OuroConfig | HuginnConfig) -> dict[str, Any]:
    """The config as a config.json object: upstream keys, metadata kept from loading.

    Optional keys that are ``None`` (``head_dim``, ...) are left out, as upstream code
    reads them with a default when absent.
    """
    out: dict[str, Any] = dict(config.extra)
    aliases = {v: k for k, v in _ALIASES.get(config.model_type, {}).items() if k in config.extra}
    for f in fields(config):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        if value is None and f.name in config._optional:
            continue
        out[f.name] = value
        if f.name in aliases:
            out[aliases[f.name]] = value
    out["model_type"] = config.model_type
    return out
