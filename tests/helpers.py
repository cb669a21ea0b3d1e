"""Helpers shared by several test files: relative errors, running the scripts and recipes
as a user would (``python benchmarks/<script>``, ``python experiments/<name>/run.py``,
``torchrun``), and the tiny training run.

Importable as ``from helpers import ...`` (conftest.py puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eqloop.checkpoint import load_checkpoint
from eqloop.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------ relative errors


def rel_err_per_sample(estimate: Tensor, reference: Tensor) -> Tensor:
    """``||estimate - reference|| / ||reference||`` per sample, in float64.

    Args:
        estimate: ``(B, ...)``.
        reference: the same shape.

    Returns:
        ``(B,)`` float64; for ``(B,)`` inputs ``|estimate - reference| / |reference|``.
    """
    diff = (estimate.double() - reference.double()).reshape(len(estimate), -1)
    return diff.norm(dim=1) / reference.double().reshape(len(reference), -1).norm(dim=1)


def rel_err(estimate: Tensor, reference: Tensor) -> float:
    """``||estimate - reference|| / ||reference||`` over the whole tensors, in float64."""
    return float(rel_err_per_sample(estimate.reshape(1, -1), reference.reshape(1, -1))[0])


# ---------------------------------------------------------------- scripts and recipes


def run_python(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python <args>`` from the repository root, single-threaded (OMP/MKL one thread, to
    keep CI steady); output captured as text, never raising on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<script> <args>``, as :func:`run_python` runs it."""
    return run_python(str(ROOT / "benchmarks" / script), *args)


def run_experiment(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python experiments/<name>/run.py <args>``, as :func:`run_python` runs it."""
    return run_python(str(ROOT / "experiments" / name / "run.py"), *args)


def run_torchrun(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=2 -m eqloop.cli <args>`` (e.g. ``train
    --config FILE``): the documented DDP command, two CPU ranks, as :func:`run_python`
    runs it."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    return run_python(*torchrun, "-m", "eqloop.cli", *args, timeout=timeout)


# ----------------------------------------------------------------------- a tiny run

#: The LoopLM of :func:`tiny_train_config` (a ``TrainConfig.model`` dict).
TINY_TRAIN_MODEL = dict(vocab_size=19, d_model=32, n_heads=2, d_ff=64, max_seq_len=16)


def tiny_train_config(tmp: Path, cache: Path, **overrides: Any) -> TrainConfig:
    """A 2-digit addition run that takes a few seconds on a CPU, in ``tmp / "run"``.

    Args:
        tmp: the directory that holds the run.
        cache: the dataset cache (the ``data_cache`` fixture).
        **overrides: TrainConfig fields (dicts replace the default's, e.g. ``model``).
    """
    base: dict[str, Any] = dict(
        model=TINY_TRAIN_MODEL,
        digits=2,
        n_train=256,
        n_test=64,
        batch_size=32,
        steps=24,
        lr=3e-3,
        warmup_steps=4,
        depth={"kind": "lognormal", "mu": 1.0, "sigma": 0.5, "lo": 1, "hi": 3},
        penalty_start=6,
        eval_every=12,
        eval_loops=[1, 2, 4],
        checkpoint_every=0,
        out_dir=str(tmp / "run"),
        data_cache_dir=str(cache),
        progress=False,
    )
    base.update(overrides)
    return TrainConfig.from_dict(base)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (e.g. a run's metrics.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    """Whether the latest checkpoints of runs (or checkpoints) ``a`` and ``b`` hold equal
    weights."""
    wa, wb = load_checkpoint(a).weights, load_checkpoint(b).weights
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
