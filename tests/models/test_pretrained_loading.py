"""Loading and saving pretrained checkpoints: no broken recipe, no lost model, no misread.

One check (``eqloop.models.io.check_checkpoint``) runs on every loading path, the
direct loader and transformers' ``AutoModelForCausalLM``; a save is all-or-nothing even
when the process is killed. Every checkpoint here is a tiny random one written by
``write_tiny_checkpoint``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eqloop import pretrained
from eqloop.cli import main


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loading")
    pretrained.write_tiny_checkpoint(root / "ouro", "ouro")
    pretrained.write_tiny_checkpoint(root / "sharded", "ouro", max_shard_size="20KB")
    pretrained.write_tiny_checkpoint(root / "sharded_new", "ouro", seed=1, max_shard_size="20KB")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(file: Path, **changes: object) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def _edit_index(path: Path, key: str, value: object) -> None:
    file = path / "model.safetensors.index.json"
    data = json.loads(file.read_text())
    data["weight_map"][key] = value
    file.write_text(json.dumps(data))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return pretrained.load(path).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error of an ``eqloop`` command that must fail with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------- row 4: all-or-nothing save

_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import safetensors.torch
    from eqloop import pretrained

    path, new, where = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    model = pretrained.load(new)

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "shards":  # killed after 5 of the 7 shard files are written
        real_save, written = safetensors.torch.save_file, []

        def save_file(*args, **kwargs):
            if len(written) == 5:
                kill()
            written.append(args)
            real_save(*args, **kwargs)

        safetensors.torch.save_file = save_file
    else:  # killed between moving the old directory away and moving the new one in
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst) == path and Path(src).name != path.name:
                kill()
            real_replace(src, dst)

        os.replace = replace
    model.save_pretrained(path, max_shard_size="20KB", overwrite=True)
    """
)


@pytest.mark.parametrize("where", ["shards", "swap"])
def test_a_killed_sharded_overwrite_leaves_the_old_model_or_the_new(root, tmp_path, where):
    path = _copy(root / "sharded", tmp_path / "model")
    old, new = _state(root / "sharded"), _state(root / "sharded_new")
    assert len(list(path.glob("model-*.safetensors"))) == 7
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(path), str(root / "sharded_new"), where],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    try:
        state = _state(path)
    except FileNotFoundError as err:  # only between the two renames: the old one is kept
        assert where == "swap" and "move it back" in str(err)
        kept = next(tmp_path.glob(".model-old-*/model"))
        assert _same(_state(kept), old)
        return
    assert _same(state, old) or _same(state, new)
    assert where == "shards" and _same(state, old)  # the staging copy never became visible


def test_a_failed_save_keeps_the_old_model_and_the_other_files(root, tmp_path, monkeypatch):
    import safetensors.torch

    path = _copy(root / "sharded", tmp_path / "model")
    (path / "README.md").write_text("notes")
    old, new_model = _state(path), pretrained.load(root / "sharded_new")
    real_save, written = safetensors.torch.save_file, []

    def failing_save(*args: object, **kwargs: object) -> None:
        if len(written) == 3:
            raise OSError("disk full")
        written.append(args)
        real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        new_model.save_pretrained(path, max_shard_size="20KB", overwrite=True)
    assert _same(_state(path), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    new_model.save_pretrained(path, overwrite=True)  # now one file: the shards go
    assert _same(_state(path), _state(root / "sharded_new"))
    assert not list(path.glob("model-*")) and (path / "README.md").read_text() == "notes"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (path / name).read_bytes() == (root / "sharded" / name).read_bytes()


# --------------------------------------------------- row 5: the same strictness on HF


def test_auto_model_is_as_strict_as_load(root, tmp_path):
    transformers = pytest.importorskip("transformers")
    from eqloop.models.hf import register_auto_classes

    register_auto_classes()
    auto = transformers.AutoModelForCausalLM
    missing = _copy(root / "ouro", tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors")
    for opener in (pretrained.load, auto.from_pretrained):
        with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
            opener(missing)
    unknown = _copy(root / "ouro", tmp_path / "unknown")
    _edit_json(unknown / "config.json", my_new_feature=3)
    for opener in (pretrained.load, auto.from_pretrained):
        with pytest.raises(ValueError, match=r"my_new_feature.*strict_config=False"):
            opener(unknown)
    model = auto.from_pretrained(unknown, strict_config=False)
    assert _same(model.eqloop.state_dict(), _state(root / "ouro"))


# ----------------------------------------------- row 9: shards inside the directory


@pytest.mark.parametrize("kind", ["parent", "absolute"])
def test_shard_paths_outside_the_directory_are_refused(root, tmp_path, kind):
    path = _copy(root / "sharded", tmp_path / "model")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    outside = tmp_path / "x.safetensors"
    shutil.copy(path / shard, outside)  # a readable file with the right tensors
    _edit_index(path, key, "../x.safetensors" if kind == "parent" else str(outside))
    with pytest.raises(ValueError, match=rf"weight_map\['{key}'\].*outside the checkpoint"):
        pretrained.load(path)


# -------------------------------------------------------- row 10: float weights only


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.int64, "I64"), (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3")],
)
def test_non_float_weights_are_refused_at_load(root, tmp_path, dtype, name):
    path = _copy(root / "ouro", tmp_path / "model")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(dtype)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"model.norm.weight \({name} in model.safetensors\)"):
        pretrained.load(path)


# ---------------------------------------------- row 11: errors name the file and key


def _truncate(path: Path) -> None:
    file = next(path.glob("model-00003-*.safetensors"))
    file.write_bytes(file.read_bytes()[:-100])


def _bad_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": ')


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, r"model-00003-of-00007.safetensors is not a readable safetensors file"),
        (
            lambda p: (p / "config.json").write_bytes(b"\xff" + (p / "config.json").read_bytes()),
            r"config.json is not UTF-8 text",
        ),
        (
            lambda p: _edit_json(p / "config.json", rope_scaling="x"),
            r"config.json: OuroConfig.rope_scaling must be null or an object",
        ),
        (
            lambda p: _edit_json(p / "config.json", model_type=["ouro"]),
            r"config.json: unsupported model_type \['ouro'\]",
        ),
        (
            lambda p: _edit_index(p, "model.norm.weight", 5),
            r"index.json: weight_map\['model.norm.weight'\] must be a file name, got 5",
        ),
    ],
)
def test_damaged_files_raise_one_line_naming_file_and_key(root, tmp_path, damage, message):
    path = _copy(root / "sharded", tmp_path / "model")
    damage(path)
    with pytest.raises((ValueError, TypeError), match=message) as err:
        pretrained.load(path)
    assert "\n" not in str(err.value)


def test_malformed_tokenizer_json_names_the_file(root, tmp_path):
    path = _copy(root / "ouro", tmp_path / "model")
    _bad_tokenizer(path)
    with pytest.raises(ValueError, match=r"tokenizer.json is not valid JSON .* line 1 column"):
        pretrained.load_tokenizer(path)
    (path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=r"tokenizer.json is not a tokenizer"):
        pretrained.load_tokenizer(path)


def test_eval_pretrained_on_a_truncated_file_is_one_line(root, tmp_path, capsys):
    path = _copy(root / "sharded", tmp_path / "model")
    _truncate(path)
    err = _cli_error(["eval", "--pretrained", str(path)], capsys)
    assert "model-00003-of-00007.safetensors is not a readable safetensors file" in err


# ----------------------------------------------- row 12: sizes before building modules


def test_layer_count_is_checked_against_the_files_before_building(root, tmp_path, monkeypatch):
    from eqloop.models.ouro import modeling as ouro

    path = _copy(root / "ouro", tmp_path / "model")
    _edit_json(path / "config.json", num_hidden_layers=10**6)

    def no_layer(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decoder layer was built before the files were checked")

    monkeypatch.setattr(ouro, "OuroDecoderLayer", no_layer)
    with pytest.raises(ValueError, match=r"num_hidden_layers=1000000 does not match.*are 2"):
        pretrained.load(path)


# ---------------------------------------------- row 13: save writes what load accepts


def test_save_refuses_unmerged_lora_and_non_bool_overwrite(root, tmp_path):
    pytest.importorskip("peft")
    from eqloop.training.lora import DEFAULT_TARGETS, attach_lora, merge_lora

    model = pretrained.load(root / "ouro")
    attach_lora(model, DEFAULT_TARGETS["ouro"], r=2)
    with pytest.raises(ValueError, match=r"unmerged LoRA adapters .*merge_lora\(model\)"):
        model.save_pretrained(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    merge_lora(model)
    pretrained.load(model.save_pretrained(tmp_path / "lora"))
    before = (tmp_path / "lora" / "model.safetensors").read_bytes()
    with pytest.raises(TypeError, match="overwrite must be true or false"):
        pretrained.load(root / "sharded").save_pretrained(tmp_path / "lora", overwrite="no")
    assert (tmp_path / "lora" / "model.safetensors").read_bytes() == before


# ---------------------------------------------------- row 14: messages that point right


def test_eval_checkpoint_on_a_pretrained_directory_points_to_pretrained(root, capsys):
    err = _cli_error(["eval", "--checkpoint", str(root / "ouro")], capsys)
    assert "pretrained model directory" in err and "--pretrained" in err
    assert "incomplete" not in err


def test_finetune_with_a_malformed_config_names_it(root, tmp_path, capsys):
    from eqloop.data.problems import make_splits
    from eqloop.data.qa import write_jsonl

    path = _copy(root / "ouro", tmp_path / "model")
    (path / "config.json").write_text('{"model_type": "ouro",')
    train, _ = make_splits(4, 1, seed=0, kinds=("add",), max_value=9)
    write_jsonl(tmp_path / "train.jsonl", train)
    err = _cli_error(
        [
            "finetune",
            "--init-from",
            str(path),
            "--train-file",
            str(tmp_path / "train.jsonl"),
            "--out-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capsys,
    )
    assert f"{path / 'config.json'} is not valid JSON" in err and "manifest" not in err
