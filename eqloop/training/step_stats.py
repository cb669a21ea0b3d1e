"""Statistics of training steps kept on the device and read at intervals (train, finetune).

Reading a tensor's value on the host (``float(loss)``, ``.item()``, ``.tolist()``) waits
for the device to finish the step and, under ``torch.compile``, ends the compiled region.
The training loops therefore keep each step's statistics (loss, CE, penalty, gradient
norm, ...) as 0-d device tensors in a :class:`PendingSteps` and read them all at once
every ``log_every`` steps, and before anything that needs them: an evaluation, a
checkpoint, a callback, the end of the run, a stop signal. One read returns one record
per step with the same values a per-step read would have given; under data parallelism
the values are averaged over the ranks by one all-reduce per read (instead of one per
step), which also carries the stop signals of every rank.

A non-finite loss is therefore seen at the next read, up to ``log_every - 1`` steps after
the step that produced it: the loops check every record of a read in order
(:func:`eqloop.training.run_dir.check_finite`) and stop at the first bad one, naming its
step. Every read that precedes a checkpoint covers all steps up to it, so no checkpoint
is written after a non-finite step: the newest checkpoint is the last finite one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["PendingSteps"]


class PendingSteps:
    """The statistics of the steps since the last read, as device tensors.

    Args:
        device: where the all-reduce of a read runs (the training device).
        world: number of ranks whose statistics a read averages (1: no collective).
    """

    def __init__(self, device: torch.device, world: int = 1) -> None:
        self.device, self.world = device, world
        self._steps: list[tuple[int, dict[str, Tensor | None], dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(
        self, step: int, stats: Mapping[str, Tensor | float | None], extra: Mapping[str, Any]
    ) -> None:
        """Record a step without reading anything from the device.

        Args:
            step: steps completed, counting this one (the record's ``step``).
            stats: 0-d tensors or host numbers (rank-local; None: not computed this
                step, the same on every rank), in the order the record lists them.
            extra: host values (loop count, learning rate, time) appended to the record.
        """
        detached = {k: v.detach() if isinstance(v, Tensor) else v for k, v in stats.items()}
        self._steps.append((step, detached, dict(extra)))

    def _reduced(self, value: Tensor | float | None) -> bool:
        """Whether a read converts ``value``: tensors, and under DDP numbers (averaged)."""
        return isinstance(value, Tensor) or (value is not None and self.world > 1)

    def read(self, signum: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Read every pending step (one host transfer) and forget them.

        A collective under data parallelism: every rank must call it at the same step.

        Args:
            signum: the stop signal this rank has received (0: none).

        Returns:
            ``(records, stop)``: one record per pending step, ``{"step": ..., **stats,
            **extra}`` with the tensors read to floats and, under DDP, every statistic
            averaged over the ranks (None stays None; alone, host numbers stay as they
            are), oldest first; and the largest signal number of any rank.
        """
        values = [
            torch.as_tensor(v, dtype=torch.float64, device=self.device)
            for _, stats, _ in self._steps
            for v in stats.values()
            if self._reduced(v)
        ]
        flat = (
            torch.stack(values)
            if values
            else torch.zeros(0, dtype=torch.float64, device=self.device)
        )
        if self.world > 1:  # the statistics and every rank's signal in one all-reduce
            flags = torch.zeros(self.world, dtype=torch.float64, device=self.device)
            flags[dist.get_rank()] = signum
            flat = torch.cat((flat, flags))
            dist.all_reduce(flat)
        host = flat.tolist()  # the one read
        if self.world > 1:
            signum = int(max(host[len(values) :]))
            host = [x / self.world for x in host[: len(values)]]
        numbers = iter(host)
        records = [
            {
                "step": step,
                **{k: next(numbers) if self._reduced(v) else v for k, v in stats.items()},
                **extra,
            }
            for step, stats, extra in self._steps
        ]
        self._steps.clear()
        return records, signum
