"""Loading checkpoints in the Hugging Face layout, by upstream key names.

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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eqloop.pretrained.base import PretrainedLoopedLM
from eqloop.pretrained.config import HuginnConfig, OuroConfig, config_from_dict
from eqloop.pretrained.huginn import HuginnForCausalLM
from eqloop.pretrained.ouro import OuroForCausalLM
from eqloop.pretrained.saving import CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE

__all__ = ["load", "load_config", "weight_files"]

# Tensors upstream files may carry that eqloop recomputes instead of loading.
_RECOMPUTED = {"huginn_raven": ("freqs_cis",)}


def _model_class(config: OuroConfig | HuginnConfig) -> type[PretrainedLoopedLM]:
    return OuroForCausalLM if isinstance(config, OuroConfig) else HuginnForCausalLM


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
