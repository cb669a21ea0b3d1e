"""Where a training process runs and how it seeds: rank, world size, device, data order.

Shared by ``eqloop train`` and ``eqloop finetune``: :func:`run_env` joins the process group
torchrun describes (or runs alone) for the length of a run; :func:`mix_seed` derives every
random stream of a step from ``(seed, step, rank, ...)`` and :func:`batch_rows` the rows
of a step's global batch, so a resumed run needs no data-loader or RNG state.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from eqloop.training.config import check_device

__all__ = ["RunEnv", "batch_rows", "mix_seed", "run_env", "setup_run"]


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(values)).generate_state(2, np.uint64)[0] >> 1)


def batch_rows(step: int, n: int, batch_size: int, seed: int) -> Tensor:
    """Row indices of the global batch of ``step``: epochs of seeded random permutations.

    Depends only on its arguments, so resuming needs no data-loader state.

    Returns:
        (batch_size,) int64 indices into the training set; the last ``n % batch_size``
        rows of each epoch's permutation are skipped.
    """
    epoch, index = divmod(step, n // batch_size)
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(n, generator=generator)[index * batch_size : (index + 1) * batch_size]


@dataclass(frozen=True)
class RunEnv:
    """Where this process runs: rank, world size, device, and who owns the process group."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def seed_step(self, seed: int, step: int) -> torch.Generator:
        """Seed step ``step``'s global RNG (dropout, if any); its penalty vectors' generator.

        Both derive from ``(seed, step, rank)`` only, so a resumed run draws the same.
        """
        torch.manual_seed(mix_seed(seed, step, self.rank, 0))
        return torch.Generator(self.device).manual_seed(mix_seed(seed, step, self.rank, 1))

    def data_parallel(self, module: nn.Module) -> DistributedDataParallel:
        """``module`` wrapped for DDP on this process's device (under ``world > 1``)."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)


def setup_run(device: str) -> RunEnv:
    """Join the process group torchrun describes (``WORLD_SIZE > 1``) or run alone."""
    device = check_device(device)
    cuda = device.startswith("cuda")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or dist.is_initialized()
    owns = distributed and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if not cuda:
        return RunEnv(rank, world, torch.device("cpu"), owns)
    if device.startswith("cuda:"):
        index = torch.device(device).index
    else:
        index = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
    torch.cuda.set_device(index)
    return RunEnv(rank, world, torch.device("cuda", index), owns)


@contextlib.contextmanager
def run_env(device: str) -> Iterator[RunEnv]:
    """:func:`setup_run` for the length of a run (train, finetune), then leave the group.

    The process group is destroyed at the end if this call created it. Under data
    parallelism the run's DDP wrapper must be gone before the group is: the wrapper's
    reducer holds a reference to the group, and when it holds the last one, deleting the
    wrapper runs the gloo group's destructor with the GIL held. That destructor joins the
    gloo worker threads, and a worker still freeing the tensors of a finished collective
    needs the GIL to do so: both wait for ever (pytorch/pytorch#56297; a rank of a test
    hung this way when the tiny runs ended). So the runs drop their wrapper when their
    loop ends, and when a run raises under DDP, the locals of the frames its traceback
    keeps (a wrapper passed down as ``net``) are cleared before the exception leaves
    (line numbers stay).

    Yields:
        The :class:`RunEnv` of this process.
    """
    env = setup_run(device)
    try:
        yield env
    except BaseException as err:
        if env.world > 1:
            _clear_frames(err)
        raise
    finally:
        if env.owns_group:
            dist.destroy_process_group()


def _clear_frames(err: BaseException) -> None:
    """Drop the locals of the finished frames in the tracebacks of ``err`` and its causes."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # skips the frames still running
        pending += [current.__cause__, current.__context__]
