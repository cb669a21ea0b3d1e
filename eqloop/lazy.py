"""Lazy public names for a package: imported from their module on first use.

Every eqloop package that re-exports names (``eqloop``, ``eqloop.models``,
``eqloop.evaluation``, ...) declares ``{name: module}`` and gets its module-level
``__getattr__`` and ``__dir__`` here, so ``import eqloop`` does not import torch-heavy or
optional modules (transformers, optuna, datasets) until a name that needs them is used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], names: Sequence[str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for its lazy ``exports``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the module that defines it.
        names: what ``dir(package)`` lists (default: the exported names, sorted).

    Returns:
        ``(__getattr__, __dir__)``: the first imports a name's module on first access and
        keeps the value in the package's namespace (later lookups skip it); an unknown
        name raises ``AttributeError`` as a module does.

    Example:
        >>> __getattr__, __dir__ = lazy_exports(__name__, {"LoopLM": "eqloop.models.looplm"})
    """
    listed = sorted(exports) if names is None else list(names)

    def getattr_(name: str) -> Any:
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return listed

    return getattr_, dir_
