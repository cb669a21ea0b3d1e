"""Exact-match accuracy versus loops, and at the equilibrium found by a solver.

The question STARS is about: does accuracy hold as the number of loops grows at test
time? Two drivers answer it with the same predictors and decodings:

* :func:`evaluate_model` / :func:`evaluate_checkpoint` (``eqloop eval``): a fixed-format
  :class:`~eqloop.evaluation.EvalSet` (arithmetic) at a grid of loop counts (default 1,
  2, 4, ..., 128) and optionally at equilibrium, with the latent dynamics of
  :mod:`eqloop.evaluation.dynamics`;
* :func:`accuracy_vs_loops` (``eqloop finetune``): free-text answers of fine-tuned
  pretrained models at loops 1..16 and at equilibrium.

Decoding is ``"greedy"`` or ``"forced"`` (:mod:`eqloop.evaluation.decoding`): for unrolled
loops both give the same verdict per sequence; ``forced`` is the cheaper one and what
training uses for its periodic evaluations.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from eqloop.checkpoint import load_model
from eqloop.compiling import compile_model
from eqloop.data.tokenizers import TextTokenizer
from eqloop.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_SOLVER, EQUILIBRIUM_TOL
from eqloop.evaluation import predictors
from eqloop.evaluation.decoding import check_decode
from eqloop.evaluation.dynamics import equilibrium_diagnostics, loop_diagnostics
from eqloop.evaluation.predictors import check_solve_options, unrolled
from eqloop.evaluation.scoring import EvalSet, answers_correct, exact_match, make_test_set
from eqloop.finetune.data import Example, PromptTemplate
from eqloop.looped import LoopedLM
from eqloop.training.config import TrainConfig, check_device
from solvers import checks

__all__ = [
    "DEFAULT_LOOPS",
    "accuracy_vs_loops",
    "check_options",
    "evaluate_checkpoint",
    "evaluate_model",
]

DEFAULT_LOOPS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


def check_options(
    loops: Sequence[int],
    solver: str | None = None,
    solver_options: dict[str, Any] | None = None,
    decode: str = "greedy",
    diagnostic_samples: int = 256,
    rho_iters: int = 30,
    batch_size: int = 1024,
) -> None:
    """Check evaluation settings before any work (see :func:`evaluate_model`).

    Raises:
        ValueError, TypeError: a setting out of range or of the wrong type, an unknown
            decode, solver or solver option (the message names it).
    """
    if isinstance(loops, (str, bytes)) or not isinstance(loops, Sequence) or not loops:
        raise TypeError(f"loops must be a non-empty sequence of loop counts, got {loops!r}")
    for t in loops:
        checks.integer("loops", t, low=0)
    check_decode(decode)
    checks.integer("diagnostic_samples", diagnostic_samples, low=1)
    checks.integer("rho_iters", rho_iters, low=1)
    checks.integer("batch_size", batch_size, low=1)
    if solver is not None:
        check_solve_options(solver, solver_options or {})


def evaluate_model(
    model: LoopedLM,
    data: EvalSet,
    *,
    loops: Sequence[int] = DEFAULT_LOOPS,
    solver: str | None = None,
    solver_options: dict[str, Any] | None = None,
    decode: str = "greedy",
    diagnostics: bool = True,
    diagnostic_samples: int = 256,
    rho_iters: int = 30,
    batch_size: int = 1024,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy per loop count (and at equilibrium) plus latent diagnostics.

    Args:
        model: the looped LM; it is switched to eval mode.
        data: the test set.
        loops: loop counts to evaluate (diagnostics skip a loop count of 0).
        solver: also solve the core to equilibrium with this solver (e.g. ``"anderson"``).
        solver_options: ``max_iter``, ``tol``, ``stop_mode`` (defaults in
            :mod:`eqloop.defaults`), ``start_loops`` (loops before the solver starts,
            default 0), ``compact`` and solver hyperparameters (see
            :func:`eqloop.evaluation.equilibrium`).
        decode: ``"greedy"`` or ``"forced"`` (identical verdicts for unrolled loops).
        diagnostics: compute the latent diagnostics and the contraction certificate.
        diagnostic_samples: test sequences used for the diagnostics (the first ones).
        rho_iters: power-iteration steps per spectral-radius estimate.
        batch_size: sequences per forward pass.
        seed: seed of the power-iteration start vectors.
        progress: show a tqdm bar over the loop counts (and the equilibrium).

    Returns:
        ``{"n_test", "accuracy": {"<loops>": acc, ...}, "equilibrium": {...} | None,
        "diagnostics": [...] | None}``; ``equilibrium`` holds ``accuracy`` and, with
        ``diagnostics``, the output of :func:`equilibrium_diagnostics`.

    Raises:
        ValueError, TypeError: a setting out of range or of the wrong type, an unknown
            decode, solver or solver option; raised before any evaluation.
    """
    options = dict(solver_options or {})
    check_options(loops, solver, options, decode, diagnostic_samples, rho_iters, batch_size)
    model.eval()
    deep = [t for t in loops if t >= 1]
    total = len(loops) + (solver is not None) * (1 + diagnostics) + diagnostics * len(deep)
    bar = tqdm(total=total, disable=not progress, desc="eval", leave=False, dynamic_ncols=True)
    result: dict[str, Any] = {
        "n_test": len(data),
        "decode": decode,
        "accuracy": {},
        "equilibrium": None,
        "diagnostics": None,
    }
    score = dict(decode=decode, batch_size=batch_size)
    with bar:
        for t in loops:
            bar.set_description(f"accuracy, {t} loops")
            result["accuracy"][str(t)] = exact_match(unrolled(model, t), data, **score)
            bar.update()
        sample = data.inputs[:diagnostic_samples]
        if solver is not None:
            diag = sample if diagnostics else None
            eq = _at_equilibrium(model, data, solver, options, score, diag, rho_iters, seed, bar)
            result["equilibrium"] = eq
        if diagnostics and deep:
            bar.set_description("diagnostics per depth")
            generator = torch.Generator(device=sample.device).manual_seed(seed)
            result["diagnostics"] = loop_diagnostics(
                model,
                sample,
                deep,
                rho_iters=rho_iters,
                generator=generator,
                on_record=lambda t: bar.update(),
            )
    return result


def _at_equilibrium(
    model: LoopedLM,
    data: EvalSet,
    solver: str,
    options: dict[str, Any],
    score: dict[str, Any],
    sample: Tensor | None,
    rho_iters: int,
    seed: int,
    bar: Any,
) -> dict[str, Any]:
    """The ``equilibrium`` entry of :func:`evaluate_model`: accuracy at the solver's fixed
    point and, given a (B, S) ``sample`` of inputs, :func:`equilibrium_diagnostics` on it."""
    bar.set_description(f"accuracy at equilibrium ({solver})")
    acc = exact_match(predictors.equilibrium(model, solver, **options), data, **score)
    out = {"accuracy": acc, "solver": solver, **options}
    bar.update()
    if sample is not None:
        bar.set_description("contraction at equilibrium")
        generator = torch.Generator(device=sample.device).manual_seed(seed)
        out.update(
            equilibrium_diagnostics(
                model, sample, solver, rho_iters=rho_iters, generator=generator, **options
            )
        )
        bar.update()
    return out


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    loops: Sequence[int] = DEFAULT_LOOPS,
    solver: str | None = None,
    *,
    solver_options: dict[str, Any] | None = None,
    n_test: int | None = None,
    decode: str = "greedy",
    diagnostics: bool = True,
    diagnostic_samples: int = 256,
    rho_iters: int = 30,
    batch_size: int = 1024,
    device: str = "cpu",
    progress: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint and run :func:`evaluate_model` on its task's test split.

    Args:
        path: a ``step_*`` checkpoint directory or a run directory (latest checkpoint).
        loops: loop counts to evaluate.
        solver: also evaluate at the equilibrium found by this solver.
        solver_options: see :func:`evaluate_model`.
        n_test: test problems (default: the run's ``n_test``).
        decode, diagnostics, diagnostic_samples, rho_iters, batch_size, progress: see
            :func:`evaluate_model`.
        device: where to run: ``"cpu"``, ``"cuda[:n]"`` or ``"auto"``.
        compile: run the model's per-loop step compiled (:func:`eqloop.compile_model`).

    Returns:
        The :func:`evaluate_model` dict plus ``checkpoint`` (path), ``step``, ``task``
        and ``digits``.

    Raises:
        ValueError, TypeError: bad settings or an unusable device (before the checkpoint
            is read).
        eqloop.checkpoint.CheckpointError: missing or corrupted checkpoint.
    """
    options = {"max_iter": EQUILIBRIUM_MAX_ITER, "tol": EQUILIBRIUM_TOL, **(solver_options or {})}
    check_options(loops, solver, options, decode, diagnostic_samples, rho_iters, batch_size)
    if n_test is not None:
        checks.integer("n_test", n_test, low=1)
    device = check_device(device)
    model, ckpt = load_model(path, device=device)
    if compile:
        compile_model(model)
    config = TrainConfig.from_dict(ckpt.config)
    if n_test is not None:
        config.n_test = n_test
        config.validate()
    data = make_test_set(config)
    result = evaluate_model(
        model,
        data.to(device),
        loops=loops,
        solver=solver,
        solver_options=options,
        decode=decode,
        diagnostics=diagnostics,
        diagnostic_samples=diagnostic_samples,
        rho_iters=rho_iters,
        batch_size=batch_size,
        seed=config.seed,
        progress=progress,
    )
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "task": config.task,
        "digits": config.digits,
        **result,
    }


def accuracy_vs_loops(
    model: LoopedLM,
    tokenizer: TextTokenizer,
    examples: Sequence[Example],
    *,
    loops: Iterable[int] = range(1, 17),
    equilibrium: bool = True,
    solver: str = EQUILIBRIUM_SOLVER,
    tol: float = EQUILIBRIUM_TOL,
    max_iter: int = EQUILIBRIUM_MAX_ITER,
    solver_options: dict[str, Any] | None = None,
    template: PromptTemplate | None = None,
    decode: str = "greedy",
    max_new_tokens: int = 256,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Exact match of free-text answers at every loop count and at the equilibrium.

    Args:
        model, tokenizer, examples: the looped LM (LoopLM, Ouro or Huginn), its tokenizer
            and examples with reference answers.
        loops: loop counts >= 1.
        equilibrium: also evaluate at the fixed point of ``solver`` (``tol``, ``max_iter``
            and ``solver_options``: ``stop_mode``, ``start_loops``, ``compact`` and the
            solver's hyperparameters; see :func:`eqloop.evaluation.equilibrium`).
        template, decode, max_new_tokens, batch_size: see :func:`answers_correct`.
        progress: show a tqdm bar over the runs.

    Returns:
        ``accuracy`` (loop count as a string -> share of examples right), ``equilibrium``
        (None, or ``accuracy`` at the solver's fixed point, ``converged``: the share of
        solves that met ``tol``, and the solver settings), ``peak`` (best loop count and
        its accuracy), ``n`` and ``decode``.

    Raises:
        ValueError: no examples, a loop count < 1, an unknown ``decode``, solver or
            solver option.
    """
    if not examples:
        raise ValueError("accuracy_vs_loops needs at least one example")
    loops = [checks.integer("loops", t, low=1) for t in loops]
    check_decode(decode)
    solve = {"tol": tol, "max_iter": max_iter, **(solver_options or {})}
    if equilibrium:
        solve = check_solve_options(solver, solve)
    was_training = model.training
    model.eval()
    common = dict(
        template=template, decode=decode, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    accuracy: dict[str, float] = {}
    eq = None
    runs: list[int | None] = [*loops, *([None] if equilibrium else [])]
    try:
        with torch.no_grad():
            for t in tqdm(runs, desc="eval loops", disable=not progress, leave=False):
                at_eq = t is None
                predict = (
                    predictors.equilibrium(model, solver, **solve) if at_eq else unrolled(model, t)
                )
                share = float(
                    answers_correct(predict, tokenizer, examples, **common).float().mean()
                )
                if not at_eq:
                    accuracy[str(t)] = share
                    continue
                converged = predict.converged_share or 0.0
                eq = {"accuracy": share, "converged": converged, "solver": solver, **solve}
    finally:
        model.train(was_training)
    best = max(accuracy, key=lambda k: (accuracy[k], -int(k)))
    return {
        "accuracy": accuracy,
        "equilibrium": eq,
        "peak": {"loops": int(best), "accuracy": accuracy[best]},
        "n": len(examples),
        "decode": decode,
    }
