"""TrainConfig.init_from: a run that starts from another run's weights (a warm start)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from eqloop.recipes.train import train
from eqloop.training.checkpoint import load_checkpoint
from eqloop.training.config import TrainConfig

MODEL = dict(vocab_size=19, d_model=16, n_heads=2, d_ff=32, max_seq_len=16, injection="none")


def config(tmp: Path, name: str, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        model=MODEL,
        digits=2,
        n_train=128,
        n_test=16,
        batch_size=16,
        steps=6,
        lr=3e-3,
        warmup_steps=1,
        depth={"kind": "fixed", "t": 2},
        lam=0.0,
        eval_every=0,
        eval_loops=[2],
        checkpoint_every=0,
        out_dir=str(tmp / name),
        data_cache_dir=str(tmp / "cache"),
        progress=False,
    )
    return TrainConfig.from_dict({**base, **overrides})


def test_a_warm_start_begins_at_the_source_weights(tmp_path: Path) -> None:
    train(config(tmp_path, "source"))
    source = load_checkpoint(tmp_path / "source").weights
    # One step at a negligible learning rate (no weight decay) leaves the weights in place.
    still = dict(lr=1e-12, weight_decay=0.0, steps=1, seed=5)
    train(config(tmp_path, "warm", init_from=str(tmp_path / "source"), **still))
    train(config(tmp_path, "cold", **still))
    warm = load_checkpoint(tmp_path / "warm").weights
    cold = load_checkpoint(tmp_path / "cold").weights
    assert all(torch.allclose(warm[k], source[k], atol=1e-8) for k in source)
    assert not all(torch.allclose(cold[k], source[k], atol=1e-3) for k in source)
    assert load_checkpoint(tmp_path / "warm").step == 1  # a fresh run, not a resumed one


def test_a_warm_start_needs_the_same_model(tmp_path: Path) -> None:
    train(config(tmp_path, "source"))
    wider = config(
        tmp_path,
        "wider",
        init_from=str(tmp_path / "source"),
        model={**MODEL, "d_ff": 64, "norm_placement": "pre"},
    )
    with pytest.raises(ValueError, match=r"differs in \['d_ff', 'norm_placement'\]"):
        train(wider)
    assert not (tmp_path / "wider").exists()  # nothing written
    with pytest.raises(TypeError, match="init_from must be a path or None"):
        config(tmp_path, "bad", init_from=3)


def test_a_resumed_warm_start_compares_init_from_by_the_file_it_names(tmp_path: Path) -> None:
    train(config(tmp_path, "source"))
    train(config(tmp_path, "other"))
    (tmp_path / "alias").symlink_to(tmp_path / "source")
    train(config(tmp_path, "warm", init_from=str(tmp_path / "source"), steps=2))
    # The same source through a symlink: the run resumes and finishes its steps.
    train(config(tmp_path, "warm", init_from=str(tmp_path / "alias"), steps=4, resume=True))
    assert load_checkpoint(tmp_path / "warm").step == 4
    other = config(tmp_path, "warm", init_from=str(tmp_path / "other"), steps=6, resume=True)
    with pytest.raises(ValueError, match=r"differs from .* in \['init_from'\]"):
        train(other)
