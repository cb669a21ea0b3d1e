"""benchmarks/gpu.py: the --quick CPU run, per-row errors, the time budget, no-CUDA exit.

The CUDA-only branches (``torch.cuda.synchronize`` after each call, the allocator's peak
memory, the CUDA graphs of ``reduce-overhead``, inductor's GPU kernels) run only where CUDA
exists: these tests run the same code on the CPU and do not exercise them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import torch
from helpers import run_benchmark

from benchmarks import gpu

STEP = {"stars_unrolled", "implicit_ift"}
EXPECTED = {  # (workload, variants) per model of the quick run
    "ouro": {
        "step": STEP,
        "solve": {"anderson", "fixed_point"},
        "forward": {"eager", "compile", "reduce-overhead"},
        "decode": {"eager", "compile"},
    },
    "looplm": {
        "step": STEP,
        "solve": {"anderson", "fixed_point"},
        "forward": {"eager", "compile", "reduce-overhead"},
    },
}


def check_rows(rows: list[dict], repeats: int) -> None:
    """Every row has either its numbers or an error string, never neither."""
    for row in rows:
        where = f"{row['model']} {row['workload']} {row['variant']}"
        assert row["status"] in ("ok", "error", "skipped"), where
        if row["status"] != "ok":
            assert isinstance(row["error"], str) and row["error"], where
            assert "median_ms" not in row, where
            continue
        assert row["error"] is None, where
        assert len(row["times_s"]) == row["repeats"] == repeats, where
        assert row["median_ms"] > 0 and row["first_call_s"] > 0, where
        if row["workload"] == "solve":
            assert 1 <= row["nfe"] <= row["max_iter"] and 0 <= row["converged"] <= 1, where
        else:
            assert row["tokens_per_s"] > 0, where
        if row["workload"] == "step":
            assert row["peak_mib"] > 0, where
        if row["variant"] == "implicit_ift":
            assert row["adjoint_vjps"] >= 1, where


@pytest.mark.slow  # 13 s on a CPU
def test_quick_run_writes_a_row_per_measurement(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = run_benchmark("gpu.py", "--quick", "--compile-backend", "none", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "tokens/s" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "command", "wall_seconds", "settings", "models", "results"}
    assert data["machine"]["device"] == "cpu" and data["machine"]["date"]
    assert data["command"].startswith("python benchmarks/gpu.py --quick")
    assert data["settings"]["quick"] is True and data["wall_seconds"] > 0
    assert set(data["models"]) == {"ouro", "looplm"}
    assert all(m["parameters"] > 0 for m in data["models"].values())
    rows = data["results"]
    found: dict[str, dict[str, set[str]]] = {}
    for row in rows:
        found.setdefault(row["model"], {}).setdefault(row["workload"], set()).add(row["variant"])
    assert found == EXPECTED
    steps = {(r["model"], r["variant"], r["loops"]) for r in rows if r["workload"] == "step"}
    assert len(steps) == 2 * 2 * 2  # two models, two kinds, loops 2 and 4
    check_rows(rows, repeats=2)
    compiled = [r for r in rows if r["variant"] in ("compile", "reduce-overhead")]
    assert compiled and all(r["status"] == "skipped" for r in compiled)
    assert all(r["error"] == "Skipped: --compile-backend none" for r in compiled)
    eager = [r for r in rows if r["variant"] not in ("compile", "reduce-overhead")]
    assert all(r["status"] == "ok" for r in eager), [r["error"] for r in eager]


@pytest.mark.slow
def test_quick_run_with_compiled_variants(tmp_path: Path) -> None:
    """torch.compile's own tracing (backend "eager"): the compiled rows measure or say why."""
    out = tmp_path / "gpu.json"
    proc = run_benchmark(
        "gpu.py", "--quick", "--models", "ouro", "--compile-backend", "eager", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    check_rows(rows, repeats=2)
    assert {r["variant"] for r in rows if r["status"] == "ok"} >= {"compile", "reduce-overhead"}


def test_full_run_without_cuda_says_so_and_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--json", str(out)]) == 0
    assert capsys.readouterr().out == gpu.NO_CUDA + "\n"
    assert "CUDA is not available" in gpu.NO_CUDA
    assert not out.exists()


def fake_run(budget: float = 60.0, **options: float) -> gpu.Run:
    args = argparse.Namespace(compile_timeout=30.0, warmup=1, repeats=3, **options)
    return gpu.Run(args, torch.device("cpu"), gpu.Budget(budget))


def test_a_failing_variant_is_its_rows_error_and_the_others_go_on() -> None:
    run = fake_run()
    calls = {"flaky": 0}

    def flaky() -> None:  # fails in the timed rounds, after its warm-up
        calls["flaky"] += 1
        if calls["flaky"] > 2:
            raise RuntimeError("CUDA out of memory\ndetails")

    def broken() -> None:
        raise ValueError("compile failed")

    base = {"model": "m", "workload": "forward", "loops": 1, "tokens": 4}
    variants = {"ok": lambda: lambda: torch.ones(3).sum(), "broken": broken, "flaky": lambda: flaky}
    gpu.measure(run, base, variants, peak=True)
    rows = {r["variant"]: r for r in run.rows}
    assert rows["broken"]["status"] == "error"
    assert rows["broken"]["error"] == "ValueError: compile failed"
    assert rows["flaky"]["status"] == "error"
    assert rows["flaky"]["error"] == "RuntimeError: CUDA out of memory"
    assert rows["ok"]["status"] == "ok" and rows["ok"]["repeats"] == 3
    assert rows["ok"]["tokens_per_s"] > 0 and rows["ok"]["peak_mib"] >= 0


def test_a_variant_past_its_timeout_or_the_budget_is_recorded() -> None:
    run = fake_run()
    run.args.compile_timeout = 0.2
    base = {"model": "m", "workload": "forward", "loops": 1, "tokens": 4}
    gpu.measure(run, base, {"slow": lambda: lambda: time.sleep(5)}, peak=False)
    assert run.rows[0]["status"] == "error"
    assert run.rows[0]["error"] == "TimeoutError: took longer than 0.2 s"
    spent = fake_run(budget=0.0)
    gpu.measure(spent, base, {"late": lambda: lambda: None}, peak=False)
    assert spent.rows[0]["status"] == "skipped"
    assert spent.rows[0]["error"] == "Skipped: the time budget of 0 s was spent"


def test_a_failing_workload_outside_its_variants_is_one_row() -> None:
    run = fake_run()
    assert gpu.stage(run, "ouro", "build", lambda: 7) == 7 and run.rows == []
    assert gpu.stage(run, "ouro", "step", lambda: 1 / 0) is None
    assert run.rows == [
        {
            "model": "ouro",
            "workload": "step",
            "variant": None,
            "loops": None,
            "status": "error",
            "error": "ZeroDivisionError: division by zero",
        }
    ]
