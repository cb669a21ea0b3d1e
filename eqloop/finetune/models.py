"""Which models can be fine-tuned, and how they are loaded and saved in their own layout.

A fine-tunable model follows eqloop's looped-LM protocol:

* ``core_map(tokens) -> (f, z0)``: the loop's map ``f`` (B, S, d) -> (B, S, d), which
  closes over the batch's input, and the starting state ``z0``;
* ``readout(z) -> logits`` (B, S, V): decode a state;
* ``model(tokens, loops=T)`` and ``model(tokens, solver=..., tol=..., max_iter=...)``.

Two kinds of directory hold one:

* a pretrained directory in the Hugging Face layout (``config.json`` with ``model_type``
  ``"ouro"`` or ``"huginn_raven"``, safetensors, ``tokenizer.json``): loaded with
  :func:`eqloop.pretrained.load`, saved back with ``model.save_pretrained`` plus the
  tokenizer files, so the result loads with ``eqloop.pretrained.load`` (and upstream's
  tools);
* an eqloop run or checkpoint directory (``eqloop train``'s LoopLM): loaded with
  :func:`eqloop.checkpoint.load_model`, saved as an eqloop checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqloop.checkpoint import load_model, save_checkpoint
from eqloop.files import umask_mode
from eqloop.finetune.tokenizer import TextTokenizer, as_text_tokenizer
from eqloop.model import LoopLM
from eqloop.pretrained.io import is_pretrained_dir  # raises on a malformed config.json

__all__ = [
    "LoadedModel",
    "TOKENIZER_FILES",
    "is_pretrained_dir",
    "load_for_finetuning",
    "save_model",
]

# Files of a pretrained directory that save_pretrained does not write: copied alongside.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)


@dataclass
class LoadedModel:
    """A model ready to fine-tune.

    Attributes:
        model: the looped LM (in train mode, float32 unless asked otherwise).
        tokenizer: its tokenizer.
        arch: ``"ouro"``, ``"huginn_raven"`` or ``"looplm"`` (picks the LoRA targets).
        trained_loops: the loop count the model was trained with (SFT's default).
        source: the directory it came from.
    """

    model: nn.Module
    tokenizer: TextTokenizer
    arch: str
    trained_loops: int
    source: Path


def _looplm_tokenizer(model: LoopLM) -> TextTokenizer:
    """The character tokenizer an eqloop LoopLM reads: printable ASCII if it fits, else digits.

    ``eqloop train`` trains on arithmetic with ``CharTokenizer()``; its ids are a prefix of
    ``CharTokenizer.printable()``'s, so a model with a large enough vocabulary reads both.
    """
    from eqloop.data import CharTokenizer

    printable = CharTokenizer.printable()
    if model.config.vocab_size >= printable.vocab_size:
        return as_text_tokenizer(printable)
    return as_text_tokenizer(CharTokenizer())


def load_for_finetuning(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a pretrained or eqloop model directory with its tokenizer.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a model directory of either kind (or a corrupted one).
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"no such model directory: {source}")
    if is_pretrained_dir(source):
        from eqloop import pretrained

        model = pretrained.load(source, dtype=dtype, device=device)
        tokenizer = as_text_tokenizer(pretrained.load_tokenizer(source))
        arch = json.loads((source / "config.json").read_text())["model_type"]
        trained = int(model.trained_loops)
    else:
        model, _ = load_model(source, device=device)
        model = model.to(dtype)
        tokenizer = _looplm_tokenizer(model)
        arch, trained = "looplm", int(model.config.default_loops)
    if tokenizer.vocab_size > _vocab_size(model):
        raise ValueError(
            f"the tokenizer of {source} has {tokenizer.vocab_size} ids but the model only "
            f"{_vocab_size(model)}"
        )
    return LoadedModel(model.train(), tokenizer, arch, trained, source)


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    return int(config.vocab_size if hasattr(config, "vocab_size") else config["vocab_size"])


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Save a fine-tuned model in its own layout (adapters must be merged first).

    Pretrained models: ``model.save_pretrained(path)`` and the tokenizer files of
    ``source``. LoopLMs: an eqloop checkpoint under ``path`` (load it with
    ``eqloop.checkpoint.load_model(path)``).

    The directory appears whole or not at all (written beside it, then renamed).

    Raises:
        ValueError: ``path`` exists and is not empty (nothing is overwritten).
    """
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not empty; choose another output directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written into a hidden sibling and renamed, so a crash never leaves a partial model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if isinstance(model, LoopLM):
            save_checkpoint(
                staging, 0, weights=model.state_dict(), config={"model": model.config.to_dict()},
                metrics=metrics or {}, training_state={},
            )  # fmt: skip
        else:
            model.save_pretrained(staging)
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file() and not (staging / name).exists():
                    shutil.copy2(Path(source) / name, staging / name)
        os.chmod(staging, umask_mode(directory=True))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
