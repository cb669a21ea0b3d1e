"""Equilibrium LoopLMs on 4-digit addition: trained at the fixed point, found by any solver.

Trains (through ``experiments/stars_scaling/run.py``'s machinery: its recipe, its variant
table, its resumable run directories ``out_dir/<variant>/seed<k>``, ``--jobs``) and then
measures, per (variant, seed):

  accuracy     exact match (teacher-forced, see :mod:`eqloop.evaluation`) after 1, 2, 4, ...,
               128 unrolled loops.
  equilibria   for each solver of ``--solvers`` (fixed_point, anderson, broyden) and each
               start: exact match at the z* it returns, the share of test sequences whose
               relative residual ``||f(z) - z|| / ||f(z)||`` reached ``--tol`` (1e-4) within
               ``--max-iter`` (100) f-evaluations, and the median f-evaluations per sequence
               (the budget for a sequence that did not converge). Starts:
                 z0      the loop's own initial state.
                 random  a seeded Gaussian state with the per-token RMS of the state after
                         one loop, ``z = g * rms(f(z0))`` with ``g ~ N(0, I)`` per token and
                         ``rms`` over the d features; every post-norm block rescales its
                         output, so this is the scale of every iterate. The one f-evaluation
                         that sets the scale is not counted. Seeded by ``--seed-eval`` + seed.
               A model whose fixed point is a function of its input reaches the same z*
               (and accuracy) from both; one without injection cannot, its input lives
               only in z0.
  rho          the spectral radius of J(z*) at the plain iteration's z* from z0 (power
               iteration, ``--rho-iters`` steps, on the first ``--diagnostic-samples`` test
               sequences): median, max, share below 1 (:func:`eqloop.evaluation.
               equilibrium_diagnostics`).
  memory       bytes autograd saves during one training step (forward, penalty and
               backward; :func:`benchmarks.memory_depth.saved_bytes`: distinct
               non-parameter storages) at each mean depth of ``--depths`` (8, 32). A
               variant trained at the fixed point runs exactly that many f-evaluations
               (its forward solver with tol 0 and max_iter = depth - start_loops); an
               unrolled variant runs a fixed loop count equal to the mean depth (its saved
               bytes are linear in the loops, so this is also the mean over random depths).
               Penalty on when the variant's lam > 0, as in the trained steps; with a
               forward solve it is taken at the point the solve returned (see
               :func:`step_config`).
  step_ms      median wall time of that training step; each variant's steps are
               interleaved with those of ``stars`` at the same depth (``--time-repeats``
               rounds, benchmarks.common.interleaved_times) and ``step_ratio`` is the
               ratio of the medians (1 for stars itself). Timed with ``--jobs`` runs
               sharing the machine: ratios, not absolute times, are the figure.

The evaluation is cached per run directory (``equilibrium.json``, keyed by its settings and
the checkpoint), so a rerun only prints and writes. The targets of issue 20 are checked
at the end (PASS/MISS with the numbers); with fewer than 10 seeds the "9 of 10 seeds"
targets become "90% of the seeds".

Variants are stars_scaling's (``--variants`` takes names or its groups, e.g.
``equilibrium``); the default: ``stars`` (the paper's recipe), ``stars_path`` (input
injection, trained unrolled from z0 and from random starts) and the two trained at the
fixed point from it, ``deq_ift`` and ``deq_phantom`` (the recipe is stars_scaling's
``DEQ`` dict). The runs are shared with
experiments/stars_scaling/run.py: same default ``--out-dir`` (runs/stars_scaling, with ``--quick``
runs/stars_scaling_quick), so a stars run trained there is reused here and vice versa.

Usage:
    OMP_NUM_THREADS=1 python experiments/equilibrium/run.py --seeds 0,1,2 --jobs 2 \\
        --json experiments/equilibrium/results/equilibrium.json \\
        --plot experiments/equilibrium/results/equilibrium.png
    python experiments/equilibrium/run.py --quick --json out.json --plot out.png   # seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import Tensor

import solvers
from benchmarks.common import (
    command_line,
    format_table,
    int_list,
    interleaved_times,
    machine_info,
    print_written,
)
from benchmarks.memory_depth import saved_bytes
from eqloop.evaluation import (
    EvalSet,
    PredictFn,
    correct_answers,
    equilibrium_diagnostics,
    exact_match,
    make_test_set,
    unrolled,
)
from eqloop.files import write_figure_atomic, write_json_atomic
from eqloop.models.looped import random_start
from eqloop.models.looplm.modeling import LoopLM
from eqloop.plotting import pyplot, style_axis
from eqloop.recipes.train import batch_rows, make_train_tensors, train_step
from eqloop.training.checkpoint import latest_checkpoint, load_model
from eqloop.training.config import TrainConfig
from eqloop.training.optim import make_optimizer
from eqloop.training.run_dir import read_metrics
from experiments.stars_scaling.run import (
    EVAL_LOOPS,
    GROUPS,
    RECIPE,
    STEPS,
    VARIANTS,
    WARM_STEPS,
    apply_quick,
    parse_set,
    run_all,
    run_config,
    run_dir,
    train_run,
    variant_names,
)

PROG = "experiments/equilibrium/run.py"  # the script in usage and error lines

REFERENCE = "stars"  # the unrolled recipe every step time is compared with
STARTS = ("z0", "random")
DEFAULT_VARIANTS = "stars,stars_path,deq_ift,deq_phantom"
CACHE = "equilibrium.json"  # the cached evaluation in each run directory
MiB = 2.0**20


# --------------------------------------------------------------------------- equilibria


def solve_predictor(
    model: LoopLM,
    solver: str,
    start: str,
    args: argparse.Namespace,
    generator: torch.Generator,
    record: list[solvers.SolveResult],
) -> PredictFn:
    """Predictor reading out at the z* ``solver`` finds from ``start`` (one of STARTS).

    Every solve is appended to ``record`` (per-sequence convergence and f-evaluations).
    Converged sequences leave the working batch early (``compact=True``).
    """

    def predict(tokens: Tensor) -> Tensor:
        f, z0 = model.core_map(tokens)
        z = z0 if start == "z0" else random_start(f, z0, generator)
        result = solvers.solve(
            f.step,
            z,
            solver,
            max_iter=args.max_iter,
            tol=args.tol,
            stop_mode="rel",
            args=f.args,
            compact=True,
        )
        record.append(result)
        return model.readout(result.z)

    return predict


def equilibrium_stats(
    model: LoopLM, data: EvalSet, solver: str, start: str, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    """Exact match at ``solver``'s z* from ``start``, share converged, median f-evaluations.

    One teacher-forced pass: each test sequence is solved once, and the same solve gives
    its answer, its convergence and its f-evaluations.
    """
    record: list[solvers.SolveResult] = []
    generator = torch.Generator(device=data.prompts.device).manual_seed(args.seed_eval + seed)
    predict = solve_predictor(model, solver, start, args, generator, record)
    correct = correct_answers(predict, data, decode="forced")
    converged = torch.cat([r.converged for r in record]).float()
    nfe = torch.cat([r.nstep for r in record]).double()
    return {
        "accuracy": float(correct.float().mean()),
        "converged": float(converged.mean()),
        "median_nfe": float(nfe.quantile(0.5)),
    }


# ---------------------------------------------------------------- training step: memory, time


def step_config(config: TrainConfig, depth: int) -> tuple[TrainConfig, int | None]:
    """The training step of ``config`` at mean depth ``depth``: (config, loops argument).

    Trained at the fixed point: exactly ``depth`` f-evaluations (``start_loops`` plain
    loops, then the solver with tol 0 and ``max_iter = depth - start_loops``, every
    sequence kept in the CE; loops None),
    and the penalty at the point that forward returned (``penalty_at="fixed_point"``
    would solve again from it: about one f-evaluation from the converged z* of a
    training step, up to a whole budget from a tol-0 forward, which would not be the
    step's cost). Otherwise: ``depth`` unrolled loops.

    Raises:
        ValueError: ``depth`` not above the variant's ``solve.start_loops``.
    """
    if config.solve is None:
        return config, depth
    budget = depth - config.solve.start_loops
    if budget < 1:
        raise ValueError(
            f"--depths {depth} must exceed solve.start_loops ({config.solve.start_loops})"
        )
    # tol 0 leaves every sequence unconverged: skip_unconverged would drop the whole CE
    # (and with it IFT's adjoint solve) from the step being timed.
    solve = dataclasses.replace(config.solve, tol=0.0, max_iter=budget, skip_unconverged=False)
    return dataclasses.replace(config, solve=solve, penalty_at="trajectory"), None


def step_runner(config: TrainConfig, depth: int, model: LoopLM) -> tuple[Callable[[], Any], LoopLM]:
    """A callable running one training step of a copy of ``model`` at ``depth``.

    Returns:
        ``(step, copy)``: each call of ``step`` trains ``copy`` on the next batch of the
        run's training data (same batches as the run, from its first step on).
    """
    config, loops = step_config(config, depth)
    net = copy.deepcopy(model).train()
    optimizer = make_optimizer(net, config)
    train_x, train_y = make_train_tensors(config)
    calls = iter(range(10**9))

    def step() -> None:
        rows = batch_rows(next(calls), len(train_x), config.batch_size, config.seed)
        train_step(
            net,
            net,
            optimizer,
            train_x[rows],
            train_y[rows],
            loops,
            config,
            penalty_on=config.lam > 0,
        )

    return step, net


def step_measures(
    variant: str, seed: int, config: TrainConfig, model: LoopLM, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Saved bytes, median step time and its ratio to ``stars`` at every ``--depths``.

    The ``stars`` step runs on a freshly initialised model of its own recipe (the time of
    an unrolled step does not depend on the weights).
    """
    memory, step_ms, ratio = {}, {}, {}
    reference = run_config(REFERENCE, seed, args)
    torch.manual_seed(seed)
    reference_model = LoopLM(reference.model)
    for depth in args.depths:
        step, net = step_runner(config, depth, model)
        step()  # warm-up (and the first batch's allocations)
        memory[str(depth)] = saved_bytes(net, step)
        fns = {variant: step}
        if variant != REFERENCE:
            fns[REFERENCE] = step_runner(reference, depth, reference_model)[0]
            fns[REFERENCE]()
        times, errors = interleaved_times(fns, args.time_repeats)
        if errors:
            raise next(iter(errors.values()))
        medians = {name: statistics.median(t) for name, t in times.items()}
        step_ms[str(depth)] = 1e3 * medians[variant]
        ratio[str(depth)] = medians[variant] / medians.get(REFERENCE, medians[variant])
    return {"memory": memory, "step_ms": step_ms, "step_ratio": ratio}


def training_summary(folder: Path, config: TrainConfig) -> dict[str, float | None]:
    """What the run's own steps cost once the penalty was on (from its metrics.jsonl).

    Returns:
        ``seconds_per_step`` (median time between consecutive steps; the interval
        across a resume is dropped), and the means of ``fwd_nfe``, ``fwd_converged`` and
        ``bwd_nfe`` (None for a run without that solve).
    """
    start = config.penalty_start if isinstance(config.penalty_start, int) else 0
    records = [
        r for r in read_metrics(folder / "metrics.jsonl") if "time" in r and r["step"] > start
    ]
    gaps = [
        b["time"] - a["time"]
        for a, b in zip(records, records[1:], strict=False)
        if b["step"] == a["step"] + 1 and b["time"] > a["time"]
    ]
    out: dict[str, float | None] = {"seconds_per_step": statistics.median(gaps) if gaps else None}
    for key in ("fwd_nfe", "fwd_converged", "bwd_nfe"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[f"{key}_mean"] = statistics.fmean(values) if values else None
    return out


# ------------------------------------------------------------------------ one (variant, seed)


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the cached evaluation depends on besides the weights."""
    return {
        "n_test": args.n_test,
        "loops": list(args.loops),
        "solvers": list(args.solvers),
        "starts": list(STARTS),
        "tol": args.tol,
        "stop_mode": "rel",
        "max_iter": args.max_iter,
        "random_start": "N(0, I) * per-token RMS of f(z0)",
        "seed_eval": args.seed_eval,
        "rho_iters": args.rho_iters,
        "diagnostic_samples": args.diagnostic_samples,
        "depths": list(args.depths),
        "step": "forward solve tol 0, max_iter = depth - start_loops; penalty at its point",
        "training": "metrics.jsonl after penalty_start",
        "time_repeats": args.time_repeats,
        "reference": REFERENCE,
    }


def _say(variant: str, seed: int, what: str) -> None:
    print(f"[equilibrium] {variant} seed {seed}: {what}", flush=True)


def measure_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) one (variant, seed) and, if it was asked for, evaluate it.

    A run needed only as another's warm start is trained, not evaluated (returns {}).
    The evaluation is cached in the run directory. Runs in a worker with ``--jobs > 1``.
    """
    train_wall = train_run(variant, seed, args)
    if variant not in args.variants:
        return {}
    folder = run_dir(variant, seed, args)
    checkpoint = latest_checkpoint(folder)
    settings = eval_settings(args)
    cache = folder / CACHE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("settings") == settings and cached.get("checkpoint") == checkpoint.name:
            return cached["result"]
    start = time.perf_counter()
    config = run_config(variant, seed, args)
    config.n_test = args.n_test
    model, ckpt = load_model(checkpoint)
    model.eval()
    data = make_test_set(config)
    spec = VARIANTS[variant]
    result: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "group": spec.group,
        "trained_at": "fixed_point" if config.solve is not None else "unrolled",
        "backward": config.backward,
        "accuracy": {},
        "equilibria": {},
    }
    _say(variant, seed, f"exact match at {args.loops[0]}..{args.loops[-1]} loops")
    for t in args.loops:
        result["accuracy"][str(t)] = exact_match(unrolled(model, t), data, decode="forced")
    for solver in args.solvers:
        for start_name in STARTS:
            _say(variant, seed, f"z* of {solver} from {start_name}")
            result["equilibria"][f"{solver}@{start_name}"] = equilibrium_stats(
                model, data, solver, start_name, args, seed
            )
    _say(variant, seed, "rho(J(z*))")
    sample = data.inputs[: args.diagnostic_samples]
    generator = torch.Generator(device=sample.device).manual_seed(args.seed_eval + seed)
    diag = equilibrium_diagnostics(
        model,
        sample,
        "fixed_point",
        max_iter=args.max_iter,
        tol=args.tol,
        rho_iters=args.rho_iters,
        generator=generator,
    )
    rho = diag["contraction"]["rho"]
    result["rho"] = {
        "at": "fixed_point@z0",
        "median": rho["q50"],
        "max": rho["q100"],
        "share_below_1": diag["contraction"]["share_rho_below_1"],
    }
    _say(variant, seed, f"training step memory and time at depths {args.depths}")
    result.update(step_measures(variant, seed, config, model, args))
    result["training"] = training_summary(folder, config)
    result["train_seconds"] = float(ckpt.metrics.get("train_time", train_wall))
    result["eval_seconds"] = time.perf_counter() - start
    result["final_train_metrics"] = ckpt.metrics.get("train")
    write_json_atomic(
        cache, {"settings": settings, "checkpoint": checkpoint.name, "result": result}
    )
    _say(variant, seed, f"evaluated in {result['eval_seconds']:.0f} s")
    return result


# -------------------------------------------------------------------------- tables, targets


def eq_keys(args: argparse.Namespace) -> list[str]:
    """``"<solver>@<start>"`` of every equilibrium measured."""
    return [f"{solver}@{start}" for solver in args.solvers for start in STARTS]


def _row(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Flat numbers of one result (the columns of the tables)."""
    row: dict[str, Any] = {"variant": result["variant"], "seed": str(result["seed"])}
    row.update({f"L{t}": result["accuracy"][str(t)] for t in args.loops})
    for key in eq_keys(args):
        for field in ("accuracy", "converged", "median_nfe"):
            row[f"{key}:{field}"] = result["equilibria"][key][field]
    row["rho"] = result["rho"]["median"]
    row["train_s"] = result["training"]["seconds_per_step"]
    row["train_nfe"] = result["training"]["fwd_nfe_mean"]
    for depth in args.depths:
        row[f"mem{depth}"] = result["memory"][str(depth)] / MiB
        row[f"ms{depth}"] = result["step_ms"][str(depth)]
        row[f"x{depth}"] = result["step_ratio"][str(depth)]
    return row


def _higher_is_better(column: str) -> bool:
    return column.startswith("L") or column.endswith((":accuracy", ":converged"))


def summary_rows(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> list[dict]:
    """Per variant: one row per seed, then its mean and its worst seed per column (lowest
    accuracy and convergence, highest f-evaluations, rho, memory and time)."""
    rows: list[dict[str, Any]] = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        mine = [_row(r, args) for r in results if r["variant"] == variant]
        rows.extend(mine)
        numeric = [k for k in mine[0] if k not in ("variant", "seed")]
        known = {k: [r[k] for r in mine if r[k] is not None] for k in numeric}
        rows.append(
            {"variant": variant, "seed": "mean"}
            | {k: statistics.fmean(v) if v else None for k, v in known.items()}
        )
        rows.append(
            {"variant": variant, "seed": "worst"}
            | {
                k: (min if _higher_is_better(k) else max)(v) if v else None
                for k, v in known.items()
            }
        )
    return rows


def print_tables(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    """Accuracy vs loops, the equilibria, and rho / memory / step time (per seed, mean, worst)."""
    rows = summary_rows(results, args)
    head = [("variant", "variant", ""), ("seed", "seed", "")]
    print("\nexact match at t unrolled loops")
    print(format_table(rows, head + [(f"L{t}", f"L{t}", ".3f") for t in args.loops]))
    print(
        f"\nat z* (tol {args.tol:g} rel, budget {args.max_iter}): exact match / share "
        "converged / median f-evaluations per sequence"
    )
    eq_rows = [
        {
            **{k: r[k] for k in ("variant", "seed")},
            **{
                key: f"{r[key + ':accuracy']:.3f}/{r[key + ':converged']:.2f}/"
                f"{r[key + ':median_nfe']:.0f}"
                for key in eq_keys(args)
            },
        }
        for r in rows
    ]
    print(format_table(eq_rows, head + [(key, key, "") for key in eq_keys(args)]))
    print(
        f"\nrho(J(z*)) (median); the run's own steps with the penalty on: s/step, mean "
        f"forward f-evals; one training step at mean depth: saved MiB, ms, x {REFERENCE}"
    )
    cols = head + [("rho", "rho", ".3f"), ("train_s", "s/step", ".2f")]
    cols += [("train_nfe", "fwd nfe", ".1f")]
    for depth in args.depths:
        cols += [(f"mem{depth}", f"MiB@{depth}", ".2f"), (f"ms{depth}", f"ms@{depth}", ".0f")]
        cols += [(f"x{depth}", f"x{REFERENCE}@{depth}", ".2f")]
    print(format_table(rows, cols))


def _mean(results: Sequence[dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> float:
    return statistics.fmean(get(r) for r in results)


def check_targets(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> list[dict]:
    """The targets of issue 20 that these results decide: one dict per (target, variant)
    with ``target``, ``variant``, ``value`` (text with the numbers) and ``passed``.

    Variants trained at the fixed point get the equilibrium, solver, memory and time
    targets; unrolled ones (``stars``, ``stars_path``) the headline's "95% at every loop
    count from 4 to 128 on 9 of 10 seeds".
    """
    out: list[dict[str, Any]] = []

    def add(target: str, variant: str, passed: bool, value: str) -> None:
        out.append({"target": target, "variant": variant, "passed": passed, "value": value})

    keys = eq_keys(args)
    lo, hi = min(args.depths), max(args.depths)
    for variant in dict.fromkeys(r["variant"] for r in results):
        mine = [r for r in results if r["variant"] == variant]
        need = math.ceil(0.9 * len(mine))  # 9 of 10 seeds
        if mine[0]["trained_at"] == "fixed_point":
            means = {k: _mean(mine, lambda r, k=k: r["equilibria"][k]["accuracy"]) for k in keys}
            worst_key = min(means, key=means.get)
            add(
                "mean exact match >= 0.99 at z* of every solver@start",
                variant,
                means[worst_key] >= 0.99,
                f"lowest mean {means[worst_key]:.4f} ({worst_key})",
            )
            good = [
                r["seed"] for r in mine if min(r["equilibria"][k]["accuracy"] for k in keys) >= 0.97
            ]
            add(
                f">= {need} of {len(mine)} seeds at >= 0.97 on every solver@start",
                variant,
                len(good) >= need,
                f"{len(good)} seeds ({good})",
            )
            deep = [t for t in args.loops if 8 <= t <= 128]
            if deep:
                acc = {t: _mean(mine, lambda r, t=t: r["accuracy"][str(t)]) for t in deep}
                t_min = min(acc, key=acc.get)
                add(
                    "mean exact match >= 0.98 at every loop count 8..128",
                    variant,
                    acc[t_min] >= 0.98,
                    f"lowest {acc[t_min]:.4f} at {t_min} loops",
                )
            for start in STARTS:
                a, p = (f"{s}@{start}" for s in ("anderson", "fixed_point"))
                if a in keys and p in keys:
                    ratio = _mean(mine, lambda r, a=a: r["equilibria"][a]["median_nfe"]) / _mean(
                        mine, lambda r, p=p: r["equilibria"][p]["median_nfe"]
                    )
                    add(
                        f"anderson median f-evals <= 0.5x fixed_point (from {start})",
                        variant,
                        ratio <= 0.5,
                        f"{ratio:.2f}x",
                    )
            if lo != hi:
                growth = _mean(mine, lambda r: r["memory"][str(hi)]) / _mean(
                    mine, lambda r: r["memory"][str(lo)]
                )
                add(
                    f"saved bytes at depth {hi} <= 1.1x at {lo}",
                    variant,
                    growth <= 1.1,
                    f"{growth:.3f}x",
                )
            ratios = {d: _mean(mine, lambda r, d=d: r["step_ratio"][str(d)]) for d in args.depths}
            d_max = max(ratios, key=ratios.get)
            add(
                f"step time <= 1.5x {REFERENCE} at equal mean depth",
                variant,
                ratios[d_max] <= 1.5,
                ", ".join(f"{ratios[d]:.2f}x at {d}" for d in args.depths),
            )
        else:
            wide = [t for t in args.loops if 4 <= t <= 128]
            good = [r["seed"] for r in mine if min(r["accuracy"][str(t)] for t in wide) >= 0.95]
            add(
                f">= {need} of {len(mine)} seeds at >= 0.95 at every loop count 4..128",
                variant,
                len(good) >= need,
                f"{len(good)} seeds ({good})",
            )
    return out


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    """One ``PASS``/``MISS`` line per target."""
    print("\ntargets (issue 20)")
    for t in targets:
        print(f"  {'PASS' if t['passed'] else 'MISS'}  {t['variant']}: {t['target']}: {t['value']}")


# ------------------------------------------------------------------------------ figure


def plot(results: Sequence[dict[str, Any]], args: argparse.Namespace, path: str | Path) -> None:
    """Left: exact match vs loops (thin line per seed, thick mean) with each solver@start's
    z* accuracy as a marker right of the loops (mean, bar from worst to best seed; filled
    from z0, open from the random start). Right: median f-evaluations per solver@start."""
    plt = pyplot()
    fig, (ax_acc, ax_nfe) = plt.subplots(1, 2, figsize=(13, 4.8))
    keys = eq_keys(args)
    loops = list(args.loops)
    spots = [loops[-1] * 2 ** (1 + 0.9 * i) for i in range(len(keys))]
    markers = dict(zip(args.solvers, "Dos^vP", strict=False))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        color = f"C{i % 10}"
        mine = [r for r in results if r["variant"] == variant]
        for r in mine:
            ax_acc.plot(
                loops, [r["accuracy"][str(t)] for t in loops], color=color, lw=0.6, alpha=0.4
            )
        mean = [_mean(mine, lambda r, t=t: r["accuracy"][str(t)]) for t in loops]
        ax_acc.plot(loops, mean, "-", color=color, lw=2, label=f"{variant} ({len(mine)} seeds)")
        for j, (key, x) in enumerate(zip(keys, spots, strict=True)):
            values = [r["equilibria"][key]["accuracy"] for r in mine]
            m = statistics.fmean(values)
            solver, start = key.split("@")
            ax_acc.errorbar(
                [x * 1.04**i],
                [m],
                yerr=[[m - min(values)], [max(values) - m]],
                fmt=markers[solver],
                color=color,
                mfc=color if start == "z0" else "none",
                ms=6,
            )
            nfe = [r["equilibria"][key]["median_nfe"] for r in mine]
            ax_nfe.bar(
                j + (i - (len(variants) - 1) / 2) * width,
                statistics.fmean(nfe),
                width,
                color=color,
                label=variant if j == 0 else None,
            )
            ax_nfe.plot([j + (i - (len(variants) - 1) / 2) * width] * len(nfe), nfe, "k.", ms=3)
    ax_acc.set_xscale("log", base=2)
    ax_acc.set_xticks(loops + spots, [str(t) for t in loops] + keys, rotation=60, fontsize=7)
    ax_acc.set_ylim(-0.02, 1.02)
    style_axis(
        ax_acc, "unrolled loops | z* of solver@start (filled: z0, open: random)", "exact match"
    )
    ax_acc.set_title("exact match vs loops and at each solver's z*")
    ax_nfe.axhline(args.max_iter, color="k", ls="--", lw=0.8, label="budget")
    ax_nfe.set_xticks(range(len(keys)), keys, rotation=30, fontsize=8)
    ax_nfe.set_yscale("log")
    style_axis(
        ax_nfe,
        f"solver@start (tol {args.tol:g} rel, budget {args.max_iter})",
        "median f-evaluations per sequence",
    )
    ax_nfe.set_title("cost of finding z* (dots: seeds)")
    fig.tight_layout()
    write_figure_atomic(path, fig, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"stars_scaling variants or groups ({', '.join(GROUPS)}), comma-separated",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--warm-steps", type=int, default=WARM_STEPS, help="steps of a baseline")
    p.add_argument("--steps", type=int, default=STEPS, help="steps of a warm-started variant")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field for every variant (as in experiments/stars_scaling/run.py)",
    )
    p.add_argument("--depth-hi", type=int, default=32, help="largest sampled loop count")
    p.add_argument("--n-test", type=int, default=1000, help="test problems")
    p.add_argument("--loops", default=",".join(map(str, EVAL_LOOPS)), help="unrolled loop counts")
    p.add_argument("--solvers", default="fixed_point,anderson,broyden", help="equilibrium solvers")
    p.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance of z*")
    p.add_argument("--max-iter", type=int, default=100, help="f-evaluation budget of z*")
    p.add_argument("--seed-eval", type=int, default=0, help="added to the seed: random starts")
    p.add_argument("--diagnostic-samples", type=int, default=256, help="sequences for rho")
    p.add_argument("--rho-iters", type=int, default=20, help="power steps per rho estimate")
    p.add_argument("--depths", default="8,32", help="mean depths of the memory and time step")
    p.add_argument("--time-repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (1 thread each)")
    p.add_argument(
        "--out-dir",
        default=None,
        help="runs (resumable, shared with the stars_scaling experiment); default "
        "runs/stars_scaling, with --quick runs/stars_scaling_quick",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete and retrain the runs this command needs"
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="accuracy vs loops and f-evaluations (PNG)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny runs in seconds (tests)")
    args = p.parse_args(argv)
    try:
        args.recipe_overrides = parse_set(args.set)
        args.variants = variant_names(args.variants)
        if args.quick:
            apply_quick(args)
            args.n_test, args.loops, args.max_iter = 32, "1,2,4,8", 20
            args.diagnostic_samples, args.rho_iters, args.time_repeats = 8, 4, 1
            args.depths = "12,16"  # solves longer than a full Anderson window (6)
            if args.seeds == "0,1,2":
                args.seeds = "0"
        args.seeds = int_list(args.seeds, "--seeds", 0)
        args.loops = sorted(set(int_list(args.loops, "--loops", 1)))
        args.depths = sorted(set(int_list(args.depths, "--depths", 1)))
        args.solvers = [s for s in args.solvers.split(",") if s]
        unknown = [s for s in args.solvers if s not in solvers.available()]
        if unknown or not args.solvers:
            known = ", ".join(solvers.available())
            raise ValueError(f"--solvers: unknown or none {unknown}; choose from {known}")
    except ValueError as error:
        p.error(str(error))
    if args.out_dir is None:
        args.out_dir = "runs/stars_scaling_quick" if args.quick else "runs/stars_scaling"
    if not 1 <= args.jobs <= 8:
        p.error("--jobs must be between 1 and 8")
    if args.max_iter < 1 or args.time_repeats < 1 or not args.tol > 0:
        p.error("--max-iter and --time-repeats must be >= 1 and --tol > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate every (variant, seed); print the tables and targets; write outputs."""
    args = parse_args(argv)
    command = command_line(PROG, argv)
    start = time.perf_counter()
    pairs = [(v, s) for v in args.variants for s in args.seeds]
    results = run_all(pairs, args, measure_one)
    wall = time.perf_counter() - start
    print_tables(results, args)
    targets = check_targets(results, args)
    print_targets(targets)
    print(f"\n{len(pairs)} runs, {wall:.0f} s wall ({args.jobs} at a time); runs in {args.out_dir}")
    settings = {
        **{k: v for k, v in vars(args).items() if k not in ("recipe_overrides", "set")},
        "recipe": {**RECIPE, **args.recipe_overrides},
        "variants": {
            n: {
                "description": VARIANTS[n].description,
                "overrides": VARIANTS[n].overrides,
                "warm_from": VARIANTS[n].warm_from,
            }
            for n in args.variants
        },
        "evaluation": eval_settings(args),
    }
    out = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "settings": settings,
        "wall_seconds": wall,
        "targets": targets,
        "results": results,
    }
    if args.json:
        write_json_atomic(args.json, out)
    if args.plot:
        plot(results, args, args.plot)
    print_written(args.json, args.plot)
    return out


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # e.g. a run directory that holds another recipe's run
        sys.exit(f"{PROG}: error: {error}")
