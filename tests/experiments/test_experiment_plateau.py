"""experiments/plateau/run.py: per-digit accuracy and attention alignment of an addition run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_experiment, tiny_train_config

from eqloop.models.looplm.modeling import CausalSelfAttention, LoopLMConfig, rotary_tables
from eqloop.recipes.train import train
from experiments.plateau.run import attention_probabilities, diagnose, digit_errors, one_off_share


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_attention_probabilities_reproduce_the_layer(positions: str) -> None:
    torch.manual_seed(0)
    config = LoopLMConfig(vocab_size=19, d_model=16, n_heads=2, d_ff=32, positions=positions)
    layer = CausalSelfAttention(config).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    rope = None
    if positions == "rope":
        rope = rotary_tables(7, 8, 10000.0, device=x.device, dtype=x.dtype)
    probs = attention_probabilities(layer, x, rope)
    v = layer.qkv(x).view(3, 7, 3, 2, 8)[:, :, 2].transpose(1, 2)  # (B, heads, S, e)
    mixed = (probs @ v).transpose(1, 2).reshape(3, 7, 16)
    torch.testing.assert_close(layer.proj(mixed), layer(x, rope))
    assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 7, dtype=torch.float64))
    assert probs[..., 0, 1:].abs().max() == 0  # causal: the first query sees only itself


def _run(tmp_path: Path, task: str = "addition") -> Path:
    """A 2-step run of ``task`` at a fixed 3 loops; returns its run directory."""
    config = tiny_train_config(
        tmp_path / task,
        tmp_path / "cache",
        task=task,
        n_train=64,
        n_test=16,
        batch_size=16,
        steps=2,
        warmup_steps=1,
        depth={"kind": "fixed", "t": 3},
        lam=0.0,
        eval_every=0,
        eval_loops=[3],
    )
    train(config)
    return Path(config.out_dir)


def test_diagnose_reports_every_digit_and_loop(tmp_path: Path) -> None:
    result = diagnose(str(_run(tmp_path)), problems=8)
    assert result["loops"] == 3
    assert len(result["digit_accuracy"]) == 2
    assert [len(row) for row in result["alignment"]] == [2, 2, 2]
    assert all(0.0 <= mass <= 1.0 for row in result["alignment"] for mass in row)
    assert result["uniform"] == round(2 / 7, 3)  # prompt "ab+cd=" after BOS: 7 tokens


def test_one_off_share_counts_carry_errors_among_the_wrong_digits() -> None:
    target = torch.tensor([[3, 0, 5], [3, 9, 5], [3, 9, 5], [3, 2, 5]])
    predicted = torch.tensor([[4, 9, 5], [2, 0, 5], [7, 9, 5], [-10, 2, 5]])
    shares = one_off_share(predicted, target)
    # digit 0: wrong 4 times, one off twice (4 vs 3, 2 vs 3); digit 1: 0 vs 9 and 9 vs 0
    # wrap around modulo 10; digit 2 is never wrong.
    assert shares[0] == 0.5
    assert shares[1] == 1.0
    assert shares[2].isnan()


def test_digit_errors_agree_with_diagnose_at_the_training_depth(tmp_path: Path) -> None:
    run = str(_run(tmp_path))
    errors = digit_errors(run, [3, 5], problems=8)
    assert list(errors["digits"]) == ["3", "5"]
    assert errors["digits"]["3"]["accuracy"] == diagnose(run, problems=8)["digit_accuracy"]
    for entry in errors["digits"].values():
        for acc, one_off in zip(entry["accuracy"], entry["one_off"], strict=True):
            assert (one_off is None) == (acc == 1.0)


def test_diagnose_refuses_other_tasks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trained task 'multiplication'"):
        diagnose(str(_run(tmp_path, "multiplication")), problems=8)


@pytest.mark.slow  # a subprocess that imports torch: slow on a loaded machine
def test_the_script_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = tmp_path / "plateau.json"
    proc = run_experiment("plateau", str(run), "--problems", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "align@3" in proc.stdout
    assert json.loads(out.read_text())["results"][0]["digit_accuracy"]
    proc = run_experiment("plateau", str(run), "--problems", "8", "--loops", "2,3")
    assert proc.returncode == 0, proc.stderr
    assert "errors one off" in proc.stdout
    proc = run_experiment("plateau", str(run), "--loops", "two")
    assert proc.returncode == 2
    assert "expected comma-separated loop counts" in proc.stderr
