"""Exact-match accuracy of a fine-tuned looped LM at loops 1..16 and at equilibrium.

For every loop count ``t`` the model answers every prompt; an answer is right when the
number it gives (:func:`eqloop.finetune.data.extract_answer`: after ``####``, else the
last number) equals the reference. Two decodings:

* ``"generate"`` (GSM8K-style free text): greedy decoding until the end token or
  ``max_new_tokens``, cut at the first ``"Question:"`` (the next few-shot example, as
  lm-eval's ``until``). A model with a ``generate`` method (Ouro, Huginn: KV cache per
  loop and layer) decodes with it; otherwise each new token re-runs the model on the
  whole sequence, prompts of equal length batched together.
* ``"forced"`` (fixed-format answers such as arithmetic): one teacher-forced pass; right
  when the argmax at every completion position (and the end token) is the reference
  token. For unrolled loops this is the same verdict as greedy decoding (causal
  attention: the logits at a position depend only on the tokens before it), at a
  fraction of the cost.

At equilibrium the model runs ``model(tokens, solver=..., tol=..., max_iter=...)``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import solvers
from eqloop.data.tokenizers import TextTokenizer
from eqloop.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_SOLVER, EQUILIBRIUM_TOL
from eqloop.finetune.data import Example, PromptTemplate, encode_examples, extract_answer
from solvers import checks

__all__ = [
    "DECODES",
    "accuracy_vs_loops",
    "answers_correct",
    "generate_continuations",
    "greedy_generate",
    "model_device",
]

DECODES: tuple[str, ...] = ("generate", "forced")
STOP_TEXT = "Question:"  # generation is cut here (the start of a next example)

Predictor = Callable[[Tensor], Tensor]
"""Token ids (B, S) -> logits (B, S, V)."""


def greedy_generate(
    predict: Predictor,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    batch_size: int = 32,
    stop_texts: Sequence[str] = (),
    decode: Callable[[Sequence[int]], str] | None = None,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Greedy continuation of each prompt by re-running ``predict`` on the whole sequence.

    Prompts of equal length share a batch (no padding is needed). A row stops at
    ``eos_id`` (not included in its output), once its decoded continuation contains one
    of ``stop_texts`` (kept in the output: the caller cuts the text), or after
    ``max_new_tokens``.

    Returns:
        The new token ids of every prompt, in input order.
    """
    if stop_texts and decode is None:
        raise ValueError("stop_texts need decode (ids -> text)")
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            seq = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=seq.device)
            for _ in range(max_new_tokens):
                token = predict(seq)[:, -1].argmax(-1)
                token = token.masked_fill(done, eos_id)
                seq = torch.cat((seq, token[:, None]), dim=1)
                done = done | (token == eos_id)
                if stop_texts:
                    start = len(prompts[chunk[0]])
                    texts = [decode(row) for row in seq[:, start:].tolist()]
                    hits = [any(t in text for t in stop_texts) for text in texts]
                    done = done | torch.tensor(hits, device=done.device)
                if bool(done.all()):  # one host read per generated token
                    break
            for row, i in enumerate(chunk):
                new = seq[row, len(prompts[i]) :].tolist()
                out[i] = new[: new.index(eos_id)] if eos_id in new else new
    return out


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


class _Unrolled:
    """Predictor running ``loops`` loops (keeps a handle on the model for its device)."""

    def __init__(self, model: nn.Module, loops: int) -> None:
        self.model, self.loops = model, loops

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.model(tokens, loops=self.loops)


class _Equilibrium:
    """Predictor reading out at the fixed point ``solvers.solve`` finds for ``core_map``.

    Counts the sequences solved and those that converged, so the share is reported next
    to the accuracy instead of a warning per call.
    """

    def __init__(self, model: nn.Module, solver: str, tol: float, max_iter: int) -> None:
        self.model, self.solver, self.tol, self.max_iter = model, solver, tol, max_iter
        self.solved = 0
        self.converged = 0

    def __call__(self, tokens: Tensor) -> Tensor:
        f, z0 = self.model.core_map(tokens)
        result = solvers.solve(f, z0, self.solver, max_iter=self.max_iter, tol=self.tol)
        self.solved += tokens.shape[0]
        self.converged += int(result.converged.sum())
        return self.model.readout(result.z)


def _cached_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    loops: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    batch_size: int,
    stage_options: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Greedy decoding with a pretrained model's KV cache, prompts left-padded in batches;
    ``stage_options`` (e.g. Huginn's ``init_scale``) go to ``generate``."""
    from eqloop.pretrained import generate

    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
            mask[row, width - len(prompts[i]) :] = 1
        sequences = generate(
            model,
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            loops=loops,
            stop_token_ids=[eos_id],
            pad_token_id=pad_id,
            **(stage_options or {}),
        )
        for row, i in enumerate(chunk):
            new = sequences[row, width:].tolist()
            out[i] = new[: new.index(eos_id)] if eos_id in new else new
    return out


def _has_kv_cache(model: nn.Module) -> bool:
    """Whether ``model`` is an Ouro/Huginn model of :mod:`eqloop.pretrained` (cached decoding)."""
    try:
        from eqloop.pretrained.base import PretrainedLoopedLM
    except ImportError:
        return False
    return isinstance(model, PretrainedLoopedLM)


def generate_continuations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    loops: int | None,
    predict: Predictor,
    tokenizer: TextTokenizer,
    max_new_tokens: int,
    stop_texts: Sequence[str] = (),
    batch_size: int = 32,
    stage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts as text, cut at the first stop text.

    At a fixed loop count an Ouro/Huginn model decodes with its KV cache (batched, left
    padding; stop texts are applied to the finished text; ``stage_options`` such as
    Huginn's ``init_scale`` are passed on); otherwise ``predict`` is re-run on the whole
    sequence per token (:func:`greedy_generate`, which also stops a row as soon as a stop
    text appears).
    """
    if loops is not None and _has_kv_cache(model):
        outputs = _cached_generate(
            model,
            prompts,
            loops=loops,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            batch_size=batch_size,
            stage_options=stage_options,
        )
    else:
        outputs = greedy_generate(
            predict,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            batch_size=batch_size,
            stop_texts=stop_texts,
            decode=tokenizer.decode,
            device=model_device(model),
        )
    texts = []
    for ids in outputs:
        text = tokenizer.decode(ids)
        for stop in stop_texts:
            text = text.split(stop)[0]
        texts.append(text)
    return texts


def answers_correct(
    model: nn.Module,
    tokenizer: TextTokenizer,
    examples: Sequence[Example],
    predict: Predictor,
    *,
    loops: int | None,
    template: PromptTemplate | None = None,
    decode: str = "generate",
    max_new_tokens: int = 256,
    batch_size: int = 32,
) -> Tensor:
    """Per-example exact match of one way of running the model.

    Args:
        model: the looped LM (its ``generate`` serves ``decode="generate"`` at fixed loops).
        tokenizer: the model's tokenizer.
        examples: examples with reference ``answer`` (rows without one count as wrong).
        predict: token ids -> logits, e.g. ``loops`` loops or an equilibrium solve.
        loops: the loop count ``predict`` runs (None at equilibrium).
        template: prompt template.
        decode: one of :data:`DECODES`.
        max_new_tokens: generation budget.
        batch_size: sequences per forward pass.

    Returns:
        (N,) bool tensor on the CPU.
    """
    checks.choice("decode", decode, DECODES)
    template = template if template is not None else PromptTemplate()
    if decode == "forced":
        inputs, targets = encode_examples(examples, tokenizer, template, max_len=1 << 30)
        device = model_device(model)
        right = []
        for start in range(0, len(examples), batch_size):
            x = inputs[start : start + batch_size].to(device)
            y = targets[start : start + batch_size].to(device)
            hit = (predict(x).argmax(-1) == y) | (y < 0)
            right.append(hit.all(dim=1).cpu())
        return torch.cat(right)
    prompts = [tokenizer.encode_prompt(template.format_prompt(e)) for e in examples]
    texts = generate_continuations(
        model,
        prompts,
        loops=loops,
        predict=predict,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        stop_texts=(STOP_TEXT,),
        batch_size=batch_size,
    )
    answers = [extract_answer(text) for text in texts]
    return torch.tensor(
        [e.answer is not None and a == e.answer for a, e in zip(answers, examples, strict=True)]
    )


def accuracy_vs_loops(
    model: nn.Module,
    tokenizer: TextTokenizer,
    examples: Sequence[Example],
    *,
    loops: Iterable[int] = range(1, 17),
    equilibrium: bool = True,
    solver: str = EQUILIBRIUM_SOLVER,
    tol: float = EQUILIBRIUM_TOL,
    max_iter: int = EQUILIBRIUM_MAX_ITER,
    template: PromptTemplate | None = None,
    decode: str = "generate",
    max_new_tokens: int = 256,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Exact match at every loop count and at the equilibrium.

    Returns:
        ``accuracy`` (loop count as a string -> share of examples right), ``equilibrium``
        (None, or ``accuracy`` at the solver's fixed point, ``converged``: the share of
        solves that met ``tol``, and the solver settings), ``peak`` (best loop count and
        its accuracy), ``n`` and ``decode``.

    Raises:
        ValueError: no examples, a loop count < 1, or an unknown ``decode``.
    """
    if not examples:
        raise ValueError("accuracy_vs_loops needs at least one example")
    loops = [checks.integer("loops", t, low=1) for t in loops]
    checks.choice("decode", decode, DECODES)
    was_training = model.training
    model.eval()
    common = dict(
        template=template, decode=decode, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    accuracy: dict[str, float] = {}
    eq = None
    runs: list[int | None] = [*loops, *([None] if equilibrium else [])]
    try:
        with torch.no_grad():
            for t in tqdm(runs, desc="eval loops", disable=not progress, leave=False):
                if t is None:
                    solve = _Equilibrium(model, solver, tol, max_iter)
                    right = answers_correct(model, tokenizer, examples, solve, loops=t, **common)
                    eq = {
                        "accuracy": float(right.float().mean()),
                        "converged": solve.converged / max(1, solve.solved),
                        "solver": solver,
                        "tol": tol,
                        "max_iter": max_iter,
                    }
                    continue
                predict = _Unrolled(model, t)
                right = answers_correct(model, tokenizer, examples, predict, loops=t, **common)
                accuracy[str(t)] = float(right.float().mean())
    finally:
        model.train(was_training)
    best = max(accuracy, key=lambda k: (accuracy[k], -int(k)))
    return {
        "accuracy": accuracy,
        "equilibrium": eq,
        "peak": {"loops": int(best), "accuracy": accuracy[best]},
        "n": len(examples),
        "decode": decode,
    }
