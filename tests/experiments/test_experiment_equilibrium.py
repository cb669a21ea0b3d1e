"""experiments/equilibrium/run.py: the quick run end to end, its schema and cache, the measured
training step, the random start, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_experiment

from eqloop.models.looplm.modeling import LoopLM
from eqloop.recipes.train import make_train_tensors, train_step
from eqloop.training.optim import make_optimizer
from experiments.equilibrium.run import STARTS, check_targets, main, parse_args, step_config
from experiments.stars_scaling.run import (
    ADJOINT_TOL,
    DEQ,
    DEQ_SHARE,
    GROUPS,
    VARIANTS,
    run_config,
    warm_chain,
)
from experiments.stars_scaling.run import parse_args as stars_args


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The benchmark's runs set one torch thread; give the test process its count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_the_schema_and_reuses_its_cache(
    tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    files = {"json": tmp_path / "eq.json", "plot": tmp_path / "eq.png"}
    # stars (the reference) and one implicit variant keep this in seconds; the slow test
    # runs the default variants as a script.
    argv = ["--quick", "--variants", "stars,deq_ift", "--no-progress", "--out-dir", str(out)]
    main([*argv, "--json", str(files["json"]), "--plot", str(files["plot"])])
    printed = capsys.readouterr().out
    assert "exact match at t unrolled loops" in printed and "targets (issue 20)" in printed
    data = json.loads(files["json"].read_text())
    assert {"machine", "date", "command", "settings", "wall_seconds", "results"} <= set(data)
    assert data["command"].startswith("python experiments/equilibrium/run.py --quick")
    assert data["settings"]["evaluation"]["tol"] == 1e-4
    assert data["settings"]["variants"]["deq_ift"]["overrides"]["backward"] == "ift"
    results = data["results"]
    assert [(r["variant"], r["seed"]) for r in results] == [("stars", 0), ("deq_ift", 0)]
    keys = {f"{s}@{start}" for s in ("fixed_point", "anderson", "broyden") for start in STARTS}
    for res in results:
        assert set(res["accuracy"]) == {"1", "2", "4", "8"}
        assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
        assert set(res["equilibria"]) == keys
        for eq in res["equilibria"].values():
            assert 0.0 <= eq["accuracy"] <= 1.0 and 0.0 <= eq["converged"] <= 1.0
            assert 1 <= eq["median_nfe"] <= 20  # the quick budget
        assert res["rho"]["median"] > 0 and 0 <= res["rho"]["share_below_1"] <= 1
        assert set(res["memory"]) == set(res["step_ms"]) == {"12", "16"}
        assert all(ms > 0 for ms in res["step_ms"].values())
    by = {r["variant"]: r for r in results}
    # Unrolled memory grows with depth; a step at the fixed point saves the same bytes.
    assert by["stars"]["memory"]["16"] > by["stars"]["memory"]["12"] > 0
    assert by["deq_ift"]["trained_at"] == "fixed_point" and by["deq_ift"]["backward"] == "ift"
    deq_memory = by["deq_ift"]["memory"]
    assert 0 < deq_memory["16"] == deq_memory["12"]
    assert (
        deq_memory["16"] - deq_memory["12"]
        < by["stars"]["memory"]["16"] - by["stars"]["memory"]["12"]
    )
    assert by["stars"]["step_ratio"] == {"12": 1.0, "16": 1.0}
    # The runs' own steps: the implicit one solved (at most solve.max_iter f-evaluations).
    assert by["stars"]["training"]["fwd_nfe_mean"] is None
    assert 1 <= by["deq_ift"]["training"]["fwd_nfe_mean"] <= 30
    assert by["deq_ift"]["training"]["bwd_nfe_mean"] >= 1
    assert all(r["training"]["seconds_per_step"] > 0 for r in results)
    targets = {(t["variant"], t["target"]): t for t in data["targets"]}
    flat = targets["deq_ift", "saved bytes at depth 16 <= 1.1x at 12"]
    ratio = deq_memory["16"] / deq_memory["12"]
    assert flat["passed"] and flat["value"] == f"{ratio:.3f}x"
    assert f"PASS  deq_ift: saved bytes at depth 16 <= 1.1x at 12: {ratio:.3f}x" in printed
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"

    # A rerun trains nothing and evaluates nothing: every run file and cache is kept.
    kept = [p for p in out.rglob("*") if p.suffix in (".json", ".safetensors")]
    assert sum(p.name == "equilibrium.json" for p in kept) == 2  # not in baseline runs
    stamp = {p: p.stat().st_mtime_ns for p in kept}
    again = main([*argv, "--json", str(tmp_path / "again.json")])
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert again["results"] == results


def test_unknown_variants_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--quick", "--variants", "stars,nonsense"])
    assert exit_info.value.code == 2
    assert "unknown variant(s) ['nonsense']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--solvers", "fixed_point,newton"])
    assert "--solvers: unknown or none ['newton']" in capsys.readouterr().err


def test_groups_and_defaults() -> None:
    args = parse_args([])
    assert args.variants == ["stars", "stars_path", "deq_ift", "deq_phantom"]
    assert args.out_dir == "runs/stars_scaling" and args.depths == [8, 32]
    assert parse_args(["--quick"]).out_dir == "runs/stars_scaling_quick"
    assert parse_args(["--variants", "equilibrium"]).variants == ["deq_ift", "deq_phantom"]
    assert GROUPS["equilibrium"] == ("deq_ift", "deq_phantom")


def test_equilibrium_variants_train_at_the_fixed_point(tmp_path: Path) -> None:
    args = stars_args(["--out-dir", str(tmp_path)])
    adjoint = {"backward_options": {"tol": ADJOINT_TOL}}
    for variant, backward, extra in (("deq_ift", "ift", adjoint), ("deq_phantom", "phantom", {})):
        assert VARIANTS[variant].overrides == {**DEQ, "backward": backward, **extra}
        config = run_config(variant, 2, args)
        config.validate()
        assert config.backward == backward and config.model.injection == "add"
        assert config.random_start == 0.5 and config.solve.start_loops == 0
        assert (config.solve.solver, config.solve.tol, config.solve.max_iter) == (
            "anderson",
            1e-4,
            30,
        )
        steps = round(DEQ_SHARE * args.steps)
        assert (config.lam, config.penalty_at, config.steps) == (0.1, "fixed_point", steps)
        assert config.penalty_start == steps // 5
        if backward == "ift":  # the adjoint solved looser than the forward
            assert config.make_backward().tol == ADJOINT_TOL > config.solve.tol
        assert config.checkpoint_every == steps // 4
        # From stars_path's last step, which itself starts from baseline_add's.
        assert config.init_from == str(
            tmp_path / "stars_path" / "seed2" / "checkpoints" / f"step_{args.steps:08d}"
        )
        assert warm_chain(variant) == ["baseline_add", "stars_path"]


def test_the_measured_step_runs_exactly_depth_f_evaluations(tmp_path: Path) -> None:
    args = parse_args(["--quick", "--out-dir", str(tmp_path)])
    config = run_config("deq_ift", 0, args)
    budget = 8 - config.solve.start_loops  # the solve's evaluations after the plain loops
    measured, loops = step_config(config, 8)
    assert loops is None and measured.solve.tol == 0.0 and measured.solve.max_iter == budget
    assert measured.penalty_at == "trajectory" and config.solve.tol == 1e-4  # a copy
    model = LoopLM(measured.model)
    x, y = make_train_tensors(measured)
    optimizer = make_optimizer(model, measured)
    stats = train_step(model, model, optimizer, x[:4], y[:4], loops, measured, penalty_on=True)
    assert stats["fwd_nfe"] == budget and float(stats["fwd_converged"]) == 0.0
    # A recipe that skips unconverged sequences is timed with its whole CE (and adjoint).
    config.solve.skip_unconverged = True
    skipping, _ = step_config(config, 8)
    assert not skipping.solve.skip_unconverged
    stats = train_step(model, model, optimizer, x[:4], y[:4], None, skipping, penalty_on=False)
    assert float(stats["ce"]) > 0 and stats["bwd_nfe"] > 0
    stars = run_config("stars", 0, args)
    assert step_config(stars, 6) == (stars, 6)
    started = run_config("deq_ift", 0, args)
    started.solve.start_loops = 6
    with pytest.raises(ValueError, match=r"--depths 6 must exceed solve.start_loops \(6\)"):
        step_config(started, 6)


@pytest.mark.slow
def test_script_runs_two_jobs_and_refuses_bad_input(tmp_path: Path) -> None:
    out = str(tmp_path / "runs")
    proc = run_experiment("equilibrium", "--quick", "--jobs", "2", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "done measure_one deq_phantom seed 0" in proc.stdout
    assert "MISS  deq_phantom: mean exact match >= 0.99 at z* of every solver" in proc.stdout
    phantom = json.loads((Path(out) / "deq_phantom" / "seed0" / "equilibrium.json").read_text())
    memory = phantom["result"]["memory"]
    assert phantom["result"]["backward"] == "phantom" and 0 < memory["16"] <= 1.05 * memory["12"]
    proc = run_experiment("equilibrium", "--quick", "--variants", "deq_ift,nonsense")
    assert proc.returncode == 2 and "unknown variant(s) ['nonsense']" in proc.stderr
    proc = run_experiment(
        "equilibrium", "--quick", "--variants", "deq_ift", "--out-dir", out, "--set", "lr=0.01"
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "experiments/equilibrium/run.py: error: cannot resume the run in" in proc.stderr


def _result(variant: str, seed: int, trained_at: str, acc: float, nfe: float) -> dict[str, Any]:
    """A results entry with every loop count at ``acc`` and every z* at ``acc``, the plain
    iteration at 10 f-evaluations and Anderson at ``nfe``; memory 1 MiB at depth 8."""
    args = parse_args([])
    eq = {
        f"{solver}@{start}": {
            "accuracy": acc,
            "converged": 1.0,
            "median_nfe": nfe if solver == "anderson" else 10.0,
        }
        for solver in args.solvers
        for start in STARTS
    }
    return {
        "variant": variant,
        "seed": seed,
        "trained_at": trained_at,
        "accuracy": {str(t): acc for t in args.loops},
        "equilibria": eq,
        "memory": {"8": 2**20, "32": 1.2 * 2**20},
        "step_ratio": {"8": 1.4, "32": 0.8},
    }


def test_targets_count_seeds_and_name_the_worst() -> None:
    args = parse_args([])
    results = [_result("deq_ift", s, "fixed_point", 1.0 if s else 0.96, 4.0) for s in range(10)]
    results += [_result("stars_path", s, "unrolled", 0.9 if s < 2 else 1.0, 10) for s in range(10)]
    lines = {(t["variant"], t["target"]): t for t in check_targets(results, args)}
    every = lines["deq_ift", "mean exact match >= 0.99 at z* of every solver@start"]
    assert every["passed"] and every["value"].startswith("lowest mean 0.9960")
    # Seed 0 is at 0.96 < 0.97: 9 of 10 seeds still pass.
    nine = lines["deq_ift", ">= 9 of 10 seeds at >= 0.97 on every solver@start"]
    assert nine["passed"] and nine["value"] == "9 seeds ([1, 2, 3, 4, 5, 6, 7, 8, 9])"
    assert lines["deq_ift", "anderson median f-evals <= 0.5x fixed_point (from z0)"]["passed"]
    memory = lines["deq_ift", "saved bytes at depth 32 <= 1.1x at 8"]
    assert not memory["passed"] and memory["value"] == "1.200x"
    step = lines["deq_ift", "step time <= 1.5x stars at equal mean depth"]
    assert step["passed"] and step["value"] == "1.40x at 8, 0.80x at 32"
    # Every unrolled variant gets the headline's loop-count target: 8 of 10 is a miss.
    loops = lines["stars_path", ">= 9 of 10 seeds at >= 0.95 at every loop count 4..128"]
    assert not loops["passed"] and loops["value"].startswith("8 seeds ([2, 3")
