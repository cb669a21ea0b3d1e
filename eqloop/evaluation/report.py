"""Reports: the one plain-text table formatter, the ``eqloop eval`` table and its plot.

:func:`format_table` renders every table eqloop prints (``eqloop eval``, the
benchmarks, the pretrained diagnostics): right-aligned columns two spaces apart, a
format spec per column, ``-`` for a missing value.
:func:`format_result` renders one :func:`~eqloop.evaluation.evaluate_checkpoint` result
with it; :func:`plot_results` plots several.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eqloop.files import atomic_path
from eqloop.plotting import pyplot, style_axis

__all__ = ["format_cell", "format_result", "format_table", "plot_results"]


def format_cell(value: Any, spec: str = "") -> str:
    """One table cell: ``format(value, spec)``, ``-`` for None (a value that does not
    exist); a non-finite number shows as ``nan`` or ``inf`` (a value that blew up)."""
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str, str]],
    *,
    rule: bool = True,
) -> str:
    """Render rows as an aligned plain-text table.

    Args:
        rows: one dict per row; a missing key is an empty (``-``) cell.
        columns: ``(key, header, format spec)`` per column, e.g. ``("nfe", "f-evals",
            "d")``; an empty spec prints ``str(value)``.
        rule: draw a line of dashes under the header.

    Returns:
        The table, one line per row (no trailing newline).
    """
    cells = [[header for _, header, _ in columns]]
    cells += [[format_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# Columns of ``eqloop eval``: (key, header, spec); the rows hold formatted text.
_RESULT_COLUMNS = (
    ("loops", "loops", ""),
    ("accuracy", "accuracy", ".3f"),
    ("step_norm", "step norm", ".3g"),
    ("state_norm", "state norm", ".3g"),
    ("rho_median", "rho median", ".3f"),
    ("rho_q90", "rho q90", ".3f"),
    ("rho_below_1", "rho < 1", ".0%"),
)


def _rho_cells(rho: Mapping[str, float], share: float) -> dict[str, float]:
    return {"rho_median": rho["q50"], "rho_q90": rho["q90"], "rho_below_1": share}


def format_result(result: Mapping[str, Any]) -> str:
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
    rows: list[dict[str, Any]] = []
    for t, acc in result["accuracy"].items():
        row: dict[str, Any] = {"loops": t, "accuracy": acc}
        d = by_depth.get(int(t))
        if d is not None:
            row.update(step_norm=d["step_norm"], state_norm=d["state_norm"])
            row.update(_rho_cells(d["rho"], d["rho"]["share_below_1"]))
        rows.append(row)
    if eq is not None:
        row = {"loops": "eq", "accuracy": eq["accuracy"]}
        c = eq.get("contraction")
        if c:
            row["state_norm"] = eq["state_norm"]
            row.update(_rho_cells(c["rho"], c["share_rho_below_1"]))
        rows.append(row)
    columns = _RESULT_COLUMNS if detailed else _RESULT_COLUMNS[:2]
    lines = [title] + ["  " + line for line in format_table(rows, columns, rule=False).split("\n")]
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


def _label(result: Mapping[str, Any]) -> str:
    path = Path(result["checkpoint"])
    return f"{path.parent.parent.name}/{path.name}"


def plot_results(results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
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
