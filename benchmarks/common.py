"""Helpers shared by the benchmark and experiment scripts: timing, memory, tables, atomic
output, model shapes."""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eqloop.evaluation.report import format_table  # the one table formatter
from eqloop.files import write_json_atomic

__all__ = [
    "OURO_14B",
    "PeakMemory",
    "command_line",
    "extra_peak_bytes",
    "format_table",
    "int_list",
    "interleaved_times",
    "machine_info",
    "median_time",
    "print_written",
    "write_json_atomic",
]

#: Ouro-1.4B's shape, from its config.json (PRETRAINED.md): the GPU benchmark builds it
#: with random weights, the fine-tuning experiment estimates its memory from it.
OURO_14B = {"vocab": 49152, "hidden": 2048, "ffn": 5632, "layers": 24, "heads": 16}


def print_written(*paths: str | os.PathLike[str] | None) -> None:
    """Say where a benchmark wrote its output: one ``wrote PATH`` line per path (None skipped)."""
    for path in paths:
        if path is not None:
            print(f"wrote {path}", flush=True)


def int_list(text: str, name: str, low: int) -> list[int]:
    """A command-line list like ``"1,2,4"`` -> ``[1, 2, 4]``, in the order given.

    Args:
        text: comma-separated integers (empty items are skipped).
        name: the option, for the error (``"--seeds"``).
        low: the smallest value allowed.

    Raises:
        ValueError: an item that is not an integer, no item, or one below ``low``.
    """
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{name} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < low:
        raise ValueError(f"{name} needs at least one integer, each >= {low}, got {text!r}")
    return values


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, Exception]]:
    """Wall times of several workloads, interleaved so that load changes hit all alike.

    Round r runs every workload once, starting at the r-th (the order rotates). A
    workload that raises is dropped from later rounds; the others go on. Each ``fn`` must
    finish its device work before it returns (e.g. end with ``torch.cuda.synchronize()``).

    Args:
        fns: name -> workload.
        repeats: rounds.

    Returns:
        ``(times, errors)``: seconds per run of each name that never failed (``repeats``
        values), and the exception of each name that failed.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, Exception] = {}
    for r in range(repeats if names else 0):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if name in errors:
                continue
            start = time.perf_counter()
            try:
                fns[name]()
            except Exception as exc:  # noqa: BLE001 - reported to the caller, per workload
                errors[name] = exc
                continue
            times[name].append(time.perf_counter() - start)
    return {n: t for n, t in times.items() if n not in errors}, errors


def extra_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes ``fn()`` allocates above what was allocated before it.

    CUDA: the caching allocator's ``max_memory_allocated`` after a reset, minus
    ``memory_allocated`` before the call. Other devices: :class:`PeakMemory` (slower;
    do not time the same call).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakMemory() as peak:
        fn()
    return peak.peak_bytes


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by the ops run inside the block.

    Device-independent: every op output is attributed to its storage, and the storage's
    bytes count as live until the last tensor object using it is garbage collected.
    Inputs created before the block do not count, so the figure is the extra memory the
    measured code needed. Dispatch adds overhead: do not time code while measuring.

    Example:
        >>> with PeakMemory() as mem:   # doctest: +SKIP
        ...     solve(...)
        >>> mem.peak_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[tuple[str, int], list[int]] = {}  # key -> [nbytes, refs]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [storage.nbytes(), 0]
            self.live_bytes += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._storages[key]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def command_line(script: str, argv: list[str] | None) -> str:
    """The shell command that ran ``script`` (its path from the repository root) with
    ``argv`` (None: this process's own arguments), as recorded in a benchmark's JSON."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }
