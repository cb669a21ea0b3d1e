"""Decoding for exact match: one teacher-forced check and one greedy decoder.

Two decodings, the one vocabulary of :data:`DECODES`:

* ``"forced"``: one teacher-forced pass; a sequence is right when the argmax at every
  scored position equals the reference token (:func:`forced_correct`). For unrolled
  loops this is the same verdict as greedy decoding (causal attention: the logits at a
  position depend only on the tokens before it), ``len(answer) + 1`` times cheaper.
  (At an equilibrium the two can differ slightly: the solver's stopping test looks at
  the whole sequence.)
* ``"greedy"``: greedy decoding, re-running the predictor on the growing sequence
  (:func:`greedy_generate`), prompts of equal length batched together; finished rows
  leave the working batch. At a fixed loop count a model with a KV cache (Ouro,
  Huginn) decodes with it instead (:func:`generate_continuations`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from eqloop.data import IGNORE_INDEX
from eqloop.data.tokenizers import TextTokenizer
from eqloop.evaluation.predictors import Predictor, model_device

__all__ = [
    "DECODES",
    "PredictFn",
    "cached_generate",
    "check_decode",
    "forced_correct",
    "generate_continuations",
    "greedy_generate",
]

DECODES: tuple[str, ...] = ("greedy", "forced")
_RENAMED = {"generate": "greedy"}  # names of earlier versions, refused with the new name

PredictFn = Callable[[Tensor], Tensor]
"""Token ids (B, S) -> logits (B, S, V): a :class:`Predictor` or any such callable."""


def check_decode(decode: Any) -> str:
    """``decode`` if it is one of :data:`DECODES`.

    Raises:
        ValueError: any other value; an earlier version's name (``"generate"``) is
            refused with the name that replaced it.
    """
    if decode in DECODES:
        return decode
    hint = f" ({decode!r} is now called {_RENAMED[decode]!r})" if decode in _RENAMED else ""
    raise ValueError(f"unknown decode {decode!r}; valid: {list(DECODES)}{hint}")


def forced_correct(
    predict: PredictFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-sequence teacher-forced exact match.

    Args:
        predict: token ids -> logits.
        inputs: (N, S) model inputs.
        targets: (N, S) the token each position must predict, ``IGNORE_INDEX`` (-100)
            where nothing is scored.
        batch_size: sequences per forward pass.
        device: where to run (None: where ``inputs`` are).

    Returns:
        (N,) bool on the CPU: True where the argmax is the target at every scored position.
    """
    right = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start : start + batch_size]
            y = targets[start : start + batch_size]
            if device is not None:
                x, y = x.to(device), y.to(device)
            hit = (predict(x).argmax(-1) == y) | (y == IGNORE_INDEX)
            right.append(hit.all(dim=1).cpu())
    return torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)


def greedy_generate(
    predict: PredictFn,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    batch_size: int = 32,
    stop_texts: Sequence[str] = (),
    decode: Callable[[Sequence[int]], str] | None = None,
    references: Sequence[Sequence[int]] | None = None,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt by re-running ``predict`` on the whole sequence.

    Prompts of equal length share a batch (no padding is needed). A row stops at
    ``eos_id`` (not included in its output), once its decoded continuation contains one
    of ``stop_texts`` (kept in the output: the caller cuts the text), at its first token
    that differs from its reference (kept: the row can no longer match it), or after
    ``max_new_tokens``. Stopped rows leave the working batch.

    Args:
        predict: token ids -> logits.
        prompts: token ids per prompt.
        max_new_tokens: generation budget per prompt.
        eos_id: the end token (None: no end token stops a row).
        batch_size: prompts per batch.
        stop_texts: texts that end a row's continuation (need ``decode``).
        decode: ids -> text, for ``stop_texts``.
        references: per prompt, the continuation it is scored against (exact match).
        device: where to run; default the device of a :class:`Predictor`'s model, else
            the CPU.

    Returns:
        The new token ids of every prompt, in input order.

    Raises:
        ValueError: ``stop_texts`` without ``decode``, or ``references`` that do not
            cover ``max_new_tokens`` tokens per prompt.
    """
    if stop_texts and decode is None:
        raise ValueError("stop_texts need decode (ids -> text)")
    if references is not None and (
        len(references) != len(prompts) or any(len(r) < max_new_tokens for r in references)
    ):
        raise ValueError("references must hold max_new_tokens tokens for every prompt")
    if device is None:
        device = model_device(predict.model) if isinstance(predict, Predictor) else "cpu"
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                refs = None
                if references is not None:
                    refs = [list(references[i][:max_new_tokens]) for i in chunk]
                new = _greedy_batch(
                    predict,
                    torch.tensor([list(prompts[i]) for i in chunk], device=device),
                    max_new_tokens,
                    eos_id,
                    None if refs is None else torch.tensor(refs, device=device),
                    stop_texts,
                    decode,
                )
                for i, ids in zip(chunk, new, strict=True):
                    out[i] = ids
    return out


def _greedy_batch(
    predict: PredictFn,
    seq: Tensor,
    max_new_tokens: int,
    eos_id: int | None,
    refs: Tensor | None,
    stop_texts: Sequence[str],
    decode: Callable[[Sequence[int]], str] | None,
) -> list[list[int]]:
    """Greedy decoding of one batch of equal-length prompts ``seq`` (b, P); ``refs``
    (b, max_new_tokens) or None. Returns each row's new tokens (see :func:`greedy_generate`)."""
    batch, width = seq.shape
    rows = torch.arange(batch, device=seq.device)  # the working batch's rows in ``seq``
    tokens = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=seq.device)
    length = torch.full((batch,), max_new_tokens, dtype=torch.long, device=seq.device)
    for j in range(max_new_tokens):
        token = predict(seq)[:, -1].argmax(-1)
        tokens[rows, j] = token
        seq = torch.cat((seq, token[:, None]), dim=1)
        at_eos = torch.zeros_like(token, dtype=torch.bool)
        if eos_id is not None:
            at_eos = token == eos_id
        other = torch.zeros_like(at_eos)
        if refs is not None:
            other = other | (token != refs[rows, j])
        if stop_texts:
            texts = [decode(ids) for ids in seq[:, width:].tolist()]
            hits = [any(stop in text for stop in stop_texts) for text in texts]
            other = other | torch.tensor(hits, device=other.device)
        # A row ending at eos leaves it out; a stop text or a wrong token stays in.
        length[rows] = torch.where(at_eos, j, torch.where(other, j + 1, length[rows]))
        keep = ~(at_eos | other)
        live = int(keep.sum())  # one host read per generated token
        if live == 0:
            break
        if live < keep.shape[0]:
            seq, rows = seq[keep], rows[keep]
    return [ids[:n] for ids, n in zip(tokens.tolist(), length.tolist(), strict=True)]


def cached_generate(
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
    """Greedy decoding with a pretrained model's KV cache (``model.generate``), prompts
    left-padded in batches; ``stage_options`` (e.g. Huginn's ``init_scale``) go to
    ``generate``. Returns the new token ids of every prompt (``eos_id`` cut off)."""
    from eqloop.models import generate

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
    """Whether ``model`` is an Ouro/Huginn model of :mod:`eqloop.models` (cached decoding)."""
    try:
        from eqloop.models.base import PretrainedLoopedLM
    except ImportError:
        return False
    return isinstance(model, PretrainedLoopedLM)


def generate_continuations(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    loops: int | None,
    predict: PredictFn,
    tokenizer: TextTokenizer,
    max_new_tokens: int,
    stop_texts: Sequence[str] = (),
    batch_size: int = 32,
    stage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts as text, cut at the first stop text.

    At a fixed loop count (``loops``: the count ``predict`` runs, None when it does not
    run a fixed count) an Ouro/Huginn model decodes with its KV cache
    (:func:`cached_generate`; stop texts are applied to the finished text); otherwise
    ``predict`` is re-run on the whole sequence per token (:func:`greedy_generate`,
    which also stops a row as soon as a stop text appears).
    """
    if loops is not None and _has_kv_cache(model):
        outputs = cached_generate(
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
