"""An Optuna study of the STARS penalty weight lam, with the training seed as a nuisance.

The setting is the hardest one of ``experiments/stars_scaling/run.py`` whose objective is not
saturated: the ``stars`` variant's second phase (4-digit addition, no input injection,
random loop counts plus the penalty), warm-started from the seed-0 fixed-loop baseline,
the seed whose baseline is slowest to recover under random loops, and given a short
budget (``--steps``, default 500 instead of the benchmark's 4000). The objective is the
mean exact match at 4, 8, ..., 128 loops.

Every lam in ``--lams`` is trained ``--repeats`` times; eqloop.tune gives trial ``n`` the
training seed ``n`` (data order, loop-count draws, penalty directions), so the trials at
one lam differ only in that seed. All trials are queued up front (the design is a grid:
no sampler decides anything) and no trial is pruned (a pruned trial would leave its lam
with fewer seeds). The report gives each trial, then each lam's mean, worst and best
seed, names the best lam by its mean with its spread, and states the separation: best
minus worst complete trial for lam < 1, in points of exact match.

``--workers 2`` runs a second ``eqloop tune`` worker on the same study (one thread each);
the study lives in ``<out-dir>/<study>/`` and a rerun with the same ``--study-name``
resumes it (``--overwrite`` deletes it and starts again). ``<out-dir>`` is
``runs/bench/tune_lambda``, or ``runs/bench/tune_lambda_quick`` with ``--quick``.

Usage:
    python experiments/stars_scaling/run.py --variants baseline --seeds 0    # the warm start
    python experiments/tune_lambda/run.py --workers 2 --study-name lam-seeds
    python experiments/tune_lambda/run.py --quick --json out.json --plot out.png
    optuna-dashboard sqlite:///runs/bench/tune_lambda/study.db          # browse the study
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import optuna
import torch
from optuna.trial import TrialState

from benchmarks.common import format_table, machine_info, print_written
from eqloop.checkpoint import CHECKPOINT_DIR, step_dir_name
from eqloop.files import write_json_atomic
from eqloop.plotting import pyplot, style_axis
from eqloop.train import train
from eqloop.training.config import TrainConfig
from eqloop.tune import TuneConfig, load_study, run_study
from eqloop.tune.storage import connect
from experiments.stars_scaling.run import FINETUNE, RANDOM, RECIPE, WARM_STEPS, config_dict

PROG = "experiments/tune_lambda/run.py"  # the script in usage and error lines

DEFAULT_INIT = f"runs/stars_scaling/baseline/seed0/{CHECKPOINT_DIR}/{step_dir_name(WARM_STEPS)}"
FULL: dict[str, Any] = {
    "lams": [1e-3, 1e-2, 3e-2, 1e-1, 3e-1],
    "repeats": 2,
    "steps": 500,
    "loops": [4, 8, 16, 32, 64, 128],
}
QUICK: dict[str, Any] = {"lams": [1e-3, 1e-1], "repeats": 2, "steps": 4, "loops": [2, 4, 8]}
QUICK_MODEL = {"d_model": 16, "n_heads": 2, "d_ff": 32}  # the quick preset's tiny baseline


def quick_baseline(out_dir: Path, data_cache_dir: str | None) -> Path:
    """Train the quick preset's warm start (a few steps of a tiny model); its checkpoint."""
    run = out_dir / "baseline"
    base = config_dict(RECIPE)
    config = TrainConfig.from_dict(
        {
            **base,
            "model": {**base["model"], **QUICK_MODEL},
            "digits": 2,
            "n_train": 256,
            "n_test": 32,
            "batch_size": 16,
            "steps": 6,
            "warmup_steps": 2,
            "eval_every": 0,
            "checkpoint_every": 0,
            "out_dir": str(run),
            "resume": True,
            "progress": False,
            **({"data_cache_dir": data_cache_dir} if data_cache_dir else {}),
        }
    )
    train(config)
    return run / CHECKPOINT_DIR / step_dir_name(config.steps)


def tune_config(preset: dict[str, Any], args: argparse.Namespace, init_from: Path) -> TuneConfig:
    """The study: the lam grid times ``repeats`` seeds, warm-started, no sampler, no pruner."""
    base = config_dict(RECIPE)
    steps = args.steps or preset["steps"]
    base.update(
        FINETUNE,
        depth={**RANDOM["depth"], "hi": args.depth_hi},
        init_from=str(init_from),
        steps=steps,
        penalty_start=steps // 5,
        eval_every=steps,
        checkpoint_every=0,
        n_test=args.n_test,
    )
    if args.quick:
        base.update(
            digits=2,
            n_train=256,
            batch_size=16,
            warmup_steps=1,
            n_test=32,
            model={**base["model"], **QUICK_MODEL},
            depth={**RANDOM["depth"], "hi": 4},
        )
    if args.data_cache_dir is not None:
        base["data_cache_dir"] = args.data_cache_dir
    lams = args.lams or preset["lams"]
    return TuneConfig(
        study_name=args.study_name,
        study_dir=str(args.out_dir),
        n_trials=len(lams) * (args.repeats or preset["repeats"]),
        objective="deep_accuracy",
        loops=list(preset["loops"]),
        space={"lam": {"low": min(lams), "high": max(max(lams), min(lams) * 1.0001), "log": True}},
        base=base,
        seed_per_trial=True,
        sampler="random",
        pruner="none",
        max_retry=1,
        progress=not args.no_progress,
    )


def trial_rows(study: optuna.Study, loops: list[int]) -> list[dict[str, Any]]:
    """One row per complete trial, sorted by lam then seed."""
    rows = []
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        accuracy = t.user_attrs.get("accuracy", {})
        row = {
            "trial": t.number,
            "lam": t.params["lam"],
            "seed": t.user_attrs.get("seed"),
            "objective": t.value,
            "seconds": t.user_attrs.get("train_seconds"),
        }
        row.update({f"acc@{k}": accuracy.get(str(k)) for k in loops})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["lam"], r["seed"]))


def per_lam(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each lam's mean, worst and best objective over its seeds, and their spread."""
    out = []
    for lam in sorted({r["lam"] for r in rows}):
        values = [r["objective"] for r in rows if r["lam"] == lam]
        out.append(
            {
                "lam": lam,
                "seeds": len(values),
                "mean": statistics.fmean(values),
                "worst": min(values),
                "best": max(values),
                "spread": max(values) - min(values),
            }
        )
    return out


def separation(rows: list[dict[str, Any]]) -> float | None:
    """Best minus worst complete trial with lam < 1, in points of exact match."""
    values = [r["objective"] for r in rows if r["lam"] < 1]
    return 100 * (max(values) - min(values)) if values else None


def plot(
    rows: list[dict[str, Any]], summary: list[dict[str, Any]], loops: list[int], path: Path
) -> None:
    """Objective vs lam (each seed a dot, the mean a line) and mean accuracy per loop count."""
    plt = pyplot()
    fig, (ax_obj, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_obj.plot(
        [r["lam"] for r in rows],
        [r["objective"] for r in rows],
        "o",
        color="C0",
        alpha=0.6,
        label="one seed",
    )
    ax_obj.plot(
        [s["lam"] for s in summary],
        [s["mean"] for s in summary],
        "-",
        color="C0",
        label="mean over seeds",
    )
    for i, t in enumerate(loops):
        means = [
            statistics.fmean(r[f"acc@{t}"] for r in rows if r["lam"] == s["lam"]) for s in summary
        ]
        ax_acc.plot([s["lam"] for s in summary], means, "o-", color=f"C{i}", label=f"{t} loops")
    for ax, ylabel in (
        (ax_obj, f"mean exact match, {loops[0]}-{loops[-1]} loops"),
        (ax_acc, "exact match (mean over seeds)"),
    ):
        ax.set_xscale("log")
        style_axis(ax, "STARS penalty weight lam", ylabel)
    ax_obj.set_title("objective vs lam, seed as nuisance")
    ax_acc.set_title("per test-time loop count")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny preset for tests (seconds)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="study directory (default runs/bench/tune_lambda[_quick])",
    )
    p.add_argument("--study-name", default=None, help="default tune-lambda-<date-time>")
    p.add_argument(
        "--lams", default=None, help=f"comma-separated lam values (default {FULL['lams']})"
    )
    p.add_argument("--repeats", type=int, default=None, help="seeds per lam (default 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per trial (500)")
    p.add_argument("--depth-hi", type=int, default=32, help="largest sampled loop count")
    p.add_argument("--n-test", type=int, default=500, help="test problems per loop count")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help=f"warm-start checkpoint (default {DEFAULT_INIT})",
    )
    p.add_argument("--workers", type=int, default=1, help="workers on the study (1 thread each)")
    p.add_argument("--data-cache-dir", default=None, help="dataset cache directory")
    p.add_argument("--json", type=Path, default=None, help="results JSON (default in study dir)")
    p.add_argument("--plot", type=Path, default=None, help="plot PNG (default in study dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the study named --study-name (its trials, runs and outputs) "
        "and, with --quick, the quick warm start, then run it again",
    )
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = Path("runs/bench") / ("tune_lambda_quick" if args.quick else "tune_lambda")
    if args.study_name is None:
        args.study_name = time.strftime("tune-lambda-%Y%m%d-%H%M%S")
    if args.lams is not None:
        try:
            args.lams = sorted(float(v) for v in args.lams.split(",") if v)
        except ValueError:
            p.error(f"--lams takes comma-separated numbers, got {args.lams!r}")
        if not args.lams or min(args.lams) <= 0:
            p.error("--lams needs at least one value, all > 0 (lam is searched on a log scale)")
    for name in ("repeats", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 1 <= args.workers <= 8:
        p.error("--workers must be between 1 and 8")
    if args.init_from is not None and not args.init_from.is_dir():
        p.error(f"--init-from {args.init_from}: no such checkpoint directory")
    return args


def start_workers(config_path: Path, n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` more ``eqloop tune`` workers on the study of ``config_path``, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "eqloop.cli",
        "tune",
        "--config",
        str(config_path),
        "--no-progress",
    ]
    return [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL) for _ in range(n)]


def delete_study(config: TuneConfig) -> None:
    """Delete ``config``'s study from its storage and its directory (trial runs, outputs)."""
    storage, _ = connect(config)
    with contextlib.suppress(KeyError):  # KeyError: no such study yet
        optuna.delete_study(study_name=config.study_name, storage=storage)
    shutil.rmtree(config.out_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study, print the tables, write JSON and the plot; return the results."""
    args = parse_args(argv)
    preset = QUICK if args.quick else FULL
    if args.overwrite and args.quick and args.init_from is None:
        shutil.rmtree(args.out_dir / "baseline", ignore_errors=True)  # the quick warm start
    if args.init_from is not None:
        init_from = args.init_from
    elif args.quick:
        init_from = quick_baseline(args.out_dir, args.data_cache_dir)
    else:
        init_from = Path(DEFAULT_INIT)
        if not init_from.is_dir():
            sys.exit(
                f"tune_lambda: error: no warm-start checkpoint at {init_from}; train it "
                "with `python experiments/stars_scaling/run.py --variants baseline --seeds 0` "
                "or pass --init-from"
            )
    config = tune_config(preset, args, init_from)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.overwrite:
        delete_study(config)
    try:
        study, _, _ = load_study(config)
    except ValueError as error:  # e.g. a study of this name made with other settings
        sys.exit(
            f"{PROG}: error: {error}. With this script: --overwrite deletes "
            f"study {config.study_name!r} and runs it again, or pass another --study-name"
        )
    if not study.get_trials():
        for _ in range(config.n_trials // len(args.lams or preset["lams"])):
            for lam in args.lams or preset["lams"]:
                study.enqueue_trial({"lam": lam})
    config.out_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.out_dir / "tune_config.json"
    write_json_atomic(config_path, config.to_dict())
    if args.workers > 1:
        torch.set_num_threads(1)
    start = time.perf_counter()
    others = start_workers(config_path, args.workers - 1)
    study = run_study(config)
    failed = [w.wait() for w in others]
    wall = time.perf_counter() - start

    loops = config.loops
    rows = trial_rows(study, loops)
    summary = per_lam(rows)
    best = max(summary, key=lambda s: s["mean"]) if summary else None
    columns = [
        ("trial", "trial", "d"),
        ("lam", "lam", ".4g"),
        ("seed", "seed", "d"),
        ("objective", "objective", ".4f"),
    ]
    columns += [(f"acc@{t}", f"acc@{t}", ".3f") for t in loops]
    print(format_table(rows, [*columns, ("seconds", "train s", ".1f")]))
    print()
    print(
        format_table(
            summary,
            [
                ("lam", "lam", ".4g"),
                ("seeds", "seeds", "d"),
                ("mean", "mean", ".4f"),
                ("worst", "worst seed", ".4f"),
                ("best", "best seed", ".4f"),
                ("spread", "spread", ".4f"),
            ],
        )
    )
    sep = separation(rows)
    if best is not None:
        print(
            f"best lam = {best['lam']:.4g}: mean objective {best['mean']:.4f} over "
            f"{best['seeds']} seeds (worst {best['worst']:.4f}, best {best['best']:.4f})"
        )
        print(f"separation (best - worst complete trial, lam < 1): {sep:.1f} points")
    if any(failed):
        print(
            f"warning: {sum(map(bool, failed))} extra worker(s) exited with an error",
            file=sys.stderr,
        )
    print(f"wall time {wall:.0f} s ({args.workers} worker(s))")

    results = {
        "preset": "quick" if args.quick else "full",
        "config": config.to_dict(),
        "study": {
            "name": study.study_name,
            "dir": str(config.out_dir),
            "dashboard": f"optuna-dashboard sqlite:///{Path(args.out_dir).resolve()}/study.db",
        },
        "trials": rows,
        "per_lam": summary,
        "best": best,
        "separation_points": sep,
        "incomplete_trials": len(study.trials) - len(rows),
        "workers": args.workers,
        "wall_seconds": wall,
        "machine": machine_info(),
    }
    json_path = args.json or config.out_dir / "tune_lambda.json"
    plot_path = args.plot or config.out_dir / "tune_lambda.png"
    write_json_atomic(json_path, results)
    plot(rows, summary, loops, plot_path)
    print_written(json_path, plot_path)
    return results


if __name__ == "__main__":
    main()
