"""The STARS paper's arithmetic experiment on a CPU: the collapse, the rescue, test-time scaling.

Setup (the paper's Sec. 4 and its released code ``train_addition/``, scaled to a 2-core
CPU): 4-digit addition with the answer written least-significant digit first, one shared
block looped, in the paper with NO input injection (``z <- block(z)`` from ``z0 =
embedding + positions``; the ``paper`` variants), in eqloop's ``headline`` with it
(``z <- block(z + x)`` from zeros); exact match on held-out problems at loops 1, 2, 4,
..., 128 and at the equilibrium that each of a few solvers finds. Every variant is
trained with several seeds; tables report the mean and the worst seed.

Depth curriculum (the main departure from the paper's recipe, needed at this scale):
every run first learns the task with a fixed 4 loops: the baselines are exactly that
(``--warm-steps`` steps), every other variant starts from its baseline's final
checkpoint (same seed) and trains ``--steps`` more with its own recipe (random loop
counts, penalty from 20% of those steps) at a lower learning rate. Trained from
scratch, random loop counts kept this small model on the loss plateau of the untrained
task for the whole budget; a warm start from a baseline that had not yet learned every
answer digit did not recover, and at the baseline's learning rate (3e-3) the warm start
of one seed in three fell back onto the plateau. Loop counts are drawn up to 32, not
the paper's 100 (``--depth-hi``; 100 measured no better here). docs/benchmarks.md lists what
was tried.

Variants (``--variants`` takes names or the group names in brackets):

  [norms]      Sec. 4.1: each norm placement trained with a fixed 4 loops, no penalty
    baseline               post-sandwich N(x + f(N(x)))  (the paper's sandwich_dual)
    baseline_pre           pre-norm x + f(N(x))          (pre_norm)
    baseline_post          post-norm N(x + f(x))         (post_norm)
    baseline_pre_sandwich  pre-sandwich x + N(f(N(x)))   (sandwich_branch)
  [random]     Sec. 4.2-4.3, post-sandwich
    random_loops           loop counts clamp(round(LogNormal(2, 0.7)), 1, hi), no penalty
    penalty_only           fixed 4 loops + the Jacobian penalty (lam after 20% of training)
    stars                  random loops + penalty: the paper's recipe
  [injection]  the same two with the input added to every loop (z <- block(z + x))
    baseline_add, stars_add
  [internal]   beyond the paper: STARS on internal-norm blocks
    stars_pre, stars_pre_sandwich
  [options]    the penalty options on stars_pre: at the solver's fixed point, a hinge
               target, more power steps, the Arnoldi direction; stars_arnoldi: the
               Arnoldi direction on the post-sandwich stars recipe (stars_arnoldi) and
               on stars_add (stars_add_arnoldi)
  [fixed_point] stars with the penalty at the solver's fixed point (a solve every step:
               about 8x the cost of a stars step)
  [path]       input injection and random starts: the loop is trained from z0 and, for
               half the sequences, from a random state (TrainConfig.random_start), so
               every start reaches the same fixed point z*(x) (path independence)
    stars_path             stars_add's recipe, warm from baseline_add, random starts
  [equilibrium] trained AT the fixed point (TrainConfig.solve, recipe in :data:`DEQ`):
               warm from stars_path (random starts kept), every step solves the core
               with Anderson and takes the gradient there, penalty at z*
    deq_ift                implicit-function-theorem backward
    deq_phantom            phantom gradient (a few damped steps with a graph)
               (experiments/equilibrium/run.py evaluates them against stars)

``headline`` is eqloop's recipe, ``baseline_add,stars_path``: the collapse of an
injected loop trained at 4 loops and its rescue by STARS with random starts, which holds
at every loop count on every seed and is an equilibrium model (every solver from any
start finds the answer). ``paper`` is ``baseline,stars``, the paper's recipe without
input injection (the headline until 2026-12-07; it fails past 32 loops on 2 of 10 seeds).
``grid`` the paper's groups ``norms``, ``random`` and ``injection``; ``beyond`` the groups
``internal`` and ``options``; ``all`` everything.

Runs are resumable: each (variant, seed) trains in ``out_dir/<variant>/seed<k>`` and
caches its evaluation there (``eval.json``); rerunning skips whatever is finished and
continues an interrupted run from its latest checkpoint. A finished run of another
recipe is refused; ``--overwrite`` deletes the run directories this command trains and
trains them again. ``out_dir`` is ``runs/stars_scaling`` (``runs/stars_scaling_quick``
with ``--quick``, so a smoke run never meets a full run's directory). ``--jobs 2``
trains two runs at a time, one thread each.

Outputs: the tables (stdout), ``--json`` (the command, its date and machine,
``wall_seconds`` of the runs and ``total_seconds`` with the figures, and a top-level
``results`` list, one entry per (variant, seed) with ``variant``, ``seed``, ``digits``,
``accuracy`` (loops -> exact match), ``equilibrium`` (exact match at the solver's fixed
point) and the dynamics), ``--plot`` (accuracy vs loops with a band over seeds, and the
state norm), ``--pca`` (hidden-state trajectories of a few test problems on their first
two principal components, a collapsing variant next to STARS), ``--scaling`` (test-time
scaling on a harder split, see :func:`scaling_study`).

Usage:
    python experiments/stars_scaling/run.py --variants headline --jobs 2 --json r.json --plot r.png
    python experiments/stars_scaling/run.py --variants all --jobs 2 --out-dir runs/stars_scaling
    python experiments/stars_scaling/run.py --quick --json out.json --plot out.png --pca pca.png
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.common import (
    command_line,
    format_table,
    int_list,
    machine_info,
    print_written,
)
from eqloop.data import make_arithmetic_dataset
from eqloop.evaluation import (
    checkpoint_pca,
    equilibrium,
    evaluate_model,
    exact_match,
    make_eval_set,
    make_test_set,
    plot_trajectories,
    unrolled,
)
from eqloop.files import write_figure_atomic, write_json_atomic
from eqloop.plotting import pyplot, style_axis
from eqloop.recipes.train import check_resumable, penalty_overhead, train
from eqloop.training.checkpoint import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    step_dir_name,
)
from eqloop.training.config import TrainConfig, apply_overrides
from eqloop.training.run_dir import TrainingInterrupted

PROG = "experiments/stars_scaling/run.py"  # the script in usage and error lines

EVAL_LOOPS = (1, 2, 4, 8, 16, 32, 64, 128)

# The CPU recipe every variant starts from (TrainConfig fields; "model.x" for the model).
RECIPE: dict[str, Any] = {
    "task": "addition",
    "digits": 4,
    "n_train": 50000,
    "n_test": 1000,
    "batch_size": 128,
    "lr": 3e-3,
    "warmup_steps": 150,
    # Operands least-significant digit first (like the answer) with rotary positions: each
    # answer digit reads its operand digits at one fixed distance, so one attention pattern
    # serves every digit. With the operands written most-significant first and learned
    # positions, each digit needed its own pattern and 2 of seeds 0-6 never formed them all
    # in 3000 steps (experiments/plateau/run.py; docs/benchmarks.md, "seeds").
    "reverse_operands": True,
    "model.positions": "rope",
    "model.d_model": 64,
    "model.n_heads": 4,
    "model.d_ff": 256,
    "model.n_prelude": 0,
    "model.n_coda": 0,
    "model.init_std": 0.1,
    "model.injection": "none",
    "model.init_state": None,
    "model.norm_placement": "post_sandwich",
    "depth": {"kind": "fixed", "t": 4},
    "lam": 0.0,
}
WARM_STEPS = 3000  # a baseline's training: the fixed-loop phase every variant starts from
STEPS = 4000  # what a warm-started variant trains after it, with its own recipe
FINETUNE = {"lr": 1e-3, "warmup_steps": 50}  # a run that starts warm (before --set)
FIXED = {"depth": {"kind": "fixed", "t": 4}, "lam": 0.0}
RANDOM = {"depth": {"kind": "lognormal", "mu": 2.0, "sigma": 0.7, "lo": 1, "hi": 100}}
PENALTY = {"lam": 0.1}
# Input injection, z <- block(z + x); with it the state starts from zeros, not from x.
ADD = {"model.injection": "add"}
# Half of each batch's sequences start the loop from a random state at the states' scale
# (eqloop.random_start) instead of z0: the loop then reaches the same z*(x) from any start.
PATH = {"random_start": 0.5}
# Training at the fixed point (the "equilibrium" group): edit here to retune both
# variants; each adds only its "backward". They start from stars_path, a loop that
# reaches its z*(x) from z0 and from random starts (seed 0: every solver from either
# start >= 0.99), and keep its random starts; the forward solve (Anderson from the start
# itself) replaces the sampled depth. From stars_add instead (a contraction near its own
# trajectory only) with 4 plain loops before Anderson, lr 1e-3 and the penalty from step
# 100, both diverged within 30-100 steps: the share of converged solves fell to 0 as the
# learning rate rose. With the path-independent start and lr 3e-4 both keep CE ~1e-3
# and 99-100% of the solves converge. They train DEQ_SHARE of the STARS phase's steps,
# the penalty at z* on from 20% of them, like every variant (run_config). IFT solves its
# adjoint to ADJOINT_TOL, looser than the forward: its products are most of an IFT step.
# At float32's default 1.2e-6 the adjoint took 16-19 VJPs and the step was 1.6-1.8x
# STARS at depth 8 (seed 0); at 1e-4, 1.16-1.89x over seeds 0-8, over 1.5x on 4 of them;
# at 1e-3, seed 4 (the slowest) 1.04x with the same accuracy (docs/benchmarks.md).
DEQ_SHARE = 0.125
DEQ_TOL = 1e-4
ADJOINT_TOL = 1e-3
DEQ: dict[str, Any] = {
    **ADD,
    **PATH,
    "solve": {"solver": "anderson", "tol": DEQ_TOL, "max_iter": 30, "start_loops": 0},
    "lam": 0.1,
    "penalty_at": "fixed_point",
    "lr": 3e-4,
}


@dataclass(frozen=True)
class Variant:
    """One training recipe: ``overrides`` on top of :data:`RECIPE`.

    A variant without ``warm_from`` trains ``WARM_STEPS`` from a random init; one with it
    starts from that variant's final checkpoint (same seed) and trains ``step_share *
    STEPS`` more, checkpointing every quarter.
    """

    name: str
    group: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    warm_from: str | None = None
    step_share: float = 1.0  # a warm-started variant trains round(step_share * --steps) steps


def _variants() -> dict[str, Variant]:
    stars = {**RANDOM, **PENALTY}
    pre, pre_sandwich = ({"model.norm_placement": p} for p in ("pre", "pre_sandwich"))
    table = [
        Variant("baseline", "norms", "post-sandwich, fixed 4 loops", FIXED),
        Variant("baseline_pre", "norms", "pre-norm, fixed 4 loops", {**FIXED, **pre}),
        Variant(
            "baseline_post",
            "norms",
            "post-norm, fixed 4 loops",
            {**FIXED, "model.norm_placement": "post"},
        ),
        Variant(
            "baseline_pre_sandwich",
            "norms",
            "pre-sandwich, fixed 4 loops",
            {**FIXED, **pre_sandwich},
        ),
        Variant(
            "random_loops",
            "random",
            "post-sandwich, random loops",
            {**RANDOM, "lam": 0.0},
            "baseline",
        ),
        Variant(
            "penalty_only",
            "random",
            "post-sandwich, fixed 4 loops + penalty",
            {**FIXED, **PENALTY},
            "baseline",
        ),
        Variant(
            "stars",
            "random",
            "post-sandwich, random loops + penalty (the paper)",
            stars,
            "baseline",
        ),
        Variant("baseline_add", "injection", "baseline with input injection", {**FIXED, **ADD}),
        Variant(
            "stars_add", "injection", "STARS with input injection", {**stars, **ADD}, "baseline_add"
        ),
        Variant(
            "stars_path",
            "path",
            "STARS with input injection, half the sequences from a random start",
            {**stars, **ADD, **PATH},
            "baseline_add",
        ),
        Variant(
            "stars_pre", "internal", "STARS on a pre-norm block", {**stars, **pre}, "baseline_pre"
        ),
        Variant(
            "stars_pre_sandwich",
            "internal",
            "STARS on a pre-sandwich block",
            {**stars, **pre_sandwich},
            "baseline_pre_sandwich",
        ),
        Variant(
            "stars_fixed_point",
            "fixed_point",
            "stars, penalty at the solver's fixed point",
            {**stars, "penalty_at": "fixed_point"},
            "baseline",
        ),
        Variant(
            "stars_pre_fixed_point",
            "options",
            "stars_pre, penalty at the fixed point",
            {**stars, **pre, "penalty_at": "fixed_point"},
            "baseline_pre",
        ),
        Variant(
            "stars_pre_hinge",
            "options",
            "stars_pre, hinge relu(||Jv|| - 0.5)^2",
            {**stars, **pre, "penalty_target": 0.5},
            "baseline_pre",
        ),
        Variant(
            "stars_pre_power",
            "options",
            "stars_pre, 5 power steps per penalty",
            {**stars, **pre, "power_steps": 5},
            "baseline_pre",
        ),
        Variant(
            "stars_pre_arnoldi",
            "options",
            "stars_pre, product along an 8-step Ritz vector",
            {**stars, **pre, "penalty_arnoldi": 8},
            "baseline_pre",
        ),
        Variant(
            "stars_arnoldi",
            "options",
            "stars, product along an 8-step Ritz vector (the dominant direction)",
            {**stars, "penalty_arnoldi": 8},
            "baseline",
        ),
        Variant(
            "stars_add_arnoldi",
            "options",
            "stars_add, product along an 8-step Ritz vector",
            {**stars, **ADD, "penalty_arnoldi": 8},
            "baseline_add",
        ),
        Variant(
            "deq_ift",
            "equilibrium",
            "input injection, trained at the Anderson fixed point, IFT backward",
            {**DEQ, "backward": "ift", "backward_options": {"tol": ADJOINT_TOL}},
            "stars_path",
            DEQ_SHARE,
        ),
        Variant(
            "deq_phantom",
            "equilibrium",
            "input injection, trained at the Anderson fixed point, phantom backward",
            {**DEQ, "backward": "phantom"},
            "stars_path",
            DEQ_SHARE,
        ),
    ]
    return {v.name: v for v in table}


VARIANTS = _variants()


def _members(*groups: str) -> tuple[str, ...]:
    """The variants of ``groups``, in the order of :data:`VARIANTS`."""
    return tuple(v.name for v in VARIANTS.values() if v.group in groups)


GROUPS: dict[str, tuple[str, ...]] = {
    # eqloop's recipe: the collapse of an injected loop and its rescue by STARS with
    # random starts, chosen over the paper's recipe on 10 seeds (docs/benchmarks.md).
    "headline": ("baseline_add", "stars_path"),
    "paper": ("baseline", "stars"),
    **{
        g: _members(g)
        for g in (
            "norms",
            "random",
            "injection",
            "internal",
            "options",
            "fixed_point",
            "path",
            "equilibrium",
        )
    },
    "grid": _members("norms", "random", "injection"),
    "beyond": _members("internal", "options"),
    "all": tuple(VARIANTS),
}


# ------------------------------------------------------------------------------ one run


def warm_chain(variant: str) -> list[str]:
    """The variants ``variant`` starts from, the first one trained from scratch first."""
    chain: list[str] = []
    source = VARIANTS[variant].warm_from
    while source is not None:
        chain.insert(0, source)
        source = VARIANTS[source].warm_from
    return chain


def train_steps(variant: str, args: argparse.Namespace) -> int:
    """Steps ``variant`` trains: ``--warm-steps`` from scratch, else its share of ``--steps``."""
    spec = VARIANTS[variant]
    if spec.warm_from is None:
        return args.warm_steps
    return max(1, round(spec.step_share * args.steps))


def run_config(variant: str, seed: int, args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of one (variant, seed): recipe, CLI overrides, variant overrides."""
    spec = VARIANTS[variant]
    warm = FINETUNE if spec.warm_from is not None else {}
    settings = {**RECIPE, **warm, **args.recipe_overrides, **spec.overrides}
    if settings["depth"]["kind"] == "lognormal":
        settings["depth"] = {**settings["depth"], "hi": args.depth_hi}
    steps = train_steps(variant, args)
    if spec.warm_from is None:
        checkpoint_every = max(1, steps // 3)
    else:
        checkpoint_every = max(1, steps // 4)
        source = run_dir(spec.warm_from, seed, args) / CHECKPOINT_DIR
        settings["init_from"] = str(source / step_dir_name(train_steps(spec.warm_from, args)))
    settings.update(
        seed=seed,
        steps=steps,
        penalty_start=steps // 5,  # the paper: after 20% of training (here: of this run)
        eval_every=0,
        eval_loops=[4],
        checkpoint_every=checkpoint_every,
        out_dir=str(run_dir(variant, seed, args)),
        resume=True,
        progress=not args.no_progress and args.jobs == 1,
    )
    return TrainConfig.from_dict(config_dict(settings))


def config_dict(settings: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig's defaults with ``settings`` (flat keys, ``"model.x"`` for the model)."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    return apply_overrides(TrainConfig().to_dict(), overrides)


def run_dir(variant: str, seed: int, args: argparse.Namespace) -> Path:
    """Where one (variant, seed) keeps its checkpoints and cached evaluation."""
    return Path(args.out_dir) / variant / f"seed{seed}"


def _solvers(args: argparse.Namespace) -> list[str]:
    """The equilibrium solvers of ``--solver`` (comma-separated; the first is the primary)."""
    return [name for name in (args.solver or "").split(",") if name]


def solver_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``"anderson@4"`` -> ``("anderson", {"start_loops": 4})``: the solver and its start.

    ``name@k`` starts the solver from the state after ``k`` loops instead of the loop's
    initial state (see :func:`eqloop.evaluation.equilibrium`).
    """
    name, at, start = spec.partition("@")
    if not at:
        return name, {}
    if not start.isdigit():
        raise ValueError(f"solver {spec!r}: write NAME@K with K loops before it starts")
    return name, {"start_loops": int(start)}


def _eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the cached evaluation depends on besides the weights."""
    return {
        "loops": list(args.loops),
        "n_test": args.n_test,
        "solvers": _solvers(args),
        "solver_options": {"max_iter": args.solver_max_iter, "tol": args.solver_tol},
        "diagnostic_samples": args.diagnostic_samples,
        "rho_iters": args.rho_iters,
        "decode": "forced",
    }


def summarize(variant: str, seed: int, config: TrainConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """One ``results`` entry from :func:`eqloop.evaluation.evaluate_model` output."""
    eq = raw.get("equilibrium") or {}
    contraction = eq.get("contraction") or {}
    return {
        "variant": variant,
        "seed": seed,
        "digits": config.digits,
        "task": config.task,
        "accuracy": {int(t): acc for t, acc in raw["accuracy"].items()},
        "equilibrium": eq.get("accuracy"),
        "equilibrium_details": {
            "converged": eq.get("converged"),
            "nstep_median": (eq.get("nstep") or {}).get("q50"),
            "state_norm": eq.get("state_norm"),
            "rho_median": (contraction.get("rho") or {}).get("q50"),
            "share_rho_below_1": contraction.get("share_rho_below_1"),
        },
        "dynamics": [
            {
                "loops": d["loops"],
                "state_norm": d["state_norm"],
                "step_norm": d["step_norm"],
                "rel_step": d["rel_step"],
                "rho_median": d["rho"]["q50"],
            }
            for d in raw.get("diagnostics") or []
        ],
    }


def train_run(variant: str, seed: int, args: argparse.Namespace) -> float:
    """Train (or resume, or reuse) one (variant, seed); returns this call's wall seconds.

    A finished run is reused only if it holds this recipe's run (else ValueError, naming
    ``--overwrite`` and ``--out-dir``). Every process uses one thread.
    """
    torch.set_num_threads(1)
    config = run_config(variant, seed, args)
    done = latest_checkpoint(Path(config.out_dir))
    start = time.perf_counter()
    try:
        if done is None or done.name != step_dir_name(config.steps):
            train(config)
        else:  # a finished run is reused only if it is this recipe's
            check_resumable(load_checkpoint(done).config, config, done)
    except ValueError as error:  # name the script's way out, not TrainConfig's fields
        raise ValueError(
            f"{error}. With this script: --overwrite retrains the runs it needs, or "
            f"--out-dir DIR trains them elsewhere (now {args.out_dir})"
        ) from None
    return time.perf_counter() - start


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume, or reuse) one (variant, seed) and evaluate it (or reuse that).

    Runs in a worker process when ``--jobs > 1``; every process uses one thread.
    """
    train_wall = train_run(variant, seed, args)
    config = run_config(variant, seed, args)
    folder = Path(config.out_dir)
    cache = folder / "eval.json"
    settings = _eval_settings(args)
    checkpoint = latest_checkpoint(folder)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("settings") == settings and cached.get("checkpoint") == checkpoint.name:
            result = cached["result"]
            result["accuracy"] = {int(t): acc for t, acc in result["accuracy"].items()}
            return result
    model, ckpt = load_model(checkpoint)
    config.n_test = args.n_test
    start = time.perf_counter()
    test = make_test_set(config)
    specs = [solver_spec(spec) for spec in settings["solvers"]]
    options = [{**settings["solver_options"], **start_options} for _, start_options in specs]
    raw = evaluate_model(
        model,
        test,
        loops=args.loops,
        solver=specs[0][0] if specs else None,
        solver_options=options[0] if specs else None,
        decode="forced",
        diagnostic_samples=args.diagnostic_samples,
        rho_iters=args.rho_iters,
        seed=seed,
    )
    result = summarize(variant, seed, config, raw)
    result["equilibria"] = {
        spec: result["equilibrium"]
        if i == 0
        else exact_match(equilibrium(model, name, **opts), test, decode="forced")
        for i, (spec, (name, _), opts) in enumerate(
            zip(settings["solvers"], specs, options, strict=True)
        )
    }
    result["train_seconds"] = float(ckpt.metrics.get("train_time", train_wall))
    result["eval_seconds"] = time.perf_counter() - start
    result["final_ce"] = (ckpt.metrics.get("train") or {}).get("ce")
    write_json_atomic(
        cache, {"settings": settings, "checkpoint": checkpoint.name, "result": result}
    )
    return result


def run_all(
    pairs: Sequence[tuple[str, int]],
    args: argparse.Namespace,
    job: Callable[[str, int, argparse.Namespace], dict[str, Any]] = run_one,
) -> list[dict[str, Any]]:
    """``job`` (default :func:`run_one`) for every (variant, seed), ``args.jobs`` at a
    time; results in the order of ``pairs``.

    Runs that others start from (``warm_from``, transitively) go first, even when they were not
    asked for (their results are then not returned); the others start in the order of
    ``pairs`` (variant by variant with ``--variants``), a warm-started one as soon as a
    worker is free and the run it starts from is done, so no worker waits for a round.
    ``job`` must be a module-level function (spawned workers import it).
    """
    sources = list(dict.fromkeys((a, s) for v, s in pairs for a in warm_chain(v)))

    def source(pair: tuple[str, int]) -> tuple[str, int] | None:
        warm_from = VARIANTS[pair[0]].warm_from
        return None if warm_from is None else (warm_from, pair[1])

    todo = list(dict.fromkeys([*sources, *pairs]))
    if args.overwrite:  # start these runs over: weights, checkpoints and cached evaluations
        for variant, seed in todo:
            shutil.rmtree(run_dir(variant, seed, args), ignore_errors=True)
    done = _run_jobs(job, todo, args, source)
    return [done[p] for p in pairs]


def _run_jobs(
    job: Any,
    pairs: Sequence[tuple[str, int]],
    args: argparse.Namespace,
    waits_for: Callable[[tuple[str, int]], tuple[str, int] | None] = lambda pair: None,
) -> dict[tuple[str, int], dict[str, Any]]:
    """``job(variant, seed, args)`` for every pair, ``args.jobs`` processes at a time.

    Pairs start in the order of ``pairs``, each once a worker is free and the pair
    ``waits_for(pair)`` names is done (None: at once; that pair must be in ``pairs`` and
    wait for nothing). After a failed job no further pair starts (jobs in progress
    still end) and its exception is raised.
    """
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if args.jobs == 1 or len(pairs) <= 1:
        try:
            for v, s in sorted(pairs, key=lambda p: len(warm_chain(p[0]))):
                done[v, s] = job(v, s, args)
        except TrainingInterrupted as stopped:
            raise _resumable_exit(stopped) from None
        return done
    waiting = list(pairs)
    context = multiprocessing.get_context("spawn")
    running: dict[concurrent.futures.Future, tuple[str, int]] = {}
    with (
        concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool,
        _signals_raise_stopped(),
    ):
        try:
            while True:
                ready = [p for p in waiting if waits_for(p) is None or waits_for(p) in done]
                for v, s in ready[: args.jobs - len(running)]:  # the pool queues nothing
                    waiting.remove((v, s))
                    running[pool.submit(job, v, s, args)] = (v, s)
                if not running:
                    return done
                finished, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in finished:
                    v, s = running.pop(future)
                    error = future.exception()
                    if isinstance(error, TrainingInterrupted):  # a worker signalled alone
                        raise _resumable_exit(error)
                    if error is not None:
                        raise error
                    done[v, s] = future.result()
                    print(f"done {job.__name__} {v} seed {s}", flush=True)
        except _Stopped as stopped:
            _stop_workers(running)
            raise SystemExit(
                f"{stopped}: stopped {len(running)} running job(s) (a training run saves the "
                "step it is at); the same command resumes"
            ) from None


def _resumable_exit(stopped: TrainingInterrupted) -> SystemExit:
    """The exit of a run stopped by a signal: its save line, and how to resume."""
    return SystemExit(f"{stopped}; the same command resumes")


WORKER_GRACE = 120.0  # seconds a worker gets to save its run after SIGTERM, then SIGKILL


class _Stopped(Exception):
    """SIGINT or SIGTERM reached the process that runs the jobs."""


@contextlib.contextmanager
def _signals_raise_stopped() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`_Stopped` in the main thread (handlers restored)."""

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop_workers(running: dict[concurrent.futures.Future, Any]) -> None:
    """End the pool's workers before the parent exits (else they train on, unseen).

    Every worker gets SIGTERM, on which a training run saves the step it is at and stops
    (eqloop's training loop); the running jobs get ``WORKER_GRACE`` seconds to end, then
    the workers still running one are killed. (No new job starts: the pool holds only
    the jobs it runs.)
    """
    workers = multiprocessing.active_children()
    for worker in workers:
        worker.terminate()
    _, unfinished = concurrent.futures.wait(running, timeout=WORKER_GRACE)
    if unfinished:
        for worker in workers:
            if worker.is_alive():
                worker.kill()


# ------------------------------------------------------------------------------ tables


def _by_variant(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        groups.setdefault(res["variant"], []).append(res)
    return groups


def _mean_worst(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    return (statistics.fmean(known), min(known)) if known else (None, None)


def accuracy_table(
    results: Sequence[dict[str, Any]], loops: Sequence[int], solvers: Sequence[str] = ()
) -> list[dict]:
    """Per variant: mean and worst seed at every loop count and at each solver's z*.

    ``eq`` is the primary solver's (``solvers[0]``), ``eq_<name>`` the others'.
    """
    rows = []
    for variant, runs in _by_variant(results).items():
        row: dict[str, Any] = {"variant": variant, "seeds": len(runs)}
        for t in loops:
            row[f"L{t}"] = _mean_worst([r["accuracy"].get(t) for r in runs])
        row["eq"] = _mean_worst([r["equilibrium"] for r in runs])
        for name in solvers[1:]:
            row[f"eq_{name}"] = _mean_worst([(r.get("equilibria") or {}).get(name) for r in runs])
        rows.append(row)
    return rows


def dynamics_table(results: Sequence[dict[str, Any]], loops: Sequence[int]) -> list[dict]:
    """Per variant and loop count (and z*): mean state norm, step norm, median rho."""
    rows = []
    for variant, runs in _by_variant(results).items():
        for t in loops:
            at = [d for r in runs for d in r["dynamics"] if d["loops"] == t]
            if not at:
                continue
            rows.append(
                {
                    "variant": variant,
                    "loops": str(t),
                    **{
                        k: statistics.fmean(d[k] for d in at)
                        for k in ("state_norm", "step_norm", "rho_median")
                    },
                }
            )
        eq = [r["equilibrium_details"] for r in runs if r["equilibrium_details"]["state_norm"]]
        if eq:
            rows.append(
                {
                    "variant": variant,
                    "loops": "z*",
                    "step_norm": None,
                    **{k: statistics.fmean(e[k] for e in eq) for k in ("state_norm", "rho_median")},
                }
            )
    return rows


def _pair(value: tuple[float | None, float | None]) -> str:
    mean, worst = value
    return "-" if mean is None else f"{mean:.3f}/{worst:.3f}"


def print_tables(
    results: Sequence[dict[str, Any]], loops: Sequence[int], solvers: Sequence[str]
) -> None:
    """Accuracy (mean/worst seed) and dynamics tables."""
    rows = [
        {k: (_pair(v) if isinstance(v, tuple) else v) for k, v in row.items()}
        for row in accuracy_table(results, loops, solvers)
    ]
    columns = [("variant", "variant", ""), ("seeds", "seeds", "")]
    columns += [(f"L{t}", f"L{t}", "") for t in loops]
    columns += [
        ("eq" if i == 0 else f"eq_{name}", f"z* {name}", "") for i, name in enumerate(solvers)
    ]
    print("exact match at t loops and at the equilibrium z* of each solver, mean/worst seed")
    print(format_table(rows, columns))
    print(
        "\ndynamics (mean over seeds): state norm ||z_t||, step norm ||z_t - z_t-1||, "
        "median rho(J(z_t))"
    )
    print(
        format_table(
            dynamics_table(results, loops),
            [
                ("variant", "variant", ""),
                ("loops", "loops", ""),
                ("state_norm", "||z||", ".3g"),
                ("step_norm", "||dz||", ".3g"),
                ("rho_median", "rho", ".3f"),
            ],
        )
    )


# ------------------------------------------------------------------------------ figures


def plot_accuracy(results: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Accuracy vs loops (mean, band from worst to best seed; the equilibrium at "z*")
    and the mean state norm vs loops (log scale), one line per variant."""
    plt = pyplot()
    fig, (ax_acc, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (variant, runs) in enumerate(_by_variant(results).items()):
        color = f"C{i % 10}"
        loops = sorted(runs[0]["accuracy"])
        eq_x = 2 * loops[-1]
        acc = [[r["accuracy"][t] for r in runs] for t in loops]
        mean = [statistics.fmean(a) for a in acc]
        ax_acc.plot(loops, mean, "o-", color=color, ms=3, label=f"{variant} ({len(runs)} seeds)")
        ax_acc.fill_between(
            loops, [min(a) for a in acc], [max(a) for a in acc], color=color, alpha=0.15
        )
        eqs = [r["equilibrium"] for r in runs if r["equilibrium"] is not None]
        if eqs:
            ax_acc.errorbar(
                [eq_x],
                [statistics.fmean(eqs)],
                fmt="D",
                color=color,
                ms=5,
                yerr=[[statistics.fmean(eqs) - min(eqs)], [max(eqs) - statistics.fmean(eqs)]],
            )
        dyn = [
            [d["state_norm"] for r in runs for d in r["dynamics"] if d["loops"] == t] for t in loops
        ]
        if all(dyn):
            ax_norm.plot(
                loops, [statistics.fmean(d) for d in dyn], "o-", color=color, ms=3, label=variant
            )
            ax_norm.fill_between(
                loops, [min(d) for d in dyn], [max(d) for d in dyn], color=color, alpha=0.15
            )
    for ax in (ax_acc, ax_norm):
        ax.set_xscale("log", base=2)
    ticks = loops + [eq_x]
    ax_acc.set_xticks(ticks, [str(t) for t in loops] + ["z*"])
    ax_acc.set_ylim(-0.02, 1.02)
    style_axis(ax_acc, "loops at test time (z*: solver's equilibrium)", "exact match")
    ax_acc.set_title("accuracy vs loops (band: worst to best seed)")
    ax_norm.set_xticks(loops, [str(t) for t in loops])
    ax_norm.set_yscale("log")
    style_axis(ax_norm, "loops at test time", "state norm ||z_t||", legend=False)
    ax_norm.set_title("hidden-state norm vs loops")
    fig.tight_layout()
    write_figure_atomic(path, fig, dpi=120)
    plt.close(fig)


def plot_pca(variants: Sequence[str], args: argparse.Namespace, path: str | Path) -> dict:
    """PCA trajectories (loops 1..max) of ``args.pca_problems`` test problems per variant
    (its first seed), side by side; returns the explained variance per variant."""
    panels, summary = {}, {}
    for variant in variants:
        seed = args.seeds[0]
        pca = checkpoint_pca(
            run_dir(variant, seed, args), problems=args.pca_problems, loops=max(args.loops)
        )
        panels[f"{variant} (seed {seed})"] = pca
        summary[variant] = {
            "explained": pca.explained.tolist(),
            "final_state_norm": pca.state_norm[:, -1].tolist(),
        }
    plot_trajectories(panels, path)
    return summary


# ---------------------------------------------------------------------- test-time scaling


def carry_chain(question: str, *, reverse_operands: bool = False) -> int:
    """Longest run of consecutive carries in the written addition ``"a+b"`` (equal widths),
    its operands written most significant digit first (or least, ``reverse_operands``)."""
    a, b = question.split("+")
    if not reverse_operands:
        a, b = a[::-1], b[::-1]
    longest = run = carry = 0
    for da, db in zip(a, b, strict=True):
        carry = int(int(da) + int(db) + carry >= 10)
        run = run + 1 if carry else 0
        longest = max(longest, run)
    return longest


def scaling_sets(config: TrainConfig, n: int, min_chain: int) -> dict[str, Any]:
    """The harder splits of the scaling study, ``n`` problems each.

    ``long_carry``: held-out problems of the trained width whose carries run through at
    least ``min_chain`` consecutive digits (rare in training); ``ood``: operands one digit
    longer than trained (the data module's ``ood`` split).
    """
    drawn = make_arithmetic_dataset(
        config.task,
        config.digits,
        20 * n,
        config.seed,
        split="test",
        reverse_operands=config.reverse_operands,
        cache_dir=config.data_cache_dir,
    )
    order = config.reverse_operands
    hard = [
        i
        for i, q in enumerate(drawn["question"])
        if carry_chain(q, reverse_operands=order) >= min_chain
    ]
    if len(hard) < n:
        raise ValueError(
            f"only {len(hard)} of {len(drawn)} test problems have a carry chain "
            f">= {min_chain}; lower --scaling-chain or --scaling-n"
        )
    ood = make_arithmetic_dataset(
        config.task,
        config.digits,
        n,
        config.seed,
        split="ood",
        reverse_operands=config.reverse_operands,
        cache_dir=config.data_cache_dir,
    )
    return {"long_carry": make_eval_set(drawn.select(hard[:n])), "ood": make_eval_set(ood)}


def training_depth(config: TrainConfig) -> float:
    """Mean loop count of the run's own training (its depth sampler's mean)."""
    return float(config.make_sampler().mean())


def scaling_loops(depth: float, loops: Sequence[int]) -> list[int]:
    """The evaluation grid plus 1x, 2x and 4x the training depth."""
    return sorted(set(loops) | {max(1, round(k * depth)) for k in (1, 2, 4)})


def scaling_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy vs loops of one run on the harder splits (cached in the run directory)."""
    torch.set_num_threads(1)
    folder = run_dir(variant, seed, args)
    checkpoint = latest_checkpoint(folder)
    config = run_config(variant, seed, args)
    depth = training_depth(config)
    loops = scaling_loops(depth, args.loops)
    settings = {"n": args.scaling_n, "min_chain": args.scaling_chain, "loops": loops}
    cache = folder / "scaling.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("settings") == settings and cached.get("checkpoint") == checkpoint.name:
            return cached["result"]
    model, _ = load_model(checkpoint)
    model.eval()
    result = {"variant": variant, "seed": seed, "training_depth": depth, "splits": {}}
    for split, data in scaling_sets(config, args.scaling_n, args.scaling_chain).items():
        result["splits"][split] = {
            str(t): exact_match(unrolled(model, t), data, decode="forced") for t in loops
        }
    write_json_atomic(
        cache, {"settings": settings, "checkpoint": checkpoint.name, "result": result}
    )
    return result


def scaling_table(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant and split: accuracy at 1x, 2x, 4x the training depth (mean/worst)."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        depth = mine[0]["training_depth"]
        for split in mine[0]["splits"]:
            row: dict[str, Any] = {"variant": variant, "split": split, "depth": depth}
            for k in (1, 2, 4):
                t = str(max(1, round(k * depth)))
                row[f"x{k}"] = _mean_worst([r["splits"][split][t] for r in mine])
            mean = {k: row[f"x{k}"][0] for k in (1, 2, 4)}
            row["deeper_not_worse"] = mean[2] >= mean[1] and mean[4] >= mean[1]
            rows.append(row)
    return rows


def plot_scaling(runs: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Accuracy vs loops on each harder split, mean and worst-to-best band per variant;
    dotted verticals mark each variant's training depth."""
    plt = pyplot()
    splits = list(runs[0]["splits"])
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.3), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in runs)):
            mine = [r for r in runs if r["variant"] == variant]
            loops = sorted(int(t) for t in mine[0]["splits"][split])
            acc = [[r["splits"][split][str(t)] for r in mine] for t in loops]
            color = f"C{i % 10}"
            ax.plot(
                loops,
                [statistics.fmean(a) for a in acc],
                "o-",
                ms=3,
                color=color,
                label=f"{variant} ({len(mine)} seeds)",
            )
            ax.fill_between(
                loops, [min(a) for a in acc], [max(a) for a in acc], color=color, alpha=0.15
            )
            ax.axvline(mine[0]["training_depth"], color=color, ls=":", lw=1)
        ax.set_xscale("log", base=2)
        grid = [t for t in EVAL_LOOPS if t <= loops[-1]]
        ax.set_xticks(grid, [str(t) for t in grid])
        ax.set_ylim(-0.02, 1.02)
        style_axis(ax, "loops at test time (dotted: training depth)", "exact match")
        ax.set_title(split)
    fig.tight_layout()
    write_figure_atomic(path, fig, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ CLI


# --quick: tiny runs in seconds (tests); experiments/equilibrium/run.py trains the same ones.
QUICK_RECIPE: dict[str, Any] = {
    "batch_size": 16,
    "n_train": 256,
    "digits": 2,
    "warmup_steps": 2,
    "model.d_model": 16,
    "model.n_heads": 2,
    "model.d_ff": 32,
}
QUICK_STEPS = {"warm_steps": 6, "steps": 16, "depth_hi": 4}


def variant_names(text: str, check: bool = True) -> list[str]:
    """Comma-separated variants and group names -> variant names, groups expanded.

    Raises:
        ValueError: with ``check``, a name that is neither a variant nor a group.
    """
    out: list[str] = []
    for item in (s for s in text.split(",") if s):
        for name in GROUPS.get(item, (item,)):
            if name not in out:
                out.append(name)
    unknown = [v for v in out if v not in VARIANTS]
    if check and unknown:
        raise ValueError(
            f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)} "
            f"or the groups {', '.join(GROUPS)}"
        )
    return out


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> recipe overrides (values JSON if they parse, else text).

    Raises:
        ValueError: an item without ``=`` or without a key.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} must look like KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def apply_quick(args: argparse.Namespace) -> None:
    """``--quick``: the tiny recipe (``--set`` still wins) and training steps, in place."""
    args.recipe_overrides = QUICK_RECIPE | args.recipe_overrides
    for key, value in QUICK_STEPS.items():
        setattr(args, key, value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--variants",
        default="headline",
        help=f"variants or groups ({', '.join(GROUPS)}), comma-separated",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument(
        "--warm-steps",
        type=int,
        default=WARM_STEPS,
        help="training steps of a baseline (the fixed-loop phase the others start from)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=STEPS,
        help="training steps of a warm-started variant after that phase",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field for every variant, e.g. lr=1e-3 (the "
        "fields a variant sets itself, such as depth and lam, stay)",
    )
    p.add_argument(
        "--depth-hi",
        type=int,
        default=32,
        help="largest loop count the random-depth variants sample (paper: 100)",
    )
    p.add_argument("--n-test", type=int, default=1000, help="test problems per loop count")
    p.add_argument("--loops", default=",".join(map(str, EVAL_LOOPS)), help="eval loop counts")
    p.add_argument(
        "--solver",
        default="fixed_point,anderson@4,broyden@4,anderson",
        help="equilibrium solvers, comma-separated, the first one primary (its "
        "accuracy is 'equilibrium', its diagnostics are reported); NAME@K "
        "starts NAME after K loops; '' skips",
    )
    p.add_argument("--solver-max-iter", type=int, default=100)
    p.add_argument("--solver-tol", type=float, default=1e-4)
    p.add_argument("--diagnostic-samples", type=int, default=256)
    p.add_argument("--rho-iters", type=int, default=20, help="power steps per rho estimate")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (1 thread each)")
    p.add_argument(
        "--out-dir",
        default=None,
        help="runs (resumable); default runs/stars_scaling, with --quick runs/stars_scaling_quick",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the runs this command trains (and their cached evaluations) "
        "and train them again",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="accuracy and state norm vs loops (PNG)")
    p.add_argument("--pca", default=None, help="PCA trajectory figure (PNG)")
    p.add_argument("--pca-variants", default="headline", help="variants in --pca")
    p.add_argument("--pca-problems", type=int, default=8, help="test problems in --pca")
    p.add_argument(
        "--scaling",
        default=None,
        help="test-time scaling figure (PNG): accuracy vs loops on harder splits",
    )
    p.add_argument("--scaling-variants", default="headline", help="variants in --scaling")
    p.add_argument("--scaling-n", type=int, default=1000, help="problems per harder split")
    p.add_argument(
        "--scaling-chain", type=int, default=3, help="shortest carry chain of the long_carry split"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny runs in seconds (tests)")
    args = p.parse_args(argv)
    try:
        args.recipe_overrides = parse_set(args.set)
        args.variants = variant_names(args.variants)
    except ValueError as error:
        p.error(str(error))
    if args.out_dir is None:
        args.out_dir = "runs/stars_scaling_quick" if args.quick else "runs/stars_scaling"
    if args.quick:
        apply_quick(args)
        args.n_test, args.diagnostic_samples, args.rho_iters = 32, 8, 4
        args.loops, args.solver_max_iter, args.pca_problems = "1,2,4,8", 20, 3
        args.scaling_n, args.scaling_chain = 16, 1
        if args.seeds == "0,1,2":
            args.seeds = "0,1"
    args.pca_variants = variant_names(args.pca_variants, check=False)
    args.scaling_variants = variant_names(args.scaling_variants, check=False)
    try:
        args.seeds = int_list(args.seeds, "--seeds", 0)
        args.loops = int_list(args.loops, "--loops", 1)
    except ValueError as error:
        p.error(str(error))
    if not 1 <= args.jobs <= 8:
        p.error("--jobs must be between 1 and 8")
    if args.solver:
        from solvers import available

        try:
            names = [solver_spec(spec)[0] for spec in _solvers(args)]
        except ValueError as error:
            p.error(f"--solver: {error}")
        unknown = [name for name in names if name not in available()]
        if unknown:
            p.error(f"unknown solver(s) {unknown}; choose from {', '.join(available())}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train and evaluate every (variant, seed); print the tables; write JSON and figures."""
    args = parse_args(argv)
    command = command_line(PROG, argv)
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    start = time.perf_counter()
    pairs = [(v, s) for v in args.variants for s in args.seeds]
    results = run_all(pairs, args)
    wall = time.perf_counter() - start
    print_tables(results, args.loops, _solvers(args))
    print(f"\n{len(pairs)} runs, {wall:.0f} s wall ({args.jobs} at a time)")
    extra: dict[str, Any] = {}
    configs = ((v, run_config(v, args.seeds[0], args)) for v in args.variants)
    penalised = next(((v, c) for v, c in configs if c.lam > 0), None)
    if penalised is not None:
        variant, config = penalised
        overhead = penalty_overhead(config, steps=3, warmup=1)
        with_penalty, without = overhead["step_time_stars"], overhead["step_time_ce"]
        print(
            f"penalty overhead per step ({variant}): {overhead['ratio']:.2f}x "
            f"({with_penalty * 1e3:.0f} ms vs {without * 1e3:.0f} ms at {overhead['loops']} loops)"
        )
        extra["penalty_overhead"] = {"variant": variant, **overhead}
    if args.plot:
        plot_accuracy(results, args.plot)
    if args.pca:
        extra["pca"] = plot_pca(
            [v for v in args.pca_variants if v in args.variants], args, args.pca
        )
    if args.scaling:
        chosen = [(v, s) for v in args.scaling_variants if v in args.variants for s in args.seeds]
        done = _run_jobs(scaling_one, chosen, args)
        runs = [done[p] for p in chosen]
        table = scaling_table(runs)
        print("\ntest-time scaling: exact match at 1x, 2x, 4x the training depth, mean/worst")
        print(
            format_table(
                [
                    {k: (_pair(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                    for r in table
                ],
                [
                    ("variant", "variant", ""),
                    ("split", "split", ""),
                    ("depth", "train depth", ".1f"),
                    ("x1", "1x", ""),
                    ("x2", "2x", ""),
                    ("x4", "4x", ""),
                    ("deeper_not_worse", "2x,4x >= 1x", ""),
                ],
            )
        )
        plot_scaling(runs, args.scaling)
        extra["scaling"] = {"table": table, "runs": runs}
    total = time.perf_counter() - start
    print(f"{total:.0f} s in all (runs, then the penalty overhead and the figures)")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "recipe_overrides"}
        write_json_atomic(
            args.json,
            {
                "machine": machine_info(),
                "date": date,
                "command": command,
                "wall_seconds": wall,
                "total_seconds": total,
                "settings": settings,
                "recipe": {**RECIPE, **args.recipe_overrides},
                "variants": {
                    n: {
                        "group": VARIANTS[n].group,
                        "description": VARIANTS[n].description,
                        "overrides": VARIANTS[n].overrides,
                    }
                    for n in args.variants
                },
                "accuracy_table": accuracy_table(results, args.loops, _solvers(args)),
                "dynamics_table": dynamics_table(results, args.loops),
                "results": results,
                **extra,
            },
        )
    print(f"runs in {args.out_dir}")
    print_written(args.json, args.plot, args.pca, args.scaling)
    return results


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # e.g. a run directory that holds another recipe's run
        sys.exit(f"{PROG}: error: {error}")
