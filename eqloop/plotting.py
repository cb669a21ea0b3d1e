"""Headless matplotlib helpers shared by eqloop's and the benchmarks' plots.

matplotlib is an optional extra (``pip install -e ".[plots]"``), so it is imported only
when a plot is drawn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pyplot", "style_axis"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style_axis(ax: Any, xlabel: str, ylabel: str, *, legend: bool = True) -> None:
    """Label the axes, add a light grid and, with ``legend``, a small legend when any
    artist on ``ax`` carries a label."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
