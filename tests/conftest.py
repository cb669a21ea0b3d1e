"""Shared pytest setup: ``tests/`` importable under any import mode (``helpers.py``,
``problems.py``, ``ranks.py``), one torch thread per parallel worker (``-n 2``), and the
fixtures several test files use."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one torch thread each, and in their subprocesses
    # (more threads than cores made the suite several times slower on 2 cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset cache per test module: the tiny datasets are generated once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """The test's subprocesses; those still running at its end are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
