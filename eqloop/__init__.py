"""eqloop: looped language models treated as equilibrium (fixed-point) models.

Public names are imported lazily so that ``import eqloop`` stays cheap: the data and
tuning modules pull in ``datasets`` and ``optuna`` only when they are used.
"""

from __future__ import annotations

from eqloop.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # models
    "LoopLM": "eqloop.models.looplm.modeling",
    "LoopLMConfig": "eqloop.models.looplm.modeling",
    "LoopedLM": "eqloop.models.looped",
    "random_start": "eqloop.models.looped",
    "compile_model": "eqloop.core.compiling",
    # differentiable fixed points and their backward modes
    "fixed_point": "eqloop.core.implicit",
    "IFT": "eqloop.core.backward",
    "Phantom": "eqloop.core.backward",
    "Truncated": "eqloop.core.backward",
    "Unroll": "eqloop.core.backward",
    "BACKWARD_MODES": "eqloop.core.backward",
    "ConvergenceWarning": "eqloop.core.backward",
    # STARS
    "spectral_radius": "eqloop.core.stars",
    "jsrr_penalty": "eqloop.core.stars",
    # depth samplers
    "DepthSampler": "eqloop.training.depth",
    "make_depth_sampler": "eqloop.training.depth",
    # data
    "CharTokenizer": "eqloop.data",
    "make_arithmetic_dataset": "eqloop.data",
    "load_qa_jsonl": "eqloop.data",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
