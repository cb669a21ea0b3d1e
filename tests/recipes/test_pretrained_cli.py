"""``eqloop eval --pretrained DIR``: table, JSON and plot; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eqloop import pretrained


def eqloop(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "eqloop.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize("arch", ["ouro", pytest.param("huginn_raven", marks=pytest.mark.slow)])
def test_eval_pretrained_prints_and_writes(tmp_path, arch):
    path = pretrained.write_tiny_checkpoint(tmp_path / "ckpt", arch)
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    done = eqloop(
        "eval",
        "--pretrained",
        str(path),
        "--max-loops",
        "6",
        "--rho-iters",
        "4",
        "--solver",
        "anderson",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
        "--no-progress",
        "--prompt",
        "Hello there",
        "--prompt",
        "1+1=",
    )
    assert done.returncode == 0, done.stderr
    assert f"({arch}, trained depth 4)" in done.stdout and "4*" in done.stdout
    data = json.loads(out_json.read_text())
    assert data["loops"] == [1, 2, 3, 4, 5, 6] and data["model_type"] == arch
    assert data["settings"]["prompts"] == ["Hello there", "1+1="]
    assert data["equilibrium"]["solver"] == "anderson"
    assert out_png.stat().st_size > 1000


def test_eval_pretrained_errors_are_one_line(tmp_path):
    for args, message in [
        (["--pretrained", str(tmp_path / "nowhere")], "does not exist"),
        ([], "give --checkpoint"),
        (["--pretrained", str(tmp_path), "--checkpoint", "x"], "give --checkpoint"),
        (["--pretrained", str(tmp_path), "--max-loops", "0"], "--max-loops must be >= 1"),
        (["--pretrained", str(tmp_path)], "config.json"),
    ]:
        done = eqloop("eval", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_eval_flags_of_the_other_mode_are_errors_naming_the_mode(tmp_path):
    # row 20: a flag that does not apply to the chosen mode is refused before any work,
    # naming the mode (or the flag) it needs, instead of being silently ignored
    path = pretrained.write_tiny_checkpoint(tmp_path / "ckpt", "ouro")
    run = tmp_path / "no_run"  # never read: the flags are checked first
    for args, message in [
        (
            ["--pretrained", str(path), "--solver-start", "2"],
            "--solver-start applies to --checkpoint runs only, not to --pretrained",
        ),
        (
            ["--pretrained", str(path), "--pca", str(tmp_path / "p.png")],
            "--pca applies to --checkpoint runs only",
        ),
        (["--pretrained", str(path), "--decode", "forced"], "--decode applies to --checkpoint"),
        (["--pretrained", str(path), "--n-test", "4"], "--n-test applies to --checkpoint"),
        (
            ["--pretrained", str(path), "--loops", "1,2,4"],
            "with --pretrained, --loops takes "
            "one count N (loops 1..N are diagnosed, as with --max-loops N), got 1,2,4",
        ),
        (
            ["--pretrained", str(path), "--loops", "8", "--max-loops", "8"],
            "give one of --loops N and --max-loops N",
        ),
        (["--pretrained", str(path), "--max-iter", "5"], "--max-iter needs --solver"),
        (
            ["--checkpoint", str(run), "--dtype", "float64"],
            "--dtype applies to --pretrained checkpoints only, not to --checkpoint",
        ),
        (["--checkpoint", str(run), "--max-loops", "8"], "--max-loops applies to --pretrained"),
        (["--checkpoint", str(run), "--prompt", "hi"], "--prompt applies to --pretrained"),
        (["--checkpoint", str(run), "--no-rho"], "--no-rho applies to --pretrained"),
        (["--checkpoint", str(run), "--pca-loops", "4"], "--pca-loops needs --pca"),
        (["--checkpoint", str(run), "--solver-start", "2"], "--solver-start needs --solver"),
    ]:
        done = eqloop("eval", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_eval_pretrained_loops_is_the_number_of_loops_diagnosed(tmp_path):
    # row 20: the README's `--loops N` diagnoses loops 1..N, as --max-loops N does
    path = pretrained.write_tiny_checkpoint(tmp_path / "ckpt", "huginn_raven")
    out_json = tmp_path / "d.json"
    done = eqloop(
        "eval",
        "--pretrained",
        str(path),
        "--loops",
        "6",
        "--no-rho",
        "--no-progress",
        "--json",
        str(out_json),
        "--prompt",
        "1+1=",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out_json.read_text())["loops"] == [1, 2, 3, 4, 5, 6]
