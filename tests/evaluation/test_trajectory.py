"""Tests for eqloop.evaluation.trajectory: the unrolled states and their PCA projection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from eqloop.evaluation import (
    checkpoint_pca,
    hidden_trajectory,
    make_test_set,
    plot_trajectories,
    trajectory_pca,
)
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig
from eqloop.training.checkpoint import save_checkpoint
from eqloop.training.config import TrainConfig

MODEL = dict(vocab_size=19, d_model=16, n_heads=2, d_ff=32, max_seq_len=8, injection="none")


@pytest.fixture(scope="module")
def model() -> LoopLM:
    torch.manual_seed(0)
    return LoopLM(LoopLMConfig(**MODEL, init_std=0.3)).eval()


def test_hidden_trajectory_is_the_unrolled_loop(model: LoopLM) -> None:
    tokens = torch.randint(3, 19, (3, 5), generator=torch.Generator().manual_seed(1))
    states = hidden_trajectory(model, tokens, 6)
    assert states.shape == (7, 3, 5, 16)
    assert torch.equal(states[0], model.inject(tokens))  # z0 = x without injection
    with torch.no_grad():
        assert torch.allclose(states[4], model.unroll(tokens, 4))
        assert torch.allclose(states[6], model.core_step(states[5], states[0]))
    with pytest.raises(ValueError, match="loops must be an integer >= 1"):
        hidden_trajectory(model, tokens, 0)


def test_pca_recovers_a_planar_trajectory_exactly() -> None:
    # Two spirals in the plane spanned by two orthonormal directions of R^12, plus an
    # offset: PCA must explain all variance with 2 components and reproduce the distances.
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(12, 2, generator=gen, dtype=torch.float64))
    t = torch.arange(20, dtype=torch.float64)
    radius = 0.9**t
    plane = torch.stack(
        [
            torch.stack((radius * torch.cos(t + p), radius * torch.sin(t + p)), dim=1)
            for p in (0.0, 1.5)
        ]
    )  # (B=2, T+1=20, 2)
    offset = torch.randn(12, generator=gen, dtype=torch.float64)
    features = plane @ basis.T + offset  # (2, 20, 12)
    states = features.transpose(0, 1).reshape(20, 2, 3, 4)  # (T+1, B, S, d)
    pca = trajectory_pca(states, components=2)
    assert pca.points.shape == (2, 20, 2)
    assert math.isclose(float(pca.explained.sum()), 1.0, rel_tol=1e-12)
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(2, dtype=torch.float64))
    exact = "donot_use_mm_for_euclid_dist"
    pairwise = torch.cdist(pca.points.reshape(40, 2), pca.points.reshape(40, 2), compute_mode=exact)
    expected = torch.cdist(plane.reshape(40, 2), plane.reshape(40, 2), compute_mode=exact)
    assert torch.allclose(pairwise, expected, atol=1e-12)
    assert torch.allclose(pca.state_norm, features.norm(dim=2))


def test_pca_features_and_errors(model: LoopLM) -> None:
    tokens = torch.randint(3, 19, (4, 5), generator=torch.Generator().manual_seed(2))
    states = hidden_trajectory(model, tokens, 8)
    last = trajectory_pca(states, feature="last", components=3)
    assert last.components.shape == (3, 16) and last.points.shape == (4, 9, 3)
    assert torch.all(last.explained[:-1] >= last.explained[1:])  # sorted by variance
    whole = trajectory_pca(states)
    assert whole.components.shape == (2, 5 * 16)
    with pytest.raises(ValueError, match="feature must be one of 'sequence', 'last'; got 'mean'"):
        trajectory_pca(states, feature="mean")
    with pytest.raises(ValueError, match="components=99 exceeds"):
        trajectory_pca(states, feature="last", components=99)
    with pytest.raises(ValueError, match="shape"):
        trajectory_pca(states[0])
    bad = states.clone()
    bad[3, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="diverged"):
        trajectory_pca(bad)


def test_plot_trajectories_writes_a_png(model: LoopLM, tmp_path: Path) -> None:
    tokens = torch.randint(3, 19, (3, 5), generator=torch.Generator().manual_seed(4))
    pca = trajectory_pca(hidden_trajectory(model, tokens, 16))
    out = tmp_path / "pca.png"
    plot_trajectories({"a": pca, "b": pca}, out)
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least one"):
        plot_trajectories({}, out)


def test_first_loop_leaves_out_the_start(model: LoopLM) -> None:
    tokens = torch.randint(3, 19, (3, 5), generator=torch.Generator().manual_seed(5))
    states = hidden_trajectory(model, tokens, 10)
    later = trajectory_pca(states, first_loop=1)
    assert later.first_loop == 1 and later.points.shape == (3, 10, 2)
    assert torch.allclose(later.state_norm, trajectory_pca(states[1:]).state_norm)
    with pytest.raises(ValueError, match="first_loop must be an integer in"):
        trajectory_pca(states, first_loop=11)


def test_checkpoint_pca_traces_the_runs_own_test_problems(tmp_path: Path) -> None:
    config = TrainConfig(
        model=LoopLMConfig(**{**MODEL, "max_seq_len": 16}, init_std=0.3),
        digits=2,
        n_train=64,
        n_test=16,
        batch_size=8,
        out_dir=str(tmp_path / "run"),
        data_cache_dir=str(tmp_path / "cache"),
    )
    torch.manual_seed(0)
    model = LoopLM(config.model)
    save_checkpoint(
        tmp_path / "run",
        3,
        weights=model.state_dict(),
        config=config.to_dict(),
        metrics={},
        training_state={},
    )
    pca = checkpoint_pca(tmp_path / "run", problems=5, loops=12)
    tokens = make_test_set(config).inputs[:5]
    expected = trajectory_pca(hidden_trajectory(model.eval(), tokens, 12), first_loop=1)
    assert pca.first_loop == 1 and torch.allclose(pca.state_norm, expected.state_norm)
    with pytest.raises(ValueError, match="problems must be an integer >= 1"):
        checkpoint_pca(tmp_path / "run", problems=0)


def test_eqloop_eval_pca_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eqloop.cli import main

    config = TrainConfig(
        model=LoopLMConfig(**{**MODEL, "max_seq_len": 16}),
        digits=2,
        n_train=64,
        n_test=8,
        batch_size=8,
        out_dir=str(tmp_path / "run"),
        data_cache_dir=str(tmp_path / "cache"),
    )
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "run",
        2,
        weights=LoopLM(config.model).state_dict(),
        config=config.to_dict(),
        metrics={},
        training_state={},
    )
    out = tmp_path / "pca.png"
    common = [
        "eval",
        "--checkpoint",
        str(tmp_path / "run"),
        "--loops",
        "1,2",
        "--no-progress",
        "--no-diagnostics",
        "--pca",
        str(out),
    ]
    assert main([*common, "--pca-loops", "6", "--pca-problems", "3"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as stop:
        main([*common, "--pca-loops", "0"])
    assert stop.value.code == 2
    assert "--pca-loops must be an integer >= 1" in capsys.readouterr().err
