"""experiments/stars_scaling/run.py: the quick run end to end, resumption, tables, bad input."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, run_experiment

from experiments.stars_scaling.run import (
    FINETUNE,
    GROUPS,
    RECIPE,
    VARIANTS,
    _run_jobs,
    accuracy_table,
    carry_chain,
    dynamics_table,
    parse_args,
    run_config,
    solver_spec,
)


@pytest.mark.slow  # 33 s; test_runs_start_in_the_order_asked_for stays in the default run
def test_quick_run_trains_evaluates_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ("--quick", "--variants", "headline", "--out-dir", str(out), "--jobs", "2")
    names = (("json", "json"), ("plot", "png"), ("pca", "png"), ("scaling", "png"))
    files = {k: tmp_path / f"{k}.{ext}" for k, ext in names}
    proc = run_experiment(
        "stars_scaling",
        *args,
        "--json",
        str(files["json"]),
        "--plot",
        str(files["plot"]),
        "--pca",
        str(files["pca"]),
        "--scaling",
        str(files["scaling"]),
    )
    assert proc.returncode == 0, proc.stderr
    assert "exact match at t loops and at the equilibrium" in proc.stdout
    data = json.loads(files["json"].read_text())
    assert data["command"].startswith("python experiments/stars_scaling/run.py --quick")
    assert data["total_seconds"] >= data["wall_seconds"] > 0
    results = data["results"]
    assert [(r["variant"], r["seed"]) for r in results] == [
        ("baseline_add", 0),
        ("baseline_add", 1),
        ("stars_path", 0),
        ("stars_path", 1),
    ]
    for res in results:
        assert res["digits"] == 2 and set(res["accuracy"]) == {"1", "2", "4", "8"}
        assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
        assert 0.0 <= res["equilibrium"] <= 1.0
        assert [d["loops"] for d in res["dynamics"]] == [1, 2, 4, 8]
        assert all(d["state_norm"] > 0 and d["rho_median"] > 0 for d in res["dynamics"])
    # The table's mean and worst seed are those of the per-seed entries.
    for row in data["accuracy_table"]:
        runs = [r for r in results if r["variant"] == row["variant"]]
        values = [r["accuracy"]["8"] for r in runs]
        assert row["L8"] == pytest.approx([sum(values) / len(values), min(values)])
    assert data["variants"]["stars_path"]["overrides"]["lam"] == 0.1
    assert data["variants"]["stars_path"]["overrides"]["random_start"] == 0.5
    assert data["penalty_overhead"]["variant"] == "stars_path"
    assert data["pca"]["stars_path"]["explained"][0] > 0
    scaling = data["scaling"]["table"]
    assert [(r["variant"], r["split"]) for r in scaling] == [
        ("baseline_add", "long_carry"),
        ("baseline_add", "ood"),
        ("stars_path", "long_carry"),
        ("stars_path", "ood"),
    ]
    assert scaling[0]["depth"] == 4.0 and 0 <= scaling[0]["x2"][0] <= 1
    for key in ("plot", "pca", "scaling"):
        assert files[key].read_bytes()[:4] == b"\x89PNG"

    # Rerunning trains nothing and reuses every cached evaluation.
    kept = [p for p in out.rglob("*") if p.suffix in (".json", ".safetensors")]
    stamp = {p: p.stat().st_mtime_ns for p in kept}
    again = run_experiment("stars_scaling", *args)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


@pytest.mark.slow
def test_bad_arguments_exit_with_a_message() -> None:
    proc = run_experiment("stars_scaling", "--quick", "--variants", "baseline,nonsense")
    assert proc.returncode == 2 and "unknown variant(s) ['nonsense']" in proc.stderr
    proc = run_experiment("stars_scaling", "--quick", "--set", "lr")
    assert proc.returncode == 2 and "must look like KEY=VALUE" in proc.stderr
    proc = run_experiment("stars_scaling", "--quick", "--solver", "fixed_point,anderson@x")
    assert proc.returncode == 2 and "write NAME@K" in proc.stderr
    proc = run_experiment("stars_scaling", "--quick", "--solver", "newton@4")
    assert proc.returncode == 2 and "unknown solver(s) ['newton']" in proc.stderr


def test_solver_spec_names_the_start() -> None:
    assert solver_spec("anderson") == ("anderson", {})
    assert solver_spec("broyden@4") == ("broyden", {"start_loops": 4})


def test_groups_name_known_variants() -> None:
    assert GROUPS["headline"] == ("baseline_add", "stars_path")
    assert GROUPS["paper"] == ("baseline", "stars")
    assert set(GROUPS["all"]) == set(VARIANTS)
    assert all(name in VARIANTS for names in GROUPS.values() for name in names)


def test_carry_chain() -> None:
    assert carry_chain("0000+0000") == 0
    assert carry_chain("0195+0005") == 2  # 5+5 carries, 9+0+1 carries, 1+0+1 does not
    assert carry_chain("9999+0001") == 4
    assert carry_chain("5050+5050") == 1
    assert carry_chain("5910+5000", reverse_operands=True) == 2  # "0195+0005" written LSB first


def test_tables_take_mean_and_worst_seed() -> None:
    def entry(variant: str, seed: int, acc: float, norm: float) -> dict:
        return {
            "variant": variant,
            "seed": seed,
            "accuracy": {4: acc, 8: acc / 2},
            "equilibrium": acc,
            "dynamics": [{"loops": 4, "state_norm": norm, "step_norm": 1.0, "rho_median": 0.5}],
            "equilibrium_details": {"state_norm": norm, "rho_median": 0.25},
        }

    results = [entry("a", 0, 1.0, 2.0), entry("a", 1, 0.5, 4.0), entry("b", 0, 0.2, 1.0)]
    rows = accuracy_table(results, [4, 8])
    assert rows[0] == {
        "variant": "a",
        "seeds": 2,
        "L4": (0.75, 0.5),
        "L8": (0.375, 0.25),
        "eq": (0.75, 0.5),
    }
    assert rows[1]["L4"] == (0.2, 0.2)
    dyn = dynamics_table(results, [4, 8])
    assert dyn[0] == {
        "variant": "a",
        "loops": "4",
        "state_norm": 3.0,
        "step_norm": 1.0,
        "rho_median": 0.5,
    }
    assert dyn[1]["loops"] == "z*" and dyn[1]["rho_median"] == 0.25


def test_set_overrides_reach_warm_started_variants(tmp_path: Path) -> None:
    args = parse_args(["--out-dir", str(tmp_path), "--set", "warmup_steps=300"])
    stars, baseline = run_config("stars", 1, args), run_config("baseline", 1, args)
    assert stars.warmup_steps == baseline.warmup_steps == 300  # --set wins over FINETUNE
    assert stars.lr == FINETUNE["lr"] and baseline.lr == RECIPE["lr"]
    assert stars.init_from == str(
        tmp_path / "baseline" / "seed1" / "checkpoints" / f"step_{args.warm_steps:08d}"
    )
    assert (stars.lam, stars.depth["hi"], stars.penalty_start) == (0.1, 32, args.steps // 5)


@pytest.mark.slow
def test_a_finished_run_of_another_recipe_is_refused_not_reused(tmp_path: Path) -> None:
    args = ("--quick", "--variants", "baseline", "--seeds", "0", "--out-dir", str(tmp_path))
    assert run_experiment("stars_scaling", *args).returncode == 0
    proc = run_experiment("stars_scaling", *args, "--set", "lr=0.01")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "experiments/stars_scaling/run.py: error: cannot resume the run in" in proc.stderr
    assert "['lr']" in proc.stderr
    # Two at a time (a process pool), the refusal is the same one-line error.
    proc = run_experiment(
        "stars_scaling",
        *args[:-4],
        "--seeds",
        "0,1",
        "--jobs",
        "2",
        "--out-dir",
        str(tmp_path),
        "--set",
        "lr=0.01",
    )
    assert proc.returncode == 1 and "cannot resume the run in" in proc.stderr


def _record_start(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """A job of ``_run_jobs`` (module level, so spawned workers can import it).

    It logs its start; ``src1`` then runs until ``x0`` has started and ``x0`` until
    the run after it has (so one worker is free while ``x0`` runs); at most 30 s.
    """
    log = Path(args.out_dir) / "started.txt"
    with open(log, "a") as file:
        file.write(f"{variant}{seed}\n")
    wait_for = {"src1": ("x0",), "x0": ("x1", "y0")}.get(f"{variant}{seed}", ())
    deadline = time.monotonic() + 30
    while wait_for and time.monotonic() < deadline:
        if set(wait_for) & set(log.read_text().split()):
            break
        time.sleep(0.02)
    return {"variant": variant, "seed": seed}


def test_runs_start_in_the_order_asked_for(tmp_path: Path) -> None:
    # x and y start from src of their seed. When src1 is done, x0 still runs and both x1
    # and y0 can start on the free worker: the order asked for puts x1 first (a pool that
    # queued every run as soon as it was ready would start y0, queued earlier).
    pairs = [("src", 0), ("src", 1), ("x", 0), ("x", 1), ("y", 0), ("y", 1)]
    args = argparse.Namespace(jobs=2, out_dir=str(tmp_path))
    done = _run_jobs(_record_start, pairs, args, lambda p: None if p[0] == "src" else ("src", p[1]))
    assert sorted(done) == sorted(pairs)
    started = (tmp_path / "started.txt").read_text().split()  # src1 may log after x0
    assert [run for run in started if run[0] in "xy"] == ["x0", "x1", "y0", "y1"]


def test_quick_runs_keep_their_own_directory() -> None:
    # A smoke run must never share its run directory with the full benchmark's runs.
    assert parse_args([]).out_dir == "runs/stars_scaling"
    assert parse_args(["--quick"]).out_dir == "runs/stars_scaling_quick"
    assert parse_args(["--quick", "--out-dir", "elsewhere"]).out_dir == "elsewhere"


@pytest.mark.slow
def test_overwrite_retrains_a_run_of_another_recipe(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ("--quick", "--variants", "baseline", "--seeds", "0", "--out-dir", str(out))
    first = run_experiment("stars_scaling", *args, "--json", str(tmp_path / "a.json"))
    assert first.returncode == 0, first.stderr
    assert f"wrote {tmp_path / 'a.json'}" in first.stdout and f"runs in {out}" in first.stdout
    refused = run_experiment("stars_scaling", *args, "--set", "lr=0.01")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--overwrite retrains the runs it needs" in refused.stderr
    again = run_experiment("stars_scaling", *args, "--set", "lr=0.01", "--overwrite")
    assert again.returncode == 0, again.stderr
    saved = json.loads((out / "baseline" / "seed0" / "config.json").read_text())
    assert saved["lr"] == 0.01


@pytest.mark.slow  # ~30 s each: 2-digit baselines started, then stopped
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_the_runs_which_save_their_step(tmp_path: Path, jobs: int) -> None:
    out = tmp_path / "runs"
    script = [sys.executable, "experiments/stars_scaling/run.py", "--variants", "baseline"]
    options = ["--seeds", "0,1", "--jobs", str(jobs), "--out-dir", str(out), "--no-progress"]
    recipe = ["digits=2", "n_train=512", "n_test=32", "batch_size=32", "log_every=1"]
    sets = [part for value in recipe for part in ("--set", value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen(
        [*script, *options, *sets], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    running = [out / "baseline" / f"seed{s}" / "metrics.jsonl" for s in range(jobs)]
    deadline = time.monotonic() + 240
    while not all(m.is_file() and '"step"' in m.read_text() for m in running):
        assert parent.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=180)
    assert parent.returncode != 0 and "Traceback" not in stderr, stderr
    assert "the same command resumes" in stderr
    if jobs == 2:
        assert "SIGTERM: stopped 2 running job(s)" in stderr
    sizes = [m.stat().st_size for m in running]
    time.sleep(3)
    assert [m.stat().st_size for m in running] == sizes  # no worker trains on unseen
    for m in running:  # each run saved the step it was stopped at
        assert list((m.parent / "checkpoints").glob("step_*")), m.parent
