"""Ouro (ByteDance Seed's looped LM): ``config`` (:class:`OuroConfig`) and ``modeling``
(:class:`OuroForCausalLM`, its gate exits and decode step).

Names are imported lazily (as in :mod:`eqloop.models`): importing the config does not
import the model.
"""

from __future__ import annotations

from eqloop.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "OuroConfig": "eqloop.models.ouro.config",
    "OuroForCausalLM": "eqloop.models.ouro.modeling",
    "EXIT_MODES": "eqloop.models.ouro.modeling",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
