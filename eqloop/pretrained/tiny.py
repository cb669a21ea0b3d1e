"""Toy checkpoints with random weights in the Hugging Face layout, made offline.

:func:`write_tiny_checkpoint` writes what a published Ouro or Huginn checkpoint
directory holds (config.json, model.safetensors or shards, tokenizer.json with its
tokenizer_config.json and special_tokens_map.json, generation_config.json), at a size
that runs in milliseconds. Tests, the docs and users use it to try every tool
without downloading anything. The tokenizer is character-level: ids 0-3 are
``<|pad|> <|bos|> <|eos|> <|unk|>``, then one id per printable ASCII character and the
newline (100 ids in all; unknown characters map to ``<|unk|>``).
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import torch

from eqloop.files import atomic_path, write_json_atomic
from eqloop.pretrained.config import ARCHITECTURES, PretrainedConfig, config_from_dict
from solvers import checks

__all__ = ["SPECIAL_TOKENS", "TINY_DEFAULTS", "write_tiny_checkpoint"]

SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "unk_token": "<|unk|>",
}
"""The tiny tokenizer's special tokens; their ids are 0, 1, 2, 3 in this order."""

_CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    model_type: cls.TINY_DEFAULTS for model_type, cls in ARCHITECTURES.items()
}
"""Architecture keys of the tiny configs; ``write_tiny_checkpoint`` overrides them."""

_ARCH_ALIASES = {"ouro": "ouro", "huginn": "huginn_raven", "huginn_raven": "huginn_raven"}


def _tokenizer_vocab() -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for c in _CHARACTERS:
        vocab.setdefault(c, len(vocab))
    return vocab


def _write_tokenizer(directory: Path) -> int:
    """tokenizer.json (+ its config files); returns the number of ids it uses."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = _tokenizer_vocab()
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS.values()])
    with atomic_path(directory / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    write_json_atomic(
        directory / "tokenizer_config.json",
        {**SPECIAL_TOKENS, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512},
    )
    write_json_atomic(directory / "special_tokens_map.json", dict(SPECIAL_TOKENS))
    return len(vocab)


def write_tiny_checkpoint(
    path: str | os.PathLike[str],
    arch: str = "ouro",
    *,
    seed: int = 0,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a random-initialised checkpoint directory of ``arch`` in the HF layout.

    Args:
        path: the directory to create.
        arch: ``"ouro"`` or ``"huginn_raven"`` (``"huginn"`` is accepted too).
        seed: seed of the random weights (the same seed writes the same files).
        max_shard_size: split the weights into shards of at most this size (e.g.
            ``"20KB"``) with a model.safetensors.index.json; ``None``: one file.
        overwrite: replace a checkpoint already in ``path``.
        **config_overrides: config.json keys that replace :data:`TINY_DEFAULTS`
            (e.g. ``num_hidden_layers=3``, ``sliding_window=4``).

    Returns:
        The directory, ready for :func:`eqloop.pretrained.load` and
        :func:`eqloop.pretrained.load_tokenizer`.

    Example:
        >>> from eqloop import pretrained                                  # doctest: +SKIP
        >>> path = pretrained.write_tiny_checkpoint("toy-huginn", arch="huginn_raven")
        >>> model = pretrained.load(path)
    """
    checks.integer("seed", seed, low=0)
    try:
        import tokenizers  # noqa: F401  (checked before anything is written)
    except ImportError as err:
        raise ImportError(
            "write_tiny_checkpoint needs tokenizers: pip install 'eqloop[hf]'"
        ) from err
    model_type = _ARCH_ALIASES.get(arch) if isinstance(arch, str) else None
    if model_type is None:
        raise ValueError(f"arch must be 'ouro' or 'huginn_raven', got {arch!r}")
    data = ARCHITECTURES[model_type].tiny_dict(config_overrides)
    data.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    config = config_from_dict(data)
    tokens = len(_tokenizer_vocab())
    vocab = config.vocab_size
    if vocab < tokens:
        raise ValueError(f"vocab_size must be >= {tokens} (the tiny tokenizer's ids), got {vocab}")

    directory = Path(path)
    model = _random_model(config, seed)
    model.generation_config = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    model.save_pretrained(directory, max_shard_size=max_shard_size or "100GB", overwrite=overwrite)
    _write_tokenizer(directory)
    return directory


def _random_model(config: PretrainedConfig, seed: int) -> Any:
    from eqloop.pretrained.io import model_class

    model = model_class(config)(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model
