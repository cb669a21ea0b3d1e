"""Loading checkpoints in the Hugging Face layout, by upstream key names.

A checkpoint directory holds ``config.json``, the weights as ``model.safetensors`` or as
shards listed in ``model.safetensors.index.json`` (``{"weight_map": {key: file}}``),
and usually ``tokenizer.json`` and ``generation_config.json``. Nothing is downloaded
and no remote code runs: the architecture comes from ``config.json``'s ``model_type``
and eqloop's own modules, whose parameter names are upstream's.

Loading is strict, and :func:`check_checkpoint` is the one check every loading path runs
(:func:`load` and transformers' ``AutoModelForCausalLM`` after
:func:`eqloop.pretrained.register_auto_classes`) before it reads a weight: config.json
must hold only keys eqloop knows (unless ``strict_config=False``); shard files must lie
in the directory; the layer counts of config.json must be those of the files (checked
before any module is built); every parameter of the model must be in the files with its
shape and a float16/bfloat16/float32/float64 dtype, and every tensor in the files must
belong to the model (upstream's recomputable ``freqs_cis`` buffer excepted). Every
mismatch raises one ``ValueError`` naming the file and the key (all missing, unexpected
and mis-shaped tensors in one message).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import torch
from torch import Tensor

from eqloop.files import STAGING_PREFIX, read_json
from eqloop.model import LoopLM, LoopLMConfig
from eqloop.pretrained.base import PretrainedLoopedLM
from eqloop.pretrained.config import PretrainedConfig, config_from_dict
from eqloop.pretrained.huginn.modeling import HuginnForCausalLM
from eqloop.pretrained.keys import LISTED, check_keys, listing
from eqloop.pretrained.ouro.modeling import OuroForCausalLM
from eqloop.pretrained.saving import CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE

__all__ = [
    "check_checkpoint",
    "is_pretrained_dir",
    "load",
    "load_config",
    "MODEL_CLASSES",
    "model_class",
    "weight_files",
]

# eqloop's own models in this layout (written by their save_pretrained), by model_type:
# load() hands such a directory to the class's from_pretrained.
_OWN_MODELS: dict[str, type[LoopLM]] = {LoopLMConfig.model_type: LoopLM}

# Weight dtypes eqloop computes with (safetensors header names); others are refused.
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


MODEL_CLASSES: dict[str, type[PretrainedLoopedLM]] = {
    "ouro": OuroForCausalLM,
    "huginn_raven": HuginnForCausalLM,
}
"""The model class of each ``model_type`` of :data:`eqloop.pretrained.config.ARCHITECTURES`."""


def model_class(config: PretrainedConfig) -> type[PretrainedLoopedLM]:
    """The model class of a config (build it with ``model_class(config)(config)``)."""
    return MODEL_CLASSES[config.model_type]


def _directory(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path, got {type(path).__name__}")
    directory = Path(path)
    if not directory.is_dir():
        # A save killed between its two renames leaves the old checkpoint here.
        name = glob.escape(directory.name)
        kept = sorted(directory.parent.glob(f"{STAGING_PREFIX}{name}-old-*/{name}"))
        hint = (
            f"; an interrupted save_pretrained left the previous checkpoint in {str(kept[-1])!r}:"
            " move it back"
            if kept
            else ""
        )
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist{hint}")
    return directory


def is_pretrained_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Hugging Face-layout directory (``config.json`` with ``model_type``).

    Raises:
        ValueError: ``config.json`` exists but is not UTF-8 JSON (the message names it),
            whatever kind of directory this is.
    """
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    data = read_json(config)
    return isinstance(data, dict) and "model_type" in data


def load_config(path: str | os.PathLike[str], *, strict: bool = True) -> PretrainedConfig:
    """Read and check ``config.json`` of a checkpoint directory.

    Raises:
        FileNotFoundError: no directory or no config.json.
        ValueError: config.json is not UTF-8 JSON, or has an unsupported ``model_type``,
            unknown keys (``strict``) or values eqloop does not implement (every message
            starts with the file's path and names the key).
    """
    directory = _directory(path)
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no {CONFIG_FILE}: not a checkpoint directory"
        )
    data = read_json(file)
    try:
        return config_from_dict(data, strict=strict)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{file}: {err}") from None


@contextmanager
def _open_weights(file: Path) -> Iterator[Any]:
    """``safe_open(file)``; a damaged file raises ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as handle:
            yield handle
    except SafetensorError as err:
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}): it is truncated or damaged; "
            "copy or download it again"
        ) from None


def _shard_path(directory: Path, index: Path, key: Any, name: Any) -> Path:
    """The shard ``name`` that the index gives for tensor ``key``, inside ``directory``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: weight_map[{key!r}] must be a file name, got {name!r}")
    parts = PurePath(name)
    if parts.is_absolute() or parts.anchor or ".." in parts.parts:
        raise ValueError(
            f"{index}: weight_map[{key!r}] = {name!r} lies outside the checkpoint directory; "
            "shard files must be named relative to it, without '..'"
        )
    return directory / name


def weight_files(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Map every tensor key of a checkpoint to the safetensors file that holds it.

    Raises:
        FileNotFoundError: neither model.safetensors nor the index, or a shard the
            index names is missing.
        ValueError: the index is malformed or names a file outside the directory, or
            model.safetensors is damaged.
    """
    directory = _directory(path)
    index = directory / INDEX_FILE
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(
                f"{index} has no 'weight_map' object mapping tensor keys to shard files"
            )
        files = {key: _shard_path(directory, index, key, name) for key, name in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}"
        )
    with _open_weights(single) as handle:
        return {key: single for key in handle.keys()}  # noqa: SIM118 (not a dict)


def _by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    return by_file


def _headers(files: dict[str, Path]) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """``{key: (safetensors dtype, shape, file)}`` from the file headers (no tensor data)."""
    headers: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for file, keys in _by_file(files).items():
        with _open_weights(file) as handle:
            absent = sorted(set(keys) - set(handle.keys()))
            if absent:
                raise ValueError(
                    f"the index places {listing(absent)} in {file.name}, which does not hold them"
                )
            for key in keys:
                view = handle.get_slice(key)
                headers[key] = (view.get_dtype(), tuple(view.get_shape()), file)
    return headers


def _read_tensors(files: dict[str, Path]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for file, keys in _by_file(files).items():
        with _open_weights(file) as handle:
            for key in keys:
                tensors[key] = handle.get_tensor(key)
    return tensors


def _check_layer_counts(directory: Path, config: PretrainedConfig, keys: Iterable[str]) -> None:
    """Config.json must not count more layers than the files hold.

    Runs before the model is built, so an absurd count fails at once rather than after
    building its modules; other differences (stray layers) are listed by the full check.
    """
    keys = list(keys)
    for prefix, (name, count) in config.layer_stacks.items():
        pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
        found = {int(m.group(1)) for key in keys if (m := pattern.match(key))}
        if count > len(found):
            held = f"{len(found)} (indices {min(found)}-{max(found)})" if found else "none"
            raise ValueError(
                f"{directory / CONFIG_FILE}: {name}={count} does not match the weight files, "
                f"whose '{prefix}.<i>' layers are {held}"
            )


def _check_dtypes(
    config: PretrainedConfig, headers: dict[str, tuple[str, tuple[int, ...], Path]]
) -> None:
    """Every weight must be a float eqloop computes with (no int, bool or float8)."""
    recomputed = set(config.RECOMPUTED_KEYS)
    bad = sorted(
        f"{key} ({dtype} in {file.name})"
        for key, (dtype, _, file) in headers.items()
        if key not in recomputed and dtype not in _FLOAT_DTYPES
    )
    if bad:
        shown = bad[:LISTED] + ([f"and {len(bad) - LISTED} more"] if len(bad) > LISTED else [])
        raise ValueError(
            f"weights of unsupported dtype: {', '.join(shown)}; eqloop loads "
            f"{'/'.join(_FLOAT_DTYPES.values())} weights (dequantize or convert the checkpoint)"
        )


def check_checkpoint(
    path: str | os.PathLike[str], *, strict_config: bool = True
) -> tuple[PretrainedConfig, dict[str, Path], PretrainedLoopedLM]:
    """Everything loading checks before it reads the weights; shared by every loading path.

    Reads config.json and the safetensors headers (and, for a tied head stored in the
    files, the head and the embedding), never builds a module the files cannot fill.

    Args:
        path: checkpoint directory.
        strict_config: reject config keys eqloop does not know.

    Returns:
        ``(config, {tensor key: file}, model)``, the model built on the meta device.

    Raises:
        FileNotFoundError: the directory, config.json, the weights or a shard is missing.
        ValueError: a config, index or weight file eqloop cannot use; the message names
            the file and the key (or tensors).
    """
    directory = _directory(path)
    config = load_config(directory, strict=strict_config)
    files = weight_files(directory)
    headers = _headers(files)
    _check_dtypes(config, headers)
    _check_layer_counts(directory, config, headers)
    shapes = {key: shape for key, (_, shape, _) in headers.items()}
    tied = config.tied_head
    if tied is not None and tied[0] in shapes:
        head, embedding = tied
        pair = _read_tensors({key: files[key] for key in tied if key in files})
        if embedding not in pair or not torch.equal(pair[head], pair[embedding]):
            raise ValueError(
                f"config.json ties the head to the embeddings but the files hold a different "
                f"{head!r}: untie it in config.json or remove the tensor"
            )
        del shapes[head]
    with torch.device("meta"):
        model = model_class(config)(config)
    check_keys(model, shapes, config)
    return config, files, model


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
) -> PretrainedLoopedLM | LoopLM:
    """Load an Ouro or Huginn checkpoint directory as an eqloop looped LM, offline.

    A directory written by ``LoopLM.save_pretrained`` (``model_type: "looplm"``) loads as
    that :class:`~eqloop.model.LoopLM` (:meth:`~eqloop.model.LoopLM.from_pretrained`).

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
        ValueError: unsupported model_type or config value, damaged files, or tensors
            that do not match the architecture or are not floats (see
            :func:`check_checkpoint`).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}"
        )
    directory = _directory(path)
    data = read_json(directory / CONFIG_FILE) if (directory / CONFIG_FILE).is_file() else None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if isinstance(model_type, str) and model_type in _OWN_MODELS:
        return _OWN_MODELS[model_type].from_pretrained(directory, dtype=dtype, device=device)
    config, files, model = check_checkpoint(directory, strict_config=strict_config)
    tensors = _read_tensors(files)
    tied = config.tied_head
    if tied is not None:
        tensors.pop(tied[0], None)  # checked equal to the embedding
    for name in config.RECOMPUTED_KEYS:
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
    model.generation_config = read_json(generation) if generation.is_file() else {}
    return model.eval()
