"""Autoregressive generation with a KV cache laid out per (loop, layer).

One call of :func:`generate`:

1. prefill: the prompt runs through the model once; every attention layer of every
   loop writes its keys/values to its own cache slot (Ouro: ``(loop, layer)`` for
   L x T slots; Huginn: the prelude and coda blocks once, ``(loop, layer)`` for the
   core).
2. decode: each new token runs all loops over that one token, each layer attending to
   its own slot. Cached decoding computes the same logits as recomputing the whole
   sequence (tested).

Compiled decoding (``compile=True``): the cache is static between growths (full-capacity
buffers written in place at a tensor position, see :class:`~eqloop.pretrained.layers.KVCache`),
so the one-token decode step compiles to one graph (``fullgraph=True``), used for every
token; the first growth of the cache adds one shape-generic graph, later growths none.
The prompt runs eagerly. The host reads the stop ids and the finiteness of the logits
every :data:`HOST_CHECK_EVERY` tokens (each token when eager) and drops the tokens
generated past the point where every row had stopped, so compiled and eager results
are the same.

Batched prompts of different lengths are **left-padded** (``attention_mask`` 0 on the
left, as ``load_tokenizer`` pads by default): every row's next token then sits at the
same index. Padded keys are masked and positions count real tokens only, so a padded
row decodes as it would alone.

Exits, per token and per row of the batch, are the model's (see its
``decode_options``): Ouro's gate (``exit="last" | "threshold" | "expected"``: all loops
run, the gate picks the logits) or Huginn's criteria (``exit="latent-diff" | "kl" |
"entropy-diff" | "argmax-stability"``: a token stops looping once its criterion holds).
This module never asks which architecture it has: it runs the decode-step interface of
:class:`~eqloop.pretrained.base.PretrainedLoopedLM` (``decode_options``,
``decode_call``, ``decode_step``, ``decode_recompute``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eqloop.pretrained.base import PretrainedLoopedLM
from eqloop.pretrained.layers import KVCache
from solvers import checks

__all__ = [
    "CACHE_RESERVE",
    "COMPILE_OPTIONS",
    "HOST_CHECK_EVERY",
    "GenerateOutput",
    "GenerationMixin",
    "adaptive_forward",
    "generate",
]

CACHE_RESERVE = 256
"""New tokens :func:`generate` reserves KV-cache room for before the cache first grows."""

HOST_CHECK_EVERY = 16
"""Tokens between the host reads of a compiled :func:`generate` (stop ids, finite logits)."""


@dataclass(frozen=True)
class GenerateOutput:
    """What :func:`generate` returns with ``return_dict=True``.

    Attributes:
        sequences: (B, S + n) prompt and new tokens (``pad_token_id`` after a row stops).
        attention_mask: (B, S + n) 1 at real tokens (0 at the prompt's left padding and
            after a row stopped).
        loops_used: (B, n) int64, loops behind each new token: the exit loop for Ouro's
            threshold exit, the steps run for Huginn's criteria, else ``loops``.
        finished: (B,) bool, rows that produced a stop token.
        logits: (B, n, V) float32, the logits each new token was chosen from (after the
            vocabulary cut, before the sampling filters).
    """

    sequences: Tensor
    attention_mask: Tensor
    loops_used: Tensor
    finished: Tensor
    logits: Tensor


# ------------------------------------------------------------------- compilation

COMPILE_OPTIONS = ("backend", "mode", "options", "dynamic")
"""Keys of a ``compile`` dict of :func:`generate`, passed on to ``torch.compile``."""


def _compile_options(compile: Any) -> dict[str, Any] | None:
    """``generate``'s ``compile`` argument as ``torch.compile`` keywords, or ``None`` for
    eager decoding (``True``: the defaults; a dict: the :data:`COMPILE_OPTIONS`)."""
    if compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        unknown = sorted(set(compile) - set(COMPILE_OPTIONS))
        if unknown:
            raise ValueError(
                f"compile options {unknown} are not supported; use keys from {COMPILE_OPTIONS} "
                "(passed on to torch.compile)"
            )
        return dict(compile)
    raise TypeError(
        f"compile must be True, False or a dict of torch.compile options, got "
        f"{type(compile).__name__}"
    )


def _compiled_step(
    model: PretrainedLoopedLM, options: dict[str, Any]
) -> Callable[..., tuple[Tensor, Tensor]]:
    """The model's ``decode_step`` compiled with the ``torch.compile`` keywords
    ``options``, plus ``mode="reduce-overhead"`` (CUDA graphs) on CUDA unless a mode or
    backend is given. The step is compiled with ``fullgraph=True``: one graph per cache
    capacity, or an error, never a silent split.
    """
    if model.get_input_embeddings().weight.device.type == "cuda" and not {
        "mode",
        "backend",
    } & set(options):
        options = {**options, "mode": "reduce-overhead"}
    compiled = torch.compile(model.decode_step, fullgraph=True, **options)

    def step(*args: Any) -> tuple[Tensor, Tensor]:
        torch.compiler.cudagraph_mark_step_begin()  # a new token: last outputs may be reused
        logits, used = compiled(*args)
        return logits.clone(), used.clone()  # CUDA graphs overwrite outputs on the next replay

    return step


# ------------------------------------------------------------------------ sampling


def _next_token(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """(B, V) float logits -> (B,) int64 token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    # Shift the maximum to 0 before dividing: any temperature > 0, however small, then
    # gives logits <= 0 (-inf at most), never inf - inf = NaN; as it goes to 0 sampling
    # becomes the argmax.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_finite(broken: list[Tensor], first: int) -> None:
    """Refuse non-finite logits of rows still generating (one host read for all steps).

    NaN logits would otherwise decode silently as token 0 (the argmax of NaNs) or stop
    sampling with an unrelated error.

    Args:
        broken: (B,) bool per step since the last check: rows whose logits were not
            finite while still generating.
        first: the index of the new token of ``broken[0]``.
    """
    if not broken:
        return
    flags = torch.stack(broken)  # (k, B)
    if bool(flags.any()):
        step = int(flags.any(dim=1).int().argmax())
        rows = flags[step].nonzero().flatten().tolist()
        raise ValueError(
            f"generate: the logits of new token {first + step} are not finite (NaN or inf) in "
            f"batch rows {rows}: the weights or the looped state overflowed or hold NaN "
            "(check the checkpoint, load it in float32, or run fewer loops)"
        )


def _check_stop_ids(stop_token_ids: Any, usable: int) -> list[int]:
    """``stop_token_ids`` (None, one id, or a list/tuple of ids) as a list of ids the
    model can generate, i.e. in ``[0, usable)``; an id it never generates would never stop."""
    if stop_token_ids is None:
        return []
    if isinstance(stop_token_ids, int) and not isinstance(stop_token_ids, bool):
        stop_token_ids = [stop_token_ids]
    if not isinstance(stop_token_ids, (list, tuple)):
        raise TypeError(
            "stop_token_ids must be a token id or a list of token ids (e.g. the tokenizer's "
            f"eos_token_id), got {type(stop_token_ids).__name__}"
        )
    return [
        checks.integer(f"stop_token_ids[{i}] (a token id)", stop, low=0, high=usable - 1)
        for i, stop in enumerate(stop_token_ids)
    ]


def _check_left_padded(mask: Tensor) -> None:
    ordered = bool((mask[:, 1:] >= mask[:, :-1]).all())
    if not ordered or not bool(mask[:, -1].all()):
        raise ValueError(
            "generate needs left-padded prompts: each attention_mask row must be zeros then "
            "ones (load_tokenizer(..., padding_side='left') pads that way), with at least "
            "one real token"
        )


# ------------------------------------------------------------------------ generate


def generate(
    model: PretrainedLoopedLM,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int,
    loops: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: int | list[int] | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    exit: str | None = None,
    exit_threshold: float | None = None,
    init_scale: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool | dict[str, Any] = False,
    return_dict: bool = False,
) -> Tensor | GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens per row (see the module docstring).

    Args:
        model: an Ouro or Huginn model from :func:`eqloop.pretrained.load`.
        input_ids: (B, S) prompts, left-padded when their lengths differ.
        attention_mask: (B, S) 1 for real tokens, 0 for the left padding.
        max_new_tokens: tokens to add (fewer when every row stopped).
        loops: loops per token (Huginn with an exit criterion: the most steps);
            default :attr:`~PretrainedLoopedLM.trained_loops`.
        do_sample: sample from the softmax instead of taking the argmax.
        temperature, top_k, top_p: sampling filters (``do_sample`` only).
        stop_token_ids: a row stops after producing one of these ids (one id or a list;
            each must be one the model can generate).
        pad_token_id: id written after a row stopped (default: the first stop id, or 0).
        exit: the model's exit (its ``decode_options``): Ouro ``"last"`` (default) |
            ``"threshold"`` | ``"expected"``; Huginn
            ``"none"`` (default) | ``"latent-diff"`` | ``"kl"`` | ``"entropy-diff"`` |
            ``"argmax-stability"``.
        exit_threshold: the exit's threshold (defaults: Ouro's config
            ``early_exit_threshold``; Huginn's
            :data:`~eqloop.pretrained.huginn.HUGINN_EXITS`).
        init_scale: Huginn's initial-state scale (0: zeros, deterministic).
        generator: random generator for sampling and Huginn's initial states.
        use_cache: ``False`` recomputes the whole sequence for every token (the
            reference the cache is tested against; not with a Huginn exit criterion,
            and equal to the cached result for Huginn only with ``init_scale=0``, since
            a recompute draws new random initial states for every position).
        compile: compile the one-token decode step with ``torch.compile`` (the prompt
            runs eagerly): ``True`` for the defaults (``mode="reduce-overhead"``, i.e.
            CUDA graphs, on CUDA), or a dict of :data:`COMPILE_OPTIONS` (e.g.
            ``{"backend": "aot_eager"}``). One graph serves every token until the KV cache
            grows (see :class:`~eqloop.pretrained.layers.KVCache`); the stop ids and
            the finiteness of the logits are then read on the host every
            :data:`HOST_CHECK_EVERY` tokens instead of every token (the tokens generated
            past a stop are dropped, so the result is the same). Not with
            ``use_cache=False`` or a Huginn exit criterion.
        return_dict: return a :class:`GenerateOutput` instead of the sequences.

    Returns:
        (B, S + n) token ids, or a :class:`GenerateOutput`.

    Raises:
        TypeError, ValueError: a bad argument (named in the message): e.g. an empty
            batch, an attention mask that is not 0/1, a stop id the model cannot
            generate, an ``exit_threshold`` for an exit that uses none.
        ValueError: the logits of a row still generating are NaN or infinite.
    """
    if not isinstance(model, PretrainedLoopedLM):
        raise TypeError(f"model must be an eqloop pretrained looped LM, got {type(model).__name__}")
    input_ids = model.check_input_ids(input_ids)
    batch, prompt_len = input_ids.shape
    mask = model.check_attention_mask(attention_mask, input_ids.shape)
    if mask is not None:
        _check_left_padded(mask)
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=0)
    loops = model.trained_loops if loops is None else checks.integer("loops", loops, low=1)
    checks.boolean("do_sample", do_sample)
    temperature = checks.number("temperature", temperature, low=0.0, low_open=True)
    if top_k is not None:
        top_k = checks.integer("top_k", top_k, low=1)
    if top_p is not None:
        top_p = checks.number("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if not do_sample and (top_k is not None or top_p is not None or temperature != 1.0):
        raise ValueError("temperature, top_k and top_p need do_sample=True")
    # Ids the tokenizer cannot produce (Huginn's padded vocabulary) are never generated.
    usable = getattr(model.config, "vocab_size", model.vocab_size)
    stops = _check_stop_ids(stop_token_ids, usable)
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    pad_token_id = checks.integer("pad_token_id", pad_token_id, low=0, high=model.vocab_size - 1)
    checks.boolean("use_cache", use_cache)

    compile_options = _compile_options(compile)
    # The model checks its own exit options (and which of them need the cache or
    # cannot be compiled); everything below is the same for every architecture.
    options = model.decode_options(
        exit,
        exit_threshold,
        init_scale=init_scale,
        use_cache=use_cache,
        compiled=compile_options is not None,
    )
    if compile_options is not None and not use_cache:
        raise ValueError("compile compiles the cached decode step: it needs use_cache=True")
    step_fn = None if compile_options is None else _compiled_step(model, compile_options)
    # Host reads (stop ids, finite logits) every `every` tokens: each token eagerly, and
    # every HOST_CHECK_EVERY tokens when compiled, so a compiled decode loop queues its
    # steps without waiting for the device; the tokens past a stop are then dropped.
    every = 1 if step_fn is None else HOST_CHECK_EVERY
    prompt_mask = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.dtype)
    stop_ids = torch.tensor(stops, dtype=input_ids.dtype, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens: list[Tensor] = []  # (B,) per step, concatenated once at the end
    new_masks: list[Tensor] = []  # (B,) 1 while the row had not stopped
    loops_used: list[Tensor] = []  # (B,) per step
    step_logits: list[Tensor] = []  # (B, V) per step
    broken: list[Tensor] = []  # (B,) per step: non-finite logits in a row still generating
    all_done: list[Tensor] = []  # () per step: every row has stopped after it
    # Room for the prompt and CACHE_RESERVE new tokens; the cache doubles from there as
    # tokens arrive (up to prompt + max_new_tokens), so a large max_new_tokens costs
    # nothing until the tokens are generated.
    cache = (
        KVCache(
            batch,
            prompt_len + min(max_new_tokens, CACHE_RESERVE),
            max_length=prompt_len + max_new_tokens,
        )
        if use_cache
        else None
    )
    step_tokens, step_mask = input_ids, mask
    with torch.no_grad():
        for step in range(max_new_tokens):
            # The prompt (step 0) runs eagerly: only the one-token decode step is compiled.
            compiled = None if step == 0 else step_fn
            if use_cache:
                logits, used = model.decode_call(
                    step_tokens, step_mask, cache, loops, options, generator, compiled
                )
            else:
                logits, used = model.decode_recompute(
                    torch.cat([input_ids, *(t[:, None] for t in new_tokens)], dim=1),
                    None if mask is None else torch.cat([mask, *new_masks], dim=1).bool(),
                    loops,
                    options,
                    generator,
                )
            logits = logits.float()
            nonfinite = ~torch.isfinite(logits[:, :usable]).all(dim=-1)  # (B,)
            broken.append(nonfinite & ~finished)
            if usable < logits.shape[-1]:
                logits[:, usable:] = float("-inf")
            step_logits.append(logits)
            # Rows with NaN logits pick from zeros, so sampling goes on to the host check
            # below, which refuses them (finished rows are padded anyway).
            choose = torch.where(nonfinite[:, None], torch.zeros_like(logits), logits)
            token = _next_token(choose, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            loops_used.append(torch.where(finished, torch.zeros_like(used), used))
            new_masks.append((~finished).to(prompt_mask.dtype)[:, None])
            new_tokens.append(token)
            if stops:
                finished = finished | torch.isin(token, stop_ids)
                all_done.append(finished.all())
            if (step + 1) % every == 0 or step + 1 == max_new_tokens:
                _check_finite(broken, step + 1 - len(broken))
                broken = []
                if stops and bool(all_done[-1]):
                    break
            step_tokens, step_mask = token[:, None], None
    if all_done and bool(all_done[-1]):  # drop the steps after every row had stopped
        keep = int(torch.stack(all_done).int().argmax()) + 1
        del new_tokens[keep:], new_masks[keep:], loops_used[keep:], step_logits[keep:]
    sequences = torch.cat([input_ids, *(t[:, None] for t in new_tokens)], dim=1)
    used_all = (
        torch.stack(loops_used, dim=1)
        if loops_used
        else torch.zeros(batch, 0, dtype=torch.long, device=input_ids.device)
    )
    if return_dict:
        vocab = model.vocab_size
        logits_all = (
            torch.stack(step_logits, dim=1)
            if step_logits
            else torch.zeros(batch, 0, vocab, device=input_ids.device)
        )
        return GenerateOutput(
            sequences=sequences,
            attention_mask=torch.cat([prompt_mask, *new_masks], dim=1),
            loops_used=used_all,
            finished=finished,
            logits=logits_all,
        )
    return sequences


def adaptive_forward(
    model: PretrainedLoopedLM,
    tokens: Tensor,
    *,
    exit: str,
    exit_threshold: float | None = None,
    loops: int | None = None,
    attention_mask: Tensor | None = None,
    init_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The adaptive-compute forward: token by token, each exiting by the model's ``exit``.

    Upstream Huginn's ``forward_with_adaptive_compute`` for a batch: position i runs its
    loop with the KV cache of positions < i until its exit criterion holds (at most
    ``loops`` steps), exactly as :func:`generate` decodes a new token. For Ouro, whose
    exits run every loop, it equals ``forward(exit=...)`` position by position.

    Returns:
        logits (B, S, V) and the loops each position ran (B, S) int64.
    """
    if not isinstance(model, PretrainedLoopedLM):
        raise TypeError(f"model must be an eqloop pretrained looped LM, got {type(model).__name__}")
    tokens = model.check_input_ids(tokens)
    mask = model.check_attention_mask(attention_mask, tokens.shape)
    options = model.decode_options(exit, exit_threshold, init_scale=init_scale)
    loops = model.trained_loops if loops is None else checks.integer("loops", loops, low=1)
    cache = KVCache(tokens.shape[0], tokens.shape[1])
    outputs, steps = [], []
    for i in range(tokens.shape[1]):
        column = None if mask is None else mask[:, i : i + 1]
        logits, used = model.decode_call(
            tokens[:, i : i + 1], column, cache, loops, options, generator
        )
        outputs.append(logits)
        steps.append(used)
    return torch.stack(outputs, dim=1), torch.stack(steps, dim=1)


class GenerationMixin:
    """Gives the pretrained models :meth:`generate`."""

    def generate(self, input_ids: Tensor, **options: Any) -> Tensor | GenerateOutput:
        """Autoregressive decoding with a KV cache; see :func:`generate` for the options."""
        return generate(self, input_ids, **options)
