"""The former name of :mod:`eqloop.models`: the same public names, so that
``from eqloop import pretrained; pretrained.load(path)`` keeps working."""

from __future__ import annotations

from typing import Any

from eqloop import models

__all__ = models.__all__


def __getattr__(name: str) -> Any:
    return getattr(models, name)


def __dir__() -> list[str]:
    return __all__
