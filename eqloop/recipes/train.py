"""Train a LoopLM on arithmetic with STARS: random loop counts plus the Jacobian penalty.

Single process (CPU or one GPU)::

    eqloop train --config add3.json --set lam=0.1 --out-dir runs/stars

Distributed data parallel on one machine, N processes (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc_per_node=2 -m eqloop.cli train --config add3.json --out-dir ddp

CPU recipe (3-digit addition, reversed answers; its results are in docs/benchmarks.md's
benchmarks): the TrainConfig defaults (d=64, 8 heads, prelude + one post-sandwich core
block + coda, init_std 0.1, AdamW lr 3e-3, batch 64, 1500 steps, lam 0.1 from 20% of training)
with the sampler narrowed to what a CPU affords::

    eqloop train --set 'depth={"kind": "lognormal", "mu": 2.0, "sigma": 0.7, "lo": 1, "hi": 16}'

The run directory follows :mod:`eqloop.training.run_dir` (shared with ``eqloop
finetune``): a directory that already holds a run's files (``config.json``,
``metrics.jsonl``, ``checkpoints/``) is continued with ``resume``, replaced with
``overwrite``, or refused, and it may not be, contain or lie inside ``init_from``. SIGINT
(Ctrl-C) and SIGTERM end a run cleanly: the step in progress (with its evaluation, if due)
finishes, a checkpoint is written and :class:`TrainingInterrupted` says where it is (under
DDP the ranks agree on the signal at the next read of the statistics, below, so the run
stops up to ``log_every - 1`` steps later).

The step's statistics stay on the device (``train_step`` reads nothing back) and are read
every ``log_every`` steps and before every evaluation and checkpoint
(:mod:`eqloop.training.step_stats`); metrics.jsonl still gets one record per step, with
the same values. A non-finite loss or gradient norm stops the run with
:class:`NonFiniteLoss` naming the first such step, found at the next read (up to
``log_every - 1`` steps later); no checkpoint is written after it, so the newest
checkpoint is the last finite one. ``compile`` runs the model's per-loop step compiled
(:func:`eqloop.compile_model`); the penalty differentiates the eager step, and with
``penalty_product="jvp"`` runs compiled as a whole (forward-mode product and its backward).
At a fixed depth the forward, loss and jvp penalty compile as one graph
(:class:`eqloop.training.whole_step.WholeStep`).

Every step draws one loop count ``t`` from the depth sampler (the same ``t`` on every
rank, logged), runs the model ``t`` loops and minimises

    loss = (1 - lam) * CE(answer tokens) + lam * JSRR(f, z_t.detach())

with the penalty switched on from ``penalty_start`` (plain CE before; a fraction of
``steps`` such as the default 0.2, or a step number), using AdamW with a
linear warm-up, a cosine schedule and gradient clipping. Exact-match accuracy at a few
loop counts is evaluated every ``eval_every`` steps; checkpoints are written every
``checkpoint_every`` steps (see :mod:`eqloop.training.checkpoint`), metrics go to
``out_dir/metrics.jsonl``.

Training at the fixed point (``solve`` set, with ``backward="ift"`` or ``"phantom"``):
each step solves the core to its equilibrium with ``solve.solver`` (tolerance
``solve.tol``, budget ``solve.max_iter``, from z0 after ``solve.start_loops`` loops)
instead of running a sampled depth (the sampler is not drawn; ``loops`` is logged as
null), and the backward takes its gradient at the point the solver returned. What the
solves did is logged with every step: ``fwd_converged`` (share of sequences that met
the tolerance), ``fwd_nfe`` and ``fwd_residual`` (the batch's largest residual), and
with IFT ``bwd_converged`` and ``bwd_nfe`` of the adjoint solve (also without
``solve``). An unconverged solve is never silently taken as a fixed point: it shows in
these shares, and the first step with one emits a ``ConvergenceWarning`` (once per run
and kind, instead of one per solve). The penalty is unchanged: ``penalty_at`` chooses
its point as before (with ``solve``, "trajectory" means the returned point).

Data parallelism: the global batch of ``batch_size`` rows does not depend on the number of
ranks; rank ``r`` of ``N`` trains on rows ``r, r + N, ...`` of it, so N ranks compute the
gradient of one process (up to summation order and the penalty's random vectors). Only
rank 0 evaluates, logs and writes; the evaluation metrics are broadcast so that
``on_eval`` runs on every rank with the same values.

DDP and the penalty: the CE forward goes through the DDP wrapper; the penalty applies the
core of the underlying module to the detached state ``z_t`` with the injection ``x`` of
that forward (so its gradient also reaches the embeddings). Both terms enter one backward,
in which each parameter's gradient is accumulated once and then all-reduced by DDP's
hooks; the penalty's inner ``autograd.grad`` (with respect to ``z`` only) never runs the
parameters' accumulators. Every parameter is used by the CE forward, so
``find_unused_parameters=False``.

Exact resume: the data order, the dropout RNG and the penalty vectors of each step are
derived from ``(seed, step, rank)``, and the optimiser, scheduler and depth-sampler states
are checkpointed, so a run interrupted at step k and resumed reaches bit-identical
weights to an uninterrupted run. Resuming drops the metrics records written after the
checkpoint (and a torn last line left by a crash, with a warning).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

import solvers
from eqloop.core.compiling import compile_model, eager_map
from eqloop.core.defaults import (
    EQUILIBRIUM_MAX_ITER,
    EQUILIBRIUM_SOLVER,
    EQUILIBRIUM_STOP_MODE,
    EQUILIBRIUM_TOL,
)
from eqloop.core.stars import PenaltySchedule, jsrr_penalty, spectral_radius
from eqloop.data import IGNORE_INDEX, CharTokenizer, to_tensors
from eqloop.evaluation import EvalSet, evaluate_model, make_test_set
from eqloop.models.looped import random_start
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig
from eqloop.training import run_dir
from eqloop.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from eqloop.training.config import TrainConfig, penalty_start_step
from eqloop.training.depth import DepthSampler
from eqloop.training.env import (  # re-exported: they were defined here
    RunEnv,
    batch_rows,
    mix_seed,
    run_env,
    setup_run,
)
from eqloop.training.loop import OnEval, TrainingLoop  # OnEval: re-exported
from eqloop.training.optim import lr_factor, make_optimizer, make_scheduler  # lr_factor: too
from eqloop.training.run_dir import (  # re-exported: they were defined here
    MetricsLog,
    NonFiniteLoss,
    TrainingInterrupted,
    changed_fields,
    read_metrics,
)
from eqloop.training.solve import converged_targets, quiet_solves, solve_forward, solve_stats
from eqloop.training.timing import penalty_step_times
from eqloop.training.whole_step import WholeStep

__all__ = [
    "MetricsLog",
    "NonFiniteLoss",
    "OnEval",
    "RunEnv",
    "TrainingInterrupted",
    "batch_rows",
    "changed_fields",
    "check_resumable",
    "lr_factor",
    "make_train_tensors",
    "mix_seed",
    "penalty_overhead",
    "penalty_point",
    "read_metrics",
    "run_env",
    "setup_run",
    "train",
    "train_step",
]

# Options a resumed run may change (besides run_dir.RESUME_MAY_CHANGE); every other field
# must match the checkpoint's config.
_RESUME_MAY_CHANGE = run_dir.RESUME_MAY_CHANGE | {"eval_every", "n_test", "data_cache_dir"}


# ------------------------------------------------------------------------------- helpers


def make_train_tensors(config: TrainConfig) -> tuple[Tensor, Tensor]:
    """The training split as next-token tensors.

    Returns:
        ``inputs`` (N, S) and ``targets`` (N, S) int64; targets are -100 on the prompt.
    """
    return to_tensors(config.make_examples("train"), CharTokenizer())


# ---------------------------------------------------------------------------- one step


def _forward(
    net: nn.Module,
    inputs: Tensor,
    loops: int | None,
    config: TrainConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Any]:
    """Logits (B, S, V) and the LoopInfo of one training forward.

    Without ``config.solve``: ``loops`` loops. ``unroll`` backpropagates through every
    loop (the paper); the other modes run ``eqloop.fixed_point`` with the plain iteration
    and the sampled depth as its budget (``max_iter=loops``, ``tol=0``: exactly ``loops``
    evaluations) and the backward mode built from ``backward`` and ``backward_options``.

    With ``config.solve`` (``loops`` is ignored): the core is solved to equilibrium by
    ``solve.solver`` from z0 after ``solve.start_loops`` loops, converged sequences
    leaving the working batch (``compact=True``), and the backward mode (``ift`` or
    ``phantom``) takes its gradient at the point the solver returned.

    With ``config.random_start``, that share of the sequences starts from
    :func:`eqloop.random_start` (drawn with ``generator``) instead of z0.
    """
    start = None
    if config.random_start:
        start = functools.partial(random_start, generator=generator, share=config.random_start)
    if config.solve is not None:
        return solve_forward(net, inputs, config.solve, config.make_backward(), start=start)
    if config.backward == "unroll":
        return net(inputs, loops=loops, start=start, return_info=True)
    return net(
        inputs,
        solver="fixed_point",
        max_iter=loops,
        tol=0.0,
        backward=config.make_backward(),
        start=start,
        return_info=True,
    )


def penalty_point(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    config: TrainConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Where the penalty takes the Jacobian, and the vector it starts from.

    Args:
        f: the core map of the batch, (B, S, d) -> (B, S, d).
        z: (B, S, d) the state after the sampled loops.
        config: ``penalty_at`` and ``penalty_arnoldi`` choose (see TrainConfig).
        generator: random start vectors.

    Returns:
        ``(point, v)``: the detached (B, S, d) state, ``z`` or the fixed point solved from
        it (``EQUILIBRIUM_SOLVER`` with its budget and tolerance, best iterate if it does
        not converge), and the dominant Ritz vectors of ``J(point)`` (B, S, d), or None
        for the paper's random vector.
    """
    point = z.detach()
    if config.penalty_at == "fixed_point":
        with torch.no_grad():
            point = solvers.solve(
                f,
                point,
                EQUILIBRIUM_SOLVER,
                max_iter=EQUILIBRIUM_MAX_ITER,
                tol=EQUILIBRIUM_TOL,
                stop_mode=EQUILIBRIUM_STOP_MODE,
            ).z
    if not config.penalty_arnoldi:
        return point, None
    _, v = spectral_radius(
        f, point, "arnoldi", config.penalty_arnoldi, return_vectors=True, generator=generator
    )
    return point, v


@quiet_solves()
def train_step(
    net: nn.Module,
    model: LoopLM,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    targets: Tensor,
    loops: int | None,
    config: TrainConfig,
    *,
    penalty_on: bool,
    generator: torch.Generator | None = None,
    whole: WholeStep | None = None,
) -> dict[str, Tensor | int | None]:
    """One optimisation step; returns (rank-local) loss and solve statistics.

    Nothing is read from the device (no ``.item()``): the caller decides when to read
    the statistics (the training loop every ``log_every`` steps, see
    :mod:`eqloop.training.step_stats`). The ``ConvergenceWarning`` of each unconverged
    solve is silenced here: the solves' outcome is in the returned statistics, and
    :func:`train` warns once per run.

    Args:
        net: the model to run forward (the DDP wrapper, or ``model`` itself).
        model: the underlying LoopLM, whose core the penalty differentiates.
        optimizer: steps ``model``'s parameters.
        inputs: (B, S) token ids.
        targets: (B, S) next tokens, -100 where no loss is taken.
        loops: loop count of this batch (None with ``config.solve``, which ignores it).
        config: supplies ``lam``, ``power_steps``, ``penalty_product``, ``compile``,
            ``grad_clip``, ``backward`` and ``solve``.
        penalty_on: add the STARS penalty (weight ``lam``) to the loss.
        generator: random start vectors of the penalty.
        whole: the compiled whole loss (fixed depth, ``WholeStep.for_training``), used
            when it covers the step and ``net`` is ``model``.

    Returns:
        0-d detached tensors: ``loss``, ``ce``, ``penalty`` and ``rho`` (the penalty's
        mean one-step estimate ``||v^T J||``; None when the penalty is off) and the
        pre-clipping ``grad_norm``; and the solve statistics of
        :func:`eqloop.training.solve.solve_stats` as
        device tensors and ints.
    """
    info = None
    if whole is not None and net is model and whole.covers(loops, penalty_on):
        # fixed depth, compiled: forward, CE and the jvp penalty as one graph per count
        loss, ce, penalty, rho = whole(inputs, targets, loops, penalty_on, generator)
    else:
        logits, info = _forward(net, inputs, loops, config, generator)
        kept = converged_targets(targets, info, config.solve)
        if kept is targets:
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        else:  # skipped sequences' tokens weigh zero; the mean stays over every target token
            ce = F.cross_entropy(
                logits.flatten(0, 1), kept.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ) / (targets != IGNORE_INDEX).sum().clamp_min(1)
        loss, penalty, rho = ce, None, None
        if penalty_on:
            f = eager_map(model, info.f)  # second-order/forward-mode AD needs the eager step
            point, start = penalty_point(f, info.z, config, generator)
            product = "jvp" if start is not None else config.penalty_product
            result = jsrr_penalty(
                f,
                point,
                product=product,
                power_steps=config.power_steps,
                v=start,
                target=config.penalty_target,
                generator=generator,
                return_details=True,
                # compiled: the jvp product as one graph with its backward (inductor)
                compile_options={} if config.compile and product == "jvp" else None,
            )
            loss = (1 - config.lam) * ce + config.lam * result.penalty
            penalty, rho = result.penalty.detach(), result.rho.detach().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
    optimizer.step()
    return {
        "loss": loss.detach(),
        "ce": ce.detach(),
        "penalty": penalty,
        "rho": rho,
        "grad_norm": grad_norm.detach(),
        **(solve_stats(info, config.solve) if info is not None else {}),
    }


# ----------------------------------------------------------------------- run directory


def check_resumable(saved: dict[str, Any], config: TrainConfig, source: Path) -> None:
    """Raise ``ValueError`` if ``config`` changes fields a resumed run must keep.

    Args:
        saved: the config of the run's checkpoint (``Checkpoint.config``).
        config: the config that would continue (or reuse) that run.
        source: the checkpoint, named in the message.
    """
    run_dir.check_resumable(saved, config.to_dict(), _RESUME_MAY_CHANGE, source, TrainConfig)


# -------------------------------------------------------------------------------- train


@dataclass
class _State:
    """The objects a run carries from step to step."""

    model: LoopLM
    net: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: LambdaLR
    sampler: DepthSampler
    step: int = 0
    train_time: float = 0.0
    last_eval: dict[str, Any] | None = None
    last_train: dict[str, Any] | None = None
    whole: WholeStep | None = None  # the compiled whole loss at a fixed depth

    def metrics(self) -> dict[str, Any]:
        """The metrics stored with a checkpoint and returned by :func:`train`."""
        return {
            "step": self.step,
            "train_time": self.train_time,
            "train": self.last_train,
            "eval": self.last_eval,
        }

    def save(self, out_dir: Path, config: TrainConfig) -> Path:
        """Checkpoint the current step (call on rank 0 only)."""
        return save_checkpoint(
            out_dir,
            self.step,
            weights=self.model.state_dict(),
            config=config.to_dict(),
            metrics=self.metrics(),
            training_state={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "train_time": self.train_time,
            },
        )


def initial_weights(config: TrainConfig) -> dict[str, Tensor]:
    """The weights of ``config.init_from``, checked to fit ``config.model``.

    Raises:
        ValueError: the checkpoint's model config differs from ``config.model``.
        eqloop.training.checkpoint.CheckpointError: missing or corrupted checkpoint.
    """
    source = load_checkpoint(config.init_from)
    theirs = LoopLMConfig.from_dict(source.config.get("model", {})).to_dict()  # with defaults
    ours = config.model.to_dict()
    changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if changed:
        raise ValueError(
            f"init_from {config.init_from}: its model config differs in {changed}; "
            "a warm start needs the same model"
        )
    return source.weights


def _build(config: TrainConfig, env: RunEnv, ckpt: Checkpoint | None) -> _State:
    """Model, DDP wrapper, optimiser, scheduler and sampler, restored from ``ckpt`` if given.

    Raises:
        eqloop.training.checkpoint.CheckpointError: the training state does not match the step.
    """
    torch.manual_seed(config.seed)
    model = LoopLM(config.model).to(env.device)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    state = _State(model, model, optimizer, scheduler, config.make_sampler())
    if ckpt is None and config.init_from is not None:
        model.load_state_dict(initial_weights(config))
    if config.compile:  # in place, before the DDP wrapper; the penalty stays eager
        compile_model(model)
        state.whole = WholeStep.for_training(model, config)
    if ckpt is not None:
        saved = ckpt.training_state(map_location=env.device)
        scheduled = saved["scheduler"].get("last_epoch")
        if scheduled != ckpt.step:
            raise CheckpointError(
                f"checkpoint {ckpt.path} is inconsistent: it is step {ckpt.step} but its "
                f"training state has taken {scheduled} steps"
            )
        model.load_state_dict(ckpt.weights)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.sampler.load_state_dict(saved["sampler"])
        state.step, state.train_time = ckpt.step, float(saved["train_time"])
        state.last_eval, state.last_train = ckpt.metrics.get("eval"), ckpt.metrics.get("train")
    if env.world > 1:
        state.net = env.data_parallel(model)
    return state


def _evaluate(state: _State, test: EvalSet, config: TrainConfig, env: RunEnv) -> dict[str, Any]:
    """Exact match at ``config.eval_loops`` on rank 0, broadcast to every rank."""
    metrics: list[dict[str, Any] | None] = [None]
    if env.main:
        start = time.perf_counter()
        result = evaluate_model(
            state.model, test, loops=config.eval_loops, decode="forced", diagnostics=False
        )
        accuracy = result["accuracy"]
        metrics[0] = {
            "step": state.step,
            "accuracy": accuracy,
            "mean_accuracy": sum(accuracy.values()) / len(accuracy),
            "eval_time": time.perf_counter() - start,
        }
        state.model.train()
    if env.world > 1:
        dist.broadcast_object_list(metrics, src=0)
    assert metrics[0] is not None
    return metrics[0]


def train(config: TrainConfig, *, on_eval: OnEval | None = None) -> dict[str, Any]:
    """Train (or resume) a run; see the module docstring.

    Run under ``torchrun`` for data parallelism; the process group is created here (and
    destroyed at the end) unless the caller already initialised one.

    Args:
        config: the run; validated, and its run directory checked, before any work.
        on_eval: called as ``on_eval(step, metrics)`` after every periodic evaluation
            (``metrics``: ``step``, ``accuracy`` per loop count, ``mean_accuracy``,
            ``eval_time``). It may raise, e.g. ``optuna.TrialPruned``: the step is then
            checkpointed and the exception propagates.

    Returns:
        Final metrics: ``step``, ``train_time`` (seconds, evaluations excluded), ``train``
        (last step's ``loss``, ``ce``, ``penalty``, ``rho``, ``grad_norm``, ``loops``,
        ``lr``, and the solve statistics ``fwd_*``/``bwd_*`` described above), ``eval``
        (last evaluation) and ``checkpoint`` (path of the last one).

    Raises:
        ValueError: invalid config (unknown task, ``digits < 1``, ``lam`` outside
            [0, 1], ...), a model too small for the data, ``batch_size`` not divisible by
            the number of ranks, a run already in ``out_dir`` without ``resume`` or
            ``overwrite``, or an ``out_dir`` that is, contains or lies inside ``init_from``.
        TypeError: a config field of the wrong type.
        eqloop.training.checkpoint.CheckpointError: the checkpoint to resume from is damaged.
        TrainingInterrupted: SIGINT or SIGTERM arrived; the last step was checkpointed.
        NonFiniteLoss: a step's loss or gradient norm was not finite (a ``ValueError``
            naming the step); the newest checkpoint is the last finite one.
    """
    config.validate()
    with run_env(config.device) as env:
        return _train(config, env, on_eval)


def _train(config: TrainConfig, env: RunEnv, on_eval: OnEval | None) -> dict[str, Any]:
    """:func:`train` in the process environment ``env``."""
    if config.batch_size % env.world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {env.world} ranks")
    vocab = CharTokenizer().vocab_size
    if config.model.vocab_size < vocab:
        raise ValueError(f"model.vocab_size must be >= {vocab} (the tokenizer's vocabulary)")
    plan = run_dir.plan_run_dir(config.to_dict(), may_change=_RESUME_MAY_CHANGE, schema=TrainConfig)
    if env.world > 1:
        dist.barrier()  # every rank has looked at out_dir before rank 0 changes it
    train_x, train_y = make_train_tensors(config)
    if train_x.shape[1] > config.model.max_seq_len:
        raise ValueError(
            f"model.max_seq_len must be >= {train_x.shape[1]} for {config.digits}-digit "
            f"{config.task}, got {config.model.max_seq_len}"
        )
    train_x, train_y = train_x.to(env.device), train_y.to(env.device)
    test = make_test_set(config).to(env.device)
    state = _build(config, env, plan.checkpoint)
    out_dir = Path(config.out_dir)
    if state.step >= config.steps:
        return {**state.metrics(), "checkpoint": str(latest_checkpoint(out_dir))}

    log = plan.start(config.to_dict()) if env.main else None  # nothing is written before
    start_step = penalty_start_step(config.penalty_start, config.steps, lam=config.lam)
    schedule = PenaltySchedule(start_step, config.penalty_every)

    def one_step(step: int) -> tuple[dict[str, Any], int | None, float]:
        """Optimisation step ``step`` on this rank's rows of its global batch."""
        generator = env.seed_step(config.seed, step)  # penalty vectors, random starts
        rows = batch_rows(step, len(train_x), config.batch_size, config.seed)
        rows = rows[env.rank :: env.world].to(env.device)
        # Training at the fixed point runs no sampled depth: the sampler is not drawn.
        loops = state.sampler.sample() if config.solve is None else None
        lr = state.scheduler.get_last_lr()[0]
        state.model.train()
        stats = train_step(
            state.net,
            state.model,
            state.optimizer,
            train_x[rows],
            train_y[rows],
            loops,
            config,
            penalty_on=config.lam > 0 and schedule.active(step),
            generator=generator,
            whole=state.whole,
        )
        state.scheduler.step()
        return stats, loops, lr

    def evaluate() -> dict[str, Any]:
        """Exact match at ``eval_loops`` (every rank gets rank 0's), kept in ``state``."""
        state.last_eval = _evaluate(state, test, config, env)
        return state.last_eval

    loop = TrainingLoop(
        config,
        env,
        state,
        one_step,
        save=lambda: state.save(out_dir, config) if env.main else None,
        log=log,
        desc=f"train {out_dir.name}",
        evaluate=evaluate,
        eval_every=config.eval_every,
        on_eval=on_eval,
    )
    try:
        checkpoint = loop.run()
    finally:
        state.net = state.model  # the DDP wrapper goes while the group lives (see run_env)
    return {**state.metrics(), "checkpoint": str(checkpoint) if checkpoint else None}


# ------------------------------------------------------------------------ measurements


def penalty_overhead(
    config: TrainConfig, *, steps: int = 10, warmup: int = 2, loops: int | None = None
) -> dict[str, float]:
    """Median time of a training step with and without the STARS penalty.

    Steps with and without the penalty alternate on the same model and batches, so load
    changes on a shared machine hit both alike. Nothing is written to disk.

    Args:
        config: model, data and optimiser settings (``out_dir`` is not used).
        steps: timed steps of each kind.
        warmup: untimed steps of each kind first.
        loops: loop count of every step (default: the median of the depth sampler).

    Returns:
        ``loops``, ``step_time_ce`` and ``step_time_stars`` (seconds) and their
        ``ratio`` (STARS / CE).
    """
    config.validate()
    loops = config.make_sampler().median() if loops is None else loops
    train_x, train_y = make_train_tensors(config)
    torch.manual_seed(config.seed)
    model = LoopLM(config.model)
    optimizer = make_optimizer(model, config)

    def run_step(rows: Tensor, penalty_on: bool) -> None:
        train_step(
            model,
            model,
            optimizer,
            train_x[rows],
            train_y[rows],
            loops,
            config,
            penalty_on=penalty_on,
        )

    ce, stars = penalty_step_times(
        lambda i: batch_rows(i, len(train_x), config.batch_size, config.seed),
        run_step,
        steps=steps,
        warmup=warmup,
    )
    return {"loops": loops, "step_time_ce": ce, "step_time_stars": stars, "ratio": stars / ce}
