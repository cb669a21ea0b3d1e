"""Tests for eqloop.evaluation and eqloop.training.checkpoint: exact match, diagnostics."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import solvers
from eqloop.data import CharTokenizer
from eqloop.data.qa import Example, PromptTemplate, encode_examples
from eqloop.data.tokenizers import TextTokenizer, as_text_tokenizer
from eqloop.evaluation import (
    DECODES,
    EvalSet,
    accuracy_vs_loops,
    check_options,
    correct_answers,
    early_exit,
    equilibrium,
    equilibrium_diagnostics,
    evaluate_checkpoint,
    exact_match,
    format_result,
    format_table,
    greedy_generate,
    loop_diagnostics,
    make_test_set,
    plot_results,
    quantiles,
    unrolled,
)
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig
from eqloop.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)
from eqloop.training.config import TrainConfig

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


# ------------------------------------------------- issue 19: one evaluation path


def text_setup() -> tuple[LoopLM, TextTokenizer, list[Example]]:
    """A tiny LoopLM without input injection over printable characters, its tokenizer
    and two word-problem examples."""
    tokenizer = as_text_tokenizer(CharTokenizer.printable())
    config = LoopLMConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_heads=2,
        d_ff=64,
        max_seq_len=48,
        injection="none",
        init_std=0.3,
    )
    torch.manual_seed(0)
    examples = [Example(f"{a} + {b}", f" {a + b}", str(a + b)) for a, b in [(2, 3), (4, 4)]]
    return LoopLM(config).eval(), tokenizer, examples


def test_text_equilibrium_passes_start_loops_compact_and_stop_mode_to_the_solve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before, eqloop.recipes.finetune.evaluate's equilibrium predictor called solvers.solve with
    # tol and max_iter only: start_loops, compact and stop_mode were dropped.
    model, tokenizer, examples = text_setup()
    calls: list[tuple[Tensor, dict[str, Any]]] = []
    solve = solvers.solve

    def spy(f: Any, z0: Tensor, *args: Any, **kwargs: Any) -> solvers.SolveResult:
        calls.append((z0, kwargs))
        return solve(f, z0, *args, **kwargs)

    monkeypatch.setattr(solvers, "solve", spy)
    options = {"start_loops": 3, "stop_mode": "abs", "compact": False}
    result = accuracy_vs_loops(
        model,
        tokenizer,
        examples,
        loops=[1],
        solver="anderson",
        tol=1e-3,
        max_iter=7,
        solver_options=options,
        decode="forced",
    )
    eq = result["equilibrium"]
    assert {k: eq[k] for k in options} == options and eq["max_iter"] == 7
    solves = [(z0, kw) for z0, kw in calls if kw.get("max_iter") == 7]
    assert len(solves) == 1  # the one forced pass at equilibrium
    z0, kwargs = solves[0]
    assert kwargs["stop_mode"] == "abs" and kwargs["compact"] is False and kwargs["tol"] == 1e-3
    # The solve starts from the state after 3 loops, not from z0.
    template = PromptTemplate()
    inputs, _ = encode_examples(examples, tokenizer, template, max_len=1 << 30)
    with torch.no_grad():
        after_3 = model.unroll(inputs, 3)
    assert torch.allclose(z0, after_3, atol=1e-6)
    assert not torch.allclose(z0, model.unroll(inputs, 0), atol=1e-3)


def test_the_equilibrium_predictor_reads_out_where_its_start_puts_it() -> None:
    # The same predictor scores fixed-format and free-text answers: with tol 0 and the
    # last iterate, fixed_point for 5 steps after 3 loops is 8 loops, after 0 it is 5.
    model, tokenizer, examples = text_setup()
    inputs, _ = encode_examples(examples, tokenizer, PromptTemplate(), max_len=1 << 30)
    with torch.no_grad():
        for start in (0, 3):
            predict = equilibrium(
                model, "fixed_point", max_iter=5, tol=0.0, start_loops=start, output="last"
            )
            logits = predict(inputs)
            assert torch.allclose(logits, model(inputs, loops=start + 5), atol=1e-5)
            assert predict.solved == len(examples) and predict.converged_share is not None
            assert predict.cache_loops is None  # no KV-cache shortcut at equilibrium
    assert unrolled(model, 4).cache_loops == 4 and early_exit(model, 4, 0.1).cache_loops is None
    with torch.no_grad():
        got = early_exit(model, 6, 1e-2)(inputs)
        want = model(inputs, loops=6, exit_threshold=1e-2)
    assert torch.equal(got, want)


def test_one_decode_vocabulary() -> None:
    model, tokenizer, examples = text_setup()
    assert DECODES == ("greedy", "forced")
    message = r"unknown decode 'generate'; valid: \['greedy', 'forced'\] \('generate' is now"
    with pytest.raises(ValueError, match=message):
        accuracy_vs_loops(model, tokenizer, examples, loops=[1], decode="generate")
    with pytest.raises(ValueError, match=message):
        check_options([1], decode="generate")
    greedy = accuracy_vs_loops(
        model, tokenizer, examples, loops=[1], equilibrium=False, max_new_tokens=3
    )
    assert greedy["decode"] == "greedy" and set(greedy["accuracy"]) == {"1"}


def test_greedy_generate_stops_each_row_where_it_ends() -> None:
    # Rows stop at eos (left out), at a stop text (kept) or at their first token that
    # differs from the reference (kept); the others run to max_new_tokens.
    vocab = 6

    def predict(tokens: Tensor) -> Tensor:
        """Next token = (last token + 1) mod vocab, as logits."""
        return torch.nn.functional.one_hot((tokens + 1) % vocab, vocab).float()

    prompts = [[0], [3], [1, 2]]
    assert greedy_generate(predict, prompts, max_new_tokens=4, eos_id=5) == [
        [1, 2, 3, 4],
        [4],
        [3, 4],
    ]
    refs = [[1, 2, 0, 0], [4, 5, 0, 1], [3, 3, 3, 3]]
    got = greedy_generate(predict, prompts, max_new_tokens=4, eos_id=None, references=refs)
    assert got == [[1, 2, 3], [4, 5, 0, 1], [3, 4]]
    text = greedy_generate(
        predict, [[0]], max_new_tokens=4, eos_id=None, stop_texts=["2"], decode=str
    )
    assert text == [[1, 2]]
    with pytest.raises(ValueError, match="references must hold max_new_tokens"):
        greedy_generate(predict, prompts, max_new_tokens=4, eos_id=None, references=refs[:2])


def test_one_table_formatter() -> None:
    from benchmarks import common

    rows = [{"name": "anderson", "nfe": 12, "res": 3.14159e-6}, {"name": "broyden", "res": None}]
    columns = [("name", "solver", ""), ("nfe", "f-evals", "d"), ("res", "residual", ".2e")]
    assert format_table(rows, columns) == (
        "  solver  f-evals  residual\n"
        "--------  -------  --------\n"
        "anderson       12  3.14e-06\n"
        " broyden        -         -"
    )
    assert format_table(rows[:1], columns[:2], rule=False) == "  solver  f-evals\nanderson       12"
    assert format_table([{"x": float("nan")}], [("x", "x", ".3f")]).endswith("nan")
    assert common.format_table is format_table  # the benchmarks print with the same one
