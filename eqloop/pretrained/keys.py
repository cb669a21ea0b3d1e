"""Which tensors a pretrained checkpoint of each architecture holds, checked by name and shape.

Shared by loading (:mod:`eqloop.pretrained.io`) and saving (:mod:`eqloop.pretrained.saving`),
so that what one writes is exactly what the other accepts.
"""

from __future__ import annotations

from collections.abc import Iterable

from eqloop.pretrained.base import PretrainedLoopedLM
from eqloop.pretrained.config import PretrainedConfig

__all__ = ["LISTED", "check_keys", "listing"]

# How many names an error message lists before it says how many more there are.
LISTED = 20


def listing(names: Iterable[str]) -> str:
    """``[a, b, ...]`` of at most ``LISTED`` names, then how many more there are."""
    names = sorted(names)
    shown = repr(names[:LISTED])
    return shown if len(names) <= LISTED else f"{shown} and {len(names) - LISTED} more"


def check_keys(
    model: PretrainedLoopedLM,
    shapes: dict[str, tuple[int, ...]],
    config: PretrainedConfig,
    *,
    what: str = "checkpoint tensors",
) -> None:
    """Raise one ValueError listing every missing, unexpected or mis-shaped tensor."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    recomputed = set(config.RECOMPUTED_KEYS)
    missing = set(expected) - set(shapes)
    unexpected = set(shapes) - set(expected) - recomputed
    mis_shaped = sorted(
        f"{name}: file {shapes[name]}, model {shape}"
        for name, shape in expected.items()
        if name in shapes and shapes[name] != shape
    )
    problems = []
    if missing:
        problems.append(f"missing {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {listing(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped [{'; '.join(mis_shaped)}]")
    if problems:
        raise ValueError(
            f"{what} do not match the {config.model_type!r} architecture of "
            f"config.json: " + ", ".join(problems)
        )
