"""Tests for the eqloop command line: help, config errors, train -> eval, the tune hook."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from eqloop import cli
from eqloop.cli import main
from eqloop.evaluate import DECODES, DEFAULT_LOOPS

TINY = [
    "--set", 'model={"vocab_size": 19, "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 16}',
    "--set", "digits=2", "--set", "n_train=128", "--set", "n_test=32", "--set", "batch_size=32",
    "--set", "eval_every=0", "--set", 'depth={"kind": "fixed", "t": 2}', "--set", "penalty_start=1",
    "--set", "eval_loops=[1,2]",
]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = shutil.which("eqloop")
    prefix = [command] if command else [sys.executable, "-m", "eqloop.cli"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sub", ["train", "eval"])
def test_help(sub: str) -> None:
    done = run_cli(sub, "--help")
    assert done.returncode == 0, done.stderr
    assert f"usage: eqloop {sub}" in done.stdout
    assert ("--set" if sub == "train" else "--solver") in done.stdout


def test_parser_constants_match_evaluate() -> None:
    assert cli._DECODES == DECODES and cli._DEFAULT_LOOPS == DEFAULT_LOOPS


def test_unknown_key_and_bad_values_exit_with_a_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cases = [
        (["--set", "lamda=0.1"], "unknown TrainConfig keys: ['lamda']; valid keys are"),
        (["--lam", "2"], "lam must lie in [0, 1]"),
        (["--set", "digits=0"], "digits must be an integer >= 1"),
        (["--set", "task=division"], "unknown task 'division'"),
        (["--set", "model.widht=3"], "unknown LoopLMConfig keys: ['widht']"),
        (["--config", str(tmp_path / "missing.json")], "no such config file"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--out-dir", str(tmp_path / "run"), *args])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_print_config_applies_file_sets_and_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"lam": 0.05, "steps": 10}))
    args = ["train", "--config", str(file), "--set", "model.d_model=32", "--steps", "20"]
    assert main([*args, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["lam"], printed["steps"], printed["model"]["d_model"]) == (0.05, 20, 32)


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    cache = ["--set", f"data_cache_dir={tmp_path / 'cache'}"]
    assert (
        main(["train", *TINY, *cache, "--steps", "3", "--out-dir", str(run), "--no-progress"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["step"] == 3
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    args = ["eval", "--checkpoint", str(run), str(run / "checkpoints" / "step_00000003")]
    args += ["--loops", "1,2", "--solver", "anderson", "--max-iter", "20", "--rho-iters", "4"]
    args += ["--diagnostic-samples", "8", "--json", str(out_json), "--plot", str(out_png)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "equilibrium (anderson)" in printed and "rho<1 share" in printed
    results = json.loads(out_json.read_text())
    assert len(results) == 2 and set(results[0]["accuracy"]) == {"1", "2"}
    assert out_png.stat().st_size > 0
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", str(tmp_path / "nothing")])
    assert exc.value.code == 2 and "no checkpoint at" in capsys.readouterr().err


def test_tune_hook_forwards_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("eqloop.tune")
    fake.main = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "eqloop.tune", fake)
    monkeypatch.setattr("eqloop.tune", fake, raising=False)
    assert main(["tune", "--n-trials", "3", "--storage", "sqlite:///x.db"]) == 0
    assert seen == [["--n-trials", "3", "--storage", "sqlite:///x.db"]]
