"""Ouro (ByteDance Seed's looped LM): ``config`` (:class:`OuroConfig`) and ``modeling``
(:class:`OuroForCausalLM`, its gate exits and decode step).

Names are imported lazily (as in :mod:`eqloop.pretrained`): importing the config does not
import the model.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "OuroConfig": "eqloop.pretrained.ouro.config",
    "OuroForCausalLM": "eqloop.pretrained.ouro.modeling",
    "EXIT_MODES": "eqloop.pretrained.ouro.modeling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
