"""Tests for eqloop.evaluation and eqloop.checkpoint: exact match, diagnostics, corruption."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from torch import Tensor

from eqloop.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from eqloop.config import TrainConfig
from eqloop.evaluation import (
    EvalSet,
    check_options,
    correct_answers,
    equilibrium,
    equilibrium_diagnostics,
    evaluate_checkpoint,
    exact_match,
    format_result,
    loop_diagnostics,
    make_test_set,
    plot_results,
    quantiles,
    unrolled,
)
from eqloop.model import LoopLM, LoopLMConfig

MODEL = LoopLMConfig(vocab_size=19, d_model=32, n_heads=2, d_ff=64, max_seq_len=16)


def reference_greedy(model: LoopLM, prompts: Tensor, n_new: int, loops: int) -> Tensor:
    """Plain greedy decoding, one token at a time, no shortcuts: (N, n_new)."""
    seq = prompts
    with torch.no_grad():
        for _ in range(n_new):
            token = model(seq, loops=loops)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat((seq, token), dim=1)
    return seq[:, prompts.shape[1] :]


def half_right_set(model: LoopLM, loops: int, n: int = 40) -> tuple[EvalSet, Tensor]:
    """A test set whose references are the model's own greedy output on even rows only.

    Odd rows get one wrong token at a row-dependent position, so the expected verdict is
    known exactly.
    """
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 19, (n, 6), generator=generator)
    targets = reference_greedy(model, prompts, 4, loops)
    expected = torch.arange(n) % 2 == 0
    for i in range(1, n, 2):
        j = i % 4
        targets[i, j] = (targets[i, j] + 1 - 3) % 16 + 3
    return EvalSet(prompts, targets), expected


@pytest.fixture(scope="module")
def model() -> LoopLM:
    torch.manual_seed(0)
    # A large init makes the untrained model's predictions depend on its input.
    return LoopLM(LoopLMConfig(**{**MODEL.to_dict(), "init_std": 0.3})).eval()


@pytest.mark.parametrize("loops", [1, 3])
def test_greedy_and_forced_give_the_exact_verdicts(model: LoopLM, loops: int) -> None:
    data, expected = half_right_set(model, loops)
    for decode in ("greedy", "forced"):
        got = correct_answers(unrolled(model, loops), data, decode=decode, batch_size=16)
        assert torch.equal(got, expected), decode
    assert exact_match(unrolled(model, loops), data) == 0.5


def test_bad_decode_is_rejected(model: LoopLM) -> None:
    data, _ = half_right_set(model, 1, n=4)
    with pytest.raises(ValueError, match="unknown decode 'beam'"):
        exact_match(unrolled(model, 1), data, decode="beam")


def test_equilibrium_matches_many_loops_for_a_contractive_core() -> None:
    torch.manual_seed(1)
    model = LoopLM(MODEL).eval()  # small init: the core is a strong contraction
    data, _ = half_right_set(model, 64)
    many = correct_answers(unrolled(model, 64), data)
    at_eq = correct_answers(equilibrium(model, "anderson", tol=1e-6), data)
    assert torch.equal(many, at_eq)

    inputs = data.inputs[:16]
    diag = loop_diagnostics(model, inputs, [1, 2, 8])
    assert [d["loops"] for d in diag] == [1, 2, 8]
    assert diag[2]["step_norm"] < diag[1]["step_norm"]
    assert all(0 <= d["rho"]["q50"] < 1 and d["rho"]["share_below_1"] == 1.0 for d in diag)
    eq = equilibrium_diagnostics(model, inputs, "anderson", tol=1e-5)
    assert eq["converged"] == 1.0 and eq["contraction"]["share_rho_below_1"] == 1.0
    assert eq["contraction"]["rho"]["q100"] < 1


def test_a_solver_can_start_after_some_loops() -> None:
    torch.manual_seed(0)
    config = LoopLMConfig(
        vocab_size=19,
        d_model=32,
        n_heads=2,
        d_ff=64,
        max_seq_len=16,
        injection="none",
        init_std=0.5,
    )
    model = LoopLM(config).eval()  # far from a contraction: every loop changes the logits
    tokens = torch.randint(0, 19, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for start in (0, 3):
            # tol 0 and the last iterate: the solver is 5 plain loops after `start` loops.
            solve = equilibrium(
                model, "fixed_point", max_iter=5, tol=0.0, start_loops=start, output="last"
            )
            logits = solve(tokens)
            assert torch.allclose(logits, model(tokens, loops=start + 5), atol=1e-5)
            assert not torch.allclose(logits, model(tokens, loops=start + 4), atol=1e-2)
            # The model's own equilibrium mode starts the same way.
            forward = model(
                tokens, solver="fixed_point", max_iter=5, tol=0.0, output="last", start_loops=start
            )
            assert torch.allclose(forward, logits, atol=1e-5)
    with pytest.raises(ValueError, match="start_loops"):
        model(tokens, solver="anderson", start_loops=-1)
    with pytest.raises(TypeError, match=r"\['start_loops'\] apply to equilibrium mode only"):
        model(tokens, loops=2, start_loops=3)
    with pytest.raises(ValueError, match="start_loops"):
        equilibrium(model, "anderson", start_loops=-1)
    with pytest.raises(ValueError, match="start_loops"):
        check_options([1], "anderson", {"start_loops": -2})


def test_quantiles() -> None:
    q = quantiles(torch.arange(11.0))
    assert q["mean"] == 5 and q["q0"] == 0 and q["q50"] == 5 and q["q90"] == 9 and q["q100"] == 10


# ------------------------------------------------------------------ checkpoints and eval


def write_checkpoint(run: Path, cache: Path, step: int = 7) -> TrainConfig:
    config = TrainConfig(
        model=MODEL,
        digits=2,
        n_train=128,
        n_test=32,
        batch_size=32,
        out_dir=str(run),
        data_cache_dir=str(cache),
    )
    torch.manual_seed(0)
    save_checkpoint(
        run,
        step,
        weights=LoopLM(MODEL).state_dict(),
        config=config.to_dict(),
        metrics={"step": step},
        training_state={"note": torch.zeros(2)},
    )
    return config


def test_evaluate_checkpoint_json_and_plot(tmp_path: Path) -> None:
    config = write_checkpoint(tmp_path / "run", tmp_path / "cache")
    result = evaluate_checkpoint(
        tmp_path / "run", loops=[1, 4], solver="anderson", diagnostic_samples=8, rho_iters=6
    )
    assert result["step"] == 7 and result["n_test"] == config.n_test
    assert set(result["accuracy"]) == {"1", "4"}
    assert [d["loops"] for d in result["diagnostics"]] == [1, 4]
    eq = result["equilibrium"]
    assert 0 <= eq["accuracy"] <= 1 and 0 <= eq["contraction"]["share_rho_below_1"] <= 1
    json.dumps(result)  # serialisable
    plot = tmp_path / "acc.png"
    plot_results([result, result], plot)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert len(make_test_set(config)) == config.n_test


def test_checkpoint_layout_and_resolution(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, tmp_path / "cache", step=3)
    write_checkpoint(run, tmp_path / "cache", step=5)
    write_checkpoint(run, tmp_path / "cache", step=5)  # the same step again: replaced
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000005"
    assert resolve_checkpoint(run / "checkpoints") == latest_checkpoint(run)
    assert resolve_checkpoint(run / "checkpoints" / "step_00000003").name == "step_00000003"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    ckpt = load_checkpoint(run)
    assert ckpt.step == 5 and torch.equal(ckpt.training_state()["note"], torch.zeros(2))
    model, _ = load_model(run)
    assert not model.training
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path)


def test_checkpoint_step_must_agree_with_its_directory_and_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, tmp_path / "cache", step=7)
    step7 = run / "checkpoints" / "step_00000007"
    manifest = json.loads((step7 / "manifest.json").read_text())
    (step7 / "manifest.json").write_text(json.dumps({**manifest, "step": 5}))
    message = (
        "manifest.json says step 5, but the weights' step is 7 and the directory name's step is 7"
    )
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(run)
    with pytest.raises(CheckpointError, match=message):
        evaluate_checkpoint(run, loops=[1], diagnostics=False)
    # A checkpoint copied under another name is still readable: its weights hold the step.
    (step7 / "manifest.json").write_text(json.dumps(manifest))
    best = tmp_path / "best"
    shutil.copytree(step7, best)
    assert load_checkpoint(best).step == 7


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_permissions_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        write_checkpoint(tmp_path / "run", tmp_path / "cache")
    finally:
        os.umask(previous)
    step = latest_checkpoint(tmp_path / "run")
    assert step is not None
    assert stat.S_IMODE(step.stat().st_mode) == 0o777 & ~umask
    for file in [*step.iterdir(), step.parent / "latest"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def test_format_result_shows_every_loop_count_and_the_equilibrium(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "run", tmp_path / "cache")
    result = evaluate_checkpoint(
        tmp_path / "run", loops=[0, 1, 4], solver="anderson", diagnostic_samples=8, rho_iters=4
    )
    lines = format_result(result).split("\n")
    assert lines[0].endswith("(step 7; 2-digit addition, 32 test problems, greedy decoding)")
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert list(rows) == ["0", "1", "4", "eq"]
    assert rows["0"][2:] == ["-"] * 5  # no diagnostics before the first loop
    by_depth = {d["loops"]: d for d in result["diagnostics"]}
    assert rows["4"][1] == f"{result['accuracy']['4']:.3f}"
    assert rows["4"][3] == f"{by_depth[4]['state_norm']:.3g}"
    assert rows["4"][-1] == f"{by_depth[4]['rho']['share_below_1']:.0%}"
    assert lines[-1].startswith("  eq: anderson, max_iter 100, tol 0.0001;")
    plain = evaluate_checkpoint(tmp_path / "run", loops=[1], diagnostics=False)
    assert format_result(plain).split("\n")[1].split() == ["loops", "accuracy"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_checkpoint_raises_checkpoint_error(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, tmp_path / "cache")
    step = latest_checkpoint(run)
    assert step is not None
    weights = step / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        weights.unlink()
    else:
        (step / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=str(step)):
        load_checkpoint(run)
    with pytest.raises(CheckpointError):
        evaluate_checkpoint(run, loops=[1], diagnostics=False)
