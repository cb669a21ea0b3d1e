"""The benchmark scripts run end to end in their --quick mode and write valid output."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from helpers import run_benchmark

import solvers
from benchmarks.common import command_line, int_list


def test_solve_compare_quick_writes_json_and_plot(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "compare.json", tmp_path / "compare.png"
    proc = run_benchmark(
        "solve_compare.py", "--quick", "--json", str(out_json), "--plot", str(out_png)
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out_json}\nwrote {out_png}" in proc.stdout  # says where it wrote
    data = json.loads(out_json.read_text())
    rows = data["results"]
    problems = {r["problem"] for r in rows}
    assert {"sym-0.99", "sym-0.99-weak", "affine", "looplm"} <= problems
    assert {r["solver"] for r in rows} == set(solvers.available())
    for row in rows:
        assert row["nfe"] >= 1 and 0.0 <= row["converged"] <= 1.0
        assert row["wall_ms"] > 0 and row["peak_mem_mb"] > 0
    # eqloop's own solvers converge on every quick problem, and find the affine answer.
    for row in rows:
        own = row["solver"] in ("fixed_point", "anderson", "broyden")
        if own and row["problem"] != "sym-0.99-weak":
            assert row["converged"] == 1.0, row
        if row["problem"] == "affine" and row["converged"] == 1.0:
            assert row["max_error_vs_answer"] < 1e-3
    assert out_png.stat().st_size > 10_000
    assert "f-evals" in proc.stdout  # the table was printed


def test_solve_compare_rejects_unknown_solver() -> None:
    proc = run_benchmark("solve_compare.py", "--quick", "--solvers", "newton")
    assert proc.returncode != 0
    assert "unknown solver" in proc.stderr and "anderson" in proc.stderr


@pytest.mark.parametrize("flag", ["--problems=nonsense"])
def test_solve_compare_rejects_unknown_problem(flag: str) -> None:
    proc = run_benchmark("solve_compare.py", "--quick", flag)
    assert proc.returncode != 0
    assert "unknown problem" in proc.stderr


def test_solve_compare_solves_a_trained_checkpoint(tmp_path: Path) -> None:
    from eqloop.recipes.train import train
    from eqloop.training.config import TrainConfig

    run = tmp_path / "run"
    config = TrainConfig.from_dict(
        dict(
            model={"d_model": 16, "n_heads": 2, "d_ff": 32, "max_seq_len": 16},
            digits=2,
            n_train=64,
            n_test=16,
            batch_size=16,
            steps=2,
            warmup_steps=1,
            eval_every=0,
            checkpoint_every=0,
            out_dir=str(run),
            progress=False,
            data_cache_dir=str(tmp_path / "cache"),
        )
    )
    train(config)
    out_json = tmp_path / "compare.json"
    proc = run_benchmark(
        "solve_compare.py",
        "--quick",
        "--problems",
        "looplm",
        "--solvers",
        "fixed_point,anderson",
        "--checkpoint",
        str(run),
        "--json",
        str(out_json),
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out_json.read_text())["results"]
    assert {r["problem"] for r in rows} == {"looplm"}
    assert {r["solver"] for r in rows} == {"fixed_point", "anderson"}


def test_int_list_parses_in_order_and_names_the_option() -> None:
    assert int_list("8,4, 16,", "--loops", 1) == [8, 4, 16]
    assert int_list("0", "--seeds", 0) == [0]
    with pytest.raises(ValueError, match=r"--seeds takes comma-separated integers, got '1,x'"):
        int_list("1,x", "--seeds", 0)
    with pytest.raises(ValueError, match=r"--loops needs at least one integer, each >= 1"):
        int_list("4,0", "--loops", 1)
    with pytest.raises(ValueError, match=r"--depths needs at least one integer"):
        int_list(",", "--depths", 1)


def test_command_line_quotes_the_arguments_a_shell_would_split() -> None:
    line = command_line("benchmarks/x.py", ["--set", "depth={'t': 8}", "--seeds", "0,1"])
    assert line == "python benchmarks/x.py --set 'depth={'\"'\"'t'\"'\"': 8}' --seeds 0,1"
    assert shlex.split(line)[2:] == ["--set", "depth={'t': 8}", "--seeds", "0,1"]
