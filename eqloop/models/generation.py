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
buffers written in place at a tensor position, see :class:`~eqloop.models.layers.KVCache`),
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
:class:`~eqloop.models.base.PretrainedLoopedLM` (``decode_options``,
``decode_call``, ``decode_step``, ``decode_recompute``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from eqloop.models.base import PretrainedLoopedLM
from eqloop.models.layers import KVCache
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
        model: an Ouro or Huginn model from :func:`eqloop.models.load`.
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
            :data:`~eqloop.models.huginn.HUGINN_EXITS`).
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
            grows (see :class:`~eqloop.models.layers.KVCache`); the stop ids and
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
    mask = model.check_attention_mask(attention_mask, input_ids.shape)
    if mask is not None:
        _check_left_padded(mask)
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=0)
    loops = model.trained_loops if loops is None else checks.integer("loops", loops, low=1)
    sampling = _check_sampling(do_sample, temperature, top_k, top_p)
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
    decode = _Decode(
        model=model,
        input_ids=input_ids,
        mask=mask,
        loops=loops,
        options=options,
        generator=generator,
        step_fn=step_fn,
        use_cache=use_cache,
        sampling=sampling,
        usable=usable,
        stops=stops,
        pad_token_id=pad_token_id,
    )
    with torch.no_grad():
        steps = _decode_loop(decode, max_new_tokens)
    return _generate_result(decode, steps, return_dict)


@dataclass(frozen=True)
class _Sampling:
    """How the next token is picked from a step's logits (checked by :func:`_check_sampling`).

    Attributes:
        do_sample: sample from the softmax instead of taking the argmax.
        temperature: softmax temperature (> 0).
        top_k: keep only the ``top_k`` largest logits (``None``: all).
        top_p: nucleus sampling mass in (0, 1] (``None``: no nucleus filter).
    """

    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None


def _check_sampling(
    do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> _Sampling:
    """Check :func:`generate`'s sampling arguments.

    Args:
        do_sample, temperature, top_k, top_p: as in :func:`generate`.

    Returns:
        The checked arguments.

    Raises:
        TypeError, ValueError: a bad argument, or a sampling filter without ``do_sample``.
    """
    checks.boolean("do_sample", do_sample)
    temperature = checks.number("temperature", temperature, low=0.0, low_open=True)
    if top_k is not None:
        top_k = checks.integer("top_k", top_k, low=1)
    if top_p is not None:
        top_p = checks.number("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if not do_sample and (top_k is not None or top_p is not None or temperature != 1.0):
        raise ValueError("temperature, top_k and top_p need do_sample=True")
    return _Sampling(do_sample, temperature, top_k, top_p)


@dataclass(frozen=True)
class _Decode:
    """The checked inputs of one :func:`generate` call that every decode step reads.

    Attributes:
        model: the model decoding.
        input_ids: (B, S) the prompts.
        mask: (B, S) the prompts' attention mask, or ``None`` (no padding).
        loops: loops per token.
        options: the model's checked :meth:`~PretrainedLoopedLM.decode_options`.
        generator: random generator for sampling and Huginn's initial states.
        step_fn: the compiled one-token decode step, or ``None`` (eager).
        use_cache: decode with a KV cache (else recompute the whole sequence per token).
        sampling: how the next token is picked.
        usable: the ids below this one are the ones the model can generate.
        stops: the stop ids (may be empty).
        pad_token_id: id written after a row stopped.
    """

    model: PretrainedLoopedLM
    input_ids: Tensor
    mask: Tensor | None
    loops: int
    options: Any
    generator: torch.Generator | None
    step_fn: Callable[..., Any] | None
    use_cache: bool
    sampling: _Sampling
    usable: int
    stops: list[int]
    pad_token_id: int


@dataclass
class _Steps:
    """What the decode steps produced, one entry per step, concatenated once at the end.

    Attributes:
        finished: (B,) the rows that have produced a stop id.
        tokens: (B,) per step: the token (``pad_token_id`` for rows that had stopped).
        masks: (B, 1) per step: 1 while the row had not stopped.
        loops_used: (B,) per step: loops run (0 for rows that had stopped).
        logits: (B, V) per step: float logits (``-inf`` past the usable ids).
        all_done: () per step: every row has stopped after it (only with stop ids).
    """

    finished: Tensor
    tokens: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    loops_used: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)
    all_done: list[Tensor] = field(default_factory=list)


def _new_cache(decode: _Decode, max_new_tokens: int) -> KVCache | None:
    """The KV cache of a :func:`generate` call (``None`` without ``use_cache``).

    Room for the prompt and :data:`CACHE_RESERVE` new tokens; the cache doubles from there
    as tokens arrive (up to prompt + ``max_new_tokens``), so a large ``max_new_tokens``
    costs nothing until the tokens are generated.
    """
    if not decode.use_cache:
        return None
    batch, prompt_len = decode.input_ids.shape
    return KVCache(
        batch,
        prompt_len + min(max_new_tokens, CACHE_RESERVE),
        max_length=prompt_len + max_new_tokens,
    )


def _step_logits(
    decode: _Decode,
    steps: _Steps,
    step: int,
    step_tokens: Tensor,
    step_mask: Tensor | None,
    cache: KVCache | None,
) -> tuple[Tensor, Tensor]:
    """Run the model for one decode step.

    Args:
        decode: the call's checked inputs.
        steps: the steps so far (read only without a cache, to rebuild the sequence).
        step: the step's index (0: the prompt, which runs eagerly).
        step_tokens: (B, S) the prompt at step 0, then (B, 1) the last token.
        step_mask: (B, S) the prompt's mask at step 0, then ``None``.
        cache: the KV cache, or ``None`` (recompute the whole sequence).

    Returns:
        (B, V) the logits of the next token and (B,) the loops run.
    """
    if cache is not None:
        # The prompt (step 0) runs eagerly: only the one-token decode step is compiled.
        compiled = None if step == 0 else decode.step_fn
        return decode.model.decode_call(
            step_tokens,
            step_mask,
            cache,
            decode.loops,
            decode.options,
            decode.generator,
            compiled,
        )
    mask = decode.mask
    return decode.model.decode_recompute(
        torch.cat([decode.input_ids, *(t[:, None] for t in steps.tokens)], dim=1),
        None if mask is None else torch.cat([mask, *steps.masks], dim=1).bool(),
        decode.loops,
        decode.options,
        decode.generator,
    )


def _decode_loop(decode: _Decode, max_new_tokens: int) -> _Steps:
    """Generate up to ``max_new_tokens`` tokens per row (the loop of :func:`generate`).

    Args:
        decode: the call's checked inputs.
        max_new_tokens: the most steps.

    Returns:
        The steps run, without those after every row had stopped.

    Raises:
        ValueError: the logits of a row still generating are NaN or infinite.
    """
    input_ids, usable, sampling = decode.input_ids, decode.usable, decode.sampling
    # Host reads (stop ids, finite logits) every `every` tokens: each token eagerly, and
    # every HOST_CHECK_EVERY tokens when compiled, so a compiled decode loop queues its
    # steps without waiting for the device; the tokens past a stop are then dropped.
    every = 1 if decode.step_fn is None else HOST_CHECK_EVERY
    stop_ids = torch.tensor(decode.stops, dtype=input_ids.dtype, device=input_ids.device)
    steps = _Steps(torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device))
    broken: list[Tensor] = []  # (B,) per step: non-finite logits in a row still generating
    cache = _new_cache(decode, max_new_tokens)
    step_tokens, step_mask = input_ids, decode.mask
    for step in range(max_new_tokens):
        logits, used = _step_logits(decode, steps, step, step_tokens, step_mask, cache)
        logits = logits.float()
        finished = steps.finished
        nonfinite = ~torch.isfinite(logits[:, :usable]).all(dim=-1)  # (B,)
        broken.append(nonfinite & ~finished)
        if usable < logits.shape[-1]:
            logits[:, usable:] = float("-inf")
        steps.logits.append(logits)
        # Rows with NaN logits pick from zeros, so sampling goes on to the host check
        # below, which refuses them (finished rows are padded anyway).
        choose = torch.where(nonfinite[:, None], torch.zeros_like(logits), logits)
        token = _next_token(
            choose,
            sampling.do_sample,
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
            decode.generator,
        )
        token = torch.where(finished, torch.full_like(token, decode.pad_token_id), token)
        steps.loops_used.append(torch.where(finished, torch.zeros_like(used), used))
        steps.masks.append((~finished).to(input_ids.dtype)[:, None])
        steps.tokens.append(token)
        if decode.stops:
            steps.finished = finished | torch.isin(token, stop_ids)
            steps.all_done.append(steps.finished.all())
        if (step + 1) % every == 0 or step + 1 == max_new_tokens:
            _check_finite(broken, step + 1 - len(broken))
            broken = []
            if decode.stops and bool(steps.all_done[-1]):
                break
        step_tokens, step_mask = token[:, None], None
    if steps.all_done and bool(steps.all_done[-1]):  # drop the steps after every row stopped
        keep = int(torch.stack(steps.all_done).int().argmax()) + 1
        del steps.tokens[keep:], steps.masks[keep:], steps.loops_used[keep:], steps.logits[keep:]
    return steps


def _generate_result(decode: _Decode, steps: _Steps, return_dict: bool) -> Tensor | GenerateOutput:
    """Concatenate the steps into :func:`generate`'s result.

    Args:
        decode: the call's checked inputs.
        steps: the steps run.
        return_dict: return a :class:`GenerateOutput` instead of the sequences.

    Returns:
        (B, S + n) token ids, or a :class:`GenerateOutput`.
    """
    input_ids, mask = decode.input_ids, decode.mask
    batch, device = input_ids.shape[0], input_ids.device
    sequences = torch.cat([input_ids, *(t[:, None] for t in steps.tokens)], dim=1)
    if not return_dict:
        return sequences
    prompt_mask = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.dtype)
    used_all = (
        torch.stack(steps.loops_used, dim=1)
        if steps.loops_used
        else torch.zeros(batch, 0, dtype=torch.long, device=device)
    )
    logits_all = (
        torch.stack(steps.logits, dim=1)
        if steps.logits
        else torch.zeros(batch, 0, decode.model.vocab_size, device=device)
    )
    return GenerateOutput(
        sequences=sequences,
        attention_mask=torch.cat([prompt_mask, *steps.masks], dim=1),
        loops_used=used_all,
        finished=steps.finished,
        logits=logits_all,
    )


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
