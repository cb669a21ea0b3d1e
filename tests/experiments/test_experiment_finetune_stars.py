"""experiments/finetune_stars/run.py runs end to end in --quick mode, resumes, and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.finetune_stars import run as finetune_stars


def test_finetune_stars_quick_writes_table_json_plot_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--quick",
        "--no-progress",
        "--out-dir",
        str(tmp_path / "runs"),
        "--json",
        str(tmp_path / "out.json"),
        "--plot",
        str(tmp_path / "out.png"),
    ]
    assert finetune_stars.main(argv) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    (seed,) = report["seeds"]
    for stage in ("pretrained", "sft", "stars"):
        result = seed["results"][stage]
        assert list(result["accuracy"]) == [str(t) for t in range(1, 9)]
        assert 0.0 <= result["equilibrium"]["accuracy"] <= 1.0
        summary = seed["summary"][stage]
        assert summary["drop8"] == summary["peak"] - 100 * result["accuracy"]["8"]
    timing = seed["step_time"]
    assert timing["ratio"] > 0 and timing["whole_batch"]["ratio"] > 0
    assert report["step_time_ratio"] == timing["ratio"]
    assert set(report["targets"]) == {
        "stars_drop8_le_half_sft",
        "stars_peak_ge_sft_minus_1",
        "stars_step_le_1.3x_sft",
        "within_45_min",
    }
    assert "drop@8" in capsys.readouterr().out and (tmp_path / "out.png").stat().st_size > 10_000
    # The stages are done: a rerun trains nothing and evaluates nothing again.
    cached = tmp_path / "runs" / "seed0" / "stars" / "benchmark_eval.json"
    cached.write_text(json.dumps({**seed["results"]["stars"], "decode": "cached"}))
    assert finetune_stars.main(argv) == 0
    rerun = json.loads((tmp_path / "out.json").read_text())["seeds"][0]
    assert rerun["results"]["stars"]["decode"] == "cached"
    assert rerun["train_time"] == seed["train_time"]


def test_quick_runs_keep_their_own_directory() -> None:
    assert finetune_stars.parse_args([]).out_dir == "runs/finetune_stars"
    assert finetune_stars.parse_args(["--quick"]).out_dir == "runs/finetune_stars_quick"


def test_a_run_of_other_settings_is_one_line_and_overwrite_reruns_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--quick", "--no-progress", "--out-dir", str(tmp_path / "runs")]
    assert finetune_stars.main([*argv, "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'a.json'}" in out and f"stages in {tmp_path / 'runs'}" in out
    refused = r"^experiments/finetune_stars/run.py: error: .*--overwrite runs the"
    with pytest.raises(SystemExit, match=refused):
        finetune_stars.main([*argv, "--finetune-lr", "0.01"])
    assert finetune_stars.main([*argv, "--finetune-lr", "0.01", "--overwrite"]) == 0
    saved = json.loads((tmp_path / "runs" / "seed0" / "sft" / "config.json").read_text())
    assert saved["lr"] == 0.01
