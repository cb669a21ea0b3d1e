"""Fine-tuning: LoRA, the STARS step, depth draws, exact resume, saving, DDP/FSDP, CLI.

Everything runs on eqloop's own LoopLM (no input injection, as Ouro's loop) written as an
eqloop checkpoint, with a tiny prompt/completion arithmetic file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import count_step_reads
from ranks import run_ranks

from eqloop import pretrained
from eqloop.cli import main
from eqloop.core.backward import ConvergenceWarning, Truncated
from eqloop.data import CharTokenizer
from eqloop.data.qa import PromptTemplate, encode_examples, load_jsonl, write_jsonl
from eqloop.models.auto import load_for_finetuning
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig
from eqloop.recipes.finetune.config import FinetuneConfig, LoraOptions, load_finetune_config
from eqloop.recipes.finetune.train import Objective, finetune, step_time_ratio
from eqloop.training import run_dir
from eqloop.training.checkpoint import load_checkpoint, load_model, save_checkpoint
from eqloop.training.config import TrainConfig
from eqloop.training.depth import make_depth_sampler
from eqloop.training.lora import attach_lora, lora_module_names, merge_lora
from eqloop.training.run_dir import NonFiniteLoss

TRAINED_LOOPS = 3


def _write_base(path: Path, seed: int = 0, injection: str = "none") -> Path:
    torch.manual_seed(seed)
    config = LoopLMConfig(
        vocab_size=CharTokenizer.printable().vocab_size,
        d_model=16,
        n_heads=2,
        d_ff=32,
        max_seq_len=64,
        injection=injection,
        norm_placement="post_sandwich",
        positions="rope",
        default_loops=TRAINED_LOOPS,
        init_std=0.1,
    )
    model = LoopLM(config)
    save_checkpoint(
        path,
        0,
        weights=model.state_dict(),
        config={"model": config.to_dict()},
        metrics={},
        training_state={},
    )
    return path


def _write_data(path: Path, n: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randint(10, 99, (2, n), generator=generator).tolist()
    records = [{"prompt": f"{x}+{y}=", "completion": str(x + y)} for x, y in zip(a, b, strict=True)]
    return write_jsonl(path, records)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    return {
        "base": _write_base(root / "base"),
        "injected": _write_base(root / "injected", injection="add"),
        "train": _write_data(root / "train.jsonl", 48, seed=0),
        "test": _write_data(root / "test.jsonl", 8, seed=1),
    }


def _config(files: dict[str, Path], out: Path, **overrides) -> FinetuneConfig:
    config = FinetuneConfig(
        init_from=str(files["base"]),
        train_file=str(files["train"]),
        out_dir=str(out),
        batch_size=8,
        steps=4,
        lr=3e-3,
        warmup_steps=1,
        checkpoint_every=2,
        progress=False,
        eval_loops=[1, 3],
        eval_equilibrium=False,
        max_new_tokens=4,
    )
    return dataclasses.replace(config, **overrides)


def _logged_loops(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loops"] for line in lines]


# ------------------------------------------------------------------------------- LoRA


def test_lora_attaches_to_named_modules_only_and_merges_exactly(files: dict[str, Path]) -> None:
    loaded = load_for_finetuning(files["base"], dtype=torch.float64)
    model = loaded.model
    before = {name for name, p in model.named_parameters()}
    names = attach_lora(model, ["attn.fn.qkv", "fc_out"], r=4)
    assert names == ["core.0.attn.fn.qkv", "core.0.mlp.fn.fc_out"]
    assert lora_module_names(model) == names
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{m}.lora_{ab}.default.weight" for m in names for ab in ("A", "B"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters do something
            torch.nn.init.normal_(parameter, std=0.5)
    tokens = torch.randint(3, 90, (3, 9))
    with torch.no_grad():
        adapted = model(tokens, loops=4)
    assert merge_lora(model) == 2
    assert {name for name, p in model.named_parameters()} == before
    with torch.no_grad():
        merged = model(tokens, loops=4)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-12)
    with torch.no_grad():  # and the adapters did change the model
        original = load_for_finetuning(files["base"], dtype=torch.float64).model(tokens, loops=4)
    assert not torch.allclose(merged, original)
    with pytest.raises(ValueError, match=r"LoRA targets \['q_proj'\] match no nn.Linear"):
        attach_lora(model, ["q_proj"])


# -------------------------------------------------------------------------- the steps


def test_a_looplm_saved_with_save_pretrained_is_fine_tuned_like_a_run(
    files: dict[str, Path], tmp_path: Path
) -> None:
    # Issue 19: the model-directory format (config.json with model_type + safetensors) of
    # Ouro and Huginn holds a LoopLM too; fine-tuning reads it as it reads the run.
    run = load_for_finetuning(files["base"], dtype=torch.float64)
    saved = load_for_finetuning(run.model.save_pretrained(tmp_path / "looplm"), dtype=torch.float64)
    assert (saved.arch, saved.trained_loops) == ("looplm", run.trained_loops)
    assert saved.tokenizer.vocab_size == run.tokenizer.vocab_size
    assert saved.fingerprint == run.fingerprint


def test_a_stars_step_lowers_the_penalty(files: dict[str, Path]) -> None:
    loaded = load_for_finetuning(files["base"])
    config = _config(files, Path("unused"))
    inputs, targets = encode_examples(
        load_jsonl(files["train"])[:16], loaded.tokenizer, PromptTemplate(), max_len=64
    )
    objective = Objective(loaded.model, lam=0.5)
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=3e-3)

    def penalty() -> float:
        generator = torch.Generator().manual_seed(7)  # the same random vectors every time
        return float(objective(inputs, targets, 6, True, generator)[2])

    start = penalty()
    for step in range(3):
        generator = torch.Generator().manual_seed(100 + step)
        loss, ce, pen, rho = objective(inputs, targets, 6, True, generator)
        expected = 0.5 * float(ce.detach()) + 0.5 * float(pen)
        assert float(rho) > 0 and float(loss.detach()) == pytest.approx(expected)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert penalty() < 0.9 * start
    # SFT's objective has no penalty term at all
    assert objective(inputs, targets, 6, False)[2] is None
    timing = step_time_ratio(loaded, inputs, targets, config, loops=3, steps=2, warmup=1)
    # Timings are the benchmark's business; here only that both steps ran and were timed.
    assert timing["loops"] == 3 and timing["step_time_sft"] > 0 and timing["step_time_stars"] > 0
    assert timing["ratio"] == timing["step_time_stars"] / timing["step_time_sft"]


def test_sft_and_stars_draw_depths_as_configured(files: dict[str, Path], tmp_path: Path) -> None:
    finetune(_config(files, tmp_path / "sft", mode="sft", steps=6))
    assert _logged_loops(tmp_path / "sft") == [TRAINED_LOOPS] * 6  # the model's trained depth
    finetune(_config(files, tmp_path / "sft5", mode="sft", loops=5, steps=3))
    assert _logged_loops(tmp_path / "sft5") == [5] * 3
    depth = {"kind": "lognormal", "mu": 1.7, "sigma": 0.4, "lo": 1, "hi": 16}
    finetune(_config(files, tmp_path / "stars", mode="stars", steps=6, seed=3))
    sampler = make_depth_sampler(**depth, seed=3)
    expected = [sampler.sample() for _ in range(6)]
    assert _logged_loops(tmp_path / "stars") == expected
    assert len(set(expected)) > 1
    records = [
        json.loads(x) for x in (tmp_path / "stars" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["penalty"] is not None and r["rho"] > 0 for r in records)
    finetune(_config(files, tmp_path / "late", mode="stars", steps=4, penalty_start=2))
    records = [
        json.loads(x) for x in (tmp_path / "late" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["penalty"] is None for r in records] == [True, True, False, False]


# ------------------------------------------------------------- training at the fixed point

SOLVE = {"solver": "anderson", "tol": 1e-3, "max_iter": 12}


def _step_rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


@pytest.mark.parametrize(("backward", "mode"), [("ift", "stars"), ("phantom", "sft")])
def test_solve_finetunes_at_the_fixed_point_and_logs_the_forward(
    files: dict[str, Path], tmp_path: Path, backward: str, mode: str
) -> None:
    # Issue 20 item 1 (finetune): the forward solve of TrainConfig.solve, on a LoopLM whose
    # loop sees its input; two micro-batches per step, the penalty at the solver's point.
    config = _config(
        files,
        tmp_path / "run",
        init_from=str(files["injected"]),
        solve=SOLVE,
        backward=backward,
        mode=mode,
        grad_accum=2,
        steps=3,
        penalty_start=1,
    )
    result = finetune(FinetuneConfig.from_dict(config.to_dict()))
    assert math.isfinite(result["train"]["loss"])
    rows = _step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["loops"] is None  # no sampled depth: the solver decides
        assert 0.0 <= row["fwd_converged"] <= 1.0
        # f-evaluations of the step: both micro-batches' solves, each within the budget
        assert isinstance(row["fwd_nfe"], int) and 2 <= row["fwd_nfe"] <= 2 * 12
        assert (row["fwd_converged"] < 1) == (row["fwd_residual"] > SOLVE["tol"])
        assert ("bwd_converged" in row) == (backward == "ift")
    assert (rows[-1]["penalty"] is not None) == (mode == "stars")
    saved = load_checkpoint(tmp_path / "run").config
    assert saved["solve"]["max_iter"] == 12 and saved["backward"] == backward


def test_skip_unconverged_finetunes_on_converged_sequences_only(
    files: dict[str, Path], tmp_path: Path
) -> None:
    # No sequence converges within one evaluation at tol 1e-12: no CE, no gradient.
    config = _config(
        files,
        tmp_path / "none",
        init_from=str(files["injected"]),
        solve={**SOLVE, "tol": 1e-12, "max_iter": 1, "skip_unconverged": True},
        backward="phantom",
        mode="sft",
        grad_accum=2,
        steps=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        finetune(FinetuneConfig.from_dict(config.to_dict()))
    rows = _step_rows(tmp_path / "none")
    assert [r["fwd_converged"] for r in rows] == [0.0, 0.0]
    assert all(r["ce"] == 0.0 and r["grad_norm"] == 0.0 for r in rows)


def test_the_solve_gradient_is_taken_at_the_solvers_point(files: dict[str, Path]) -> None:
    # One phantom step (tau 1) from the detached z*: the gradient must be that of
    # CE(readout(f(z*))) at the point the solver returned, not at z0 or after some loops.
    from eqloop.core.backward import Phantom
    from eqloop.training.config import SolveConfig

    loaded = load_for_finetuning(files["injected"], dtype=torch.float64)
    model = loaded.model
    template = PromptTemplate(FinetuneConfig().prompt, FinetuneConfig().delimiter)
    examples = load_jsonl(files["train"])[:4]
    inputs, targets = encode_examples(examples, loaded.tokenizer, template, max_len=64)
    solve = SolveConfig(**SOLVE)
    objective = Objective(model, lam=0.0, solve=solve, backward=Phantom(steps=1))
    loss, *_ = objective(inputs, targets, None)
    loss.backward()
    solved = objective.solve_info.fixed_point.forward
    assert solved.nfe > 1 and objective.solve_info.loops_used is None
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    f, z0 = model.core_map(inputs)
    z_star = solved.z.detach()
    assert not torch.allclose(z_star, z0)
    logits = model.readout(f(z_star)).float()  # as the objective's CE
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, ce)
    ce.backward()
    for got, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"backward": "ift"}, r"backward='ift' takes its gradient at the fixed point .*set solve"),
        ({"solve": SOLVE}, r"backward must be one of \('ift', 'phantom'\), got 'unroll'"),
        ({"solve": SOLVE, "backward": "truncated"}, r"backward must be one of 'unroll', 'ift'"),
        ({"solve": {**SOLVE, "tol": 0.0}, "backward": "ift"}, r"solve\.tol"),
        (
            {"solve": SOLVE, "backward": "ift", "backprop_loops": 2},
            r"backprop_loops=2 \(truncated backprop .*\) applies to unrolled loops",
        ),
        ({"solve": SOLVE, "backward": "ift", "loops": 3}, r"loops=3 \(the SFT loop count\)"),
        (
            {"solve": SOLVE, "backward": "phantom", "grad_checkpointing": True},
            r"grad_checkpointing=True .* set grad_checkpointing to its default, or solve=null",
        ),
        (
            {"solve": SOLVE, "backward": "ift", "backward_options": {"k": 2}},
            r"backward_options: .*k",
        ),
    ],
)
def test_solve_settings_are_checked(
    files: dict[str, Path], tmp_path: Path, overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        FinetuneConfig.from_dict(_config(files, tmp_path / "run", **overrides).to_dict())


def test_solve_is_refused_for_a_loop_that_does_not_see_its_input(
    files: dict[str, Path], tmp_path: Path
) -> None:
    # The base LoopLM has injection="none" (as Ouro): its fixed point is not a function
    # of the input. Refused before anything is written; the CLI says it in one line.
    config = _config(files, tmp_path / "run", solve=SOLVE, backward="ift")
    with pytest.raises(ValueError, match=r"solve: .* injection='none', so the input only sets"):
        finetune(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------- resume, saving


@pytest.mark.parametrize("lora", [False, True])
def test_resume_is_bit_identical(files: dict[str, Path], tmp_path: Path, lora: bool) -> None:
    options = {"mode": "stars", "steps": 6, "checkpoint_every": 3}
    if lora:
        options["lora"] = LoraOptions(r=2, targets=["qkv", "fc_in"])
    whole = finetune(_config(files, tmp_path / "whole", **options))

    def stop_at_4(step: int, stats: dict) -> None:
        if step == 4:  # between checkpoints: step 4 is saved before the exception propagates
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(_config(files, tmp_path / "split", **options), on_step=stop_at_4)
    assert load_checkpoint(tmp_path / "split").step == 4
    held = r"already holds a training run \(checkpoints up to step_00000004\)"
    with pytest.raises(ValueError, match=held):
        finetune(_config(files, tmp_path / "split", **options))
    with pytest.raises(ValueError, match=r"differs from .*step_00000004 in \['lam'\]"):
        finetune(_config(files, tmp_path / "split", **options, resume=True, lam=0.3))
    resumed = finetune(_config(files, tmp_path / "split", **options, resume=True))
    assert resumed["step"] == whole["step"] == 6
    a = load_checkpoint(whole["checkpoint"]).weights
    b = load_checkpoint(resumed["checkpoint"]).weights
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if lora:  # only the adapters are checkpointed
        assert all("lora_" in k for k in a)
    assert _logged_loops(tmp_path / "whole") == _logged_loops(tmp_path / "split")


def test_final_model_is_saved_merged_and_loads_back(files: dict[str, Path], tmp_path: Path) -> None:
    lora = LoraOptions(r=2, targets=["qkv", "proj", "fc_in", "fc_out"])
    result = finetune(
        _config(files, tmp_path / "run", lora=lora, steps=3, eval_file=str(files["test"]))
    )
    model, _ = load_model(result["model"])
    assert not lora_module_names(model)
    base, _ = load_model(files["base"])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.startswith("core.0.") and k.endswith(".weight") for k in changed)
    assert result["eval"]["n"] == 8 and set(result["eval"]["accuracy"]) == {"1", "3"}
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result["eval"]


# ------------------------------------------------- the run directory (shared with train)


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_dir_is_never_the_source_model(files: dict[str, Path], tmp_path: Path) -> None:
    # Issue 21 row 2: --init-from DIR --out-dir DIR overwrote DIR's config.json.
    source = pretrained.write_tiny_checkpoint(tmp_path / "ouro", arch="ouro", seed=1)
    before = _snapshot(source)
    cases = ((source, "is"), (tmp_path, "contains"), (source / "ft", "lies inside"))
    for out, relation in cases:
        for extra in ({}, {"overwrite": True}):
            config = _config(files, out, init_from=str(source), mode="sft", steps=1, **extra)
            match = f"out_dir {out} {relation} the model the run starts from"
            with pytest.raises(ValueError, match=match):
                finetune(config)
    assert _snapshot(source) == before
    assert pretrained.load(source).model_type == "ouro"  # still loads


def test_resuming_a_finished_run_to_more_steps_replaces_the_model(
    files: dict[str, Path], tmp_path: Path
) -> None:
    # Issue 21 row 3: out_dir/model kept the step-2 weights while the result said step 4.
    out = tmp_path / "run"
    finetune(_config(files, out, mode="sft", steps=2, eval_file=str(files["test"])))
    longer = finetune(
        _config(files, out, mode="sft", steps=4, eval_file=str(files["test"]), resume=True)
    )
    assert longer["step"] == 4 and load_checkpoint(longer["checkpoint"]).step == 4
    saved = load_model(longer["model"])[0].state_dict()
    final = load_checkpoint(longer["checkpoint"]).weights
    assert all(torch.equal(saved[k], final[k]) for k in final)
    assert json.loads((out / "eval.json").read_text()) == longer["eval"]
    again = finetune(_config(files, out, mode="sft", steps=4, resume=True))  # finished: kept
    assert again["step"] == 4 and again["model"] == longer["model"]


def test_a_non_finite_loss_stops_finetuning_and_saves_no_model(
    files: dict[str, Path], tmp_path: Path
) -> None:
    # Issue 21 row 8: a NaN loss trained on to the end and saved a NaN model.
    config = _config(files, tmp_path / "run", mode="sft", steps=6, lr=1e10, checkpoint_every=1)
    with pytest.raises(NonFiniteLoss, match=r"training diverged at step (\d+) \(loss nan") as stop:
        finetune(config)
    ckpt = load_checkpoint(config.out_dir)
    assert 2 <= stop.value.step <= 6 and ckpt.step == stop.value.step - 1
    assert stop.value.checkpoint == ckpt.path
    assert all(torch.isfinite(w).all() for w in ckpt.weights.values())
    assert not (tmp_path / "run" / "model").exists()


def test_finetune_reads_step_statistics_every_log_every_steps(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 22 row 5: the same records as a read per step; a NaN between reads is named.
    options = {"mode": "stars", "steps": 5, "checkpoint_every": 0, "penalty_start": 1}
    finetune(_config(files, tmp_path / "every", **options, log_every=1))
    reads = count_step_reads(monkeypatch)
    spaced = finetune(_config(files, tmp_path / "spaced", **options, log_every=2))
    assert reads == [2, 2, 1]  # steps 2, 4 and the end (5)

    def untimed(out: Path) -> list[dict[str, Any]]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]

    records = untimed(tmp_path / "spaced")
    assert records == untimed(tmp_path / "every") and len(records) == 5
    assert records[0]["penalty"] is None and records[1]["penalty"] is not None
    assert spaced["train"] == {k: v for k, v in records[-1].items() if k != "step"}

    diverging = _config(
        files, tmp_path / "nan", mode="sft", steps=8, lr=1e10, checkpoint_every=0, log_every=8
    )
    with pytest.raises(NonFiniteLoss, match=r"training diverged at step (\d+) \(loss nan") as stop:
        finetune(diverging)
    assert stop.value.step < 8 and stop.value.checkpoint is None
    assert not (tmp_path / "nan" / "checkpoints").exists()
    assert not (tmp_path / "nan" / "model").exists()
    logged = [r["step"] for r in untimed(tmp_path / "nan")]
    assert logged == list(range(1, stop.value.step + 1))  # nothing after the bad step


@pytest.mark.slow
def test_compiled_finetuning_equals_eager(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 22 row 7: compile=True (eqloop finetune --compile) compiles the model's step;
    # SFT and STARS steps (the penalty on the eager step) give the eager results. aot_eager
    # checks the plumbing in seconds (tests/training/test_train.py also runs inductor, slow).
    import eqloop.core.compiling
    import eqloop.recipes.finetune.train

    compiled: list[object] = []

    def compile_with(model: Any) -> Any:
        compiled.append(model)
        return eqloop.core.compiling.compile_model(model, backend="aot_eager")

    monkeypatch.setattr(eqloop.recipes.finetune.train, "compile_model", compile_with)
    options = {"mode": "stars", "steps": 3, "penalty_start": 1, "checkpoint_every": 0}
    eager = finetune(_config(files, tmp_path / "eager", **options))
    fast = finetune(_config(files, tmp_path / "compiled", **options, compile=True))
    assert len(compiled) == 1
    for key in ("loss", "ce", "penalty", "rho", "grad_norm"):
        assert fast["train"][key] == pytest.approx(eager["train"][key], rel=1e-4), key
    a, b = (load_checkpoint(r["checkpoint"]).weights for r in (eager, fast))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_penalty_start_as_a_fraction_of_finetuning(files: dict[str, Path], tmp_path: Path) -> None:
    # Issue 21 row 23: the same reading of penalty_start as eqloop train.
    finetune(_config(files, tmp_path / "half", mode="stars", steps=4, penalty_start=0.5))
    records = [
        json.loads(x) for x in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["penalty"] is None for r in records] == [True, True, False, False]
    with pytest.warns(UserWarning, match="starts at step 9 and the run ends at step 2"):
        finetune(_config(files, tmp_path / "late", mode="stars", steps=2, penalty_start=9))


def _finetune_command(files: dict[str, Path], out: Path, steps: int) -> list[str]:
    return [
        "finetune",
        "--init-from",
        str(files["base"]),
        "--train-file",
        str(files["train"]),
        "--out-dir",
        str(out),
        "--mode",
        "sft",
        "--steps",
        str(steps),
        "--no-progress",
        "--set",
        "batch_size=8",
        "--set",
        "checkpoint_every=0",
    ]


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_a_signal_checkpoints_finetuning_and_prints_the_resume_command(
    files: dict[str, Path],
    tmp_path: Path,
    processes: list[subprocess.Popen[str]],
    capsys: pytest.CaptureFixture[str],
    sig: signal.Signals,
) -> None:
    # Issue 21 row 6: Ctrl-C exited 130 without a checkpoint, SIGTERM killed it silently.
    run = tmp_path / "run"
    args = _finetune_command(files, run, steps=2000)
    command = shutil.which("eqloop")
    prefix = [command] if command else [sys.executable, "-m", "eqloop.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    processes.append(proc)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, err
    step = load_checkpoint(run).step
    assert 2 <= step < 2000
    saved = f"eqloop finetune: {sig.name} at step {step}: saved {run}/checkpoints/step_{step:08d}"
    assert line.startswith(saved + "; resume with: ")
    resume = shlex.split(line.split("; resume with: ", 1)[1])
    assert resume[-1] == "--resume" and resume[1:-1] == args
    # What a kill during a save leaves behind is cleaned when the run resumes.
    (run / "checkpoints" / ".step_00000099-k1ll3d").mkdir()
    (run / ".model-k1ll3d").mkdir()
    assert main([*resume[1:-1], "--resume", "--steps", str(step + 2)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == step + 2
    assert load_checkpoint(run).step == step + 2 and (run / "model").is_dir()
    assert [p.name for p in run.rglob(".*")] == []


def test_print_config_and_overwrite(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 21 row 26: --print-config failed (init_from must be a non-empty path), and
    # finetune had no --overwrite: the flags of train and finetune are one table.
    assert main(["finetune", "--print-config", "--set", "lam=0.2", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {**FinetuneConfig().to_dict(), "lam": 0.2, "device": "cpu"}
    assert printed["init_from"] == "" and printed["overwrite"] is False
    argv = _finetune_command(files, tmp_path / "run", steps=2)
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--steps", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "latest",
        "step_00000001",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--overwrite", "--resume"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        FinetuneConfig.from_dict({"overwrite": True, "resume": True}, complete=False)


# -------------------------------------------------------------------------------- DDP


def _worker(rank: int, world: int, configs: list[FinetuneConfig], out: str) -> None:
    for i, config in enumerate(configs):
        result = finetune(config)
        Path(out, f"run{i}_rank{rank}.json").write_text(json.dumps(result))


def _two_ranks(configs: list[FinetuneConfig], out: Path) -> list[list[dict]]:
    run_ranks(_worker, configs, str(out))
    return [
        [json.loads((out / f"run{i}_rank{r}.json").read_text()) for r in range(2)]
        for i in range(len(configs))
    ]


def _assert_same_model(a: str, b: str) -> None:
    model_a, model_b = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    for key, value in model_a.items():
        torch.testing.assert_close(model_b[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # 11 s; .ci/run runs it (-k ddp); train's DDP test stays in the default run
def test_ddp_two_ranks_gloo_match_one_process(files: dict[str, Path], tmp_path: Path) -> None:
    # Without the penalty 2 ranks x 4 rows compute the gradient of 1 process x 8 rows (the CE
    # is normalised by the target tokens of the global batch); with it, the run goes through.
    # Training at the fixed point (IFT) too: the solves' statistics are averaged over ranks.
    sft = _config(files, tmp_path / "sft", mode="sft", steps=3, grad_accum=2)
    stars = _config(files, tmp_path / "stars", mode="stars", steps=2)
    solve = _config(
        files,
        tmp_path / "solve",
        init_from=str(files["injected"]),
        mode="sft",
        steps=2,
        solve=SOLVE,
        backward="ift",
    )
    one = finetune(dataclasses.replace(sft, out_dir=str(tmp_path / "one")))
    (sft0, sft1), (stars0, _), (solve0, solve1) = _two_ranks([sft, stars, solve], tmp_path)
    assert solve0["train"] == solve1["train"] and solve0["train"]["loops"] is None
    assert 0 <= solve0["train"]["fwd_converged"] <= 1 and solve0["train"]["bwd_nfe"] >= 1
    assert sft0["model"] and "model" not in sft1  # only rank 0 writes
    assert sft0["train"]["loops"] == sft1["train"]["loops"] == one["train"]["loops"]
    assert sft0["train"]["ce"] == pytest.approx(one["train"]["ce"], rel=1e-5)
    _assert_same_model(one["model"], sft0["model"])
    assert stars0["train"]["penalty"] > 0


@pytest.mark.slow
def test_fsdp_two_ranks_gloo(files: dict[str, Path], tmp_path: Path) -> None:
    sft = _config(files, tmp_path / "sft", mode="sft", steps=3, parallel="fsdp")
    stars = _config(files, tmp_path / "stars", mode="stars", steps=2, parallel="fsdp")
    lora = dataclasses.replace(
        stars, out_dir=str(tmp_path / "lora"), lora=LoraOptions(r=2, targets=["qkv"])
    )
    one = finetune(dataclasses.replace(sft, out_dir=str(tmp_path / "one")))
    (sft0, _), (stars0, _), (lora0, _) = _two_ranks([sft, stars, lora], tmp_path)
    _assert_same_model(one["model"], sft0["model"])
    assert stars0["train"]["penalty"] > 0  # forward-mode (jvp) penalty under FSDP
    assert not lora_module_names(load_model(lora0["model"])[0])
    with pytest.raises(ValueError, match="penalty_product='vjp'.*FSDP"):
        dataclasses.replace(stars, penalty_product="vjp").validate()


@pytest.mark.parametrize(
    ("device", "error", "match"),
    [
        ("cpu0", ValueError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:<n>', got 'cpu0'"),
        ("cudax", ValueError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:<n>', got 'cudax'"),
        (5, TypeError, "device must be a non-empty string, got 5"),
    ],
)
def test_finetune_checks_the_run_options_as_train_does(
    device: object, error: type[Exception], match: str
) -> None:
    # One check (eqloop.config.check_run_options): finetune accepted any "cpu*"/"cuda*".
    finetune_config = FinetuneConfig(init_from="base", train_file="train.jsonl", device=device)
    for config in (finetune_config, TrainConfig(device=device)):
        with pytest.raises(error, match=re.escape(match)):
            config.validate()


def test_finetune_builds_the_sampler_and_backward_as_train_does() -> None:
    # One implementation (eqloop.config.TrainingConfigMixin) for both configs.
    depth = {"kind": "lognormal", "mu": 1.5, "sigma": 0.6, "lo": 1, "hi": 12}
    shared = dict(depth=depth, seed=3, backward="unroll")
    finetune_config = FinetuneConfig(init_from="base", train_file="train.jsonl", **shared)
    train_config = TrainConfig(**shared)
    a, b = finetune_config.make_sampler(), train_config.make_sampler()
    assert [a.sample() for _ in range(20)] == [b.sample() for _ in range(20)]
    # With a training solve both build the backward mode at the fixed point the same way;
    # unrolled, fine-tuning's is the loop's (None: every loop, or Truncated(backprop_loops)).
    solve = {"solver": "anderson", "tol": 1e-4, "max_iter": 10}
    at_fixed_point = {**shared, "backward": "phantom", "solve": solve}
    assert type(
        FinetuneConfig(init_from="base", train_file="train.jsonl", **at_fixed_point).make_backward()
    ) is type(TrainConfig(**at_fixed_point).make_backward())
    for config in (finetune_config, train_config):
        config.depth = {"mu": 1.0}
        with pytest.raises(TypeError, match="depth must be a dict with a 'kind' key"):
            config.validate()


# -------------------------------------------------------------------------------- CLI


def test_cli_runs_and_reports_bad_settings_in_one_line(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["finetune", "--init-from", str(files["base"]), "--no-progress"]

    def error(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert error([*base, "--train-file", str(files["train"]), "--set", "lam=2"]) == (
        "eqloop finetune: error: lam must be a number >= 0 and <= 1, got 2.0"
    )
    assert "must be an integer" in error([*base, "--train-file", "x", "--set", "steps=1.5"])
    assert "unknown FinetuneConfig keys: ['lamb']" in error([*base, "--set", "lamb=1"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": 3\n')
    message = error([*base, "--train-file", str(broken), "--out-dir", str(tmp_path / "x")])
    assert f"{broken}:2: invalid JSON" in message
    argv = [
        *base,
        "--train-file",
        str(files["train"]),
        "--out-dir",
        str(tmp_path / "run"),
        "--mode",
        "sft",
        "--steps",
        "2",
        "--lora",
        "--set",
        "batch_size=8",
        "--set",
        'lora.targets=["qkv"]',
    ]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert "already holds a training run (checkpoints up to step_00000002)" in error(argv)
    config = load_finetune_config(None, ["lora.r=4", "init_from=x", "train_file=y"])
    assert config.lora == LoraOptions(r=4)


def test_evaluating_on_the_training_examples_is_warned(
    files: dict[str, Path], tmp_path: Path
) -> None:
    # row 22: an eval file that is the train file (or shares its prompts) measures recall
    config = _config(
        files,
        tmp_path / "run",
        steps=1,
        eval_file=str(files["train"]),
        eval_limit=4,
        eval_loops=[1],
    )
    with pytest.warns(UserWarning, match=r"all 4 evaluation prompts are also training prompts"):
        finetune(config)
    copy = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            *[json.loads(line) for line in files["train"].read_text().splitlines()[:1]],
            *[json.loads(line) for line in files["test"].read_text().splitlines()[:3]],
        ],
    )
    config = _config(files, tmp_path / "run2", steps=1, eval_file=str(copy), eval_loops=[1])
    with pytest.warns(UserWarning, match=r"1 of 4 evaluation prompts are also training prompts"):
        finetune(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(
            _config(files, tmp_path / "run3", steps=1, eval_file=str(files["test"]), eval_loops=[1])
        )
    assert not [w for w in caught if "training prompts" in str(w.message)]


def test_backprop_loops_is_truncated_backprop_through_the_model_loop(
    files: dict[str, Path],
) -> None:
    # Issue 19: the config's backprop_loops is eqloop.Truncated(k) (FinetuneConfig.
    # make_backward), which the objective hands to the model's one loop: the gradient is
    # that of a loop whose first loops - k steps are detached.
    config = _config(files, Path("unused"), backprop_loops=2)
    assert config.make_backward() == Truncated(k=2)
    assert dataclasses.replace(config, backprop_loops=None).make_backward() is None
    model = load_for_finetuning(files["base"], dtype=torch.float64).model.eval()
    inputs = torch.randint(0, 8, (3, 10), generator=torch.Generator().manual_seed(0))
    targets = inputs.roll(-1, dims=1)

    def grads(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    objective = Objective(model, lam=0.0, backward=config.make_backward())
    truncated = grads(objective(inputs, targets, 5)[0])
    f, z = model.core_map(inputs)
    for t in range(5):
        z = f(z) if t >= 3 else f(z).detach()
    logits = model.readout(z).float()  # as the objective takes the CE
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(truncated, grads(ce), rtol=1e-12, atol=0)
    full = grads(Objective(model, lam=0.0)(inputs, targets, 5)[0])
    assert truncated.shape != full.shape or not torch.allclose(truncated, full)


def test_bf16_autocast_forward_with_a_float32_penalty(files: dict[str, Path]) -> None:
    loaded = load_for_finetuning(files["base"])
    inputs, targets = encode_examples(
        load_jsonl(files["train"])[:8], loaded.tokenizer, PromptTemplate(), max_len=64
    )
    seen: list[torch.dtype] = []
    qkv = loaded.model.core[0].attn.fn.qkv
    hook = qkv.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    objective = Objective(loaded.model, lam=0.5, autocast=True, grad_checkpointing=True)
    loss, ce, penalty, rho = objective(inputs, targets, 3, True, torch.Generator().manual_seed(0))
    hook.remove()
    loss.backward()
    # three loops in bf16 (checkpointed), then the penalty's application of the map in float32
    assert seen == [torch.bfloat16] * 3 + [torch.float32]
    assert penalty.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in loaded.model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_a_finetune_toml_and_set_merge_by_trains_rule(tmp_path: Path) -> None:
    # Issue 19: load_finetune_config is eqloop.config.load_config_data, as train's loader:
    # a file's section updates the defaults entry by entry, --set reaches one entry, and an
    # unknown key of a file's section is named with the file and section.
    file = tmp_path / "ft.toml"
    file.write_text('init_from = "x"\ntrain_file = "y"\n[lora]\nalpha = 32.0\n')
    config = load_finetune_config(file, ["lora.r=4"])
    assert config.lora == LoraOptions(r=4, alpha=32.0)
    assert load_finetune_config(file, ["lora=null"]).lora is None
    file.write_text('init_from = "x"\ntrain_file = "y"\n[lora]\nrank = 4\n')
    with pytest.raises(ValueError, match=r"unknown LoraOptions keys in lora of .*ft\.toml"):
        load_finetune_config(file)
    # A whole config as to_dict() writes it (lora and solve null) loads back.
    config = load_finetune_config(None, ["init_from=x", "train_file=y", "lora.r=4"])
    config.lora = None
    saved = tmp_path / "ft.json"
    saved.write_text(json.dumps(config.to_dict()))
    assert load_finetune_config(saved).to_dict() == config.to_dict()


def test_a_lora_field_added_after_a_run_was_saved_counts_as_its_default() -> None:
    config = FinetuneConfig(lora=LoraOptions(r=4)).to_dict()
    saved = json.loads(json.dumps(config))
    del saved["lora"]["dropout"]  # as saved before the field existed
    assert run_dir.changed_fields(saved, config, frozenset(), schema=FinetuneConfig) == []
    # Without the schema the missing field reads as a change; set differently, it is one.
    assert run_dir.changed_fields(saved, config, frozenset()) == ["lora"]
    other = FinetuneConfig(lora=LoraOptions(r=4, dropout=0.1)).to_dict()
    assert run_dir.changed_fields(saved, other, frozenset(), schema=FinetuneConfig) == ["lora"]
    # A run saved without LoRA keeps its section unset: switching LoRA on is a change.
    full = FinetuneConfig().to_dict()
    assert run_dir.changed_fields(full, config, frozenset(), schema=FinetuneConfig) == ["lora"]
