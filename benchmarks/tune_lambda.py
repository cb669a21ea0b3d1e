"""A small real Optuna study of the STARS penalty weight lam on 3-digit addition.

Every trial trains the CPU recipe of ``benchmarks/stars_scaling.py`` (the TrainConfig
default LoopLM: d=64, 8 heads, FFN 256, prelude and coda around one post-sandwich core
block, init std 0.1; AdamW lr 3e-3, batch 64, 1500 steps) on 3-digit addition with the
STARS loss ``(1 - lam) * CE + lam * JSRR`` (penalty from step 300 on) and random loop
counts ``clamp(round(LogNormal(2, 0.7)), 1, 16)``. The objective is the mean exact-match
accuracy at 4, 8, ..., 128 loops, i.e. up to 8x the deepest training draw. The first six
trials are a log-spaced grid of lam over [1e-3, 1]; TPE proposes the rest. A percentile
pruner that keeps the top 90 % (from the fourth trial and step 500 on) stops a trial whose
accuracy falls into the bottom decile of the earlier trials at the same evaluation: with
these near-saturated curves a median pruner would also stop trials that are merely a
little slower to leave the loss plateau. All trials share one seed (same data, initialisation
and depth draws; identical until the penalty starts), so they differ only in lam.

Prints the trials sorted by lam, names the best lam, and reports the compute saved by
pruning (steps the pruned trials ran versus the steps they would have run). Writes a
JSON file and a plot (objective vs lam on a log axis, accuracy per loop count vs lam),
plus the study's own outputs (best_params.json, trials.csv, history.png) from
``eqloop.tune``.

Usage:
    python benchmarks/tune_lambda.py                  # full: 12 trials x 1500 steps
    python benchmarks/tune_lambda.py --quick --json out.json --plot out.png
    optuna-dashboard sqlite:///runs/bench/tune_lambda/study.db   # browse the study

The same study from the command line (add workers by starting it again elsewhere)::

    eqloop tune --config <out-dir>/<study>/tune_config.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna
from optuna.trial import FrozenTrial, TrialState

from benchmarks.common import format_table, machine_info, write_json_atomic
from eqloop.plotting import pyplot, style_axis
from eqloop.tune import TuneConfig, load_study, pruning_savings, run_study

FULL: dict[str, Any] = {
    "n_trials": 12,
    "grid": 6,
    "loops": [4, 8, 16, 32, 64, 128],
    "base": {  # the CPU recipe of benchmarks/stars_scaling.py (model: TrainConfig defaults)
        "digits": 3,
        "n_train": 20000,
        "n_test": 500,
        "batch_size": 64,
        "steps": 1500,
        "lr": 3e-3,
        "warmup_steps": 75,
        "penalty_start": 300,
        "eval_every": 250,
        "checkpoint_every": 0,
        "seed": 2,
        "depth": {"kind": "lognormal", "mu": 2.0, "sigma": 0.7, "lo": 1, "hi": 16},
    },
    "pruner": "percentile",
    "pruner_options": {"percentile": 90.0, "n_startup_trials": 3, "n_warmup_steps": 500},
}
QUICK: dict[str, Any] = {
    "n_trials": 4,
    "grid": 3,
    "loops": [2, 4, 8],
    "base": {
        "digits": 3,
        "n_train": 512,
        "n_test": 64,
        "batch_size": 32,
        "steps": 24,
        "lr": 1e-3,
        "warmup_steps": 4,
        "penalty_start": 6,
        "eval_every": 8,
        "checkpoint_every": 0,
        "depth": {"kind": "lognormal", "mu": 1.0, "sigma": 0.5, "lo": 1, "hi": 4},
        "model": {"d_model": 16, "n_heads": 2, "d_ff": 32},
    },
    "pruner": "median",
    "pruner_options": {"n_startup_trials": 3, "n_warmup_steps": 0},
}
LAM_RANGE = (1e-3, 1.0)


def tune_config(preset: dict[str, Any], args: argparse.Namespace) -> TuneConfig:
    """The study: lam log-uniform, the preset's pruner, TPE, one shared training seed."""
    base = {**preset["base"]}
    if args.steps is not None:
        base["steps"] = args.steps
    if args.data_cache_dir is not None:
        base["data_cache_dir"] = args.data_cache_dir
    return TuneConfig(
        study_name=args.study_name,
        study_dir=str(args.out_dir),
        n_trials=args.n_trials or preset["n_trials"],
        objective="deep_accuracy",
        loops=list(preset["loops"]),
        space={"lam": {"low": LAM_RANGE[0], "high": LAM_RANGE[1], "log": True}},
        base=base,
        seed_per_trial=False,
        sampler="tpe",
        sampler_options={"n_startup_trials": preset["grid"]},
        sampler_seed=args.seed,
        pruner=preset["pruner"],
        pruner_options=dict(preset["pruner_options"]),
        progress=not args.no_progress,
    )


def grid(k: int) -> list[float]:
    """``k`` values of lam log-spaced over LAM_RANGE (both ends included)."""
    lo, hi = (math.log10(v) for v in LAM_RANGE)
    return [10 ** (lo + (hi - lo) * i / (k - 1)) for i in range(k)] if k > 1 else [10**lo]


def last_eval(trial: FrozenTrial) -> dict[str, float]:
    """Accuracy per loop count at the trial's last evaluation (from its metrics log)."""
    path = Path(trial.user_attrs.get("metrics_path", ""))
    if not path.is_file():
        return {}
    evals = [json.loads(line) for line in path.read_text().splitlines() if '"eval"' in line]
    return evals[-1]["accuracy"] if evals else {}


def trial_rows(study: optuna.Study, loops: list[int]) -> list[dict[str, Any]]:
    """One row per complete or pruned trial, sorted by lam."""
    rows = []
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        reported = (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        )
        row = {
            "trial": t.number,
            "lam": t.params["lam"],
            "state": t.state.name.lower(),
            "steps": t.user_attrs.get("steps_run"),
            "objective": t.value if t.state == TrialState.COMPLETE else reported,
            "seconds": t.user_attrs.get("train_seconds"),
        }
        accuracy = last_eval(t)
        row.update({f"acc@{k}": accuracy.get(str(k)) for k in loops})
        rows.append(row)
    return sorted(rows, key=lambda r: r["lam"])


def savings(study: optuna.Study) -> dict[str, Any]:
    """Pruning savings in steps, and in seconds at the complete trials' rate."""
    out = pruning_savings(study)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    seconds = sum(t.user_attrs.get("train_seconds", 0.0) for t in complete)
    steps = sum(t.user_attrs.get("steps_run", 0) for t in complete)
    out["seconds_per_step"] = seconds / steps if steps else None
    out["seconds_saved_estimate"] = (out["steps_saved"] * seconds / steps) if steps else None
    return out


def plot(
    rows: list[dict[str, Any]], loops: list[int], best: dict[str, Any] | None, path: Path
) -> None:
    """Objective vs lam (log axis) and accuracy per loop count vs lam."""
    plt = pyplot()

    fig, (ax_obj, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "C3")):
        pts = [(r["lam"], r["objective"]) for r in rows if r["state"] == state]
        if pts:
            label = "complete" if state == "complete" else "pruned (last report)"
            ax_obj.plot(*zip(*pts, strict=True), marker, color=color, ls="", label=label)
    if best is not None:
        ax_obj.axvline(best["lam"], color="C2", ls="--", lw=1, label=f"best lam={best['lam']:.3g}")
    complete = [r for r in rows if r["state"] == "complete"]
    for i, t in enumerate(loops):
        pts = [(r["lam"], r[f"acc@{t}"]) for r in complete if r[f"acc@{t}"] is not None]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), "o-", color=f"C{i}", label=f"{t} loops")
    for ax, ylabel in ((ax_obj, f"mean accuracy at loops {loops}"), (ax_acc, "accuracy")):
        ax.set_xscale("log")
        style_axis(ax, "STARS penalty weight lam", ylabel)
    ax_obj.set_title("objective vs lam")
    ax_acc.set_title("exact match per test-time loop count (complete trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset for tests (seconds)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="study directory (default runs/bench/tune_lambda[_quick])",
    )
    p.add_argument("--study-name", default=None, help="default tune-lambda-<date-time>")
    p.add_argument("--n-trials", type=int, default=None, help="trials (default 12; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="training steps per trial")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--data-cache-dir", default=None, help="dataset cache directory")
    p.add_argument("--json", type=Path, default=None, help="results JSON (default in study dir)")
    p.add_argument("--plot", type=Path, default=None, help="plot PNG (default in study dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = Path("runs/bench") / ("tune_lambda_quick" if args.quick else "tune_lambda")
    if args.study_name is None:
        args.study_name = time.strftime("tune-lambda-%Y%m%d-%H%M%S")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study, print the table, write JSON and the plot; return the results."""
    args = parse_args(argv)
    preset = QUICK if args.quick else FULL
    config = tune_config(preset, args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, _, _ = load_study(config)
    if not study.get_trials():
        for lam in grid(min(preset["grid"], config.n_trials)):
            study.enqueue_trial({"lam": lam})
    config.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.out_dir / "tune_config.json", config.to_dict())
    start = time.perf_counter()
    study = run_study(config)
    wall = time.perf_counter() - start

    loops = config.loops
    rows = trial_rows(study, loops)
    best_trial = study.best_trial if study.get_trials(states=(TrialState.COMPLETE,)) else None
    best = (
        None
        if best_trial is None
        else {
            "trial": best_trial.number,
            "lam": best_trial.params["lam"],
            "objective": best_trial.value,
        }
    )
    saved = savings(study)
    columns = [
        ("trial", "trial", "d"),
        ("lam", "lam", ".4g"),
        ("state", "state", "s"),
        ("steps", "steps", "d"),
        ("objective", "objective", ".4f"),
    ]
    columns += [(f"acc@{t}", f"acc@{t}", ".3f") for t in loops]
    columns += [("seconds", "train s", ".1f")]
    print(format_table(rows, columns))
    if best is not None:
        print(
            f"best lam = {best['lam']:.4g} (trial {best['trial']}): mean accuracy at loops "
            f"{loops} = {best['objective']:.4f}"
        )
    print(
        f"pruning: {saved['n_pruned']} trials pruned after {saved['steps_run_pruned']} of "
        f"{saved['steps_full_pruned']} steps; {saved['steps_saved']} steps saved = "
        f"{100 * saved['saved_fraction']:.1f}% of the study's training steps"
        + (
            f" (~{saved['seconds_saved_estimate']:.0f} s)"
            if saved["seconds_saved_estimate"] is not None
            else ""
        )
    )
    print(f"wall time {wall:.0f} s")

    results = {
        "preset": "quick" if args.quick else "full",
        "config": config.to_dict(),
        "study": {
            "name": study.study_name,
            "dir": str(config.out_dir),
            "dashboard": f"optuna-dashboard sqlite:///{Path(args.out_dir).resolve()}/study.db",
        },
        "trials": rows,
        "best": best,
        "pruning": saved,
        "wall_seconds": wall,
        "machine": machine_info(),
    }
    json_path = args.json or config.out_dir / "tune_lambda.json"
    plot_path = args.plot or config.out_dir / "tune_lambda.png"
    write_json_atomic(json_path, results)
    plot(rows, loops, best, plot_path)
    print(f"wrote {json_path}\nwrote {plot_path}")
    return results


if __name__ == "__main__":
    main()
