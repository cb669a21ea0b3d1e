"""Tests for eqloop.recipes.train: a tiny run, exact resume, bad input, DDP, penalty overhead."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import (
    TINY_TRAIN_MODEL,
    count_step_reads,
    read_jsonl,
    run_torchrun,
    same_weights,
    tiny_train_config,
)
from ranks import run_ranks
from torch.nn.parallel import DistributedDataParallel

from eqloop.recipes.train import (
    NonFiniteLoss,
    TrainingInterrupted,
    batch_rows,
    lr_factor,
    penalty_overhead,
    train,
    train_step,
)
from eqloop.training.checkpoint import CheckpointError, load_checkpoint
from eqloop.training.config import TrainConfig, load_config


class Stop(Exception):
    """Raised by on_eval to interrupt a run."""


# ------------------------------------------------------------------------ the main path


def test_tiny_run_learns_checkpoints_and_resumes_bit_identically(
    tmp_path: Path, data_cache: Path
) -> None:
    config = tiny_train_config(
        tmp_path / "a", data_cache, model={**TINY_TRAIN_MODEL, "dropout": 0.1}
    )
    seen: list[int] = []
    result = train(config, on_eval=lambda step, metrics: seen.append(step))
    assert seen == [12, 24]
    assert result["step"] == 24 and set(result["eval"]["accuracy"]) == {"1", "2", "4"}

    records = read_jsonl(Path(config.out_dir) / "metrics.jsonl")
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert all(1 <= r["loops"] <= 3 for r in steps)  # one logged depth per batch
    assert steps[0]["penalty"] is None and steps[10]["penalty"] is not None  # warm-up
    first = sum(r["ce"] for r in steps[:3]) / 3
    last = sum(r["ce"] for r in steps[-3:]) / 3
    assert last < first - 0.3, (first, last)

    ckpt = load_checkpoint(config.out_dir)
    assert ckpt.path.name == "step_00000024" and ckpt.step == 24
    assert {p.name for p in ckpt.path.iterdir()} == {
        "model.safetensors",
        "config.json",
        "metrics.json",
        "training_state.pt",
        "manifest.json",
    }
    assert TrainConfig.from_dict(ckpt.config) == config

    # Interrupt a second run at step 12 (on_eval raises after the evaluation) ...
    interrupted = dataclasses.replace(config, out_dir=str(tmp_path / "b"))

    def stop_at_12(step: int, metrics: dict[str, Any]) -> None:
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        train(interrupted, on_eval=stop_at_12)
    assert load_checkpoint(interrupted.out_dir).step == 12  # saved before propagating
    # ... and resume it: bit-identical weights and the same metrics history.
    resumed = train(dataclasses.replace(interrupted, resume=True))
    assert resumed["step"] == 24
    assert same_weights(Path(config.out_dir), Path(interrupted.out_dir))
    strip = [{k: v for k, v in r.items() if "time" not in k} for r in records]
    again = read_jsonl(Path(interrupted.out_dir) / "metrics.jsonl")
    assert strip == [{k: v for k, v in r.items() if "time" not in k} for r in again]

    # A finished run resumed again does nothing.
    assert train(dataclasses.replace(interrupted, resume=True))["step"] == 24


def test_backward_modes_other_than_unroll_train(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(
        tmp_path,
        data_cache,
        steps=6,
        eval_every=0,
        backward="truncated",
        backward_options={"k": 1},
    )
    result = train(config)
    assert math.isfinite(result["train"]["loss"])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"task": "division"}, "task must be one of 'addition', .*; got 'division'"),
        ({"digits": 0}, "digits must be an integer >= 1"),
        ({"lam": 1.5}, "lam must be a number >= 0 and <= 1, got 1.5"),
        ({"lam": -0.1}, "lam must be a number >= 0 and <= 1, got -0.1"),
        ({"lam": "0.1"}, "lam must be a number, got str '0.1'"),
        ({"resume": "no"}, "resume must be true or false, got str 'no'"),
        ({"betas": 0.9}, r"betas must be two numbers like \(0.9, 0.98\)"),
        ({"eval_loops": 5}, "eval_loops must be a non-empty list of integers"),
        ({"device": 5}, "device must be a non-empty string"),
        ({"device": "tpu"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:<n>'"),
        ({"out_dir": 5}, "out_dir must be a non-empty string"),
        ({"backward": "ift", "backward_options": {"solvr": 1}}, r"backward_options: .*\['solvr'\]"),
        ({"backward": "truncated", "backward_options": {"k": 0}}, "Truncated.k must be"),
        ({"resume": True, "overwrite": True}, "resume and overwrite exclude each other"),
        ({"bogus": 1}, "unknown TrainConfig keys: \\['bogus'\\]; valid keys are"),
        ({"model": {"d_modle": 8}}, "unknown LoopLMConfig keys"),
        ({"depth": {"kind": "gaussian"}}, "unknown depth sampler kind"),
        ({"backward": "adjoint"}, "backward must be one of"),
        ({"eval_loops": []}, "eval_loops"),
    ],
)
def test_bad_config_is_rejected_before_anything_is_written(
    tmp_path: Path, data_cache: Path, override: dict[str, Any], message: str
) -> None:
    data = {**tiny_train_config(tmp_path, data_cache).to_dict(), **override}
    with pytest.raises((ValueError, TypeError), match=message):
        TrainConfig.from_dict(data)
    if not {"bogus", "model"} & set(override):  # train() validates a config changed later
        config = tiny_train_config(tmp_path, data_cache)
        for key, value in override.items():
            setattr(config, key, value)
        with pytest.raises((ValueError, TypeError), match=message):
            train(config)
    assert not (tmp_path / "run").exists()


def test_config_file_and_overrides(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(
        json.dumps({"lam": 0.2, "model": {"d_model": 32}, "depth": {"kind": "fixed", "t": 4}})
    )
    config = load_config(
        file, ["model.n_heads=2", "depth.t=6", "task=addition", "eval_loops=[1,3]"]
    )
    assert (config.lam, config.model.d_model, config.model.n_heads) == (0.2, 32, 2)
    assert config.depth == {"kind": "fixed", "t": 6} and config.eval_loops == [1, 3]
    toml = tmp_path / "c.toml"
    toml.write_text("lam = 0.3\n[model]\nd_model = 32\n")
    assert load_config(toml).lam == 0.3
    file.write_text(json.dumps({"lamda": 0.2}))
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys .*\['lamda'\]; valid keys"):
        load_config(file)
    with pytest.raises(ValueError, match="must look like key=value"):
        load_config(None, ["lam"])


def test_a_config_file_written_by_to_dict_loads_back(tmp_path: Path) -> None:
    # Issue 19: a file holding a whole config (solve null, as to_dict() writes it) is read
    # by the one loader; the null optional section stays off, a section switches it on.
    config = TrainConfig(lam=0.2, eval_loops=[1, 3])
    assert config.solve is None
    file = tmp_path / "c.json"
    file.write_text(json.dumps(config.to_dict()))
    assert load_config(file).to_dict() == config.to_dict()
    file.write_text(json.dumps({"solve": {"solver": "anderson"}, "backward": "ift"}))
    assert load_config(file).solve.solver == "anderson"
    file.write_text(json.dumps({**config.to_dict(), "solve": None}))
    assert load_config(file, ["solve.solver=anderson", "backward=ift"]).solve.solver == "anderson"


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(tmp_path, data_cache, steps=2, eval_every=0)
    train(config)
    before = {p: p.read_bytes() for p in Path(config.out_dir).rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds a training run"):
        train(config)
    with pytest.raises(ValueError, match=r"differs from .*step_00000002 in \['lr'\]"):
        train(dataclasses.replace(config, resume=True, lr=1e-2))
    after = {p: p.read_bytes() for p in Path(config.out_dir).rglob("*") if p.is_file()}
    assert before == after


def test_a_run_saved_before_a_field_existed_resumes_at_that_fields_default(
    tmp_path: Path, data_cache: Path
) -> None:
    config = tiny_train_config(tmp_path, data_cache, steps=2, eval_every=0)
    train(config)
    step = load_checkpoint(config.out_dir).path  # rewrite it as an older eqloop wrote it
    saved = json.loads((step / "config.json").read_text())
    del saved["penalty_product"]
    (step / "config.json").write_text(json.dumps(saved))
    manifest = json.loads((step / "manifest.json").read_text())
    digest = hashlib.sha256((step / "config.json").read_bytes()).hexdigest()
    manifest["files"]["config.json"] = digest
    (step / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"differs from .* in \['penalty_product'\]"):
        train(dataclasses.replace(config, resume=True, steps=3, penalty_product="jvp"))
    assert train(dataclasses.replace(config, resume=True, steps=3))["step"] == 3


def test_corrupted_checkpoint_is_reported_and_nothing_is_overwritten(
    tmp_path: Path, data_cache: Path
) -> None:
    config = tiny_train_config(tmp_path, data_cache, steps=2, eval_every=0)
    train(config)
    weights = load_checkpoint(config.out_dir).path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in Path(config.out_dir).rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="corrupted: model.safetensors"):
        train(dataclasses.replace(config, resume=True, steps=4))
    after = {p: p.read_bytes() for p in Path(config.out_dir).rglob("*") if p.is_file()}
    assert before == after


# --------------------------------------------------------------------- run directories


def snapshot(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path: Path, data_cache: Path) -> TrainConfig:
    """A finished 3-step run with a checkpoint after every step."""
    config = tiny_train_config(tmp_path, data_cache, steps=3, eval_every=0, checkpoint_every=1)
    train(config)
    return config


def test_a_run_directory_is_never_reused_without_an_explicit_choice(
    tmp_path: Path, finished: TrainConfig
) -> None:
    # Row 5: a copy of a finished run without its `latest` pointer.
    copy = tmp_path / "copy"
    shutil.copytree(finished.out_dir, copy)
    (copy / "checkpoints" / "latest").unlink()
    before = snapshot(copy)
    other = dataclasses.replace(finished, out_dir=str(copy), lam=0.9, steps=1)
    with pytest.raises(ValueError, match="already holds a training run") as refused:
        train(other)
    message = str(refused.value)
    assert "step_00000003" in message and "--resume" in message and "--overwrite" in message
    with pytest.raises(ValueError, match=r"differs from .*step_00000003 in \['lam'\]"):
        train(dataclasses.replace(other, resume=True))
    assert snapshot(copy) == before
    # The same run resumes from its newest checkpoint, pointer or not ...
    resumed = train(dataclasses.replace(finished, out_dir=str(copy), resume=True, steps=5))
    assert resumed["step"] == 5 and load_checkpoint(copy).step == 5
    steps = [r["step"] for r in read_jsonl(copy / "metrics.jsonl") if "event" not in r]
    assert steps == [1, 2, 3, 4, 5]
    # ... and overwrite replaces the whole run.
    train(dataclasses.replace(other, overwrite=True))
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert [r.get("event", r["step"]) for r in read_jsonl(copy / "metrics.jsonl")] == [1, "eval"]
    assert TrainConfig.from_dict(load_checkpoint(copy).config).lam == 0.9


def test_a_directory_with_run_files_but_no_checkpoint(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(tmp_path, data_cache, steps=2, eval_every=0)
    run = Path(config.out_dir)
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already holds a training run \(metrics.jsonl\)"):
        train(config)
    with pytest.raises(ValueError, match="no checkpoint and no config.json"):
        train(dataclasses.replace(config, resume=True))
    # A run killed before its first checkpoint (config.json written) starts again on resume.
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    assert train(dataclasses.replace(config, resume=True))["step"] == 2
    assert (run / "notes.txt").read_text() == "mine"  # not a file of the run: left alone
    assert [r.get("event", r["step"]) for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, "eval"]


def test_an_edited_manifest_step_is_refused(tmp_path: Path, finished: TrainConfig) -> None:
    # Row 6: the manifest claims step 2 for the step-3 weights and optimizer state.
    step3 = Path(finished.out_dir) / "checkpoints" / "step_00000003"
    manifest = json.loads((step3 / "manifest.json").read_text())
    (step3 / "manifest.json").write_text(json.dumps({**manifest, "step": 2}))
    with pytest.raises(CheckpointError, match="manifest.json says step 2, but the weights' step"):
        train(dataclasses.replace(finished, resume=True, steps=5))
    # Renamed to match, the directory still holds weights saved at step 3.
    shutil.rmtree(step3.with_name("step_00000002"))
    step3.rename(step3.with_name("step_00000002"))
    with pytest.raises(CheckpointError, match="but the weights' step is 3$"):
        train(dataclasses.replace(finished, resume=True, steps=5))


def test_a_torn_last_metrics_line_is_dropped_on_resume(finished: TrainConfig) -> None:
    # Row 7: a crash in the middle of a write leaves half a record without its newline.
    log = Path(finished.out_dir) / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:5: dropped the incomplete last line"):
        train(dataclasses.replace(finished, resume=True, steps=4))
    assert [r.get("event", r["step"]) for r in read_jsonl(log)] == [1, 2, 3, "eval", 4, "eval"]
    # Any other damage is an error naming the file and line; nothing is changed.
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], '{"step": 2, "lo', *lines[2:]]) + "\n")
    before = snapshot(Path(finished.out_dir))
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        train(dataclasses.replace(finished, resume=True, steps=6))
    assert snapshot(Path(finished.out_dir)) == before


def test_stale_staging_is_removed_and_permissions_follow_the_umask(
    tmp_path: Path, data_cache: Path
) -> None:
    # Row 8: what a SIGKILL during a save leaves behind.
    config = tiny_train_config(tmp_path, data_cache, steps=2, eval_every=0, checkpoint_every=1)
    previous = os.umask(0o027)
    try:
        train(dataclasses.replace(config, steps=1))
        root = Path(config.out_dir) / "checkpoints"
        (root / ".step_00000002-k1ll3d").mkdir()
        (root / ".step_00000002-k1ll3d" / "model.safetensors").write_bytes(b"half")
        (root / ".latest-abc123").write_text("step_0000")
        (Path(config.out_dir) / ".config-xyz.json").write_text("{")
        train(dataclasses.replace(config, resume=True))
    finally:
        os.umask(previous)
    hidden = [p.name for p in Path(config.out_dir).rglob(".*")]
    assert hidden == []
    step = root / "step_00000002"
    assert stat.S_IMODE(step.stat().st_mode) == 0o750
    for file in [*step.iterdir(), root / "latest", Path(config.out_dir) / "config.json"]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o640, file


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_resume_is_exact(
    tmp_path: Path, data_cache: Path, sig: signal.Signals
) -> None:
    # Row 12: the signal arrives during step 4; the run stops after it with a checkpoint.
    config = tiny_train_config(
        tmp_path / "a", data_cache, steps=8, eval_every=2, checkpoint_every=0
    )
    reference = train(config)

    def send(step: int, metrics: dict[str, Any]) -> None:
        if step == 4:
            os.kill(os.getpid(), sig)

    interrupted = dataclasses.replace(config, out_dir=str(tmp_path / "b"))
    before = signal.getsignal(sig)
    with pytest.raises(TrainingInterrupted) as stop:
        train(interrupted, on_eval=send)
    assert signal.getsignal(sig) == before  # the handlers are put back
    assert isinstance(stop.value, KeyboardInterrupt)
    assert (stop.value.step, stop.value.signum) == (4, sig)
    assert stop.value.checkpoint == Path(interrupted.out_dir) / "checkpoints" / "step_00000004"
    # A worker process hands it to its parent pickled (experiments' --jobs).
    again = pickle.loads(pickle.dumps(stop.value))
    assert (type(again), str(again), again.checkpoint) == (
        TrainingInterrupted,
        str(stop.value),
        stop.value.checkpoint,
    )
    assert load_checkpoint(interrupted.out_dir).step == 4
    resumed = train(dataclasses.replace(interrupted, resume=True))
    assert resumed["step"] == 8 and resumed["eval"]["accuracy"] == reference["eval"]["accuracy"]
    assert same_weights(Path(config.out_dir), Path(interrupted.out_dir))


def test_a_warm_start_never_writes_into_the_run_it_starts_from(
    tmp_path: Path, finished: TrainConfig
) -> None:
    # Issue 21 row 2 (the policy train shares with finetune): not even with overwrite.
    source = Path(finished.out_dir)
    before = snapshot(source)
    for out, relation in ((source, "is"), (tmp_path, "contains"), (source / "warm", "lies inside")):
        warm = dataclasses.replace(
            finished, out_dir=str(out), init_from=str(source), overwrite=True, steps=1
        )
        with pytest.raises(ValueError, match=f"out_dir {out} {relation} the model the run starts"):
            train(warm)
    assert snapshot(source) == before
    assert not (source / "warm").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(
    tmp_path: Path, data_cache: Path
) -> None:
    # Issue 21 row 8: lr=1e10 turns the weights to NaN after step 1 (the loss of step 2).
    config = tiny_train_config(
        tmp_path, data_cache, steps=6, lr=1e10, warmup_steps=1, checkpoint_every=1, eval_every=0
    )
    with pytest.raises(NonFiniteLoss, match=r"training diverged at step 2 \(loss nan") as stop:
        train(config)
    ckpt = load_checkpoint(config.out_dir)
    assert stop.value.step == 2 and ckpt.step == 1 and stop.value.checkpoint == ckpt.path
    assert f"the last finite checkpoint is {ckpt.path}" in str(stop.value)
    again = pickle.loads(pickle.dumps(stop.value))
    assert (type(again), str(again), again.step) == (NonFiniteLoss, str(stop.value), 2)
    assert all(torch.isfinite(w).all() for w in ckpt.weights.values())
    assert sorted(p.name for p in ckpt.path.parent.iterdir()) == ["latest", "step_00000001"]


def test_step_statistics_are_read_every_log_every_steps_with_the_same_values(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 22 row 5: the step returns device tensors; the loop reads them every log_every
    # steps (and before an evaluation or checkpoint), and metrics.jsonl is unchanged.
    config = tiny_train_config(
        tmp_path, data_cache, steps=8, eval_every=0, penalty_start=2, log_every=1
    )
    with pytest.raises(ValueError, match="log_every"):
        dataclasses.replace(config, log_every=0).validate()
    with pytest.raises(TypeError, match="compile"):
        dataclasses.replace(config, compile="yes").validate()
    stats = train_step(*_one_step_args(config), penalty_on=True)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    train(config)
    every_step = read_jsonl(Path(config.out_dir) / "metrics.jsonl")

    reads = count_step_reads(monkeypatch)
    spaced = dataclasses.replace(config, out_dir=str(tmp_path / "spaced"), log_every=3)
    result = train(spaced)
    assert reads == [3, 3, 2]  # steps 3, 6 and the end (8)
    records = read_jsonl(Path(spaced.out_dir) / "metrics.jsonl")

    def untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if "time" not in k} for r in records]

    assert untimed(records) == untimed(every_step)  # the final evaluation too
    records = [r for r in records if "event" not in r]
    assert records[2]["penalty"] is not None and records[0]["penalty"] is None
    assert result["train"] == {k: v for k, v in records[-1].items() if k not in ("step", "time")}


def _one_step_args(config: TrainConfig) -> tuple[Any, ...]:
    """Model, optimizer and a batch for one train_step call (3 loops)."""
    from eqloop.models.looplm.modeling import LoopLM
    from eqloop.recipes.train import make_train_tensors
    from eqloop.training.optim import make_optimizer

    torch.manual_seed(0)
    model = LoopLM(config.model)
    x, y = make_train_tensors(config)
    return model, model, make_optimizer(model, config), x[:8], y[:8], 3, config


def test_a_non_finite_loss_between_reads_is_named_and_nothing_after_it_is_saved(
    tmp_path: Path, data_cache: Path
) -> None:
    # Issue 22 row 5: with reads every 4 steps the NaN of step 2 is found at step 4; the
    # run names step 2, logs nothing after it and writes no checkpoint of the bad steps.
    config = tiny_train_config(
        tmp_path,
        data_cache,
        steps=8,
        lr=1e10,
        warmup_steps=1,
        checkpoint_every=4,
        eval_every=0,
        log_every=4,
    )
    with pytest.raises(NonFiniteLoss, match=r"training diverged at step 2 \(loss nan") as stop:
        train(config)
    assert stop.value.step == 2 and stop.value.checkpoint is None
    assert "no checkpoint was written before it" in str(stop.value)
    assert not (Path(config.out_dir) / "checkpoints").exists()
    records = read_jsonl(Path(config.out_dir) / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and math.isnan(records[1]["loss"])


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_equals_eager(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    # Issue 22 row 7: compile=True (eqloop train --compile) runs the model's step compiled;
    # the CE and STARS steps (the penalty on the eager step) give the eager results.
    # aot_eager checks the plumbing in seconds; inductor (slow) is the real compiler.
    import eqloop.core.compiling
    import eqloop.recipes.train

    compiled: list[object] = []

    def compile_with(model: Any) -> Any:
        compiled.append(model)
        return eqloop.core.compiling.compile_model(model, backend=backend)

    monkeypatch.setattr(eqloop.recipes.train, "compile_model", compile_with)
    config = tiny_train_config(
        tmp_path, data_cache, steps=4, eval_every=0, penalty_start=2, log_every=2
    )
    eager = train(config)
    fast = train(dataclasses.replace(config, out_dir=str(tmp_path / "compiled"), compile=True))
    assert len(compiled) == 1  # only the compiled run
    assert fast["eval"]["accuracy"] == eager["eval"]["accuracy"]
    for a, b in zip(
        read_jsonl(Path(config.out_dir) / "metrics.jsonl"),
        read_jsonl(tmp_path / "compiled" / "metrics.jsonl"),
        strict=True,
    ):
        for key in ("loss", "ce", "penalty", "rho", "grad_norm"):
            want, got = a.get(key), b.get(key)
            assert (want is None) == (got is None), (a, b, key)  # e.g. no penalty yet
            if want is not None:
                assert got == pytest.approx(want, rel=1e-4), (a, b, key)
    weights = load_checkpoint(eager["checkpoint"]).weights
    other = load_checkpoint(fast["checkpoint"]).weights
    assert all(torch.allclose(weights[k], other[k], atol=1e-5) for k in weights)
    # compile may change on resume (it changes how, not what, the run computes)
    more = train(dataclasses.replace(config, steps=5, resume=True, compile=True))
    assert more["step"] == 5 and len(compiled) == 2


def test_compile_flags_of_train_and_eval(
    tmp_path: Path,
    finished: TrainConfig,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 22 row 7: eqloop train/finetune --compile (shared flags) and eqloop eval --compile.
    import eqloop.core.compiling
    import eqloop.evaluation.accuracy
    from eqloop.cli import main

    for command in ("train", "finetune"):
        assert main([command, "--compile", "--print-config"]) == 0
        assert json.loads(capsys.readouterr().out)["compile"] is True
    with pytest.raises(SystemExit) as done:
        main(["eval", "--pretrained", str(tmp_path), "--compile"])
    assert done.value.code == 2
    assert "--compile applies to --checkpoint runs only" in capsys.readouterr().err

    compiled: list[object] = []

    def compile_with(model: Any) -> Any:
        compiled.append(model)
        return eqloop.core.compiling.compile_model(model, backend="aot_eager")

    monkeypatch.setattr(eqloop.evaluation.accuracy, "compile_model", compile_with)
    results = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"eval{len(flags)}.json"
        args = ["eval", "--checkpoint", finished.out_dir, "--loops", "1,2", "--no-diagnostics"]
        assert main([*args, "--no-progress", "--json", str(out), *flags]) == 0
        results.append(json.loads(out.read_text())[0])
    assert len(compiled) == 1
    assert results[1]["accuracy"] == results[0]["accuracy"]


def test_penalty_start_is_a_fraction_of_training_by_default(
    tmp_path: Path, data_cache: Path
) -> None:
    # Issue 21 row 23: 0.2 of 10 steps -> the penalty is on from the third step.
    assert TrainConfig().penalty_start == 0.2
    config = tiny_train_config(tmp_path, data_cache, steps=10, eval_every=0, penalty_start=0.2)
    train(config)
    steps = [r for r in read_jsonl(Path(config.out_dir) / "metrics.jsonl") if "event" not in r]
    assert [r["penalty"] is None for r in steps] == [True, True] + [False] * 8
    assert load_config(None, ["penalty_start=0.2"]).penalty_start == 0.2
    assert load_config(None, ["penalty_start=400"]).penalty_start == 400  # a step, as before
    with pytest.raises(ValueError, match=r"must be a fraction of training in \(0, 1\)"):
        load_config(None, ["penalty_start=1.5"])
    with pytest.raises(ValueError, match="penalty_start must be an integer >= 0, got -3"):
        load_config(None, ["penalty_start=-3"])
    # A step beyond the run's end: the run warns that its lam was never used.
    late = dataclasses.replace(config, out_dir=str(tmp_path / "late"), penalty_start=400, steps=3)
    with pytest.warns(UserWarning, match="penalty starts at step 400 and the run ends at step 3"):
        train(late)
    steps = [r for r in read_jsonl(tmp_path / "late" / "metrics.jsonl") if "event" not in r]
    assert all(r["penalty"] is None for r in steps)


# ------------------------------------------------------------------------------ helpers


def test_batch_rows_are_deterministic_epochs() -> None:
    n, batch = 100, 32  # 3 batches per epoch, 4 rows skipped
    epoch = torch.cat([batch_rows(s, n, batch, seed=1) for s in range(3)])
    assert len(set(epoch.tolist())) == 96
    assert torch.equal(batch_rows(4, n, batch, seed=1), batch_rows(4, n, batch, seed=1))
    assert not torch.equal(batch_rows(3, n, batch, seed=1), batch_rows(0, n, batch, seed=1))


def test_lr_schedule_warms_up_then_decays(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(tmp_path, data_cache, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    constant = dataclasses.replace(config, schedule="constant")
    assert lr_factor(50, constant) == 1.0


def test_penalty_overhead_helper(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(tmp_path, data_cache)
    result = penalty_overhead(config, steps=3, warmup=1, loops=2)
    assert result["loops"] == 2 and result["ratio"] > 0
    assert result["step_time_stars"] > 0 and result["step_time_ce"] > 0


# ----------------------------------------------------------------------------------- DDP


def _ddp_wrappers() -> list[DistributedDataParallel]:
    """The DDP wrappers alive in this process (also unreachable ones not yet collected)."""
    return [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]


def _ddp_gradient_is_the_mean(rank: int, world: int, config: TrainConfig) -> bool:
    """One train_step through DDP with the penalty vs. the mean of the ranks' local steps.

    A function of its own: its DDP wrapper dies when it returns, before the group does.
    """
    from eqloop.models.looplm.modeling import LoopLM
    from eqloop.recipes.train import make_train_tensors
    from eqloop.training.optim import make_optimizer

    torch.manual_seed(0)
    model = LoopLM(config.model)
    reference = LoopLM(config.model)
    reference.load_state_dict(model.state_dict())
    net = DistributedDataParallel(model)
    x, y = make_train_tensors(config)
    rows = slice(8 * rank, 8 * rank + 8)
    step_config = dataclasses.replace(config, grad_clip=0.0, lam=0.3)
    for module, runner in ((model, net), (reference, reference)):
        optimizer = make_optimizer(module, step_config)
        generator = torch.Generator().manual_seed(100 + rank)
        train_step(
            runner,
            module,
            optimizer,
            x[rows],
            y[rows],
            3,
            step_config,
            penalty_on=True,
            generator=generator,
        )
    # DDP's gradient must be the mean over ranks of the local CE + penalty gradients.
    ok = True
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        expected = q.grad.clone()
        dist.all_reduce(expected)
        ok &= torch.allclose(p.grad, expected / world, atol=1e-6, rtol=1e-5)
    return bool(ok)


def _failed_runs_leave(config: TrainConfig) -> dict[str, Any]:
    """Runs that fail under DDP, and the wrappers left while their exceptions are kept.

    A wrapper that outlives the process group frees the gloo group in its reducer's
    destructor with the GIL held, which deadlocks against a gloo worker thread needing the
    GIL (a rank of this test hung so, on the wrapper of the gradient check, after its
    group was destroyed). train() drops its wrapper before it returns or raises: the
    traceback of its error (NonFiniteLoss with lr=1e10; an error inside the step, where
    the wrapper is passed down) must not keep it.
    """
    import eqloop.recipes.train

    diverging = dataclasses.replace(
        config, out_dir=f"{config.out_dir}-nan", lr=1e10, warmup_steps=1, steps=3, eval_every=0
    )
    try:
        train(diverging)
    except NonFiniteLoss as err:
        diverged = err  # kept, as a caller that reports it later keeps it
        left = [len(_ddp_wrappers())]

    def broken(*args: Any) -> Any:
        raise RuntimeError("a collective timed out")

    eqloop.recipes.train._forward = broken
    try:
        train(dataclasses.replace(diverging, out_dir=f"{config.out_dir}-broken"))
    except RuntimeError as err:
        failed = err
        left.append(len(_ddp_wrappers()))
    return {"diverged_at": diverged.step, "error": str(failed), "left_after_errors": left}


def _ddp_worker(rank: int, world: int, config: TrainConfig, out: str) -> None:
    """One rank: check DDP gradients with the penalty, run train(), then failing runs."""
    ok = _ddp_gradient_is_the_mean(rank, world, config)
    result = train(config)
    left = len(_ddp_wrappers())  # train's wrapper died with the run
    record = {"grads_ok": ok, "left": left, **result, **_failed_runs_leave(config)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def test_ddp_two_ranks_gloo(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(tmp_path, data_cache, steps=6, eval_every=3, lam=0.0)
    single = train(dataclasses.replace(config, out_dir=str(tmp_path / "single")))
    run_ranks(_ddp_worker, config, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["grads_ok"] for r in ranks)
    assert ranks[0]["checkpoint"] and ranks[1]["checkpoint"] is None  # only rank 0 writes
    assert ranks[0]["eval"] == ranks[1]["eval"]  # broadcast to every rank
    # Without the penalty, 2 ranks x 16 rows compute the gradient of one process x 32 rows.
    ddp = load_checkpoint(config.out_dir).weights
    one = load_checkpoint(single["checkpoint"]).weights
    assert all(torch.allclose(ddp[k], one[k], atol=1e-5) for k in ddp)
    # No DDP wrapper outlives a run, finished or failed (see _failed_runs_leave).
    for r in ranks:
        assert r["left"] == 0 and r["left_after_errors"] == [0, 0]
        assert (r["diverged_at"], r["error"]) == (2, "a collective timed out")


@pytest.mark.slow
def test_torchrun_command_from_the_docstring(tmp_path: Path, data_cache: Path) -> None:
    config = tiny_train_config(tmp_path, data_cache, steps=4, eval_every=0)
    file = tmp_path / "cfg.json"
    file.write_text(json.dumps(config.to_dict()))
    done = run_torchrun(
        "train", "--config", str(file), "--out-dir", str(tmp_path / "ddp"), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(tmp_path / "ddp").step == 4
