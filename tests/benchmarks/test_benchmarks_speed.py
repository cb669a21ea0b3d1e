"""benchmarks/speed_regression.py times two trees interleaved and reports their ratio."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import run_benchmark

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0,
    reason="needs a git checkout (the baseline is extracted with git archive)",
)


@pytest.mark.slow  # 13 s: two worker processes
def test_speed_regression_quick_against_head(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    proc = run_benchmark("speed_regression.py", "--quick", "--baseline", "HEAD", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert data["baseline_commit"] == head.stdout.strip()
    rows = {r["workload"]: r for r in data["results"]}
    assert set(rows) == {"train", "solve"}
    for row in rows.values():
        runs = [
            row[f"{tree}_{clock}_s"]
            for tree in ("baseline", "current")
            for clock in ("cpu", "wall")
        ]
        assert [len(r) for r in runs] == [row["runs"]] * 4 and row["runs"] == 4
        assert min(min(r) for r in runs) > 0
        assert row["ratio"] == pytest.approx(row["current_ms"] / row["baseline_ms"])
        assert row["wall_ratio"] > 0
    assert "current / baseline" in proc.stdout
    assert f"wrote {out}" in proc.stdout


def test_speed_regression_names_a_bad_revision() -> None:
    proc = run_benchmark("speed_regression.py", "--quick", "--baseline", "no-such-revision")
    assert proc.returncode != 0
    assert "git rev-parse" in proc.stderr and "no-such-revision" in proc.stderr


@pytest.mark.slow
def test_speed_regression_compares_eager_with_compiled(tmp_path: Path) -> None:
    # Issue 22: --compile times the eager and the compiled training step of this tree
    # interleaved and reports the compile time (aot_eager here: the real run uses inductor).
    out = tmp_path / "compiled.json"
    proc = run_benchmark(
        "speed_regression.py",
        "--quick",
        "--compile",
        "step",
        "--backend",
        "aot_eager",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["baseline_commit"] == "eager" and data["settings"]["compile"] == "step"
    (row,) = data["results"]
    assert row["workload"] == "train" and row["runs"] == 4
    assert row["ratio"] == pytest.approx(row["current_ms"] / row["baseline_ms"])
    assert row["setup_extra_s"] == pytest.approx(row["current_setup_s"] - row["baseline_setup_s"])
    assert "compile s (extra set-up)" in proc.stdout
