"""Saving a model back in its upstream layout: config.json, safetensors, shards.

The weights keep upstream's key names and the model's dtype; above ``max_shard_size``
they are split into ``model-0000k-of-0000n.safetensors`` listed in
``model.safetensors.index.json``. Every file is written atomically, and loading the
result with :func:`eqloop.pretrained.load` gives back identical tensors and config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eqloop.files import atomic_path, write_json_atomic
from eqloop.pretrained.base import PretrainedLoopedLM
from eqloop.pretrained.config import HuginnConfig, config_to_dict
from eqloop.pretrained.layers import rotary_angles

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

# Upstream's architecture names, written to config.json["architectures"] when absent.
_ARCHITECTURE_NAMES = {"ouro": "OuroForCausalLM", "huginn_raven": "RavenForCausalLM"}
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
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if isinstance(model.config, HuginnConfig):
        # Upstream registers its rotary table as a persistent buffer: write it as upstream does.
        positions = torch.arange(model.config.block_size)[None]
        cos, sin = rotary_angles(positions, model.config.head_size, model.config.rope_base)
        tensors["freqs_cis"] = torch.stack((cos, sin), dim=-1)[:, :, None].contiguous()
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
    ``model.safetensors.index.json``. Every file is written atomically. Loading the
    result with :func:`load` gives back identical tensors and config.

    Args:
        model: an eqloop pretrained looped LM.
        path: output directory (created if needed).
        max_shard_size: bytes per shard (int, or a string like ``"5GB"``, ``"2GiB"``).
        overwrite: replace the weights and config of an existing checkpoint in ``path``
            (its old weight files are removed); otherwise such a directory is an error.

    Returns:
        The directory.

    Raises:
        FileExistsError: ``path`` already holds a checkpoint and ``overwrite`` is false.
    """
    from safetensors.torch import save_file

    if not isinstance(model, PretrainedLoopedLM):
        raise TypeError(f"model must be an eqloop pretrained looped LM, got {type(model).__name__}")
    limit = parse_size(max_shard_size)
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{str(directory)!r} exists and is not a directory")
    old = _old_weight_files(directory)
    existing = old + [p for p in (directory / CONFIG_FILE,) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{str(directory)!r} already holds a checkpoint ({sorted(p.name for p in existing)}); "
            "pass overwrite=True to replace it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_to_save(model)
    shards = _shards(tensors, limit)
    metadata = {"format": "pt"}
    written: list[Path] = []
    if len(shards) == 1:
        with atomic_path(directory / SINGLE_FILE) as tmp:
            save_file(shards[0], str(tmp), metadata=metadata)
        written.append(directory / SINGLE_FILE)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            with atomic_path(directory / name) as tmp:
                save_file(shard, str(tmp), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
            written.append(directory / name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json_atomic(
            directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
        written.append(directory / INDEX_FILE)
    for stale in old:
        if stale not in written:
            stale.unlink(missing_ok=True)
    write_json_atomic(directory / CONFIG_FILE, _config_json(model))
    generation = getattr(model, "generation_config", None)
    if generation:
        write_json_atomic(directory / GENERATION_CONFIG_FILE, generation)
    return directory


def _old_weight_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [
        p
        for p in directory.iterdir()
        if p.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(p.name)
    ]


def _config_json(model: PretrainedLoopedLM) -> dict[str, Any]:
    data = config_to_dict(model.config)
    data.setdefault("architectures", [_ARCHITECTURE_NAMES[model.config.model_type]])
    dtype = str(model._embedding().weight.dtype).removeprefix("torch.")
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
