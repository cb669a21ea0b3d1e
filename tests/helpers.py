"""Helpers shared by several test files: relative errors, running the scripts and recipes
as a user would (``python benchmarks/<script>``, ``python experiments/<name>/run.py``,
``torchrun``), the tiny training run, the contractive LoopLM without injection, and
``eqloop tune`` worker processes.

Importable as ``from helpers import ...`` (conftest.py puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig
from eqloop.training.checkpoint import load_checkpoint
from eqloop.training.config import TrainConfig
from eqloop.training.step_stats import PendingSteps

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


def count_step_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record, for the rest of the test, how many steps each read of the step statistics
    (``PendingSteps.read``) takes from the device; returns the list it appends to."""
    reads: list[int] = []
    original = PendingSteps.read

    def counted(self: PendingSteps, signum: int = 0) -> Any:
        reads.append(len(self))
        return original(self, signum)

    monkeypatch.setattr(PendingSteps, "read", counted)
    return reads


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (e.g. a run's metrics.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    """Whether the latest checkpoints of runs (or checkpoints) ``a`` and ``b`` hold equal
    weights."""
    wa, wb = load_checkpoint(a).weights, load_checkpoint(b).weights
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -------------------------------------------------- a contractive LoopLM, no injection

#: The LoopLM of :func:`contractive_no_injection_model` (no injection: the STARS loop).
TINY_NO_INJECTION = dict(
    vocab_size=19, d_model=8, n_heads=2, d_ff=16, max_seq_len=8, injection="none"
)


def contractive_no_injection_model(placement: str = "post_sandwich", seed: int = 0) -> LoopLM:
    """A float64 LoopLM without injection whose core is a contraction.

    Every core sublayer ends in ``g * N(u) + b`` with a small gain ``g`` and a bias ``b``
    of unit size: the next sublayer normalises ``b + O(g)``, whose spread is set by
    ``b``, so each sublayer shrinks perturbations by about ``g``.
    """
    torch.manual_seed(seed)
    config = LoopLMConfig(**TINY_NO_INJECTION, norm_placement=placement, n_prelude=1)
    model = LoopLM(config).to(torch.float64)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.core:
            for sub in (block.attn, block.mlp):
                sub.norm_out.weight.fill_(0.3)
                sub.norm_out.bias.copy_(torch.randn(8, generator=generator, dtype=torch.float64))
    return model.eval()


# ----------------------------------------------------------------- eqloop tune workers

#: The LoopLM of :func:`tiny_tune_base` (merged into ``TrainConfig.model``).
TINY_TUNE_MODEL = {"d_model": 16, "n_heads": 2, "d_ff": 32}


def tiny_tune_base(data_cache: Path, **changes: Any) -> dict[str, Any]:
    """A TuneConfig ``base`` (TrainConfig override dict) for trials of a few CPU seconds.

    Args:
        data_cache: the dataset cache (the ``data_cache`` fixture).
        **changes: TrainConfig fields that replace the defaults.
    """
    base = {
        "steps": 12,
        "n_train": 256,
        "n_test": 32,
        "batch_size": 32,
        "eval_every": 4,
        "checkpoint_every": 0,
        "warmup_steps": 2,
        "penalty_start": 2,
        "model": dict(TINY_TUNE_MODEL),
        "depth": {"kind": "lognormal", "mu": 1.0, "sigma": 0.5, "lo": 1, "hi": 4},
        "data_cache_dir": str(data_cache),
    }
    base.update(changes)
    return base


def tune_worker(config: Path, *args: str) -> subprocess.Popen[str]:
    """Start ``python -m eqloop.cli tune --config CONFIG <args>``, single-threaded and
    unbuffered, stderr merged into stdout (add it to the ``processes`` fixture)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "eqloop.cli", "tune", "--config", str(config), *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish_worker(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    """Wait for a :func:`tune_worker`; assert it exited 0 and return its output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def wait_for(condition: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    """Poll ``condition`` every 0.2 s until it holds (an exception counts as not yet: the
    storage may not exist yet); AssertionError naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if condition():
                return
        except Exception:  # the storage may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def retried_from(trial: Any) -> int | None:
    """The trial an Optuna trial retries, as Optuna's retry callback recorded it."""
    import optuna  # optional: only the tune tests call this
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():  # marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
