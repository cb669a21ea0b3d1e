"""Huginn (tomg-group-umd's depth-recurrent LM): ``config`` (:class:`HuginnConfig`) and
``modeling`` (:class:`HuginnForCausalLM`, its exit criteria, adaptive loop and decode step).

Names are imported lazily (as in :mod:`eqloop.models`): importing the config does not
import the model.
"""

from __future__ import annotations

from eqloop.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "HuginnConfig": "eqloop.models.huginn.config",
    "HuginnForCausalLM": "eqloop.models.huginn.modeling",
    "ExitCriterion": "eqloop.models.huginn.modeling",
    "HUGINN_EXITS": "eqloop.models.huginn.modeling",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
