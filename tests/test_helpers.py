"""tests/helpers.py: the shared test helpers compute what they say, and no test file keeps
its own copy of them."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from helpers import rel_err, rel_err_per_sample, tiny_train_config

TESTS = Path(__file__).resolve().parent

# What a test file must not write again (text it would contain) -> the shared helper.
SHARED = {
    "def rel_err": "helpers.rel_err / rel_err_per_sample",
    "def tiny_config": "a tiny_*_config named after what it builds (helpers.tiny_train_config)",
    '"torch.distributed.run"': "helpers.run_torchrun",
    'mktemp("data-cache")': "the data_cache fixture of conftest.py",
    "def run_benchmark": "helpers.run_benchmark / run_experiment",
    "= PendingSteps.read": "helpers.count_step_reads",
    "def tiny_base": "helpers.tiny_tune_base",
    "def wait_for": "helpers.wait_for",
}


def test_rel_err_is_the_norm_of_the_difference_over_the_norm_of_the_reference() -> None:
    estimate = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    reference = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    # Whole tensors: ||(0, 4, 1, -2)|| / ||(3, 0, 0, 2)|| = sqrt(21) / sqrt(13).
    assert rel_err(estimate, reference) == pytest.approx(math.sqrt(21 / 13), rel=1e-12)
    per_sample = rel_err_per_sample(estimate, reference)
    assert per_sample.dtype == torch.float64 and per_sample.shape == (2,)
    assert per_sample.tolist() == pytest.approx([4 / 3, math.sqrt(5) / 2], rel=1e-12)
    # (B,) inputs: |estimate - reference| / |reference| per sample.
    rho = rel_err_per_sample(torch.tensor([0.95, 0.5]), torch.tensor([1.0, 0.4]))
    assert rho.tolist() == pytest.approx([0.05, 0.25], rel=1e-6)


def test_rel_err_is_computed_in_float64() -> None:
    # float32 would round the difference of these two to 0 or to 2**-23.
    reference = torch.tensor([1.0 + 1e-9], dtype=torch.float64)
    assert rel_err(torch.tensor([1.0]), reference) == pytest.approx(1e-9, rel=1e-6)


def test_tiny_train_config_takes_overrides(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(tmp_path, data_cache, steps=3)
    assert (config.steps, config.digits, config.out_dir) == (3, 2, str(tmp_path / "run"))
    assert config.data_cache_dir == str(data_cache)


def test_shared_helpers_are_written_once() -> None:
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("helpers.py", "conftest.py", Path(__file__).name):
            continue
        text = path.read_text(encoding="utf-8")
        for copy, helper in SHARED.items():
            assert copy not in text, f"{path.name} writes {copy!r} again: use {helper}"


def test_no_test_file_imports_another_test_file() -> None:
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
                if node.module in (None, "tests"):  # from tests import test_x; from . import
                    modules += [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                assert not module.split(".")[-1].startswith("test_"), (
                    f"{path.name}:{node.lineno} imports {module}: move what it shares "
                    "into tests/helpers.py or conftest.py"
                )
