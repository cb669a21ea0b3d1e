"""Huginn (tomg-group-umd's depth-recurrent LM): ``config`` (:class:`HuginnConfig`) and
``modeling`` (:class:`HuginnForCausalLM`, its exit criteria, adaptive loop and decode step).

Names are imported lazily (as in :mod:`eqloop.pretrained`): importing the config does not
import the model.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "HuginnConfig": "eqloop.pretrained.huginn.config",
    "HuginnForCausalLM": "eqloop.pretrained.huginn.modeling",
    "ExitCriterion": "eqloop.pretrained.huginn.modeling",
    "HUGINN_EXITS": "eqloop.pretrained.huginn.modeling",
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
