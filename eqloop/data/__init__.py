"""Data: tokenizers and tokenized examples.

* :mod:`eqloop.data.tokenizers`: every tokenizer eqloop reads (its character tokenizer, a
  checkpoint directory's tokenizer, the interface fine-tuning uses over both);
* :mod:`eqloop.data.examples`: the arithmetic tasks and local QA files as tokenized
  examples, and their tensors for training and evaluation.

The public names of both are importable from ``eqloop.data``.
"""

from __future__ import annotations

from eqloop.data.examples import (
    IGNORE_INDEX,
    SEPARATOR,
    SPLITS,
    TASKS,
    Examples,
    default_cache_dir,
    eval_prompts,
    load_qa_jsonl,
    make_arithmetic_dataset,
    make_arithmetic_examples,
    to_tensors,
)
from eqloop.data.tokenizers import (
    ARITHMETIC_CHARS,
    SPECIAL_TOKENS,
    CharTokenizer,
    SpecialTokenWarning,
    TextTokenizer,
    as_text_tokenizer,
    encode_prompts,
    load_tokenizer,
    special_ids,
)

__all__ = [
    "ARITHMETIC_CHARS",
    "IGNORE_INDEX",
    "SEPARATOR",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TASKS",
    "CharTokenizer",
    "Examples",
    "SpecialTokenWarning",
    "TextTokenizer",
    "as_text_tokenizer",
    "default_cache_dir",
    "encode_prompts",
    "eval_prompts",
    "load_qa_jsonl",
    "load_tokenizer",
    "make_arithmetic_dataset",
    "make_arithmetic_examples",
    "special_ids",
    "to_tensors",
]
