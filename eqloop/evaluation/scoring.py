"""Exact match of a predictor's answers, for token-level and for text answers.

* Fixed-format test sets (arithmetic): an :class:`EvalSet` of prompts and reference
  answer tokens; a sequence is right when every answer token and ``<eos>`` is
  (:func:`correct_answers`, :func:`exact_match`).
* Free-text answers (GSM8K-style word problems): :func:`answers_correct` compares the
  number the model gives (:func:`eqloop.finetune.data.extract_answer`: after ``####``,
  else the last number) with the reference; with ``decode="forced"`` the completion's
  tokens are checked teacher-forced instead.

Both decode with :mod:`eqloop.evaluation.decoding` (``"greedy"`` or ``"forced"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eqloop.data import IGNORE_INDEX, CharTokenizer, Examples, eval_prompts
from eqloop.data.tokenizers import TextTokenizer
from eqloop.evaluation.decoding import (
    PredictFn,
    check_decode,
    forced_correct,
    generate_continuations,
    greedy_generate,
)
from eqloop.evaluation.predictors import Predictor, model_device
from eqloop.finetune.data import Example, PromptTemplate, encode_examples, extract_answer
from eqloop.training.config import TrainConfig

__all__ = [
    "STOP_TEXT",
    "EvalSet",
    "answers_correct",
    "correct_answers",
    "exact_match",
    "make_eval_set",
    "make_test_set",
]

STOP_TEXT = "Question:"  # free-text generation is cut here (the start of a next example)


@dataclass(frozen=True)
class EvalSet:
    """Prompts and reference continuations of a test set.

    Attributes:
        prompts: (N, P) token ids, ``<bos>`` up to and including ``=``.
        targets: (N, A) token ids of the answer followed by ``<eos>``.
    """

    prompts: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.prompts.shape[0]

    @property
    def inputs(self) -> Tensor:
        """(N, P + A - 1) teacher-forced model inputs: prompt and answer without ``<eos>``."""
        return torch.cat((self.prompts, self.targets[:, :-1]), dim=1)

    @property
    def forced_targets(self) -> Tensor:
        """(N, P + A - 1) the token each position of :attr:`inputs` must predict:
        ``IGNORE_INDEX`` over the prompt, then the answer and ``<eos>``."""
        ignored = self.prompts[:, 1:].new_full(self.prompts[:, 1:].shape, IGNORE_INDEX)
        return torch.cat((ignored, self.targets), dim=1)

    def to(self, device: torch.device | str) -> EvalSet:
        """The same set on ``device``."""
        return EvalSet(self.prompts.to(device), self.targets.to(device))


def make_eval_set(dataset: Examples | Any, tokenizer: CharTokenizer | None = None) -> EvalSet:
    """Build an :class:`EvalSet` from examples in eqloop's common form.

    Args:
        dataset: :class:`eqloop.data.Examples` or a ``datasets.Dataset``, with equal prompt
            and answer lengths (generated with ``zero_pad=True``).
        tokenizer: encodes the answers (default :class:`CharTokenizer`).

    Raises:
        ValueError: empty dataset or rows of different lengths.
    """
    tokenizer = tokenizer if tokenizer is not None else CharTokenizer()
    prompts, answers = eval_prompts(dataset)
    encoded = [tokenizer.encode(a, add_eos=True) for a in answers]
    if len({len(e) for e in encoded}) > 1:
        raise ValueError("answers have different lengths; generate the data with zero_pad=True")
    return EvalSet(prompts, torch.tensor(encoded, dtype=torch.long))


def make_test_set(config: TrainConfig) -> EvalSet:
    """The ``n_test`` problems of the run's test split (disjoint from its training set)."""
    return make_eval_set(config.make_examples("test"))


def correct_answers(
    predict: PredictFn, data: EvalSet, *, decode: str = "greedy", batch_size: int = 1024
) -> Tensor:
    """Per-sequence exact match of the model's continuation with the reference.

    Args:
        predict: token ids -> logits, e.g. a :class:`~eqloop.evaluation.Predictor`.
        data: the test set.
        decode: one of :data:`~eqloop.evaluation.decoding.DECODES`.
        batch_size: sequences per forward pass.

    Returns:
        (N,) bool on the CPU, True where the continuation equals the answer and ``<eos>``.
    """
    check_decode(decode)
    if decode == "forced":
        return forced_correct(predict, data.inputs, data.forced_targets, batch_size=batch_size)
    generated = greedy_generate(
        predict,
        data.prompts.tolist(),
        max_new_tokens=data.targets.shape[1],
        eos_id=None,  # the reference ends in <eos>: a row stops at its first wrong token
        batch_size=batch_size,
        references=data.targets.tolist(),
        device=data.prompts.device,
    )
    targets = data.targets.tolist()
    return torch.tensor([g == t for g, t in zip(generated, targets, strict=True)])


def exact_match(
    predict: PredictFn, data: EvalSet, *, decode: str = "greedy", batch_size: int = 1024
) -> float:
    """Share of test sequences answered exactly (see :func:`correct_answers`)."""
    return float(
        correct_answers(predict, data, decode=decode, batch_size=batch_size).float().mean()
    )


def answers_correct(
    predict: Predictor,
    tokenizer: TextTokenizer,
    examples: Sequence[Example],
    *,
    template: PromptTemplate | None = None,
    decode: str = "greedy",
    max_new_tokens: int = 256,
    batch_size: int = 32,
) -> Tensor:
    """Per-example exact match of free-text answers.

    Args:
        predict: the way of running the model; at a fixed loop count an Ouro/Huginn
            model decodes greedily with its KV cache.
        tokenizer: the model's tokenizer.
        examples: examples with reference ``answer`` (rows without one count as wrong).
        template: prompt template.
        decode: ``"greedy"``: generate until the end token, ``max_new_tokens`` or
            :data:`STOP_TEXT`, and compare the extracted answer; ``"forced"``: the
            completion's tokens (and the end token) teacher-forced.
        max_new_tokens: generation budget.
        batch_size: sequences per forward pass.

    Returns:
        (N,) bool tensor on the CPU.
    """
    check_decode(decode)
    template = template if template is not None else PromptTemplate()
    if decode == "forced":
        inputs, targets = encode_examples(examples, tokenizer, template, max_len=1 << 30)
        return forced_correct(
            predict, inputs, targets, batch_size=batch_size, device=model_device(predict.model)
        )
    prompts = [tokenizer.encode_prompt(template.format_prompt(e)) for e in examples]
    texts = generate_continuations(
        predict.model,
        prompts,
        loops=predict.cache_loops,
        predict=predict,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        stop_texts=(STOP_TEXT,),
        batch_size=batch_size,
        stage_options=predict.stage,
    )
    answers = [extract_answer(text) for text in texts]
    return torch.tensor(
        [e.answer is not None and a == e.answer for a, e in zip(answers, examples, strict=True)]
    )
