"""Shared pytest setup: ``tests/`` importable under any import mode (``helpers.py``,
``problems.py``, ``ranks.py``), and the fixtures several test files use."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


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
