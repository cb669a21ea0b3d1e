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


@pytest.mark.parametrize("arch", ["ouro", "huginn_raven"])
def test_eval_pretrained_prints_and_writes(tmp_path, arch):
    path = pretrained.write_tiny_checkpoint(tmp_path / "ckpt", arch)
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    done = eqloop(
        "eval", "--pretrained", str(path), "--max-loops", "6", "--rho-iters", "4",
        "--solver", "anderson", "--json", str(out_json), "--plot", str(out_png), "--no-progress",
        "--prompt", "Hello there", "--prompt", "1+1=",
    )  # fmt: skip
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
