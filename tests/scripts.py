"""Run the benchmark and experiment scripts as a user would: ``python benchmarks/<script>``
and ``python experiments/<name>/run.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python <path> <args>`` from the repository root (``path`` relative to it),
    single-threaded (OMP/MKL one thread, to keep CI steady); output captured as text,
    10-minute limit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<script> <args>``, as :func:`run_script` runs it."""
    return run_script(f"benchmarks/{script}", *args)


def run_experiment(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python experiments/<name>/run.py <args>``, as :func:`run_script` runs it."""
    return run_script(f"experiments/{name}/run.py", *args)
