"""benchmarks/memory_depth.py runs end to end in --quick mode and shows the memory laws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_benchmark
from torch import Tensor, nn

from benchmarks.memory_depth import saved_bytes


@pytest.mark.slow  # 13 s; saved_bytes and the mode check stay in the default run
def test_memory_depth_quick_writes_json_and_plot(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "memory.json", tmp_path / "memory.png"
    proc = run_benchmark(
        "memory_depth.py", "--quick", "--json", str(out_json), "--plot", str(out_png)
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out_json}\nwrote {out_png}" in proc.stdout  # says where it wrote
    data = json.loads(out_json.read_text())
    saved = {(r["mode"], r["loops"]): r["saved_bytes"] for r in data["depth"]}
    assert {m for m, _ in saved} == {"ift", "phantom", "truncated", "unroll"}
    assert {n for _, n in saved} == {4, 8, 16, 32, 64}
    for mode in ("ift", "phantom"):
        assert saved[mode, 64] <= 1.1 * saved[mode, 4], mode
    assert saved["truncated", 64] <= 1.1 * saved["truncated", 8]
    # unroll grows linearly: equal increments per loop
    per_loop = (saved["unroll", 8] - saved["unroll", 4]) / 4
    assert saved["unroll", 64] - saved["unroll", 4] == pytest.approx(60 * per_loop, rel=1e-3)
    for row in data["depth"]:
        assert row["time_s"] > 0 and row["peak_bytes"] > 0
    agreement = {r["mode"]: r for r in data["agreement"]}
    assert agreement["ift"]["cos_vs_unroll"] >= 0.9999
    assert agreement["ift"]["rel_err_vs_unroll"] < 1e-4
    assert agreement["phantom"]["cos_vs_ift"] > 0.99
    assert data["summary"]["unroll_over_ift_at_64"]["saved_bytes"] > 10
    assert out_png.stat().st_size > 10_000
    assert "saved MiB" in proc.stdout and "cos vs unroll" in proc.stdout


def test_memory_depth_rejects_unknown_mode() -> None:
    proc = run_benchmark("memory_depth.py", "--quick", "--modes", "ift,adjoint")
    assert proc.returncode != 0
    assert "unknown mode(s) ['adjoint']" in proc.stderr and "phantom" in proc.stderr


def test_saved_bytes_counts_each_saved_storage_once_and_skips_parameters() -> None:
    layer = nn.Linear(4, 5, bias=False).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def forward() -> Tensor:
        t = layer(x).tanh()  # the matmul saves x and the weight, tanh saves t
        return (t * t).sum()  # saves t twice more: one storage, counted once

    activations = (x.numel() + 3 * 5) * 8  # x and t, float64
    assert saved_bytes(layer, forward) == activations
    assert saved_bytes(None, forward) == activations + layer.weight.numel() * 8
