"""Loading and saving checkpoints in the Hugging Face layout, by upstream key names.

A checkpoint directory holds ``config.json``, the weights as ``model.safetensors`` or as
shards listed in ``model.safetensors.index.json`` (``{"weight_map": {key: file}}``),
and usually ``tokenizer.json`` and ``generation_config.json``. Nothing is downloaded
and no remote code runs: the architecture comes from ``config.json``'s ``model_type``
and eqloop's own modules, whose parameter names are upstream's.

Loading is strict: every parameter of the model must be in the files with its shape,
and every tensor in the files must belong to the model (upstream's recomputable
``freqs_cis`` buffer excepted); any mismatch raises one ``ValueError`` that lists all
missing, unexpected and mis-shaped tensors.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eqloop.files import atomic_path, write_json_atomic
from eqloop.pretrained.base import PretrainedLoopedLM
from eqloop.pretrained.config import HuginnConfig, OuroConfig, config_from_dict, config_to_dict

__all__ = ["load", "load_config", "parse_size", "save_pretrained", "weight_files"]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Upstream's architecture names, written to config.json["architectures"] when absent.
_ARCHITECTURE_NAMES = {"ouro": "OuroForCausalLM", "huginn_raven": "RavenForCausalLM"}
# Tensors upstream files may carry that eqloop recomputes instead of loading.
_RECOMPUTED = {"huginn_raven": ("freqs_cis",)}
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _model_class(config: OuroConfig | HuginnConfig) -> type[PretrainedLoopedLM]:
    if isinstance(config, OuroConfig):
        from eqloop.pretrained.ouro import OuroForCausalLM

        return OuroForCausalLM
    from eqloop.pretrained.huginn import HuginnForCausalLM

    return HuginnForCausalLM


def _directory(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path, got {type(path).__name__}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    return directory


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def load_config(path: str | os.PathLike[str], *, strict: bool = True) -> OuroConfig | HuginnConfig:
    """Read and check ``config.json`` of a checkpoint directory.

    Raises:
        FileNotFoundError: no directory or no config.json.
        ValueError: unsupported ``model_type``, unknown keys (``strict``) or values
            eqloop does not implement.
    """
    directory = _directory(path)
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no {CONFIG_FILE}: not a checkpoint directory"
        )
    return config_from_dict(_read_json(file), strict=strict)


def weight_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Map every tensor key of a checkpoint to the safetensors file that holds it.

    Raises:
        FileNotFoundError: neither model.safetensors nor the index, or a shard the
            index names is missing.
    """
    from safetensors import safe_open

    directory = _directory(path)
    index = directory / INDEX_FILE
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(
                f"{index} has no 'weight_map' object mapping tensor keys to shard files"
            )
        files = {key: directory / name for key, name in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}"
        )
    with safe_open(single, framework="pt") as handle:
        return {key: single for key in handle.keys()}  # noqa: SIM118 (not a dict)


def _read_tensors(files: dict[str, Path]) -> dict[str, Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    tensors: dict[str, Tensor] = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as handle:
            present = set(handle.keys())
            absent = sorted(set(keys) - present)
            if absent:
                raise ValueError(
                    f"the index places {absent} in {file.name}, which does not hold them"
                )
            for key in keys:
                tensors[key] = handle.get_tensor(key)
    return tensors


def _check_keys(
    model: PretrainedLoopedLM, tensors: dict[str, Tensor], config: OuroConfig | HuginnConfig
) -> None:
    """Raise one ValueError listing every missing, unexpected or mis-shaped tensor."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    recomputed = set(_RECOMPUTED.get(config.model_type, ()))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - recomputed)
    shapes = sorted(
        f"{name}: file {tuple(tensors[name].shape)}, model {shape}"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    )
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if shapes:
        problems.append(f"mis-shaped [{'; '.join(shapes)}]")
    if problems:
        raise ValueError(
            f"checkpoint tensors do not match the {config.model_type!r} architecture of "
            f"config.json: " + ", ".join(problems)
        )


def _tied_head(config: OuroConfig | HuginnConfig) -> tuple[str, str] | None:
    """(head key, embedding key) when the config ties them, else None."""
    if isinstance(config, OuroConfig):
        return (
            ("lm_head.weight", "model.embed_tokens.weight") if config.tie_word_embeddings else None
        )
    return ("lm_head.weight", "transformer.wte.weight") if config.tie_embeddings else None


def _checkpoint_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    kinds = {t.dtype for t in tensors.values() if t.dtype.is_floating_point}
    if len(kinds) > 1:
        names = sorted(str(k) for k in kinds)
        raise ValueError(f"the checkpoint mixes floating dtypes {names}: pass dtype=... to load it")
    return kinds.pop() if kinds else torch.float32


def load(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict_config: bool = True,
) -> PretrainedLoopedLM:
    """Load an Ouro or Huginn checkpoint directory as an eqloop looped LM, offline.

    Args:
        path: directory with config.json and model.safetensors (or the sharded
            model.safetensors.index.json and its shards).
        dtype: parameter dtype; ``None`` keeps the checkpoint's.
        device: where the parameters go (default CPU).
        strict_config: reject config keys eqloop does not know (they could change the
            architecture); ``False`` keeps them for saving but does not use them.

    Returns:
        An :class:`OuroForCausalLM` or :class:`HuginnForCausalLM` in eval mode, with
        ``model.generation_config`` from generation_config.json (a dict, empty if absent).

    Raises:
        FileNotFoundError: the directory, config.json, the weights or a shard is missing.
        ValueError: unsupported model_type or config value, or tensors that do not match
            the architecture (all listed in one message).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}"
        )
    directory = _directory(path)
    config = load_config(directory, strict=strict_config)
    tensors = _read_tensors(weight_files(directory))
    cls = _model_class(config)
    with torch.device("meta"):
        model = cls(config)
    tied = _tied_head(config)
    if tied is not None and tied[0] in tensors:
        head, embedding = tied
        if embedding not in tensors or not torch.equal(tensors[head], tensors[embedding]):
            raise ValueError(
                f"config.json ties the head to the embeddings but the files hold a different "
                f"{head!r}: untie it in config.json or remove the tensor"
            )
        del tensors[head]
    _check_keys(model, tensors, config)
    for name in _RECOMPUTED.get(config.model_type, ()):
        tensors.pop(name, None)
    target = _checkpoint_dtype(tensors) if dtype is None else dtype
    state = {
        name: tensors[name].to(
            device=device or "cpu", dtype=target if t.dtype.is_floating_point else t.dtype
        )
        for name, t in model.state_dict().items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    generation = directory / GENERATION_CONFIG_FILE
    model.generation_config = _read_json(generation) if generation.is_file() else {}
    return model.eval()


# ------------------------------------------------------------------------------ save

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
        from eqloop.pretrained.layers import rotary_angles

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
