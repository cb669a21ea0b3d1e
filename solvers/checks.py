"""Argument checks shared by every validator in ``solvers`` and ``eqloop``.

Each check returns the value in its canonical type or raises an error whose message
names the argument, says what it must be and shows what it got. Bools are never
accepted as numbers (``True`` is an ``int`` in Python, and ``tol=True`` is a typo, not
a tolerance).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["boolean", "choice", "integer", "number", "parse_bool"]

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (either bound optional).

    Raises:
        TypeError: ``value`` is a bool or not an integer.
        ValueError: ``value`` lies outside the bounds.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {_describe(value)}") from None
    if (low is not None and result < low) or (high is not None and result > high):
        raise ValueError(f"{name} must be an integer {_range(low, high)}, got {result}")
    return result


def number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """A real number (int or float, not bool) within the given bounds.

    Args:
        name: the argument's name, for the message.
        value: what the caller passed.
        low, high: bounds; ``None`` leaves that side open to infinity.
        low_open, high_open: exclude the bound itself.
        finite: reject ``inf`` and ``nan`` (NaN is always rejected by any bound).

    Raises:
        TypeError: not a real number, or a bool.
        ValueError: out of bounds, or not finite when ``finite``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    result = float(value)
    if math.isnan(result) or (finite and math.isinf(result)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (result <= low if low_open else result < low)
    too_high = high is not None and (result >= high if high_open else result > high)
    if too_low or too_high:
        left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(part for part in (left, right) if part)
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    return result


def boolean(name: str, value: Any) -> bool:
    """A real ``bool`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {_describe(value)}")
    return value


def choice(name: str, value: T, choices: Collection[T]) -> T:
    """One of ``choices``; the message lists them."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value


def parse_bool(name: str, text: str) -> bool:
    """Parse a command-line boolean: true/false, yes/no, on/off, 1/0 (any case)."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{name} must be a boolean (true/false, yes/no, on/off, 1/0), got {text!r}")


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}"


def _describe(value: Any) -> str:
    if isinstance(value, (str, int, float)):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__
