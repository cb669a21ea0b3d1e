"""Every tokenizer eqloop reads, in one module.

* :class:`CharTokenizer`: eqloop's own, one id per character (the arithmetic tasks of
  :mod:`eqloop.data`, and the text of a LoopLM trained on them).
* :func:`load_tokenizer`: the tokenizer of a checkpoint directory (Ouro, Huginn, their
  fine-tunes), offline, as a transformers fast tokenizer
  (``PreTrainedTokenizerFast.from_pretrained``; needs the ``[hf]`` extra). Its special ids
  come from the tokenizer files: upstream configs set ``bos/eos/pad_token_id``
  inconsistently (all 0 in some Ouro configs), so when config.json or
  generation_config.json disagree a :class:`SpecialTokenWarning` names both values.
* :class:`TextTokenizer` / :func:`as_text_tokenizer`: the four things fine-tuning,
  evaluation and the lm-eval model class need from any of them (text to ids without
  special tokens, a prompt's ids with its beginning-of-sequence token, ids back to text,
  the end/pad ids), over a ``CharTokenizer``, a ``tokenizers.Tokenizer`` or a transformers
  tokenizer.
* :func:`encode_prompts`: a left-padded batch of prompts for a checkpoint directory; a
  directory without ``tokenizer.json`` (weights-only directories such as the upstream
  reference checkpoints) gets the prompts' UTF-8 bytes modulo the vocabulary, with a
  warning, which exercises the loop's dynamics but is not the text.
"""

from __future__ import annotations

import os
import string
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eqloop.files import read_json

__all__ = [
    "ARITHMETIC_CHARS",
    "SPECIAL_TOKENS",
    "CharTokenizer",
    "SpecialTokenWarning",
    "TextTokenizer",
    "as_text_tokenizer",
    "encode_prompts",
    "load_tokenizer",
    "special_ids",
]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
ARITHMETIC_CHARS = "0123456789+-*=, "  # ids 3.. in every CharTokenizer

# Names end-of-sequence and beginning-of-sequence tokens go by in public tokenizers.
_EOS_NAMES = ("<|endoftext|>", "<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
_BOS_NAMES = ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
# Files of a checkpoint directory that transformers reads for its tokenizer.
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------
# eqloop's character tokenizer
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character, plus the special tokens ``<pad>``, ``<bos>``, ``<eos>``.

    The vocabulary is ``SPECIAL_TOKENS + ARITHMETIC_CHARS + extra_chars``, so the ids of
    the arithmetic characters are the same in every ``CharTokenizer``: a model trained on
    arithmetic reads them the same way under a larger vocabulary.

    Args:
        extra_chars: characters appended to the vocabulary (no repeats, none of
            ``ARITHMETIC_CHARS``). :meth:`printable` adds all printable ASCII.
    """

    extra_chars: str = ""
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chars = ARITHMETIC_CHARS + self.extra_chars
        repeated = sorted({c for c in chars if chars.count(c) > 1})
        if repeated:
            raise ValueError(
                f"extra_chars repeats characters already in the vocabulary: {repeated}"
            )
        offset = len(SPECIAL_TOKENS)
        object.__setattr__(self, "_ids", {c: offset + i for i, c in enumerate(chars)})

    @classmethod
    def printable(cls) -> CharTokenizer:
        """A tokenizer for general text: printable ASCII, tab and newline."""
        extra = "".join(c for c in string.printable if c not in ARITHMETIC_CHARS + "\r\x0b\x0c")
        return cls(extra_chars=extra)

    @property
    def chars(self) -> str:
        """The non-special characters, in id order (the first has id ``len(SPECIAL_TOKENS)``)."""
        return ARITHMETIC_CHARS + self.extra_chars

    @property
    def vocab(self) -> tuple[str, ...]:
        """Every token, indexed by id."""
        return SPECIAL_TOKENS + tuple(self.chars)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included)."""
        return len(SPECIAL_TOKENS) + len(self.chars)

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>``."""
        return 0

    @property
    def bos_id(self) -> int:
        """Id of ``<bos>``."""
        return 1

    @property
    def eos_id(self) -> int:
        """Id of ``<eos>``."""
        return 2

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, one per character.

        Raises:
            ValueError: a character of ``text`` is not in the vocabulary (the message names
                it and its position).
        """
        try:
            ids = [self._ids[c] for c in text]
        except KeyError:
            position, char = next((i, c) for i, c in enumerate(text) if c not in self._ids)
            raise ValueError(
                f"character {char!r} (U+{ord(char):04X}) at position {position} is not in the "
                "tokenizer vocabulary; add it with CharTokenizer(extra_chars=...)"
            ) from None
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(
        self, ids: Iterable[int], *, skip_special: bool = True, stop_at_eos: bool = False
    ) -> str:
        """Text of token ids (ints or 0-d tensors); ``decode(encode(s)) == s``.

        Args:
            ids: token ids.
            skip_special: drop ``<pad>``, ``<bos>`` and ``<eos>`` instead of writing them out.
            stop_at_eos: ignore everything from the first ``<eos>`` on (for generations).

        Raises:
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        vocab = self.vocab
        pieces = []
        for raw in ids:
            token = int(raw)
            if not 0 <= token < len(vocab):
                raise ValueError(f"token id {token} is outside the vocabulary [0, {len(vocab)})")
            if stop_at_eos and token == self.eos_id:
                break
            if not (skip_special and token < len(SPECIAL_TOKENS)):
                pieces.append(vocab[token])
        return "".join(pieces)


# ---------------------------------------------------------------------------------------
# The tokenizer of a checkpoint directory
# ---------------------------------------------------------------------------------------


class SpecialTokenWarning(UserWarning):
    """config.json / generation_config.json name special ids the tokenizer does not."""


def _read(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when the file is missing or holds no object."""
    if not path.is_file():
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str | os.PathLike[str], *, padding_side: str = "left") -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` for a checkpoint directory, offline.

    Args:
        path: checkpoint directory holding ``tokenizer.json`` (and usually
            ``tokenizer_config.json`` / ``special_tokens_map.json`` naming the special
            tokens). Without a pad token the end-of-sequence token pads (the usual
            choice for decoder-only models).
        padding_side: ``"left"`` (default: what :func:`eqloop.models.generate`
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

    for name in _TOKENIZER_JSON:  # a syntax error is named with file, line and column
        if (directory / name).is_file() and not isinstance(read_json(directory / name), dict):
            raise ValueError(f"{directory / name} must hold a JSON object")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            str(directory), padding_side=padding_side, local_files_only=True
        )
    except Exception as err:  # the tokenizers library raises bare Exceptions and KeyErrors
        raise ValueError(f"{file} is not a tokenizer the tokenizers library reads: {err}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
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


def encode_prompts(
    path: str | os.PathLike[str], texts: Sequence[str], vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Left-padded token ids of ``texts`` for the checkpoint directory ``path``.

    With a ``tokenizer.json`` in ``path`` the directory's tokenizer encodes them
    (:func:`load_tokenizer`). Without one (a weights-only directory) each text is encoded
    as its UTF-8 bytes modulo ``vocab_size`` and a warning says so: enough to run the
    loop's dynamics on some tokens, not a reading of the text.

    Args:
        path: checkpoint directory.
        texts: non-empty prompts.
        vocab_size: the model's vocabulary size (bounds the byte ids).

    Returns:
        ``(ids, mask)``, both (B, S) int64, padded on the left; ``mask`` is 1 on tokens.
    """
    directory = Path(path)
    if (directory / "tokenizer.json").is_file():
        batch = load_tokenizer(directory)(list(texts), padding=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]
    warnings.warn(
        f"{directory} has no tokenizer.json: the prompts are encoded as their UTF-8 bytes "
        f"modulo the vocabulary ({vocab_size}), which runs the dynamics but not on the text; "
        "copy the base checkpoint's tokenizer files into the directory to use them",
        UserWarning,
        stacklevel=2,
    )
    rows = [list(text.encode("utf-8")) for text in texts]
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row) % vocab_size
        mask[i, width - len(row) :] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------
# One interface for fine-tuning and evaluation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTokenizer:
    """Text <-> ids, with the special ids fine-tuning needs.

    Attributes:
        encode: text -> ids, no special tokens added.
        decode: ids -> text, special tokens dropped.
        eos_id: end-of-sequence id (appended to every completion, stops generation).
        pad_id: id put on padding positions (never scored).
        bos_id: prepended to prompts when not None.
        vocab_size: number of ids.
        name: what was wrapped, for messages and lm-eval's ``tokenizer_name``.
    """

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_id: int
    pad_id: int
    bos_id: int | None
    vocab_size: int
    name: str

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt: ``[bos] + encode(text)`` (no bos if the tokenizer has none)."""
        ids = self.encode(text)
        return ids if self.bos_id is None else [self.bos_id, *ids]


def special_ids(tokenizer: Any) -> tuple[int | None, int | None, int | None]:
    """``(bos, eos, pad)`` ids of a ``tokenizers.Tokenizer`` by their usual token names.

    A checkpoint's ``config.json`` may disagree with its tokenizer (PRETRAINED.md: Ouro's
    configs set all three to 0), so the tokenizer's own vocabulary decides.
    """

    def first(names: tuple[str, ...]) -> int | None:
        for name in names:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    return first(_BOS_NAMES), first(_EOS_NAMES), first(_PAD_NAMES)


def _from_char(tokenizer: Any) -> TextTokenizer:
    return TextTokenizer(
        encode=tokenizer.encode,
        decode=lambda ids: tokenizer.decode(ids, skip_special=True),
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id,
        vocab_size=tokenizer.vocab_size,
        name=f"eqloop.CharTokenizer({len(tokenizer.chars)} characters)",
    )


def _adds_bos(ids: list[int], bos_id: int | None) -> bool:
    """Whether a tokenizer's default encoding (``ids`` of some text) starts with ``bos_id``."""
    return bos_id is not None and bool(ids) and ids[0] == bos_id


def _from_tokenizers(tokenizer: Any, bos: bool) -> TextTokenizer:
    bos_id, eos_id, pad_id = special_ids(tokenizer)
    if eos_id is None:
        raise ValueError(
            f"the tokenizer has none of the end-of-sequence tokens {list(_EOS_NAMES)}; "
            "fine-tuning needs one to end completions"
        )
    return TextTokenizer(
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
        bos_id=bos_id if bos and _adds_bos(tokenizer.encode("a").ids, bos_id) else None,
        vocab_size=tokenizer.get_vocab_size(),
        name="tokenizers.Tokenizer",
    )


def _from_transformers(tokenizer: Any, bos: bool) -> TextTokenizer:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; fine-tuning needs one")
    pad_id = tokenizer.pad_token_id
    return TextTokenizer(
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
        eos_id=int(eos_id),
        pad_id=int(eos_id if pad_id is None else pad_id),
        bos_id=tokenizer.bos_token_id
        if bos and _adds_bos(tokenizer.encode("a"), tokenizer.bos_token_id)
        else None,
        vocab_size=len(tokenizer),
        name=getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
    )


def as_text_tokenizer(tokenizer: Any, *, bos: bool = True) -> TextTokenizer:
    """Wrap a tokenizer (see the module docstring); a :class:`TextTokenizer` passes through.

    Args:
        tokenizer: ``CharTokenizer``, ``tokenizers.Tokenizer`` or a transformers tokenizer.
        bos: prepend the beginning-of-sequence token to prompts when the tokenizer's own
            default encoding does (Hugging Face tokenizers); ``CharTokenizer`` always
            uses its ``<bos>`` (eqloop's data convention).

    Raises:
        TypeError: an object of another kind.
        ValueError: the tokenizer has no end-of-sequence token.
    """
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer
    if isinstance(tokenizer, CharTokenizer):
        return _from_char(tokenizer)
    if hasattr(tokenizer, "token_to_id") and hasattr(tokenizer, "get_vocab_size"):
        return _from_tokenizers(tokenizer, bos)
    if hasattr(tokenizer, "eos_token_id") and hasattr(tokenizer, "encode"):
        return _from_transformers(tokenizer, bos)
    raise TypeError(
        "tokenizer must be an eqloop CharTokenizer, a tokenizers.Tokenizer or a transformers "
        f"tokenizer, got {type(tokenizer).__name__}"
    )
