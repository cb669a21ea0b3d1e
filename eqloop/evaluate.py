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
:func:`format_result` renders one result as the table ``eqloop eval`` prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

import solvers
from eqloop.checkpoint import load_model
from eqloop.compiling import compile_model
from eqloop.config import TrainConfig, check_device
from eqloop.data import CharTokenizer, Examples, eval_prompts
from eqloop.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_STOP_MODE, EQUILIBRIUM_TOL
from eqloop.files import atomic_path
from eqloop.model import LoopLM
from eqloop.plotting import pyplot, style_axis
from eqloop.stars import spectral_radius
from solvers import checks

__all__ = [
    "DECODES",
    "DEFAULT_LOOPS",
    "EvalSet",
    "check_options",
    "correct_answers",
    "Predictor",
    "equilibrium",
    "equilibrium_diagnostics",
    "evaluate_checkpoint",
    "evaluate_model",
    "exact_match",
    "format_result",
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


def make_eval_set(dataset: Examples | Any, tokenizer: CharTokenizer | None = None) -> EvalSet:
    """Build an :class:`EvalSet` from examples in eqloop's common form.

    Args:
        dataset: :class:`eqloop.data.Examples` or a ``datasets.Dataset``, with equal prompt
            and answer lengths (generated with ``zero_pad=True``).
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
    return make_eval_set(config.make_examples("test"))


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
    start_loops: int = 0,
) -> solvers.SolveResult:
    """Solve the model's core to equilibrium for the injected input ``x`` (B, S, d).

    The solver starts from the state after ``start_loops`` loops (0: the loop's own
    initial state). Without input injection the core map does not see the input, so
    many fixed points exist and the start alone selects one: a quasi-Newton solver
    started at ``z0`` can land on a fixed point other than the one the loop itself
    converges to, while a few loops first put it in the loop's basin. Converged
    sequences leave the working batch early (``compact=True``).
    """
    f, z = model.core_map(x)
    if start_loops:
        z = model.loop(f, z, start_loops).z
    return solvers.solve(
        f.step,
        z,
        solver,
        max_iter=max_iter,
        tol=tol,
        stop_mode=stop_mode,
        args=f.args,
        compact=True,
        **solver_options,
    )


def equilibrium(
    model: LoopLM,
    solver: str,
    *,
    max_iter: int = EQUILIBRIUM_MAX_ITER,
    tol: float = EQUILIBRIUM_TOL,
    stop_mode: str = EQUILIBRIUM_STOP_MODE,
    start_loops: int = 0,
    **solver_options: Any,
) -> Predictor:
    """Predictor reading out at the fixed point found by ``solvers.solve``.

    The solver starts after ``start_loops`` loops (see :func:`solve_core`). Converged
    sequences leave the working batch early (``compact=True``).
    """
    checks.integer("start_loops", start_loops, low=0)

    def predict(tokens: Tensor) -> Tensor:
        x = model.inject(tokens)
        result = solve_core(model, x, solver, max_iter, tol, stop_mode, solver_options, start_loops)
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
    on_record: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Latent dynamics along the unrolled trajectory, at each loop count of ``loops``.

    Args:
        model: the LoopLM (put it in eval mode).
        inputs: (B, S) token ids.
        loops: loop counts >= 1 at which to record.
        rho_method, rho_iters: passed to :func:`eqloop.stars.spectral_radius`.
        generator: random start vectors of the power iteration.
        on_record: called with each loop count once its record is made (progress bars).

    Returns:
        One dict per loop count: ``loops``, ``step_norm`` (mean ``||z_t - z_{t-1}||``),
        ``rel_step`` (mean ``||z_t - z_{t-1}|| / ||z_t||``), ``state_norm`` (mean
        ``||z_t||``) and ``rho`` (:func:`quantiles` of the per-sequence estimates, plus
        ``share_below_1``).
    """
    wanted = sorted({checks.integer("loops", t, low=1) for t in loops})
    if not wanted:
        raise ValueError("loops must hold at least one loop count")
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
            if on_record is not None:
                on_record(t)
    return out


def equilibrium_diagnostics(
    model: LoopLM,
    inputs: Tensor,
    solver: str,
    *,
    max_iter: int = EQUILIBRIUM_MAX_ITER,
    tol: float = EQUILIBRIUM_TOL,
    stop_mode: str = EQUILIBRIUM_STOP_MODE,
    rho_method: str = "power",
    rho_iters: int = 30,
    generator: torch.Generator | None = None,
    start_loops: int = 0,
    **solver_options: Any,
) -> dict[str, Any]:
    """Solve the core to equilibrium and certify local contraction there.

    Args:
        model: the LoopLM (eval mode).
        inputs: (B, S) token ids.
        solver: a name from ``solvers.available()``.
        max_iter, tol, stop_mode, **solver_options: passed to ``solvers.solve``.
        rho_method, rho_iters, generator: for :func:`eqloop.stars.spectral_radius`.
        start_loops: loops run before the solver starts (see :func:`solve_core`).

    Returns:
        ``status`` (readable solver status), ``converged`` (share), ``nstep`` and
        ``rel_residual`` (quantiles), ``state_norm`` (mean ``||z*||``) and
        ``contraction``: ``share_rho_below_1`` (share of sequences with estimated
        ``rho(J(z*)) < 1``) and ``rho`` (its quantiles).
    """
    with torch.no_grad():
        x = model.inject(inputs)
        result = solve_core(model, x, solver, max_iter, tol, stop_mode, solver_options, start_loops)
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
    checks.choice("decode", decode, DECODES)
    checks.integer("diagnostic_samples", diagnostic_samples, low=1)
    checks.integer("rho_iters", rho_iters, low=1)
    checks.integer("batch_size", batch_size, low=1)
    if solver is None:
        return
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver name, got {type(solver).__name__}")
    options = dict(solver_options or {})
    checks.integer("max_iter", options.pop("max_iter", EQUILIBRIUM_MAX_ITER), low=1)
    checks.number("tol", options.pop("tol", EQUILIBRIUM_TOL), low=0)
    checks.choice("stop_mode", options.pop("stop_mode", EQUILIBRIUM_STOP_MODE), ("abs", "rel"))
    checks.integer("start_loops", options.pop("start_loops", 0), low=0)
    hyperparameters = {k: v for k, v in options.items() if k not in solvers.DRIVER_OPTIONS}
    solvers.make_solver(solver, **hyperparameters)  # unknown names and options raise here


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
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy per loop count (and at equilibrium) plus latent diagnostics.

    Args:
        model: the LoopLM; it is switched to eval mode.
        data: the test set.
        loops: loop counts to evaluate (diagnostics skip a loop count of 0).
        solver: also solve the core to equilibrium with this solver (e.g. ``"anderson"``).
        solver_options: ``max_iter``, ``tol``, ``stop_mode`` (defaults in
            :mod:`eqloop.defaults`), ``start_loops`` (loops before the solver starts,
            default 0; see :func:`solve_core`) and solver hyperparameters.
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
    with bar:
        for t in loops:
            bar.set_description(f"accuracy, {t} loops")
            result["accuracy"][str(t)] = exact_match(
                unrolled(model, t), data, decode=decode, batch_size=batch_size
            )
            bar.update()
        sample = data.inputs[:diagnostic_samples]
        if solver is not None:
            bar.set_description(f"accuracy at equilibrium ({solver})")
            acc = exact_match(
                equilibrium(model, solver, **options), data, decode=decode, batch_size=batch_size
            )
            result["equilibrium"] = {"accuracy": acc, "solver": solver, **options}
            bar.update()
            if diagnostics:
                bar.set_description("contraction at equilibrium")
                generator = torch.Generator(device=sample.device).manual_seed(seed)
                result["equilibrium"].update(
                    equilibrium_diagnostics(
                        model, sample, solver, rho_iters=rho_iters, generator=generator, **options
                    )
                )
                bar.update()
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
        solver_options: ``max_iter``, ``tol``, ``stop_mode`` (defaults in
            :mod:`eqloop.defaults`), ``start_loops`` (loops before the solver starts,
            default 0; see :func:`solve_core`) and solver hyperparameters.
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


# ------------------------------------------------------------------------------- report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Right-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]


def _rho_cells(rho: dict[str, float], share: float) -> list[str]:
    return [f"{rho['q50']:.3f}", f"{rho['q90']:.3f}", f"{share:.0%}"]


def format_result(result: dict[str, Any]) -> str:
    """One checkpoint's result as the table ``eqloop eval`` prints.

    One row per loop count (exact-match accuracy and, with diagnostics, the mean step
    norm ``||z_t - z_{t-1}||``, the mean state norm ``||z_t||``, the median and 90%
    quantile of ``rho(J(z_t))`` and the share of sequences with ``rho < 1``), an ``eq``
    row for the equilibrium and a line on the solver's convergence.
    """
    title = (
        f"{result['checkpoint']} (step {result['step']}; {result['digits']}-digit "
        f"{result['task']}, {result['n_test']} test problems, {result['decode']} decoding)"
    )
    by_depth = {d["loops"]: d for d in result.get("diagnostics") or []}
    eq = result.get("equilibrium")
    detailed = bool(by_depth) or (eq is not None and "contraction" in eq)
    header = ["loops", "accuracy"]
    if detailed:
        header += ["step norm", "state norm", "rho median", "rho q90", "rho < 1"]
    rows = []
    for t, acc in result["accuracy"].items():
        row = [t, f"{acc:.3f}"]
        if detailed:
            d = by_depth.get(int(t))
            row += (
                ["-"] * 5
                if d is None
                else [
                    f"{d['step_norm']:.3g}",
                    f"{d['state_norm']:.3g}",
                    *_rho_cells(d["rho"], d["rho"]["share_below_1"]),
                ]
            )
        rows.append(row)
    lines = [title]
    if eq is not None:
        row = ["eq", f"{eq['accuracy']:.3f}"]
        if detailed:
            c = eq.get("contraction")
            row += ["-", f"{eq['state_norm']:.3g}"] if c else ["-"] * 2
            row += _rho_cells(c["rho"], c["share_rho_below_1"]) if c else ["-"] * 3
        rows.append(row)
    lines += ["  " + line for line in _table(header, rows)]
    if eq is not None:
        settings = f"{eq['solver']}, max_iter {eq['max_iter']}, tol {eq['tol']:g}"
        if eq.get("start_loops"):
            settings += f", started after {eq['start_loops']} loops"
        if "status" in eq:
            nstep, res = eq["nstep"], eq["rel_residual"]
            lines.append(
                f"  eq: {settings}; {eq['converged']:.0%} of sequences converged "
                f"(status: {eq['status']}), "
                f"f-evaluations median {nstep['q50']:.0f} max {nstep['q100']:.0f}, "
                f"relative residual median {res['q50']:.2g} max {res['q100']:.2g}"
            )
        else:
            lines.append(f"  eq: {settings}")
    return "\n".join(lines)


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
