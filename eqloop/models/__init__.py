"""Every looped LM eqloop runs: the protocol, eqloop's LoopLM, and the public Ouro and Huginn.

``looped`` holds the :class:`LoopedLM` protocol and the loop every model shares;
``looplm/`` is eqloop's own model; ``auto`` loads any model directory for fine-tuning.
Ouro and Huginn are loaded offline, one folder per architecture (``ouro/``, ``huginn/``:
config, modeling, exits and decode step); shared beside them: the base class and its
decode-step interface (``base``), the layers, config.json reading/writing (``config``),
loading (``io``), saving, keys, the transformers bridge (``hf``) and generation, which
never ask which architecture they have.

Names are imported lazily: ``import eqloop.models`` does not import transformers,
tokenizers or safetensors until a function that needs them is called.

Example:
    >>> from eqloop import pretrained                               # doctest: +SKIP
    >>> path = pretrained.write_tiny_checkpoint("tiny-ouro", arch="ouro")
    >>> model = pretrained.load(path)
    >>> logits = model(tokens, loops=8)
"""

from __future__ import annotations

from eqloop.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "LoopedLM": "eqloop.models.looped",
    "LoopLM": "eqloop.models.looplm",
    "LoopLMConfig": "eqloop.models.looplm",
    "load": "eqloop.models.io",
    "load_config": "eqloop.models.io",
    "save_pretrained": "eqloop.models.saving",
    "load_tokenizer": "eqloop.data.tokenizers",
    "write_tiny_checkpoint": "eqloop.models.tiny",
    "generate": "eqloop.models.generation",
    "GenerateOutput": "eqloop.models.generation",
    "diagnose": "eqloop.evaluation.diagnostics",
    "Diagnostics": "eqloop.evaluation.diagnostics",
    "diagnose_checkpoint": "eqloop.evaluation.diagnostics",
    "adaptive_forward": "eqloop.models.generation",
    "OuroConfig": "eqloop.models.ouro.config",
    "HuginnConfig": "eqloop.models.huginn.config",
    "ARCHITECTURES": "eqloop.models.config",
    "OuroForCausalLM": "eqloop.models.ouro.modeling",
    "HuginnForCausalLM": "eqloop.models.huginn.modeling",
    "PretrainedLoopedLM": "eqloop.models.base",
    "DecodeOptions": "eqloop.models.base",
    "PretrainedLoopInfo": "eqloop.models.base",
    "KVCache": "eqloop.models.layers",
    "register_auto_classes": "eqloop.models.hf",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
