"""benchmarks/pretrained.py runs end to end in --quick mode and reports its targets."""

from __future__ import annotations

import json

from helpers import run_benchmark


def test_quick_run_writes_json_with_every_part(tmp_path):
    out = tmp_path / "pretrained.json"
    done = run_benchmark(
        "pretrained.py", "--quick", "--json", str(out), "--plot", str(tmp_path / "p.png")
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["decode"]["identical_outputs"] is True
    assert data["decode"]["cached_s"] > 0 and data["decode"]["recompute_s"] > 0
    memory = {(r["mode"], r["loops"]): r["saved_mib"] for r in data["memory"]}
    assert memory[("ift", 16)] <= 1.1 * memory[("ift", 4)]  # flat in loops
    assert memory[("unroll", 16)] > 3 * memory[("unroll", 4)]  # linear in loops
    assert data["diagnostics"]["loops"] == list(range(1, 7))
    assert set(data["targets_met"]) == {
        "decode_speedup_ge_5",
        "ift_saved_ratio_le_1.1",
        "diagnose_under_60s",
    }
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "targets:" in done.stdout
    assert f"wrote {tmp_path / 'p.png'}" in done.stdout and f"wrote {out}" in done.stdout


def test_unknown_part_is_rejected():
    done = run_benchmark("pretrained.py", "--quick", "--parts", "speed")
    assert done.returncode == 2 and "unknown parts" in done.stderr
