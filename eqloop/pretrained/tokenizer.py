"""The tokenizer of a checkpoint directory, offline, as a transformers fast tokenizer.

Built from ``tokenizer.json`` (the ``tokenizers`` library's format, which both Ouro and
Huginn ship) and the special tokens named in ``tokenizer_config.json`` /
``special_tokens_map.json``. The special ids come from these tokenizer files: upstream
configs set ``bos/eos/pad_token_id`` inconsistently (all 0 in some Ouro configs), so
when config.json or generation_config.json disagree with the tokenizer a warning names
both values and the tokenizer's are used. Needs the ``[hf]`` extra (transformers).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from eqloop.files import read_json

__all__ = ["SpecialTokenWarning", "load_tokenizer"]

_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")


class SpecialTokenWarning(UserWarning):
    """config.json / generation_config.json name special ids the tokenizer does not."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str | os.PathLike[str], *, padding_side: str = "left") -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` for a checkpoint directory, offline.

    Args:
        path: checkpoint directory holding ``tokenizer.json``.
        padding_side: ``"left"`` (default: what :func:`eqloop.pretrained.generate`
            needs for batched prompts) or ``"right"``.

    Returns:
        The tokenizer; ``tokenizer(texts, padding=True, return_tensors="pt")`` gives
        ``input_ids`` and ``attention_mask`` ready for the model.

    Raises:
        ImportError: transformers is not installed (``pip install eqloop[hf]``).
        FileNotFoundError: no ``tokenizer.json`` in ``path``.
        ValueError: ``tokenizer.json`` or a tokenizer config file is not UTF-8 JSON or
            not a tokenizer (the message names the file).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    directory = Path(path)
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no tokenizer.json (eqloop reads the fast-tokenizer "
            "format only, not a sentencepiece tokenizer.model)"
        )
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as err:
        raise ImportError("load_tokenizer needs transformers: pip install 'eqloop[hf]'") from err

    settings = _read(directory / "tokenizer_config.json")
    specials_map = _read(directory / "special_tokens_map.json")
    kwargs: dict[str, Any] = {}
    for name in _SPECIALS:
        text = _token_text(settings.get(name)) or _token_text(specials_map.get(name))
        if text is not None:
            kwargs[name] = text
    if "pad_token" not in kwargs and "eos_token" in kwargs:
        kwargs["pad_token"] = kwargs["eos_token"]  # the usual choice for decoder-only models
    if isinstance(settings.get("chat_template"), str):
        kwargs["chat_template"] = settings["chat_template"]
    if isinstance(settings.get("model_max_length"), int):
        kwargs["model_max_length"] = settings["model_max_length"]
    if not isinstance(read_json(file), dict):  # a syntax error is named with line and column
        raise ValueError(f"{file} must hold a JSON object (the tokenizers library's format)")
    try:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(file), padding_side=padding_side, **kwargs
        )
    except Exception as err:  # the tokenizers library raises a bare Exception
        raise ValueError(f"{file} is not a tokenizer the tokenizers library reads: {err}") from None
    _warn_on_disagreement(directory, tokenizer)
    return tokenizer


def _warn_on_disagreement(directory: Path, tokenizer: Any) -> None:
    """Warn when config.json / generation_config.json name other special ids."""
    ours = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    problems = []
    for file in ("config.json", "generation_config.json"):
        data = _read(directory / file)
        for key, value in ours.items():
            if key not in data or data[key] is None or value is None:
                continue
            theirs = data[key]
            agrees = value in theirs if isinstance(theirs, list) else theirs == value
            if not agrees:
                problems.append(f"{file} {key}={theirs!r} (tokenizer: {value})")
    if problems:
        warnings.warn(
            "special token ids disagree with the tokenizer files; eqloop uses the "
            f"tokenizer's: {'; '.join(problems)}",
            SpecialTokenWarning,
            stacklevel=3,
        )
