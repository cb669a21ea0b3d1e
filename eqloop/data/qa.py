"""Fine-tuning data: local JSONL files, a prompt template, answer extraction, tensors.

Two JSONL layouts are read, one JSON object per line (blank lines are skipped):

* GSM8K: ``{"question": "...", "answer": "... reasoning ... #### 72"}``. The completion
  the model learns is the whole ``answer`` text; the reference answer is the number after
  ``####``.
* prompt/completion: ``{"prompt": "...", "completion": "..."}``, used as is. The reference
  answer is extracted from the completion like a generation (see :func:`extract_answer`).

Every error names the file and the line (``data.jsonl:12: missing key 'answer'``).

The prompt template follows lm-eval's ``gsm8k`` task, so that fine-tuning and evaluation
with ``lm_eval --tasks gsm8k`` see the same text: the prompt is ``"Question: {question}
\\nAnswer:"`` and the completion is ``" " + answer``. :func:`encode_examples` turns examples
into right-padded next-token tensors with the loss on the completion (and the end token)
only.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eqloop.data import IGNORE_INDEX
from eqloop.data.tokenizers import TextTokenizer
from eqloop.files import jsonl_records, write_text_atomic

__all__ = [
    "FORMATS",
    "Example",
    "PromptTemplate",
    "encode_examples",
    "extract_answer",
    "final_answer",
    "load_jsonl",
    "normalize_number",
    "warn_shared_prompts",
    "write_jsonl",
]

FORMATS: tuple[str, ...] = ("auto", "gsm8k", "prompt_completion")
ANSWER_MARK = "####"  # GSM8K puts the final answer after this mark
# A whole number (72, -3, $1,250.50), not a piece of 1e5, 3/4, v2 or 1.2.3.
_WHOLE_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?![\w/]|[.,]\d)"
_NUMBER = re.compile(r"(?<![\w./])" + _WHOLE_NUMBER)  # in running text
_MARKED_NUMBER = re.compile(_WHOLE_NUMBER)  # at the start of the word after the mark
_AFTER_MARK = re.compile(re.escape(ANSWER_MARK) + r"\s*(\S*)")  # the mark, the next word


@dataclass(frozen=True)
class Example:
    """One fine-tuning example.

    Attributes:
        question: the problem text (for prompt/completion files: the prompt itself).
        completion: the text the model learns to produce after the prompt.
        answer: the normalised reference answer (a number as text), or None when the
            completion holds no number.
        where: ``path:line`` of the record, for messages.
        raw_prompt: True when ``question`` is already the full prompt (prompt/completion
            files), so the template must not wrap it.
    """

    question: str
    completion: str
    answer: str | None
    where: str = ""
    raw_prompt: bool = False

    def __post_init__(self) -> None:
        # Without a prompt no position predicts the completion's first token (and a
        # tokenizer without a beginning-of-sequence token gives no token at all).
        if not self.question.strip():
            key = "prompt" if self.raw_prompt else "question"
            raise ValueError(
                f"{self.where or 'an example'}: {key!r} is empty; every example needs a "
                "prompt for the completion to follow"
            )


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes a prompt and an answer a completion.

    Attributes:
        prompt: format string with a ``{question}`` field.
        delimiter: put between the prompt and the completion (lm-eval's
            ``target_delimiter``).
    """

    prompt: str = "Question: {question}\nAnswer:"
    delimiter: str = " "

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt:
            raise ValueError(
                f"PromptTemplate.prompt must contain the field {{question}}, got {self.prompt!r}"
            )
        try:
            self.prompt.format(question="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"PromptTemplate.prompt is not a valid format string with only {{question}}: "
                f"{err}; write literal braces as {{{{ and }}}}"
            ) from None

    def format_prompt(self, example: Example) -> str:
        """The prompt text of ``example`` (prompt/completion examples pass through)."""
        if example.raw_prompt:
            return example.question
        return self.prompt.format(question=example.question)

    def format_completion(self, example: Example) -> str:
        """The completion text, with the delimiter in front."""
        if example.raw_prompt:
            return example.completion
        return self.delimiter + example.completion


# ------------------------------------------------------------------------------ answers


def normalize_number(text: str) -> str:
    """A number as written in text, without ``$``, thousands commas and a trailing ``.0``.

    ``"$1,250.00"`` -> ``"1250"``, ``"-3.50"`` -> ``"-3.5"``, ``"7"`` -> ``"7"``.
    """
    value = text.replace("$", "").replace(",", "").strip()
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return "0" if value in ("-0", "") else value


def _marked_number(word: str) -> str | None:
    """The normalised number ``word`` (the word after ``####``) is, else None."""
    whole = _MARKED_NUMBER.match(word)
    return None if whole is None else normalize_number(whole.group(0))


def extract_answer(text: str) -> str | None:
    """The answer a (generated) text gives: the number after ``####``, else the last number.

    Only whole numbers count: ``#### 1e5`` or ``#### 3/4`` give no answer (never 1 or 3),
    and neither does a ``1e5`` or ``3/4`` in the running text.

    Returns:
        The normalised number (see :func:`normalize_number`), or None if ``text`` holds
        no number (or, after ``####``, something that is not a number).
    """
    marked = _AFTER_MARK.search(text)
    if marked is not None and marked.group(1):
        return _marked_number(marked.group(1))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def final_answer(answer: str, where: str) -> str:
    """The number after ``####`` in a GSM8K answer field.

    Raises:
        ValueError: no ``#### N`` in ``answer``, or an ``N`` that is not a whole number
            such as ``1e5`` or ``3/4`` (the message cites ``where``).
    """
    marked = _AFTER_MARK.search(answer)
    if marked is None or not marked.group(1):
        tail = answer[-40:].replace("\n", "\\n")
        raise ValueError(
            f"{where}: the answer has no final '{ANSWER_MARK} <number>' (GSM8K format); it ends "
            f"with {tail!r}"
        )
    number = _marked_number(marked.group(1))
    if number is None:
        raise ValueError(
            f"{where}: the final answer after '{ANSWER_MARK}' must be a number like 72, -3 or "
            f"1,250.50, got {marked.group(1)!r}; write it out (100000 for 1e5, 0.75 for 3/4)"
        )
    return number


# -------------------------------------------------------------------------------- JSONL


def _text_field(record: dict[str, Any], key: str, where: str) -> str:
    """``record[key]`` as text (numbers converted), else ``ValueError`` citing ``where``."""
    if key not in record:
        raise ValueError(f"{where}: missing key {key!r} (keys present: {sorted(record)})")
    value = record[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _detect_format(record: dict[str, Any], where: str) -> str:
    if "question" in record or "answer" in record:
        return "gsm8k"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    raise ValueError(
        f"{where}: cannot tell the format: expected keys 'question'/'answer' (GSM8K) or "
        f"'prompt'/'completion', got {sorted(record)}"
    )


def load_jsonl(
    path: str | os.PathLike[str], *, format: str = "auto", limit: int | None = None
) -> list[Example]:
    """Read a GSM8K or prompt/completion JSONL file.

    Args:
        path: the file.
        format: ``"gsm8k"``, ``"prompt_completion"`` or ``"auto"`` (decided by the keys of
            the first record; every later record must then have the same layout).
        limit: read at most this many records (None: all).

    Returns:
        The examples, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown ``format``, an empty file, invalid JSON, a line that is not
            an object, a missing or non-text field, or a GSM8K answer without
            ``#### N``; each message names the file and line.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such JSONL file: {file}")
    examples: list[Example] = []
    for where, record in jsonl_records(file):
        if format == "auto":
            format = _detect_format(record, where)
        if format == "gsm8k":
            question = _text_field(record, "question", where)
            answer = _text_field(record, "answer", where)
            examples.append(Example(question, answer, final_answer(answer, where), where))
        else:
            prompt = _text_field(record, "prompt", where)
            completion = _text_field(record, "completion", where)
            examples.append(
                Example(prompt, completion, extract_answer(completion), where, raw_prompt=True)
            )
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise ValueError(f"{file}: the file holds no records (empty or only blank lines)")
    return examples


def warn_shared_prompts(train: Sequence[Example], evaluated: Sequence[Example]) -> None:
    """Warn when evaluation examples are training examples too (e.g. the eval file is the
    train file): their accuracy then measures recall, not what fine-tuning generalises.

    Args:
        train: the training examples.
        evaluated: the examples evaluated after training.
    """
    seen = {(e.raw_prompt, e.question) for e in train}
    shared = [e for e in evaluated if (e.raw_prompt, e.question) in seen]
    if not shared:
        return
    n = len(evaluated)
    count = f"all {n}" if len(shared) == n else f"{len(shared)} of {n}"
    warnings.warn(
        f"{count} evaluation prompts are also training prompts (first: "
        f"{shared[0].where or 'an example'}): the evaluation measures what the model "
        "memorised; evaluate on a held-out file",
        stacklevel=2,
    )


def write_jsonl(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` as JSONL atomically (one object per line) and return the path."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(path, text)
    return Path(path)


# ------------------------------------------------------------------------------ tensors


def encode_examples(
    examples: Sequence[Example],
    tokenizer: TextTokenizer,
    template: PromptTemplate | None = None,
    *,
    max_len: int,
) -> tuple[Tensor, Tensor]:
    """Right-padded next-token tensors with the loss on the completion and end token.

    Each example becomes ``[bos?] prompt completion eos``; ``inputs`` drop the last
    token, ``targets`` the first, and targets are -100 on the prompt and on padding. With
    causal attention right padding changes nothing at the real positions.

    Args:
        examples: the examples.
        tokenizer: see :class:`~eqloop.data.tokenizers.TextTokenizer`.
        template: prompt template (default :class:`PromptTemplate`).
        max_len: longest allowed sequence (``inputs`` have at most ``max_len`` columns).

    Returns:
        ``inputs`` (N, S) int64 and ``targets`` (N, S) int64, S = longest row (<= max_len).

    Raises:
        ValueError: no examples, or an example longer than ``max_len`` tokens (named by
            its ``path:line``).
    """
    if not examples:
        raise ValueError("encode_examples needs at least one example")
    template = template if template is not None else PromptTemplate()
    rows = []
    for example in examples:
        prompt = tokenizer.encode_prompt(template.format_prompt(example))
        completion = tokenizer.encode(template.format_completion(example)) + [tokenizer.eos_id]
        if len(prompt) + len(completion) - 1 > max_len:
            raise ValueError(
                f"{example.where or 'an example'}: {len(prompt) + len(completion)} tokens do not "
                f"fit max_len={max_len}; raise max_len (the model allows its context length) "
                "or drop long examples"
            )
        rows.append((prompt, completion))
    width = max(len(p) + len(c) - 1 for p, c in rows)
    inputs = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        ids = prompt + completion
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        targets[i, len(prompt) - 1 : n] = torch.tensor(completion)
    return inputs, targets
