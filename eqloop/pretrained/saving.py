"""Saving a model back in its upstream layout: config.json, safetensors, shards.

The weights keep upstream's key names and the model's dtype; above ``max_shard_size``
they are split into ``model-0000k-of-0000n.safetensors`` listed in
``model.safetensors.index.json``. A save is all-or-nothing: the whole checkpoint is
written into a hidden staging sibling (``.<name>-XXXX``) and swapped in with renames
(:func:`eqloop.files.replace_directory`), so a killed save leaves the old checkpoint or
the new one, never a mix. Only tensors that :func:`eqloop.pretrained.load` accepts are
written (a model with unmerged LoRA adapters is refused), and loading the result gives
back identical tensors and config.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eqloop.files import STAGING_PREFIX, replace_directory, umask_mode, write_json_atomic
from eqloop.pretrained.base import PretrainedLoopedLM
from eqloop.pretrained.config import config_to_dict
from eqloop.pretrained.keys import check_keys
from solvers import checks

__all__ = [
    "CONFIG_FILE",
    "GENERATION_CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "SaveMixin",
    "parse_size",
    "save_pretrained",
]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``.

    Raises:
        ValueError: not a positive size with a known unit.
    """
    if isinstance(size, bool):
        raise TypeError(f"max_shard_size must be bytes (int) or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"max_shard_size must be >= 1 byte, got {size}")
        return size
    if not isinstance(size, str):
        raise TypeError(f"max_shard_size must be bytes (int) or a string like '5GB', got {size!r}")
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if match is None or match.group(2).upper() not in _UNITS:
        raise ValueError(
            f"max_shard_size {size!r} is not a size: use bytes or a number with one of "
            f"{sorted(u for u in _UNITS if u)}"
        )
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {size!r}")
    return value


def _tensors_to_save(model: PretrainedLoopedLM) -> dict[str, Tensor]:
    """The model's tensors under upstream's names, once checked to be what loading accepts.

    Raises:
        ValueError: the model carries unmerged LoRA adapters, or other tensors than its
            architecture has.
    """
    state = model.state_dict()
    adapters = sorted({n.split(".lora_")[0] for n in state if ".lora_" in n})
    if adapters:
        raise ValueError(
            f"the model has unmerged LoRA adapters on {len(adapters)} modules (e.g. "
            f"{adapters[0]!r}), which the upstream layout cannot hold: merge them first with "
            "eqloop.finetune.lora.merge_lora(model) (on a copy to keep training the adapters)"
        )
    with torch.device("meta"):
        fresh = type(model)(model.config)
    check_keys(
        fresh,
        {name: tuple(t.shape) for name, t in state.items()},
        model.config,
        what="the model's tensors",
    )
    tensors = {name: t.detach().contiguous() for name, t in state.items()}
    tensors.update(model.upstream_buffers())  # e.g. Huginn's rotary table, as upstream writes it
    return tensors


def _shards(tensors: dict[str, Tensor], limit: int) -> list[dict[str, Tensor]]:
    """Greedy split in key order: a shard closes when the next tensor would pass ``limit``."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_pretrained(
    model: PretrainedLoopedLM,
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a model in its upstream layout: config.json, safetensors, generation config.

    Weights keep upstream's key names and the model's dtype; above ``max_shard_size``
    they are split into ``model-0000k-of-0000n.safetensors`` shards listed in
    ``model.safetensors.index.json``. Loading the result with :func:`load` gives back
    identical tensors and config.

    The save is all-or-nothing: the checkpoint is written into a hidden sibling
    ``.<name>-XXXX`` (with hard links to, or copies of, the other files of an existing
    ``path``, such as the tokenizer's) and then swapped in with renames, so a load after
    a kill at any moment gives the old checkpoint, the new one, or an error that says
    where the old one is. A killed save can leave the hidden sibling behind; delete it.

    Args:
        model: an eqloop pretrained looped LM (LoRA adapters merged).
        path: output directory (created if needed).
        max_shard_size: bytes per shard (int, or a string like ``"5GB"``, ``"2GiB"``).
        overwrite: replace the weights and config of an existing checkpoint in ``path``
            (its old weight files are removed); otherwise such a directory is an error.

    Returns:
        The directory.

    Raises:
        FileExistsError: ``path`` already holds a checkpoint and ``overwrite`` is false.
        TypeError: ``overwrite`` is not a bool.
        ValueError: the model has unmerged LoRA adapters or tensors its architecture
            does not have.
    """
    from safetensors.torch import save_file

    if not isinstance(model, PretrainedLoopedLM):
        raise TypeError(f"model must be an eqloop pretrained looped LM, got {type(model).__name__}")
    checks.boolean("overwrite", overwrite)
    limit = parse_size(max_shard_size)
    directory = Path(path)
    if directory.is_symlink():
        directory = directory.resolve()  # swap the directory the link points to
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{str(directory)!r} exists and is not a directory")
    existing = [p for p in _owned_files(directory) if p.name != GENERATION_CONFIG_FILE]
    if existing and not overwrite:
        raise FileExistsError(
            f"{str(directory)!r} already holds a checkpoint ({sorted(p.name for p in existing)}); "
            "pass overwrite=True to replace it"
        )
    tensors = _tensors_to_save(model)
    shards = _shards(tensors, limit)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{directory.name}-", dir=directory.parent)
    )
    try:
        mode = directory.stat().st_mode if directory.is_dir() else umask_mode(directory=True)
        os.chmod(staging, mode & 0o7777)  # mkdtemp makes it private
        generation = getattr(model, "generation_config", None)
        _carry_over(directory, staging, keep_generation=not generation)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(staging / SINGLE_FILE), metadata=metadata)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / name), metadata=metadata)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json_atomic(
                staging / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        write_json_atomic(staging / CONFIG_FILE, _config_json(model))
        if generation:
            write_json_atomic(staging / GENERATION_CONFIG_FILE, generation)
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _owned_files(directory: Path) -> list[Path]:
    """The files of ``directory`` that :func:`save_pretrained` writes (or removes)."""
    if not directory.is_dir():
        return []
    return [
        p
        for p in directory.iterdir()
        if p.name in (SINGLE_FILE, INDEX_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE)
        or _SHARD_NAME.match(p.name)
    ]


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (instant, no space) or, where links are not possible, a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_over(old: Path, staging: Path, *, keep_generation: bool) -> None:
    """Give ``staging`` the entries of ``old`` that the save does not write.

    Tokenizer files, READMEs and any other entry are hard-linked (or copied); symbolic
    links stay links. The old weights and config are left out, and so is the old
    generation config unless ``keep_generation`` (the model has none of its own).
    """
    if not old.is_dir():
        return
    owned = set(_owned_files(old))
    if keep_generation:
        owned.discard(old / GENERATION_CONFIG_FILE)
    for entry in old.iterdir():
        if entry in owned:
            continue
        target = staging / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def _config_json(model: PretrainedLoopedLM) -> dict[str, Any]:
    data = config_to_dict(model.config)
    data.setdefault("architectures", [model.config.UPSTREAM_ARCHITECTURE])
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in data:
            data[key] = dtype
    if "torch_dtype" not in data and "dtype" not in data:
        data["torch_dtype"] = dtype
    return data


class SaveMixin:
    """Gives the pretrained models :meth:`save_pretrained`."""

    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
    ) -> Path:
        """Write config.json and the weights (upstream key names) to a directory.

        See :func:`eqloop.pretrained.save_pretrained`.
        """
        return save_pretrained(self, path, max_shard_size=max_shard_size, overwrite=overwrite)
