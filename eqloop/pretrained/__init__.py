"""Public looped LMs (Ouro, Huginn) as eqloop fixed-point models, loaded offline.

One folder per architecture (``ouro/``, ``huginn/``: config, modeling, exits and decode
step); shared beside them: the base class and its decode-step interface (``base``), the
layers, config.json reading/writing (``config``), loading (``io``), saving, keys, the
transformers bridge (``hf``), generation and diagnostics, which never ask which
architecture they have.

Names are imported lazily: ``import eqloop.pretrained`` does not import transformers,
tokenizers or safetensors until a function that needs them is called.

Example:
    >>> from eqloop import pretrained                               # doctest: +SKIP
    >>> path = pretrained.write_tiny_checkpoint("tiny-ouro", arch="ouro")
    >>> model = pretrained.load(path)
    >>> logits = model(tokens, loops=8)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "load": "eqloop.pretrained.io",
    "load_config": "eqloop.pretrained.io",
    "save_pretrained": "eqloop.pretrained.saving",
    "load_tokenizer": "eqloop.data.tokenizers",
    "write_tiny_checkpoint": "eqloop.pretrained.tiny",
    "generate": "eqloop.pretrained.generation",
    "GenerateOutput": "eqloop.pretrained.generation",
    "diagnose": "eqloop.pretrained.diagnostics",
    "Diagnostics": "eqloop.pretrained.diagnostics",
    "diagnose_checkpoint": "eqloop.pretrained.diagnostics",
    "adaptive_forward": "eqloop.pretrained.generation",
    "OuroConfig": "eqloop.pretrained.ouro.config",
    "HuginnConfig": "eqloop.pretrained.huginn.config",
    "ARCHITECTURES": "eqloop.pretrained.config",
    "OuroForCausalLM": "eqloop.pretrained.ouro.modeling",
    "HuginnForCausalLM": "eqloop.pretrained.huginn.modeling",
    "PretrainedLoopedLM": "eqloop.pretrained.base",
    "DecodeOptions": "eqloop.pretrained.base",
    "PretrainedLoopInfo": "eqloop.pretrained.base",
    "KVCache": "eqloop.pretrained.layers",
    "register_auto_classes": "eqloop.pretrained.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'eqloop.pretrained' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
