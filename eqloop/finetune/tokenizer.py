"""One small tokenizer interface over eqloop's character tokenizer and Hugging Face's.

Fine-tuning, evaluation and the lm-eval model class need four things from a tokenizer:
text to ids without special tokens, the prompt's ids (with a beginning-of-sequence
token if the model was trained with one), ids back to text, and the end/pad ids.
:func:`as_text_tokenizer` wraps

* :class:`eqloop.data.CharTokenizer` (``<bos>``/``<eos>``/``<pad>`` = 1/2/0),
* a ``tokenizers.Tokenizer`` (the ``tokenizer.json`` of a checkpoint directory), whose
  special tokens are read from the tokenizer itself (see :func:`special_ids`),
* a transformers fast tokenizer (``bos_token_id``, ``eos_token_id``, ``pad_token_id``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TextTokenizer", "as_text_tokenizer", "special_ids"]

# Names end-of-sequence and beginning-of-sequence tokens go by in public tokenizers.
_EOS_NAMES = ("<|endoftext|>", "<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
_BOS_NAMES = ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


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
    from eqloop.data import CharTokenizer

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
