"""Run a test function on several gloo ranks in spawned processes, with a deadline.

The DDP tests of train and finetune share this. Each rank joins one gloo process group
through a file store in a fresh directory (no TCP port to pick, so none that another
process can take in between), with a short collective timeout, and prints its Python
stacks (``faulthandler``) when the parent asks. A rank that has not finished by the
deadline fails the test with that dump instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # a collective one rank never joins fails after this


def _rank_main(rank: int, fn: Callable[..., None], world: int, store: str, args: tuple) -> None:
    """One rank: join the group, run ``fn(rank, world, *args)``, leave the group."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's stack dump
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        fn(rank, world, *args)
    except BaseException as err:
        # The frames of the traceback hold fn's locals (a DDP wrapper): free them while the
        # group lives (see eqloop.training.env.run_env on why a wrapper must not outlive it).
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., None], *args: Any, world: int = 2, timeout: float = 300) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` ranks, each in its own process.

    ``fn`` must be a module-level function (it is pickled by name). The group is
    destroyed after ``fn`` returns, so whatever ``fn`` made from it (a DDP wrapper) must
    be gone by then: a local of a function that has returned.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (its traceback).
        pytest.fail.Exception: a rank was still running ``timeout`` seconds after the
            start; its Python stacks are in the captured stderr.
    """
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.spawn(
            _rank_main, args=(fn, world, f"{tmp}/store", args), nprocs=world, join=False
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            if time.monotonic() < deadline:
                continue
            stuck = [r for r, p in enumerate(context.processes) if p.is_alive()]
            for rank in stuck:  # dump their stacks to stderr, then end them
                with contextlib.suppress(ProcessLookupError):
                    os.kill(context.processes[rank].pid, signal.SIGUSR1)
            time.sleep(2)
            for rank in stuck:
                context.processes[rank].kill()
            pytest.fail(
                f"ranks {stuck} of {world} had not finished after {timeout:.0f} s "
                "(their Python stacks are in the captured stderr)"
            )
