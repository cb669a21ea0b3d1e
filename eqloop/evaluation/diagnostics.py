"""Loop-by-loop dynamics of a pretrained looped LM, past its trained depth.

:func:`diagnose` runs the loop ``z_{t+1} = f(z_t)`` for t = 0..N once, through
:func:`eqloop.evaluation.dynamics.loop_dynamics` (the per-loop computation ``eqloop eval``
uses too), and reports, for the state z_t after every loop t = 1..N (per sequence, then
averaged in tables):

=============== ==============================================================
residual        ``||f(z_t) - z_t|| / ||z_t||`` over the sequence's whole (S, d) state
state_norm      mean over real tokens of the per-token norm ``||z_t[i]||``
rho             spectral radius of ``J = df/dz`` at z_t (Arnoldi, matrix-free)
kl              mean over real tokens of ``KL(p_{t-1} || p_t)`` between the
                distributions decoded from consecutive loops (from t = 2)
entropy         mean over real tokens of the entropy of p_t (nats)
argmax_changed  share of real tokens whose argmax differs from loop t - 1
exit_pdf        models with an exit gate (Ouro): mean exit probability of loop t
                (the gate over the N loops)
gate            models with an exit gate (Ouro): mean gate ``sigmoid(gate_logits(z_t))``
=============== ==============================================================

Optionally (``solver=...``) the loop is also solved to its equilibrium from z_0 and the
solve's status, residual and ``rho(J(z*))`` are reported. For Ouro, f does not depend
on the tokens at all (they only set z_0), so what a solver finds is an attractor of the
start, not a certified unique fixed point: the report says what happened.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from eqloop.core import defaults
from eqloop.core.stars import spectral_radius
from eqloop.data.tokenizers import encode_prompts
from eqloop.evaluation.dynamics import LoopRecord, loop_dynamics, masked_mean, token_kl
from eqloop.evaluation.predictors import equilibrium
from eqloop.evaluation.report import format_cell, format_table
from eqloop.files import write_json_atomic
from eqloop.models.base import PretrainedLoopedLM
from eqloop.models.exits import exit_distribution
from eqloop.models.looped import CoreMap
from solvers import checks

__all__ = ["Diagnostics", "diagnose"]

_COLUMNS = (
    ("residual", "residual", ".3e"),
    ("state_norm", "||z||", ".4g"),
    ("rho", "rho(J)", ".4f"),
    ("kl", "KL(prev||t)", ".3e"),
    ("entropy", "entropy", ".3f"),
    ("argmax_changed", "argmax chg", ".3f"),
    ("gate", "gate", ".3f"),
    ("exit_pdf", "p_exit", ".3f"),
)


@dataclass
class Diagnostics:
    """Per-loop diagnostics (see the module docstring); lists are indexed by loop - 1.

    Per-sequence values are (B,) lists inside ``per_sequence[name][t]``; the top-level
    lists hold their batch means (``None`` where undefined, e.g. ``kl`` at loop 1).
    """

    model_type: str
    trained_loops: int
    loops: list[int]
    residual: list[float]
    state_norm: list[float]
    rho: list[float | None]
    kl: list[float | None]
    entropy: list[float]
    argmax_changed: list[float | None]
    gate: list[float] | None = None
    exit_pdf: list[float] | None = None
    per_sequence: dict[str, list[list[float] | None]] = field(default_factory=dict)
    equilibrium: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-serialisable data."""
        return asdict(self)

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` to ``path`` (atomically)."""
        write_json_atomic(path, _finite(self.to_dict()))
        return Path(path)

    def table(self) -> str:
        """A plain-text table, one row per loop; ``*`` marks the trained depth."""
        columns = [c for c in _COLUMNS if getattr(self, c[0]) is not None]
        rows = [
            {
                "loop": f"{loop}{'*' if loop == self.trained_loops else ' '}",
                **{key: _finite(getattr(self, key)[i]) for key, _, _ in columns},
            }
            for i, loop in enumerate(self.loops)
        ]
        text = format_table(rows, [("loop", "loop", ""), *columns])
        if self.equilibrium is not None:
            eq = self.equilibrium
            text += (
                f"\nequilibrium ({eq['solver']}): {eq['status']}, {eq['nfe']} f-evals, "
                f"residual {eq['rel_residual']:.3e}, "
                f"rho(J(z*)) {format_cell(eq.get('rho'), '.4g')}, "
                f"KL(loop {self.loops[-1]} || z*) {format_cell(eq.get('kl_from_last'), '.4g')}"
            )
        return text

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Residual, state norm, rho and KL against the loop (plus Ouro's exit pdf)."""
        from eqloop.files import atomic_path
        from eqloop.plotting import pyplot, style_axis

        plt = pyplot()
        panels = [
            ("residual", True),
            ("state_norm", False),
            ("rho", False),
            ("kl", True),
            ("entropy", False),
        ]
        if self.exit_pdf is not None:
            panels.append(("exit_pdf", False))
        fig, grid = plt.subplots(2, 3, figsize=(11, 6))
        axes = list(grid.flat)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        titles = {k: t for k, t, _ in _COLUMNS}
        for ax, (key, log) in zip(axes, panels, strict=False):
            values = [math.nan if v is None else v for v in getattr(self, key)]
            if key == "exit_pdf":
                ax.bar(self.loops, values, color="tab:purple")
            else:
                ax.plot(self.loops, values, marker=".")
            if log and any(v > 0 for v in values if math.isfinite(v)):
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", useOffset=False)
                ax.set_ylim(bottom=0)
            if key == "rho":
                ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.axvline(self.trained_loops, color="tab:red", lw=0.8, ls="--")
            style_axis(ax, "loop", titles[key], legend=False)
        fig.suptitle(f"{self.model_type}: trained depth {self.trained_loops} (dashed)")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
        plt.close(fig)
        return Path(path)


def _finite(data: Any) -> Any:
    """NaN and inf (not JSON) become None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data


def diagnose(
    model: PretrainedLoopedLM,
    input_ids: Tensor,
    *,
    loops: int | None = None,
    attention_mask: Tensor | None = None,
    rho: bool = True,
    rho_iters: int = 20,
    rho_every: int = 1,
    rho_batch: int = 32,
    solver: str | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    init_scale: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Diagnostics:
    """Per-loop diagnostics of ``model`` on a batch, for loops 1..N.

    The per-loop values come from :func:`eqloop.evaluation.dynamics.loop_dynamics` (one
    run of the loop, to N + 1 for the residual of loop N); this adds the exit gate and
    the equilibrium.

    Args:
        model: an Ouro or Huginn model.
        input_ids: (B, S) token ids.
        loops: N; default 4x the trained depth, so the table reaches past it.
        attention_mask: (B, S) 1 for real tokens, 0 for padding.
        rho: estimate ``rho(J)`` by Arnoldi (the costly part: ``rho_iters`` Jacobian-
            vector products per estimate).
        rho_iters: Krylov dimension of each Arnoldi estimate.
        rho_every: estimate rho every k loops (and at the last); others are None.
        rho_batch: states of that many loops share one batched Arnoldi run (each
            Jacobian-vector product then serves ``rho_batch x B`` sequences, which is
            several times faster than one run per loop; memory grows with it).
        solver: also solve to equilibrium with this solver (e.g. ``"anderson"``).
        max_iter, tol: of that solve (defaults in ``eqloop.core.defaults``).
        init_scale: Huginn's initial-state scale; default 0 (zeros), so the
            diagnostics are deterministic.
        generator: random generator (Arnoldi's start vectors, Huginn's initial state).
        progress: show a tqdm bar over the loops.

    Returns:
        A :class:`Diagnostics`.
    """
    if not isinstance(model, PretrainedLoopedLM):
        raise TypeError(f"model must be an eqloop pretrained looped LM, got {type(model).__name__}")
    n = 4 * model.trained_loops if loops is None else checks.integer("loops", loops, low=1)
    checks.boolean("rho", rho)
    rho_iters = checks.integer("rho_iters", rho_iters, low=1)
    rho_every = checks.integer("rho_every", rho_every, low=1)
    rho_batch = checks.integer("rho_batch", rho_batch, low=1)
    input_ids = model.check_input_ids(input_ids)
    # Checked once; the bool mask then costs no host read per loop (see check_attention_mask).
    mask = model.check_attention_mask(attention_mask, input_ids.shape)
    # The model's reproducible start: Huginn's init_scale (0 by default); none for Ouro.
    stage: dict[str, Any] = {"attention_mask": mask, **model.start_options(init_scale, generator)}
    started = time.perf_counter()
    with torch.no_grad():
        f, z0 = model.core_map(input_ids, **stage)
    rho_loops = [t for t in range(1, n + 1) if t % rho_every == 0 or t == n] if rho else []
    records, gates, last = _run_loops(
        model, f, z0, n, mask, rho_loops, rho_iters, rho_batch, generator, progress
    )
    per = _per_sequence(records, n, torch.finfo(z0.dtype).tiny, gates, mask)
    gate_mean = exit_mean = None
    if gates:
        gate_mean, exit_mean = _mean(per["gate"]), _mean(per["exit_pdf"])
    equilibrium = None
    if solver is not None:
        equilibrium = _equilibrium(
            model, input_ids, stage, solver, max_iter, tol, rho, rho_iters, generator, last[0]
        )
    return Diagnostics(
        model_type=model.model_type,
        trained_loops=model.trained_loops,
        loops=list(range(1, n + 1)),
        residual=_mean(per["residual"]),
        state_norm=_mean(per["state_norm"]),
        rho=_mean(per["rho"]),
        kl=_mean(per["kl"]),
        entropy=_mean(per["entropy"]),
        argmax_changed=_mean(per["argmax_changed"]),
        gate=gate_mean,
        exit_pdf=exit_mean,
        per_sequence=per,
        equilibrium=equilibrium,
        settings={
            "batch": int(input_ids.shape[0]),
            "seq_len": int(input_ids.shape[1]),
            "rho_method": "arnoldi",
            "rho_iters": rho_iters,
            "rho_every": rho_every,
            "rho_batch": rho_batch,
            "init_scale": stage.get("init_scale"),
            "dtype": str(z0.dtype).removeprefix("torch."),
            "seconds": time.perf_counter() - started,
        },
    )


def _run_loops(
    model: PretrainedLoopedLM,
    f: CoreMap,
    z0: Tensor,
    n: int,
    mask: Tensor | None,
    rho_loops: list[int],
    rho_iters: int,
    rho_batch: int,
    generator: torch.Generator | None,
    progress: bool,
) -> tuple[list[LoopRecord], list[Tensor], list[Tensor]]:
    """Run the loop from ``z0`` to N + 1 once, recording each loop (see :func:`diagnose`).

    Args:
        model: the model diagnosed.
        f: its core map z -> f(z) on (B, S, d) states (from ``model.core_map``).
        z0: (B, S, d) the start state.
        n: N, the last loop diagnosed (loop N + 1 gives loop N's residual).
        mask: (B, S) bool attention mask, or ``None``.
        rho_loops: the loops whose ``rho(J)`` is estimated (Arnoldi).
        rho_iters, rho_batch, generator: as in :func:`diagnose`.
        progress: show a tqdm bar over the loops.

    Returns:
        The records of loops 1..N + 1; (B, S) float exit-gate logits at loops 1..N (empty
        for a model without an exit gate); and ``[z_N]``, the (B, S, d) state of loop N.
    """
    gates: list[Tensor] = []  # (B, S) per loop, for a model with an exit gate
    last: list[Tensor] = []  # z_N, for the KL between loop N and the equilibrium
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="diagnose", unit="loop")

    def on_record(t: int, z: Tensor) -> None:
        """Ouro's exit gate at loops 1..N (the record of loop N + 1 is the residual's)."""
        if t > n:
            return
        gate = model.gate_logits(z)
        if gate is not None:
            gates.append(gate.float())
        if t == n:
            last.append(z)
        if bar is not None:
            bar.update(1)

    records = loop_dynamics(
        model,
        f,
        z0,
        range(1, n + 2),
        mask=mask,
        readout=True,
        stage={"attention_mask": mask},
        rho_loops=rho_loops,
        rho_method="arnoldi",
        rho_iters=rho_iters,
        rho_batch=rho_batch,
        generator=generator,
        on_record=on_record,
    )
    if bar is not None:
        bar.close()
    return records, gates, last


def _rows(values: list[Tensor | None]) -> list[list[float] | None]:
    """Per loop: the (B,) values as a list, or None where undefined."""
    return [None if v is None else v.tolist() for v in values]


def _mean(per_loop: list[Any]) -> list[float | None]:
    """Per loop: the mean over the batch of the per-sequence values, or None where undefined."""
    return [None if r is None else float(sum(r) / len(r)) for r in per_loop]


def _per_sequence(
    records: list[LoopRecord], n: int, tiny: float, gates: list[Tensor], mask: Tensor | None
) -> dict[str, list[Any]]:
    """The per-sequence values of each loop 1..N (:attr:`Diagnostics.per_sequence`).

    Args:
        records: the records of loops 1..N + 1 (from :func:`_run_loops`).
        n: N.
        tiny: the smallest positive value of the states' dtype (guards the division).
        gates: (B, S) exit-gate logits per loop 1..N, or empty.
        mask: (B, S) bool attention mask, or ``None``.

    Returns:
        Name -> per loop, a list of B values (or None where undefined); ``"gate"`` and
        ``"exit_pdf"`` only with gates.
    """
    per: dict[str, list[Any]] = {
        "residual": [
            (nxt.step_norm / r.state_norm.clamp_min(tiny)).tolist()
            for r, nxt in zip(records, records[1:], strict=False)
        ],
        "state_norm": _rows([r.token_norm for r in records[:n]]),
        "rho": _rows([r.rho for r in records[:n]]),
        "kl": _rows([r.kl for r in records[:n]]),
        "entropy": _rows([r.entropy for r in records[:n]]),
        "argmax_changed": _rows([r.argmax_changed for r in records[:n]]),
    }
    if gates:
        stacked = torch.stack(gates, dim=-1)  # (B, S, N)
        pdf = exit_distribution(stacked)
        lam = torch.sigmoid(stacked)
        per["gate"] = [masked_mean(lam[..., i], mask).tolist() for i in range(n)]
        per["exit_pdf"] = [masked_mean(pdf[..., i], mask).tolist() for i in range(n)]
    return per


def _equilibrium(
    model: PretrainedLoopedLM,
    input_ids: Tensor,
    stage: dict[str, Any],
    solver: str,
    max_iter: int | None,
    tol: float | None,
    rho: bool,
    rho_iters: int,
    generator: torch.Generator | None,
    last: Tensor,
) -> dict[str, Any]:
    """The solve to equilibrium from z_0 (with ``stage``'s start), its ``rho(J(z*))`` and
    the KL from the last loop's state ``last`` (B, S, d) to it."""
    predictor = equilibrium(
        model,
        solver,
        max_iter=defaults.EQUILIBRIUM_MAX_ITER if max_iter is None else max_iter,
        tol=defaults.EQUILIBRIUM_TOL if tol is None else tol,
        compact=False,
        stage=stage,
    )
    with torch.no_grad():
        logits, info = predictor.run(input_ids)
        log_p = F.log_softmax(logits.float(), dim=-1)
    f, result = info.f, info.result
    out: dict[str, Any] = {
        "solver": solver,
        "status": result.status,
        "status_counts": result.status_counts(),
        "converged": result.converged.tolist(),
        "nfe": int(result.nfe),
        "nstep": result.nstep.tolist(),
        "rel_residual": float(result.rel_residual.float().mean()),
        "rel_residual_per_sequence": result.rel_residual.tolist(),
    }
    mask = stage["attention_mask"]
    with torch.no_grad():
        last_log_p = F.log_softmax(model.readout(last, attention_mask=mask).float(), dim=-1)
    out["kl_from_last"] = float(masked_mean(token_kl(last_log_p, log_p), mask).mean())
    if rho:
        radius = spectral_radius(f, info.z, method="arnoldi", iters=rho_iters, generator=generator)
        out["rho"] = float(radius.mean())
        out["rho_per_sequence"] = radius.tolist()
    return out


DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 12 + 30? Answer:",
)
"""Texts :func:`diagnose_checkpoint` uses when none are given."""


def diagnose_checkpoint(
    path: str | os.PathLike[str],
    *,
    prompts: list[str] | tuple[str, ...] | None = None,
    loops: int | None = None,
    rho: bool = True,
    rho_iters: int = 20,
    solver: str | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    json_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Diagnostics:
    """Load a checkpoint directory, tokenize ``prompts`` and run :func:`diagnose`.

    What ``eqloop eval --pretrained DIR`` calls. The prompts are tokenized with the
    directory's tokenizer (left-padded into one batch); without a tokenizer.json they
    are encoded as bytes modulo the vocabulary, with a warning
    (:func:`eqloop.data.tokenizers.encode_prompts`).

    Returns:
        The :class:`Diagnostics`; also written to ``json_path`` / ``plot_path`` if given.
    """
    from eqloop.models.io import load

    model = load(path, dtype=dtype, device=device)
    if not isinstance(model, PretrainedLoopedLM):  # a LoopLM's save_pretrained directory
        raise ValueError(
            f"{path} holds a {type(model).__name__} (model_type "
            f"{model.config.model_type!r}); eqloop eval --pretrained diagnoses Ouro and "
            "Huginn checkpoints: evaluate a LoopLM's run with eqloop eval --checkpoint RUN"
        )
    texts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("prompts must be non-empty strings")
    ids, mask = encode_prompts(path, texts, model.vocab_size)
    device = model.get_input_embeddings().weight.device
    result = diagnose(
        model,
        ids.to(device),
        attention_mask=mask.to(device),
        loops=loops,
        rho=rho,
        rho_iters=rho_iters,
        solver=solver,
        max_iter=max_iter,
        tol=tol,
        progress=progress,
    )
    result.settings["checkpoint"] = str(path)
    result.settings["prompts"] = texts
    if json_path is not None:
        result.to_json(json_path)
    if plot_path is not None:
        result.plot(plot_path)
    return result
