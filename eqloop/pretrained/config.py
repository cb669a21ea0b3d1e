"""Reading and writing the config.json of every supported public looped LM.

Each architecture has a dataclass in its own folder (:mod:`eqloop.pretrained.ouro.config`,
:mod:`eqloop.pretrained.huginn.config`) with one field per upstream key that changes the
computation; the names are upstream's, so ``config.json`` maps onto it key by key. This
module holds what every architecture shares: the registry :data:`ARCHITECTURES`, and
:func:`config_from_dict` / :func:`config_to_dict`, which read each class's key tables
(``ALIASES``, ``TRAINING_KEYS``, ``FIXED_KEYS``, ``OPTIONAL_KEYS``).
Reading is strict: a value eqloop does not implement (a rope scaling, another injection
type, test-time noise, ...) raises ``ValueError`` naming the key, and so does a key
eqloop does not know unless the caller passes ``strict=False``. Keys that describe the
checkpoint rather than the computation (``architectures``, ``auto_map``, token ids,
initialisation settings, ...) are kept verbatim in ``extra`` and written back on save,
so a config survives a load/save round trip unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from eqloop.pretrained.huginn.config import HuginnConfig
from eqloop.pretrained.ouro.config import OuroConfig

__all__ = [
    "ARCHITECTURES",
    "HuginnConfig",
    "OuroConfig",
    "PretrainedConfig",
    "config_from_dict",
    "config_to_dict",
]

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


PretrainedConfig = OuroConfig | HuginnConfig
"""The config of any supported architecture."""

ARCHITECTURES: dict[str, type[PretrainedConfig]] = {
    OuroConfig.model_type: OuroConfig,
    HuginnConfig.model_type: HuginnConfig,
}
"""Supported ``model_type`` values and their config classes."""


def config_from_dict(data: Mapping[str, Any], *, strict: bool = True) -> PretrainedConfig:
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
    aliases = cls.ALIASES
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
        elif key in _METADATA_KEYS or key in cls.TRAINING_KEYS:
            extra[key] = value
        elif key in cls.FIXED_KEYS:
            expected = cls.FIXED_KEYS[key]
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


def config_to_dict(config: PretrainedConfig) -> dict[str, Any]:
    """The config as a config.json object: upstream keys, metadata kept from loading.

    Optional keys that are ``None`` (``head_dim``, ...) are left out, as upstream code
    reads them with a default when absent.
    """
    out: dict[str, Any] = dict(config.extra)
    aliases = {v: k for k, v in config.ALIASES.items() if k in config.extra}
    for f in fields(config):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        if value is None and f.name in config.OPTIONAL_KEYS:
            continue
        out[f.name] = value
        if f.name in aliases:
            out[aliases[f.name]] = value
    out["model_type"] = config.model_type
    return out
