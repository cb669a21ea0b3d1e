"""The cost of the STARS penalty: median step time with and without it, measured alike.

Shared by ``eqloop.recipes.train.penalty_overhead`` and
``eqloop.recipes.finetune.train.step_time_ratio``; the recipes pass a function that runs
one of their steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["penalty_step_times"]

Batch = TypeVar("Batch")


def penalty_step_times(
    batch: Callable[[int], Batch],
    run_step: Callable[[Batch, bool], object],
    *,
    steps: int,
    warmup: int,
) -> tuple[float, float]:
    """Median time (seconds) of a step without and with the penalty.

    Steps of the two kinds alternate on the same model and batches, so load changes on a
    shared machine hit both alike.

    Args:
        batch: the batch of a step, as ``batch(index)`` with ``index = 2 * i + penalty_on``
            numbering the steps (not timed).
        run_step: runs one optimisation step as ``run_step(batch, penalty_on)`` (timed).
        steps: timed steps of each kind.
        warmup: untimed steps of each kind first.

    Returns:
        ``(without, with_penalty)``: the median times.
    """
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(warmup + steps):
        for penalty_on in (False, True):
            data = batch(2 * i + penalty_on)
            start = time.perf_counter()
            run_step(data, penalty_on)
            if i >= warmup:
                times[penalty_on].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True])
