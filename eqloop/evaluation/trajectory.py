"""Hidden-state trajectories of a looped model, projected on their principal components.

A looped model run for T loops traces ``z_0, z_1, ..., z_T`` per sequence. Whether the
dynamics settle (a fixed point), wander or blow up is easiest to see by projecting the
states of a few test problems onto the first principal components of all their states
together (the STARS paper's Fig. on PCA trajectories): a converging model ends each
trajectory on a point, a collapsing one drifts or spirals away.

Example::

    states = hidden_trajectory(model, tokens[:8], loops=128)      # (T + 1, B, S, d)
    pca = trajectory_pca(states)                                   # fit on every state
    pca.points                                                     # (B, T + 1, 2)
    plot_trajectories({"stars": pca}, "pca.png")

Which vector stands for the state: ``feature="sequence"`` flattens the whole ``(S, d)``
state of a sequence (the space the Jacobian acts on), ``feature="last"`` takes the last
position's ``d``-vector (the one that predicts the next token).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eqloop.models.looped import LoopedLM
from eqloop.plotting import pyplot, style_axis
from solvers import checks

__all__ = [
    "FEATURES",
    "TrajectoryPCA",
    "checkpoint_pca",
    "hidden_trajectory",
    "plot_checkpoint_trajectories",
    "plot_trajectories",
    "trajectory_pca",
]

FEATURES: tuple[str, ...] = ("sequence", "last")


def hidden_trajectory(model: LoopedLM, tokens: Tensor, loops: int) -> Tensor:
    """The states ``z_0 .. z_T`` of the unrolled loop, without gradients.

    The model's loop (:meth:`eqloop.models.looped.LoopedLM.loop`) hands each state to its
    ``on_state`` hook, which writes it into one preallocated tensor.

    Args:
        model: the looped LM (eval mode for a deterministic trajectory).
        tokens: (B, S) token ids.
        loops: number of loops T >= 1.

    Returns:
        (T + 1, B, S, d) states; index 0 is ``z_0``.

    Raises:
        ValueError: ``loops < 1``.
        TypeError: ``loops`` is not an integer.
    """
    loops = checks.integer("loops", loops, low=1)
    with torch.no_grad():
        f, z0 = model.core_map(tokens)
        states = z0.new_empty((loops + 1, *z0.shape))
        model.loop(f, z0, loops, on_state=states.__setitem__)  # states[t] = z_t
    return states


@dataclass(frozen=True)
class TrajectoryPCA:
    """Trajectories projected on the principal components of all their states.

    Attributes:
        points: (B, T + 1 - first_loop, k) coordinates; ``points[b, i]`` is state
            ``z_{first_loop + i}`` of sequence ``b``.
        components: (k, n) orthonormal principal directions in feature space.
        explained: (k,) share of the total variance each component explains.
        mean: (n,) mean feature vector removed before projecting.
        state_norm: (B, T + 1 - first_loop) norm of each feature vector (before centring).
        first_loop: the loop index of ``points[:, 0]``.
    """

    points: Tensor
    components: Tensor
    explained: Tensor
    mean: Tensor
    state_norm: Tensor
    first_loop: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Points, explained variance and norms as JSON-serialisable lists."""
        return {
            "first_loop": self.first_loop,
            "points": self.points.tolist(),
            "explained": self.explained.tolist(),
            "state_norm": self.state_norm.tolist(),
        }


def _features(states: Tensor, feature: str) -> Tensor:
    """(T + 1, B, S, d) states -> (B, T + 1, n) feature vectors, float64."""
    checks.choice("feature", feature, FEATURES)
    if states.dim() != 4:
        raise ValueError(f"states must have shape (T + 1, B, S, d), got {tuple(states.shape)}")
    picked = states.flatten(2) if feature == "sequence" else states[:, :, -1]
    return picked.transpose(0, 1).double()


def trajectory_pca(
    states: Tensor, *, components: int = 2, feature: str = "sequence", first_loop: int = 0
) -> TrajectoryPCA:
    """Principal components of every state of every trajectory, and the projections.

    The components are fitted on all ``B * (T + 1)`` feature vectors at once (exact SVD
    of the centred data, float64), so all trajectories share one coordinate system.
    States that are not finite (a diverged model) are an error: PCA of them means nothing.

    Args:
        states: (T + 1, B, S, d) from :func:`hidden_trajectory`.
        components: number of components k >= 1 to keep.
        feature: ``"sequence"`` or ``"last"`` (see the module docstring).
        first_loop: leave out the states before this loop; 1 drops ``z_0``, which for a
            normalising block is on another scale than every later state and would take
            the first component for itself.

    Returns:
        A :class:`TrajectoryPCA`.

    Raises:
        ValueError: bad shape, feature or ``components``, or non-finite states.
    """
    first_loop = checks.integer("first_loop", first_loop, low=0, high=states.shape[0] - 1)
    data = _features(states[first_loop:], feature)
    batch, steps, n = data.shape
    components = checks.integer("components", components, low=1)
    if components > min(batch * steps, n):
        raise ValueError(
            f"components={components} exceeds min(states, features) = {min(batch * steps, n)}"
        )
    if not bool(torch.isfinite(data).all()):
        raise ValueError("states contain inf or NaN (the trajectory diverged); cannot fit PCA")
    flat = data.reshape(batch * steps, n)
    mean = flat.mean(dim=0)
    centred = flat - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    variance = singular.pow(2)
    total = variance.sum().clamp_min(torch.finfo(variance.dtype).tiny)
    basis = vh[:components]
    return TrajectoryPCA(
        points=(centred @ basis.T).reshape(batch, steps, components),
        components=basis,
        explained=variance[:components] / total,
        mean=mean,
        state_norm=torch.linalg.vector_norm(data, dim=2),
        first_loop=first_loop,
    )


def checkpoint_pca(
    path: str | os.PathLike[str],
    *,
    problems: int = 8,
    loops: int = 128,
    first_loop: int = 1,
    feature: str = "sequence",
    device: str = "cpu",
) -> TrajectoryPCA:
    """PCA trajectories of the first test problems of a checkpoint's own task.

    Args:
        path: a ``step_*`` checkpoint directory or a run directory (latest checkpoint).
        problems: test problems to trace (teacher-forced inputs: prompt and answer).
        loops: loops to run, T >= 1.
        first_loop, feature: see :func:`trajectory_pca`.
        device: where to run.

    Raises:
        eqloop.training.checkpoint.CheckpointError: missing or corrupted checkpoint.
        ValueError: bad ``problems``, ``loops`` or ``first_loop``, or a diverged trajectory.
    """
    from eqloop.evaluation.scoring import make_test_set
    from eqloop.training.checkpoint import load_model
    from eqloop.training.config import TrainConfig

    problems = checks.integer("problems", problems, low=1)
    model, ckpt = load_model(path, device=device)
    model.eval()
    tokens = make_test_set(TrainConfig.from_dict(ckpt.config)).inputs[:problems].to(device)
    states = hidden_trajectory(model, tokens, loops)
    return trajectory_pca(states, first_loop=first_loop, feature=feature)


def plot_checkpoint_trajectories(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    problems: int = 8,
    loops: int = 128,
    device: str = "cpu",
) -> dict[str, TrajectoryPCA]:
    """:func:`checkpoint_pca` of every checkpoint, plotted side by side (``eqloop eval --pca``).

    Panels are titled ``<run>/<step>``. Returns the projections by title.
    """
    from eqloop.training.checkpoint import resolve_checkpoint

    panels = {}
    for path in paths:
        found = resolve_checkpoint(path)
        title = f"{found.parent.parent.name}/{found.name}"
        panels[title] = checkpoint_pca(found, problems=problems, loops=loops, device=device)
    plot_trajectories(panels, out)
    return panels


def plot_trajectories(
    panels: Mapping[str, TrajectoryPCA],
    path: str | os.PathLike[str],
    *,
    marks: Sequence[int] = (1, 4, 16, 128),
) -> None:
    """One panel per model: each sequence's trajectory on (PC1, PC2), coloured by loop.

    Args:
        panels: title -> projection (at least 2 components), e.g. a collapsing baseline
            and STARS side by side.
        path: PNG file to write.
        marks: loop counts labelled on the first trajectory (those beyond T are skipped).

    Raises:
        ValueError: no panels, or a projection with fewer than 2 components.
    """
    if not panels:
        raise ValueError("panels must hold at least one projection")
    for title, pca in panels.items():
        if pca.points.shape[2] < 2:
            raise ValueError(f"panel {title!r} needs at least 2 components")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, pca) in zip(axes[0], panels.items(), strict=True):
        points = pca.points.numpy()
        steps = points.shape[1]
        loop_of = [max(pca.first_loop + i, 1) for i in range(steps)]  # log colour scale
        for b in range(points.shape[0]):
            ax.plot(points[b, :, 0], points[b, :, 1], "-", color="0.6", lw=0.7, zorder=1)
            scatter = ax.scatter(
                points[b, :, 0],
                points[b, :, 1],
                c=loop_of,
                cmap="viridis",
                s=9,
                norm=_log_norm(pca.first_loop + steps - 1),
                zorder=2,
            )
            ax.scatter(*points[b, 0, :2], marker="s", color="k", s=18, zorder=3)
            ax.scatter(*points[b, -1, :2], marker="*", color="C3", s=60, zorder=3)
        for t in marks:
            if 0 <= t - pca.first_loop < steps:
                ax.annotate(
                    str(t),
                    points[0, t - pca.first_loop, :2],
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        share = pca.explained.tolist()
        style_axis(
            ax,
            f"PC1 ({100 * share[0]:.0f}% of variance)",
            f"PC2 ({100 * share[1]:.0f}%)",
            legend=False,
        )
        ax.set_title(title)
    bar = fig.colorbar(scatter, ax=axes[0].tolist(), label="loop t (square: first, star: last)")
    bar.ax.yaxis.set_major_formatter(_plain_numbers())
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _log_norm(last: int) -> Any:
    """Colour scale over loops 1..last on a log axis (z_0 gets the colour of loop 1)."""
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=1, vmax=max(2, last), clip=True)


def _plain_numbers() -> Any:
    """Tick labels 1, 10, 100 instead of 10^0, 10^1, 10^2."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")
