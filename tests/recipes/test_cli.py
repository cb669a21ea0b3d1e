"""Tests for the eqloop command line: help, one-line errors, train -> eval, signals, tune hook."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from eqloop import cli
from eqloop.cli import main
from eqloop.evaluation import DECODES, DEFAULT_LOOPS
from eqloop.training.checkpoint import load_checkpoint
from eqloop.training.run_dir import TrainingInterrupted, run_recipe

TINY = [
    "--set",
    'model={"vocab_size": 19, "d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 16}',
    "--set",
    "digits=2",
    "--set",
    "n_train=128",
    "--set",
    "n_test=32",
    "--set",
    "batch_size=32",
    "--set",
    "eval_every=0",
    "--set",
    'depth={"kind": "fixed", "t": 2}',
    "--set",
    "penalty_start=1",
    "--set",
    "eval_loops=[1,2]",
]
EVAL_QUICK = ["--loops", "1,2", "--no-diagnostics", "--no-progress"]


def run_cli(*args: str, **options: object) -> subprocess.CompletedProcess[str]:
    command = shutil.which("eqloop")
    prefix = [command] if command else [sys.executable, "-m", "eqloop.cli"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, **options)  # type: ignore[call-overload]


def exits_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 2
) -> tuple[str, str]:
    """Run ``main(argv)``, expect SystemExit(code) and one line on stderr; (stdout, line)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == code, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return out, err.strip()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step run with a checkpoint after every step."""
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    argv = ["train", *TINY, "--set", f"data_cache_dir={root / 'cache'}", "--steps", "3"]
    argv += ["--set", "checkpoint_every=1", "--out-dir", str(run), "--no-progress"]
    assert main(argv) == 0
    return run


@pytest.mark.parametrize("sub", ["train", "eval"])
def test_help(sub: str) -> None:
    done = run_cli(sub, "--help")
    assert done.returncode == 0, done.stderr
    assert f"usage: eqloop {sub}" in done.stdout
    assert ("--set" if sub == "train" else "--solver") in done.stdout


def test_parser_constants_match_evaluate() -> None:
    assert cli._DECODES == DECODES and cli._DEFAULT_LOOPS == DEFAULT_LOOPS


# ------------------------------------------------------- row 10: one-line errors, no work


def test_bad_train_input_is_one_line_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("lam: 0.1\n")
    cases = [
        (["--set", "lamda=0.1"], "unknown TrainConfig keys: ['lamda']; valid keys are"),
        (["--lam", "2"], "lam must be a number >= 0 and <= 1, got 2.0"),
        (["--set", "digits=0"], "digits must be an integer >= 1"),
        (["--set", "task=division"], "task must be one of 'addition'"),
        (["--set", "model.widht=3"], "unknown LoopLMConfig keys: ['widht']"),
        (["--config", str(tmp_path / "missing.json")], "no such config file"),
        (["--config", str(yaml)], "format is not read; eqloop reads JSON (.json) and TOML"),
        (["--set", "betas=0.9"], "betas takes 2 comma-separated values (e.g. 0.9,0.98)"),
        (["--set", "eval_loops=x"], "eval_loops[0] must be an integer, got 'x'"),
        (["--set", "device=5"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:<n>', got '5'"),
        (["--set", "resume=maybe"], "resume must be a boolean (true/false, yes/no, on/off"),
        (["--set", "backward=ift", "--set", 'backward_options={"solvr": 1}'], "['solvr']"),
        (["--set", "backward_options=3"], "backward_options must be a JSON object"),
        (["--out-dir", str(a_file)], f"{a_file} exists and is not a directory"),
        (["--out-dir", str(a_file / "run")], f"{a_file} exists and is not a directory"),
        (["--resume", "--overwrite"], "not allowed with argument"),
        (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "device 'cuda' requested but CUDA is not available"))
    cache = tmp_path / "cache"
    for args, message in cases:
        argv = [
            "train",
            *TINY,
            "--set",
            f"data_cache_dir={cache}",
            "--out-dir",
            str(tmp_path / "run"),
        ]
        out, line = exits_with_one_line([*argv, *args], capsys)
        assert line.startswith("eqloop train: error: ") and message in line, (args, line)
        assert out == ""
    assert not (tmp_path / "run").exists() and not cache.exists()  # no data built
    assert a_file.read_text() == "mine"


def test_bad_eval_input_is_one_line_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trained: Path
) -> None:
    cases = [
        (["--diagnostic-samples", "0"], "diagnostic_samples must be an integer >= 1, got 0"),
        (["--rho-iters", "0"], "rho_iters must be an integer >= 1, got 0"),
        (["--loops", "1,x"], "argument --loops: expected comma-separated loop counts"),
        (["--loops", "-1"], "argument --loops: expected comma-separated loop counts"),
        (["--solver", "newton"], "unknown solver 'newton'; available:"),
        (["--solver", "anderson", "--max-iter", "0"], "max_iter must be an integer >= 1"),
        (["--solver", "anderson", "--solver-start", "-1"], "start_loops must be an integer >= 0"),
        (["--n-test", "0"], "--n-test must be an integer >= 1, got 0"),
        (["--device", "tpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:<n>'"),
        (["--json", str(tmp_path / "missing" / "x.json")], "does not exist; create it first"),
        (["--json", str(tmp_path)], "is a directory; give a file name"),
        (["--json", str(tmp_path / "x"), "--plot", str(tmp_path / "x")], "the same file"),
        (["--checkpoint", str(trained), str(tmp_path / "none")], "no checkpoint at"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "device 'cuda' requested but CUDA is not available"))
    for args, message in cases:
        out, line = exits_with_one_line(["eval", "--checkpoint", str(trained), *args], capsys)
        assert line.startswith("eqloop eval: error: ") and message in line, (args, line)
        assert out == ""  # nothing was evaluated
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ row 11: typed --set values


def test_set_values_are_parsed_by_field_type(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    overrides = [
        "resume=no",
        "progress=off",
        "betas=0.9,0.95",
        "eval_loops=1,4",
        "penalty_target=none",
        "out_dir=5",
        "model.bias=false",
        "lam=1e-2",
        "depth.hi=16",
        'data_cache_dir="a b"',
    ]
    argv = ["train", "--print-config"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["resume"] is False and printed["progress"] is False
    assert printed["betas"] == [0.9, 0.95] and printed["eval_loops"] == [1, 4]
    assert printed["penalty_target"] is None and printed["out_dir"] == "5"
    assert printed["model"]["bias"] is False and printed["lam"] == 0.01
    assert printed["depth"]["hi"] == 16 and printed["data_cache_dir"] == "a b"
    for word, value in (("yes", True), ("ON", True), ("1", True), ("false", False), ("0", False)):
        assert main(["train", "--print-config", "--set", f"resume={word}"]) == 0
        assert json.loads(capsys.readouterr().out)["resume"] is value


def test_resume_no_does_not_resume(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trained: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cache = ["--set", f"data_cache_dir={trained.parent / 'cache'}", "--set", "checkpoint_every=1"]
    argv = ["train", *TINY, *cache, "--out-dir", str(run), "--no-progress", "--steps", "4"]
    _, line = exits_with_one_line([*argv, "--set", "resume=no"], capsys)
    assert "already holds a training run (checkpoints up to step_00000003)" in line
    assert main([*argv, "--set", "resume=yes"]) == 0
    assert load_checkpoint(run).step == 4


# --------------------------------------------------------------- row 9: eval outputs


def test_eval_writes_finished_results_when_a_checkpoint_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trained: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    weights = load_checkpoint(bad).path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    argv = ["eval", "--checkpoint", str(bad), str(trained), *EVAL_QUICK]
    assert main([*argv, "--json", str(out_json), "--plot", str(out_png)]) == 2
    out, err = capsys.readouterr()
    assert f"{trained}/checkpoints/step_00000003 (step 3;" in out  # the later one still ran
    assert "is corrupted: model.safetensors" in err and "1 of 2 checkpoints failed" in err
    assert "Traceback" not in err
    results = json.loads(out_json.read_text())
    assert set(results[0]["accuracy"]) == {"1", "2"}
    assert results[1]["checkpoint"].startswith(str(bad)) and "corrupted" in results[1]["error"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "--checkpoint", str(bad), *EVAL_QUICK]) == 2  # alone: one line
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "is corrupted: model.safetensors" in err


# ------------------------------------------------------------------- row 13: the report


def test_eval_prints_a_table_per_checkpoint_with_a_progress_bar(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    trained: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--checkpoint", str(trained), "--loops", "1,2", "--solver", "anderson"]
    args += ["--max-iter", "20", "--rho-iters", "4", "--diagnostic-samples", "8"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    title, header, row1, row2, eq_row, eq_line = out.strip("\n").split("\n")
    assert title.endswith(
        "step_00000003 (step 3; 2-digit addition, 32 test problems, greedy decoding)"
    )
    columns = "loops accuracy step norm state norm rho median rho q90 rho < 1"
    assert " ".join(header.split()) == columns
    assert row1.split()[0] == "1" and row2.split()[0] == "2" and eq_row.split()[0] == "eq"
    assert len(row1.split()) == len(eq_row.split()) == 7 and row1.split()[-1].endswith("%")
    assert eq_line.startswith("  eq: anderson, max_iter 20, tol 0.0001;")
    assert "of sequences converged" in eq_line
    assert "diagnostics per depth" in err and "0/6" in err  # 2 + 2 + 2 units of work
    assert list(tmp_path.iterdir()) == []  # no --json, no --plot: nothing written

    # The table's numbers are those of the JSON results.
    assert main([*args, "--no-progress", "--json", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().err == ""
    (result,) = json.loads((tmp_path / "r.json").read_text())
    assert row1.split()[1] == f"{result['accuracy']['1']:.3f}"
    assert row2.split()[2] == f"{result['diagnostics'][1]['step_norm']:.3g}"
    assert eq_row.split()[4] == f"{result['equilibrium']['contraction']['rho']['q50']:.3f}"


def test_eval_help_describes_what_is_written() -> None:
    text = " ".join(run_cli("eval", "--help").stdout.split())
    assert "Prints a table per checkpoint; --json writes the results, --plot a PNG" in text
    assert "A checkpoint that fails is reported and the others are still evaluated" in text


# --------------------------------------------------------- row 12: Ctrl-C during train


def test_ctrl_c_during_train_saves_and_prints_the_resume_command(tmp_path: Path) -> None:
    sig = signal.SIGINT  # SIGTERM takes the same path (tests/training/test_train.py covers both)
    run = tmp_path / "run"
    args = ["train", *TINY, "--set", f"data_cache_dir={tmp_path / 'cache'}", "--steps", "400"]
    args += ["--set", "checkpoint_every=0", "--out-dir", str(run), "--no-progress"]
    command = shutil.which("eqloop")
    prefix = [command] if command else [sys.executable, "-m", "eqloop.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, err
    step = load_checkpoint(run).step
    assert 3 <= step < 400
    expected = f"eqloop train: {sig.name} at step {step}: saved {run}/checkpoints/step_{step:08d}"
    assert line.startswith(expected + "; resume with: ")
    resume = shlex.split(line.split("; resume with: ", 1)[1])
    assert resume[-1] == "--resume" and resume[1:-1] == args
    resumed = subprocess.run(
        [*prefix, *resume[1:-1], "--resume", "--steps", str(step + 2)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run).step == step + 2


def test_run_recipe_prints_the_config_the_result_or_the_resume_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The one tail of ``eqloop train`` and ``eqloop finetune``: what rank 0 prints."""
    config = types.SimpleNamespace(to_dict=lambda: {"lam": 0.1})
    argv = ["finetune", "--out-dir", "run", "--overwrite"]

    def recipe(result: dict[str, object] | None) -> object:
        def run(seen: object) -> dict[str, object]:
            assert seen is config
            if result is None:
                raise TrainingInterrupted(7, Path("run/checkpoints/step_00000007"), signal.SIGTERM)
            return result

        return run

    def call(result: dict[str, object] | None, print_config: bool = False) -> int:
        args = argparse.Namespace(print_config=print_config, argv=argv)
        return run_recipe("eqloop finetune", recipe(result), config, args, rank0_key="model")

    assert call(None, print_config=True) == 0  # printed, never run
    assert json.loads(capsys.readouterr().out) == {"lam": 0.1}
    assert call({"model": "run/model", "step": 3}) == 0
    assert json.loads(capsys.readouterr().out) == {"model": "run/model", "step": 3}
    assert call({"step": 3}) == 0  # another rank: silent
    assert capsys.readouterr().out == ""
    assert call(None) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == (
        "eqloop finetune: SIGTERM at step 7: saved run/checkpoints/step_00000007; "
        "resume with: eqloop finetune --out-dir run --resume\n"
    )


# -------------------------------------------------------------------------- train, tune


def test_print_config_applies_file_sets_and_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"lam": 0.05, "steps": 10, "overwrite": True}))
    args = ["train", "--config", str(file), "--set", "model.d_model=32", "--steps", "20"]
    assert main([*args, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["lam"], printed["steps"], printed["model"]["d_model"]) == (0.05, 20, 32)
    assert main([*args, "--resume", "--print-config"]) == 0  # the flag decides over the file
    printed = json.loads(capsys.readouterr().out)
    assert printed["resume"] is True and printed["overwrite"] is False


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
    assert "eq: anderson, max_iter 20" in printed and "rho < 1" in printed
    results = json.loads(out_json.read_text())
    assert len(results) == 2 and set(results[0]["accuracy"]) == {"1", "2"}
    assert out_png.stat().st_size > 0


def test_tune_hook_forwards_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("eqloop.recipes.tune")
    fake.main = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "eqloop.recipes.tune", fake)
    monkeypatch.setattr("eqloop.recipes.tune", fake, raising=False)
    assert main(["tune", "--n-trials", "3", "--storage", "sqlite:///x.db"]) == 0
    assert seen == [["--n-trials", "3", "--storage", "sqlite:///x.db"]]


# ------------------------------------------------------- issue 9: extras are optional


_WITHOUT_EXTRAS = """
import contextlib, io, json, sys
for name in ("datasets", "pyarrow", "pandas", "optuna", "matplotlib"):
    sys.modules[name] = None  # importing it now raises ModuleNotFoundError
from eqloop.cli import main
outcomes = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    outcomes.append([code, err.getvalue()])
print(json.dumps(outcomes))
"""


def test_train_and_eval_work_without_the_extras(tmp_path: Path) -> None:
    run, cache = tmp_path / "run", ["--set", f"data_cache_dir={tmp_path / 'cache'}"]
    commands = [
        ["train", *TINY, *cache, "--steps", "2", "--out-dir", str(run), "--no-progress"],
        ["eval", "--checkpoint", str(run), *EVAL_QUICK],
        ["eval", "--checkpoint", str(run), "--plot", str(tmp_path / "p.png")],
        ["tune", "--n-trials", "1"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, json.dumps(commands)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (train, _), (evaluate, _), (plot, plot_err), (tune, tune_err) = json.loads(done.stdout)
    assert (train, evaluate) == (0, 0) and load_checkpoint(run).step == 2
    assert plot == 2 and plot_err.strip().endswith("pip install 'eqloop[plots]'")
    assert tune == 2 and tune_err.strip().endswith("pip install 'eqloop[tune]'")


@pytest.mark.slow
def test_a_fresh_venv_without_extras_trains(tmp_path: Path) -> None:
    """The check of issue 9 for real: install eqloop with no extras into a new venv."""
    venv, root = tmp_path / "venv", Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the CPU build already here
    subprocess.run([*pip, torch_pin], check=True, timeout=1800)
    subprocess.run([*pip, str(root)], check=True, timeout=900)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", EQLOOP_CACHE_DIR=str(tmp_path / "cache"))
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list"], capture_output=True, text=True
    ).stdout
    assert not {"datasets", "optuna", "matplotlib"} & {
        line.split()[0] for line in listed.split("\n")[2:] if line
    }
    done = subprocess.run(
        [str(venv / "bin" / "eqloop"), "train", "--steps", "2", "--out-dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 2


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of a parser, by flag."""
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_shared_flags_are_defined_once_in_the_flag_table() -> None:
    # Issue 19: --device, --no-progress, --compile, --print-config, ... were written again
    # in each command; now each is FLAGS' entry (a command may change default and help only).
    from eqloop.recipes.tune.cli import build_parser as tune_parser
    from eqloop.training.flags import FLAGS

    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {name: _options(sub) for name, sub in subcommands.choices.items()}
    commands["tune"] = _options(tune_parser())
    seen = 0
    for command, options in commands.items():
        for name, flag in FLAGS.items():
            if name not in options:
                continue
            seen += 1
            action, table = options[name], flag.options
            assert type(action).__name__ == {"store_true": "_StoreTrueAction"}.get(
                table.get("action"), "_StoreAction"
            ), (command, name)
            assert action.type is table.get("type"), (command, name)
    assert seen >= 17  # train 8, finetune 8, eval 3 (--device, --no-progress, --compile), ...


def test_flags_are_applied_by_the_loader_after_the_file_and_the_sets(tmp_path: Path) -> None:
    # The command line's flags are typed values the one loader merges last (train, finetune
    # and tune alike); --lora is {"lora": {}}: LoRA on, the file's LoRA options kept.
    from eqloop.recipes.finetune.config import LoraOptions, load_finetune_config
    from eqloop.training.flags import flag_values

    file = tmp_path / "ft.toml"
    file.write_text('init_from = "x"\ntrain_file = "y"\nseed = 3\n[lora]\nalpha = 32.0\n')
    args = argparse.Namespace(seed=0, no_progress=True, compile=False, resume=False)
    values = {**flag_values(args), "lora": {}}
    assert values == {"seed": 0, "progress": False, "lora": {}}
    config = load_finetune_config(file, ["seed=5"], values=values)
    assert (config.seed, config.progress, config.lora) == (0, False, LoraOptions(alpha=32.0))
    assert load_finetune_config(None, ["init_from=x", "train_file=y"], values=values).lora == (
        LoraOptions()
    )


def test_eval_pretrained_refuses_a_looplm_directory_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # eqloop.models.load reads a LoopLM's save_pretrained directory; the Ouro/Huginn
    # diagnostics say so instead of failing on an attribute the LoopLM does not have.
    from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig

    config = LoopLMConfig(vocab_size=19, d_model=16, n_heads=2, d_ff=32, max_seq_len=16)
    directory = LoopLM(config).save_pretrained(tmp_path / "looplm")
    _, line = exits_with_one_line(["eval", "--pretrained", str(directory), "--no-rho"], capsys)
    assert "holds a LoopLM (model_type 'looplm'); eqloop eval --pretrained diagnoses" in line
