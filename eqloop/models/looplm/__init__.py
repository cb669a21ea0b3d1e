"""eqloop's own looped LM: :class:`LoopLM` and its :class:`LoopLMConfig` (``modeling.py``)."""

from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig

__all__ = ["LoopLM", "LoopLMConfig"]
