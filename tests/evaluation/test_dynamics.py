"""The one per-loop dynamics computation (eqloop.evaluation.dynamics.loop_dynamics) and
the two reports on it: loop_diagnostics (eqloop eval) and diagnose (Ouro, Huginn)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import eqloop
from eqloop import pretrained
from eqloop.evaluation.dynamics import loop_diagnostics, loop_dynamics
from eqloop.models.looplm import LoopLM, LoopLMConfig


def norms(states: list[torch.Tensor], t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) ``||z_t - z_{t-1}||`` and ``||z_t||`` of a trajectory [z_0, ..., z_T]."""
    return (states[t] - states[t - 1]).flatten(1).norm(dim=1), states[t].flatten(1).norm(dim=1)


def test_loop_dynamics_gives_the_norms_of_both_reports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LoopLMConfig(vocab_size=19, d_model=32, n_heads=2, d_ff=64, max_seq_len=16)
    model = LoopLM(config).eval()
    tokens = torch.randint(0, 19, (4, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f, z0 = model.core_map(tokens)
        states = model.unroll(tokens, 5, return_states=True)
    records = loop_dynamics(model, f, z0, [2, 5])
    assert [r.loop for r in records] == [2, 5]
    assert all(r.rho is None and r.kl is None for r in records)  # not asked
    report = loop_diagnostics(model, tokens, [2, 5])
    for r, row in zip(records, report, strict=True):
        step, size = norms(states, r.loop)
        torch.testing.assert_close(r.step_norm, step)
        torch.testing.assert_close(r.state_norm, size)
        assert row["step_norm"] == pytest.approx(float(r.step_norm.mean()), rel=1e-6)
        assert row["state_norm"] == pytest.approx(float(r.state_norm.mean()), rel=1e-6)

    ouro = pretrained.load(
        pretrained.write_tiny_checkpoint(tmp_path / "o", "ouro", initializer_range=0.2)
    )
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    diag = pretrained.diagnose(ouro, ids, attention_mask=mask, loops=3, rho=False)
    with torch.no_grad():
        f, z0 = ouro.core_map(ids, attention_mask=mask)
        states = ouro.unroll(ids, 4, return_states=True, attention_mask=mask)
    records = loop_dynamics(
        ouro, f, z0, range(1, 5), mask=mask, readout=True, stage={"attention_mask": mask}
    )
    for t in range(1, 4):
        step, size = norms(states, t + 1)[0], norms(states, t)[1]
        torch.testing.assert_close(records[t].step_norm, step)
        torch.testing.assert_close(records[t - 1].state_norm, size)
        assert diag.per_sequence["residual"][t - 1] == pytest.approx(
            (step / size).tolist(), rel=1e-5
        )
        # Per-token norms averaged over the real tokens only.
        real = states[t].norm(dim=-1)
        want = [float(real[0].mean()), float(real[1, 3:].mean())]
        assert records[t - 1].token_norm.tolist() == pytest.approx(want, rel=1e-5)
        assert diag.per_sequence["state_norm"][t - 1] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=r"rho_loops \[3\] are not recorded"):
        loop_dynamics(ouro, f, z0, [1, 2], rho_loops=[3])
    with pytest.raises(ValueError, match=r"mask must be \(B, S\) = \(2, 6\)"):
        loop_dynamics(ouro, f, z0, [1], mask=mask[:, 1:])


def test_the_per_loop_reports_run_the_loop_in_one_place() -> None:
    # Loop dynamics are computed once (loop_dynamics); the reports do not run the loop.
    folder = Path(eqloop.__file__).parent / "evaluation"
    calls = []
    for name in ("dynamics.py", "diagnostics.py"):
        for node in ast.parse((folder / name).read_text()).body:
            if isinstance(node, ast.FunctionDef):
                calls += [
                    (name, node.name)
                    for call in ast.walk(node)
                    if isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr in ("loop", "unroll", "core_step")
                ]
    assert calls == [("dynamics.py", "loop_dynamics")]
