"""lm-evaluation-harness integration: the ``eqloop`` model class, at any loop count.

Importing this module registers the class with lm-eval (0.4.13 finds models only in its
registry: it reads no entry points). Three ways to use it:

* the command line, a drop-in for ``lm_eval`` that registers the model first::

      eqloop-lm-eval --model eqloop --model_args pretrained=DIR,loops=8 --tasks gsm8k
      python -m eqloop.evaluation.harness --model eqloop --model_args pretrained=DIR,loops=8 ...

* Python: ``import eqloop.evaluation.harness`` and then
  ``lm_eval.simple_evaluate(model="eqloop", model_args="pretrained=DIR,loops=8", ...)``;
* or pass an instance: ``lm_eval.simple_evaluate(model=EqloopLM(pretrained=DIR), ...)``.

``model_args``: ``pretrained`` (a directory ``eqloop finetune`` reads: Ouro/Huginn in the
HF layout or an eqloop run), ``loops`` (default: the model's trained depth), or
``solver`` (e.g. ``anderson``, with ``tol`` and ``max_iter``) to read out at the
equilibrium instead, ``device``, ``dtype``, ``batch_size`` (an integer, ``auto`` or
``auto:N``), ``max_length``, and for Huginn ``init_scale`` and ``seed``.

Scores do not depend on the batch a request lands in: Huginn's recurrence starts from
zeros by default (``init_scale=0``); ``init_scale>0`` (upstream's random start, 1.0) draws
the start from ``seed`` afresh for every forward pass and needs ``batch_size=1``, so that
each request's start depends on the request alone.

Requests: ``loglikelihood`` (sum of the continuation's log-probabilities and whether it
is the greedy continuation), ``loglikelihood_rolling`` (lm-eval's disjoint rolling
windows of ``max_length`` tokens) and ``generate_until`` (greedy: ``until`` strings and
``max_gen_toks``; sampling is refused rather than silently replaced by greedy decoding).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import Tensor
from tqdm.auto import tqdm

import solvers
from eqloop.core.defaults import EQUILIBRIUM_MAX_ITER, EQUILIBRIUM_TOL
from eqloop.evaluation.decoding import generate_continuations
from eqloop.models.auto import load_for_finetuning
from solvers import checks

__all__ = ["EqloopLM", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DEFAULT_BATCH = 8  # sequences per forward pass when lm-eval passes none (or "auto")
_MODEL_ARGS = (
    "pretrained, loops, solver, tol, max_iter, device, dtype, batch_size, max_batch_size, "
    "max_length, init_scale, seed"
)


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    """Sequences per forward pass from lm-eval's ``batch_size``: an integer (or its text),
    ``"auto"`` or ``"auto:N"`` (HF's syntax: N re-detections). eqloop does not probe the
    memory, so ``auto`` takes ``max_batch_size`` (default 8) and says so."""
    if batch_size is None:
        return _DEFAULT_BATCH
    text = str(batch_size).strip()
    if text.startswith("auto"):
        _, colon, schedule = text.partition(":")
        try:
            valid = text == "auto" or (colon and float(schedule) > 0)
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"batch_size must be an integer, auto or auto:N; got {text!r}")
        size = _DEFAULT_BATCH if max_batch_size is None else max_batch_size
        size = checks.integer("max_batch_size", size, low=1)
        warnings.warn(
            f"batch_size {text}: the eqloop model does not probe the memory; it runs "
            f"{size} sequences per forward pass (max_batch_size)",
            stacklevel=3,
        )
        return size
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"batch_size must be an integer, auto or auto:N; got {text!r}") from None
    return checks.integer("batch_size", size, low=1)


def _context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model accepts, from its config (None: unbounded)."""
    config = model.config
    for name in ("max_seq_len", "max_position_embeddings", "block_size"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@register_model("eqloop")
class EqloopLM(TemplateLM):
    """An eqloop looped LM behind lm-eval's model interface.

    Args:
        pretrained: model directory (see ``eqloop.models.auto``).
        loops: loop count of every forward pass (default: the trained depth).
        solver: read out at the equilibrium this solver finds instead (with ``tol``,
            ``max_iter``); exclusive with ``loops``.
        tol, max_iter: equilibrium settings.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; a CUDA device on a machine without
            CUDA runs on the CPU with a warning (lm-eval's command line passes
            ``cuda:0`` unless told otherwise).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float64"``.
        batch_size: sequences per forward pass (lm-eval passes ``--batch_size``);
            ``"auto"``/``"auto:N"`` take ``max_batch_size`` (no memory probe).
        max_batch_size: the batch size ``auto`` stands for (default 8).
        max_length: context length (default: the model's).
        init_scale: Huginn only: scale of the random initial state (upstream's 1.0);
            default 0, a zero start. Above 0 it needs ``batch_size=1``.
        seed: seeds the random initial state of every forward pass (``init_scale > 0``).

    Raises:
        ValueError: unknown arguments, ``loops`` together with ``solver``, an unknown
            solver, ``init_scale`` on a model other than Huginn or above 0 with batches,
            bad values.
    """

    def __init__(
        self,
        pretrained: str,
        loops: int | None = None,
        solver: str | None = None,
        tol: float = EQUILIBRIUM_TOL,
        max_iter: int = EQUILIBRIUM_MAX_ITER,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = _DEFAULT_BATCH,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        init_scale: float | None = None,
        seed: int = 0,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown eqloop model_args {sorted(unknown)}; valid: {_MODEL_ARGS}")
        if loops is not None and solver is not None:
            raise ValueError("model_args loops and solver are exclusive: pass one of them")
        if solver is not None:  # unknown names fail here, not at the first request
            solvers.make_solver(solver)
        checks.choice("dtype", dtype, tuple(_DTYPES))
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.seed = checks.integer("seed", seed)
        self._device = torch.device(device or "cpu")
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless --device is given (as HFLM does).
            warnings.warn(
                f"device {device!r} requested but CUDA is unavailable: using the CPU", stacklevel=2
            )
            self._device = torch.device("cpu")
        loaded = load_for_finetuning(pretrained, device=self._device, dtype=_DTYPES[dtype])
        self.model = loaded.model.eval()
        self.text_tokenizer = loaded.tokenizer
        self.loops = (
            loaded.trained_loops if loops is None else checks.integer("loops", loops, low=1)
        )
        self.solver = solver
        self.tol = checks.number("tol", tol, low=0.0, low_open=True)
        self.max_iter = checks.integer("max_iter", max_iter, low=1)
        context = _context_length(self.model) if max_length is None else max_length
        self.max_length = checks.integer("max_length", context or 4096, low=2)
        # Keywords of every forward pass: Huginn's start state (zeros unless asked).
        self._stage: dict[str, float] = {}
        if loaded.arch == "huginn_raven":
            scale = 0.0 if init_scale is None else init_scale
            self._stage["init_scale"] = checks.number("init_scale", scale, low=0.0)
        elif init_scale is not None:
            raise ValueError(
                f"init_scale is a Huginn option; this {loaded.arch} model starts its loop "
                "from the input"
            )
        if self.random_start and self.batch_size != 1:
            raise ValueError(
                f"init_scale={self._stage['init_scale']} draws a random start per forward "
                f"pass, which would tie a request's score to its batch: pass batch_size=1 "
                f"(got {self.batch_size}), or init_scale=0"
            )

    # -- what lm-eval asks about the model ---------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.text_tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return self.text_tokenizer.name

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        """Ids of ``string``; with the tokenizer's beginning-of-sequence token unless
        ``add_special_tokens`` is False (as the prompts ``eqloop finetune`` trains on)."""
        if add_special_tokens is False:
            return self.text_tokenizer.encode(string)
        return self.text_tokenizer.encode_prompt(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.text_tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        return {"loops": None if self.solver else self.loops, "solver": self.solver, **self._stage}

    @property
    def random_start(self) -> bool:
        """Whether every forward pass draws a random initial state (Huginn, init_scale > 0)."""
        return self._stage.get("init_scale", 0.0) > 0

    # -- running the model -----------------------------------------------------------

    @torch.no_grad()
    def _logits(self, tokens: Tensor) -> Tensor:
        """(B, S) ids -> (B, S, V) float32 logits at ``loops`` or at the equilibrium.

        A random start is drawn from a generator seeded with ``seed`` at every call, so a
        sequence (alone in its batch, see ``random_start``) always gets the same one.
        """
        stage: dict[str, Any] = dict(self._stage)
        if self.random_start:
            stage["generator"] = torch.Generator(self._device).manual_seed(self.seed)
        if self.solver is None:
            return self.model(tokens, loops=self.loops, **stage).float()
        logits = self.model(
            tokens, solver=self.solver, tol=self.tol, max_iter=self.max_iter, **stage
        )
        return logits.float()

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **_: Any,
    ) -> list[tuple[float, bool]]:
        """Log-probability of each continuation and whether greedy decoding produces it.

        Sequences are sorted by length, right-padded into batches (causal attention: the
        padding never influences a real position) and their contexts truncated on the
        left to ``max_length`` (as lm-eval's HF model does).

        Raises:
            ValueError: an empty continuation, or one that does not fit ``max_length``
                behind at least one context token.
        """
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("loglikelihood got an empty continuation")
            whole = (context + continuation)[-(self.max_length + 1) :]
            if len(continuation) > len(whole) - 1:
                raise ValueError(
                    f"a loglikelihood continuation of {len(continuation)} tokens (after "
                    f"{len(context)} context tokens) does not fit max_length "
                    f"{self.max_length}: the model must read at least one token before it; "
                    "raise model_args max_length (up to the model's context) or shorten it"
                )
            rows.append((whole[:-1], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        pad = self.text_tokenizer.pad_id
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for chunk in tqdm(chunks, desc="loglikelihood", disable=disable_tqdm):
            width = len(rows[chunk[0]][0])
            batch = torch.full((len(chunk), width), pad, dtype=torch.long)
            for r, i in enumerate(chunk):
                batch[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logprobs = F.log_softmax(self._logits(batch.to(self._device)), dim=-1).cpu()
            for r, i in enumerate(chunk):
                inputs, n = rows[i]
                whole = requests[i][1] + requests[i][2]
                target = torch.tensor(whole[-n:])
                scores = logprobs[r, len(inputs) - n : len(inputs)]
                picked = scores.gather(1, target[:, None]).squeeze(1)
                greedy = bool((scores.argmax(-1) == target).all())
                results[i] = (float(picked.sum()), greedy)
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-probability of each text, in disjoint windows of ``max_length``."""
        out = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            windows = [
                (("", ""), *lm_utils.make_disjoint_window(window))
                for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
            out.append(sum(score for score, _ in scores))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string or ``max_gen_toks``.

        Requests with the same generation settings are decoded together in batches
        (Ouro/Huginn with their KV cache at a fixed loop count; recomputed with a random
        start). The prompt keeps its last ``max_length - max_gen_toks`` tokens.

        Raises:
            ValueError: sampling asked for, or ``max_gen_toks >= max_length`` (no room
                left for the prompt).
        """
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs = request.args
            options = dict(gen_kwargs)
            until = options.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(options.pop("max_gen_toks", 256))
            if max_new >= self.max_length:
                raise ValueError(
                    f"max_gen_toks {max_new} leaves no room for the prompt in max_length "
                    f"{self.max_length}: lower the task's max_gen_toks or raise model_args "
                    "max_length (up to the model's context)"
                )
            if options.pop("do_sample", False) and float(options.get("temperature", 0.0)) > 0:
                raise ValueError(
                    "the eqloop lm-eval model decodes greedily; set do_sample=false for this task"
                )
            groups.setdefault((until, max_new), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (until, max_new), indices in groups.items():
            budget = self.max_length - max_new
            prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in indices]
            cached = self.solver is None and not self.random_start  # else via _logits
            texts = generate_continuations(
                self.model,
                prompts,
                loops=self.loops if cached else None,
                predict=self._logits,
                tokenizer=self.text_tokenizer,
                max_new_tokens=max_new,
                stop_texts=until,
                batch_size=self.batch_size,
                stage_options=self._stage,
            )
            for i, text in zip(indices, texts, strict=True):
                out[i] = text
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return out


def main(argv: Sequence[str] | None = None) -> None:
    """``eqloop-lm-eval``: lm-eval's own command line with the ``eqloop`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
