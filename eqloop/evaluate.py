"""Exact-match accuracy versus loops, equilibrium solves and latent-dynamics diagnostics.

``evaluate_checkpoint(path)`` answers the question STARS is about: does accuracy hold as
the number of loops grows at test time? For every loop count of a grid (default
1, 2, 4, ..., 128), and optionally at the equilibrium found by a solver, it reports

* exact-match accuracy with greedy decoding (every answer token and ``<eos>`` right);
* the latent dynamics: step size ``||z_t - z_{t-1}||``, state size ``||z_t||`` and the
  spectral radius ``rho`` of ``df/dz`` at ``z_t`` (per sequence, power iteration);
* at the equilibrium: the solver's convergence and a contraction certificate, the share
  of test sequences whose estimated ``rho(J(z*))`` is below 1 (``z*`` is then locally
  attracting) together with the distribution of ``rho``.

Decoding: ``decode="greedy"`` re-runs the model on the growing sequence, batched over
the test set, and drops a sequence as soon as it produces a wrong token (it can no
longer match). ``decode="forced"`` runs one teacher-forced pass and checks that the
argmax is right at every answer position. For unrolled loops both give exactly the same
correct/incorrect verdict per sequence: with causal attention the logits at a position
depend only on the tokens up to it, so greedy decoding reproduces the reference iff every
teacher-forced argmax is right. ``forced`` is ``len(answer) + 1`` times cheaper and is
what training uses for its periodic evaluations. (At an equilibrium the two can differ
slightly, because the solver's stopping test looks at the whole sequence.)

Norms are taken per sequence over the whole ``(S, d)`` state; tables report their mean.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import solvers
from eqloop.checkpoint import load_model
from eqloop.config import TrainConfig
from eqloop.data import CharTokenizer, eval_prompts
from eqloop.model import LoopLM
from eqloop.plotting import pyplot, style_axis
from eqloop.stars import spectral_radius

__all__ = [
    "DECODES",
    "DEFAULT_LOOPS",
    "EvalSet",
    "correct_answers",
    "Predictor",
    "equilibrium",
    "equilibrium_diagnostics",
    "evaluate_checkpoint",
    "evaluate_model",
    "exact_match",
    "loop_diagnostics",
    "make_eval_set",
    "make_test_set",
    "plot_results",
    "quantiles",
    "unrolled",
]

DEFAULT_LOOPS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
DECODES: tuple[str, ...] = ("greedy", "forced")
_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)

Predictor = Callable[[Tensor], Tensor]
"""Token ids (B, S) -> logits (B, S, V): one way of running the model."""


@dataclass(frozen=True)
class EvalSet:
    """Prompts and reference continuations of a test set.

    Attributes:
        prompts: (N, P) token ids, ``<bos>`` up to and including ``=``.
        targets: (N, A) token ids of the answer followed by ``<eos>``.
    """

    prompts: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.prompts.shape[0]

    @property
    def inputs(self) -> Tensor:
        """(N, P + A - 1) teacher-forced model inputs: prompt and answer without ``<eos>``."""
        return torch.cat((self.prompts, self.targets[:, :-1]), dim=1)

    def to(self, device: torch.device | str) -> EvalSet:
        """The same set on ``device``."""
        return EvalSet(self.prompts.to(device), self.targets.to(device))


def make_eval_set(dataset: Any, tokenizer: CharTokenizer | None = None) -> EvalSet:
    """Build an :class:`EvalSet` from a dataset in eqloop's common form.

    Args:
        dataset: rows with equal prompt and answer lengths (generated with
            ``zero_pad=True``).
        tokenizer: encodes the answers (default :class:`CharTokenizer`).

    Raises:
        ValueError: empty dataset or rows of different lengths.
    """
    tokenizer = tokenizer if tokenizer is not None else CharTokenizer()
    prompts, answers = eval_prompts(dataset)
    encoded = [tokenizer.encode(a, add_eos=True) for a in answers]
    if len({len(e) for e in encoded}) > 1:
        raise ValueError("answers have different lengths; generate the data with zero_pad=True")
    return EvalSet(prompts, torch.tensor(encoded, dtype=torch.long))


def make_test_set(config: TrainConfig) -> EvalSet:
    """The ``n_test`` problems of the run's test split (disjoint from its training set)."""
    return make_eval_set(config.make_dataset("test"))


# ----------------------------------------------------------------------------- predictors


def unrolled(model: LoopLM, loops: int) -> Predictor:
    """Predictor running the core ``loops`` times."""
    return lambda tokens: model(tokens, loops=loops)


def solve_core(
    model: LoopLM,
    x: Tensor,
    solver: str,
    max_iter: int,
    tol: float,
    stop_mode: str,
    solver_options: dict[str, Any],
) -> solvers.SolveResult:
    """Solve the model's core to equilibrium for the injected input ``x`` (B, S, d).

    Converged sequences leave the working batch early (``compact=True``).
    """
    f, z0 = model.core_map(x)
    return solvers.solve(
        f.step, z0, solver, max_iter=max_iter, tol=tol,
        stop_mode=stop_mode, args=f.args, compact=True, **solver_options,
    )


def equilibrium(
    model: LoopLM,
    solver: str,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    **solver_options: Any,
) -> Predictor:
    """Predictor reading out at the fixed point found by ``solvers.solve``.

    Converged sequences leave the working batch early (``compact=True``).
    """

    def predict(tokens: Tensor) -> Tensor:
        x = model.inject(tokens)
        result = solve_core(model, x, solver, max_iter, tol, stop_mode, solver_options)
        return model.readout(result.z)

    return predict


# --------------------------------------------------------------------------- exact match


def _chunks(n: int, size: int) -> Iterable[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def correct_answers(
    predict: Predictor, data: EvalSet, *, decode: str = "greedy", batch_size: int = 1024
) -> Tensor:
    """Per-sequence exact match of the greedy continuation with the reference.

    Args:
        predict: see :data:`Predictor`.
        data: the test set.
        decode: one of :data:`DECODES` (see the module docstring).
        batch_size: sequences per forward pass.

    Returns:
        (N,) bool, True where the continuation equals the answer and ``<eos>``.
    """
    if decode not in DECODES:
        raise ValueError(f"unknown decode {decode!r}; valid: {list(DECODES)}")
    prompt_len, answer_len = data.prompts.shape[1], data.targets.shape[1]
    out = []
    with torch.no_grad():
        for rows in _chunks(len(data), batch_size):
            targets = data.targets[rows]
            if decode == "forced":
                logits = predict(data.inputs[rows])[:, prompt_len - 1 :]
                out.append((logits.argmax(-1) == targets).all(dim=1))
                continue
            ok = torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)
            live = ok.nonzero().squeeze(1)  # sequences still matching the reference
            seq = data.prompts[rows]
            for j in range(answer_len):
                if live.numel() == 0:
                    break
                token = predict(seq[live])[:, -1].argmax(-1)
                ok[live] = token == targets[live, j]
                live = live[ok[live]]
                seq = torch.cat((seq, targets[:, j : j + 1]), dim=1)  # the live rows' tokens
            out.append(ok)
    return torch.cat(out)


def exact_match(
    predict: Predictor, data: EvalSet, *, decode: str = "greedy", batch_size: int = 1024
) -> float:
    """Share of test sequences answered exactly (see :func:`correct_answers`)."""
    return float(
        correct_answers(predict, data, decode=decode, batch_size=batch_size).float().mean()
    )


# --------------------------------------------------------------------------- diagnostics


def quantiles(values: Tensor) -> dict[str, float]:
    """Mean and the 0, 10, 25, 50, 75, 90, 100 % quantiles of a 1-D tensor."""
    values = values.detach().double().flatten()
    qs = torch.quantile(values, torch.tensor(_QUANTILES, dtype=torch.float64))
    out = {"mean": float(values.mean())}
    out.update({f"q{round(100 * q)}": float(v) for q, v in zip(_QUANTILES, qs, strict=True)})
    return out


def _seq_norm(z: Tensor) -> Tensor:
    """(B, S, d) -> (B,) Euclidean norm of each sequence's state."""
    return torch.linalg.vector_norm(z.flatten(1), dim=1)


def loop_diagnostics(
    model: LoopLM,
    inputs: Tensor,
    loops: Sequence[int],
    *,
    rho_method: str = "power",
    rho_iters: int = 30,
    generator: torch.Generator | None = None,
) -> list[dict[str, Any]]:
    """Latent dynamics along the unrolled trajectory, at each loop count of ``loops``.

    Args:
        model: the LoopLM (put it in eval mode).
        inputs: (B, S) token ids.
        loops: loop counts >= 1 at which to record.
        rho_method, rho_iters: passed to :func:`eqloop.stars.spectral_radius`.
        generator: random start vectors of the power iteration.

    Returns:
        One dict per loop count: ``loops``, ``step_norm`` (mean ``||z_t - z_{t-1}||``),
        ``rel_step`` (mean ``||z_t - z_{t-1}|| / ||z_t||``), ``state_norm`` (mean
        ``||z_t||``) and ``rho`` (:func:`quantiles` of the per-sequence estimates, plus
        ``share_below_1``).
    """
    wanted = sorted(set(loops))
    if not wanted or wanted[0] < 1:
        raise ValueError(f"loops must be integers >= 1, got {list(loops)}")
    out = []
    with torch.no_grad():
        f, z = model.core_map(inputs)
        for t in range(1, wanted[-1] + 1):
            previous, z = z, f(z)
            if t not in wanted:
                continue
            step, size = _seq_norm(z - previous), _seq_norm(z)
            rho = spectral_radius(f, z, rho_method, rho_iters, generator=generator)
            out.append(
                {
                    "loops": t,
                    "step_norm": float(step.mean()),
                    "rel_step": float((step / size.clamp_min(1e-30)).mean()),
                    "state_norm": float(size.mean()),
                    "rho": {**quantiles(rho), "share_below_1": float((rho < 1).float().mean())},
                }
            )
    return out


def equilibrium_diagnostics(
    model: LoopLM,
    inputs: Tensor,
    solver: str,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    rho_method: str = "power",
    rho_iters: int = 30,
    generator: torch.Generator | None = None,
    **solver_options: Any,
) -> dict[str, Any]:
    """Solve the core to equilibrium and certify local contraction there.

    Args:
        model: the LoopLM (eval mode).
        inputs: (B, S) token ids.
        solver: a name from ``solvers.available()``.
        max_iter, tol, stop_mode, **solver_options: passed to ``solvers.solve``.
        rho_method, rho_iters, generator: for :func:`eqloop.stars.spectral_radius`.

    Returns:
        ``status`` (readable solver status), ``converged`` (share), ``nstep`` and
        ``rel_residual`` (quantiles), ``state_norm`` (mean ``||z*||``) and
        ``contraction``: ``share_rho_below_1`` (share of sequences with estimated
        ``rho(J(z*)) < 1``) and ``rho`` (its quantiles).
    """
    with torch.no_grad():
        x = model.inject(inputs)
        result = solve_core(model, x, solver, max_iter, tol, stop_mode, solver_options)
        f, _ = model.core_map(x)
        rho = spectral_radius(f, result.z, rho_method, rho_iters, generator=generator)
    return {
        "solver": solver,
        "status": str(result.status),
        "converged": float(result.converged.float().mean()),
        "nstep": quantiles(result.nstep.double()),
        "rel_residual": quantiles(result.rel_residual),
        "state_norm": float(_seq_norm(result.z).mean()),
        "contraction": {
            "share_rho_below_1": float((rho < 1).float().mean()),
            "rho": quantiles(rho),
        },
    }


# ------------------------------------------------------------------------------ drivers


def evaluate_model(
    model: LoopLM,
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
) -> dict[str, Any]:
    """Accuracy per loop count (and at equilibrium) plus latent diagnostics.

    Args:
        model: the LoopLM; it is switched to eval mode.
        data: the test set.
        loops: loop counts to evaluate.
        solver: also solve the core to equilibrium with this solver (e.g. ``"anderson"``).
        solver_options: ``max_iter``, ``tol``, ``stop_mode`` and solver hyperparameters.
        decode: ``"greedy"`` or ``"forced"`` (identical verdicts for unrolled loops).
        diagnostics: compute the latent diagnostics and the contraction certificate.
        diagnostic_samples: test sequences used for the diagnostics (the first ones).
        rho_iters: power-iteration steps per spectral-radius estimate.
        batch_size: sequences per forward pass.
        seed: seed of the power-iteration start vectors.

    Returns:
        ``{"n_test", "accuracy": {"<loops>": acc, ...}, "equilibrium": {...} | None,
        "diagnostics": [...] | None}``; ``equilibrium`` holds ``accuracy`` and, with
        ``diagnostics``, the output of :func:`equilibrium_diagnostics`.
    """
    model.eval()
    options = dict(solver_options or {})
    result: dict[str, Any] = {
        "n_test": len(data),
        "decode": decode,
        "accuracy": {
            str(t): exact_match(unrolled(model, t), data, decode=decode, batch_size=batch_size)
            for t in loops
        },
        "equilibrium": None,
        "diagnostics": None,
    }
    sample = data.inputs[:diagnostic_samples]
    if solver is not None:
        acc = exact_match(
            equilibrium(model, solver, **options), data, decode=decode, batch_size=batch_size
        )
        result["equilibrium"] = {"accuracy": acc, "solver": solver, **options}
        if diagnostics:
            generator = torch.Generator(device=sample.device).manual_seed(seed)
            result["equilibrium"].update(
                equilibrium_diagnostics(
                    model, sample, solver, rho_iters=rho_iters, generator=generator, **options
                )
            )
    if diagnostics:
        generator = torch.Generator(device=sample.device).manual_seed(seed)
        result["diagnostics"] = loop_diagnostics(
            model, sample, loops, rho_iters=rho_iters, generator=generator
        )
    return result


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
) -> dict[str, Any]:
    """Load a checkpoint and run :func:`evaluate_model` on its task's test split.

    Args:
        path: a ``step_*`` checkpoint directory or a run directory (latest checkpoint).
        loops: loop counts to evaluate.
        solver: also evaluate at the equilibrium found by this solver.
        solver_options: ``max_iter`` (default 100), ``tol`` (1e-4), ``stop_mode`` and
            solver hyperparameters.
        n_test: test problems (default: the run's ``n_test``).
        decode, diagnostics, diagnostic_samples, rho_iters, batch_size: see
            :func:`evaluate_model`.
        device: where to run.

    Returns:
        The :func:`evaluate_model` dict plus ``checkpoint`` (path), ``step``, ``task``
        and ``digits``.

    Raises:
        eqloop.checkpoint.CheckpointError: missing or corrupted checkpoint.
    """
    model, ckpt = load_model(path, device=device)
    config = TrainConfig.from_dict(ckpt.config)
    if n_test is not None:
        config.n_test = n_test
        config.validate()
    data = make_test_set(config)
    options = {"max_iter": 100, "tol": 1e-4, **(solver_options or {})}
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
    )
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "task": config.task,
        "digits": config.digits,
        **result,
    }


def _label(result: dict[str, Any]) -> str:
    path = Path(result["checkpoint"])
    return f"{path.parent.parent.name}/{path.name}"


def plot_results(results: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Accuracy and median rho versus loops, one line per checkpoint, saved to ``path``.

    Equilibrium accuracy and median ``rho(J(z*))`` appear as dashed horizontal lines in
    the colour of their checkpoint.
    """
    plt = pyplot()

    fig, (ax_acc, ax_rho) = plt.subplots(1, 2, figsize=(11, 4))
    for i, res in enumerate(results):
        color = f"C{i}"
        label = _label(res)
        loops = [int(t) for t in res["accuracy"]]
        ax_acc.plot(loops, list(res["accuracy"].values()), "o-", color=color, label=label)
        eq = res.get("equilibrium")
        if eq is not None:
            ax_acc.axhline(eq["accuracy"], color=color, ls="--", lw=1)
        if res.get("diagnostics"):
            ts = [d["loops"] for d in res["diagnostics"]]
            med = [d["rho"]["q50"] for d in res["diagnostics"]]
            ax_rho.plot(ts, med, "o-", color=color, label=label)
            ax_rho.fill_between(
                ts,
                [d["rho"]["q10"] for d in res["diagnostics"]],
                [d["rho"]["q90"] for d in res["diagnostics"]],
                color=color,
                alpha=0.15,
            )
            if eq is not None and "contraction" in eq:
                ax_rho.axhline(eq["contraction"]["rho"]["q50"], color=color, ls="--", lw=1)
    ax_rho.axhline(1.0, color="k", lw=0.8, ls=":")
    for ax, ylabel in ((ax_acc, "exact-match accuracy"), (ax_rho, "spectral radius rho (median)")):
        ax.set_xscale("log", base=2)
        style_axis(ax, "loops at test time", ylabel, legend=False)
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.legend(fontsize=8)
    ax_acc.set_title("accuracy vs loops (dashed: equilibrium)")
    ax_rho.set_title("rho(J(z_t)), 10-90% band (dashed: z*)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
