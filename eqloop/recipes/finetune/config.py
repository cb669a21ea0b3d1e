"""The fine-tuning configuration: one dataclass, from JSON/TOML plus ``--set`` overrides.

Example::

    config = load_finetune_config("sft.json", ["mode=stars", "lam=0.1", "lora.r=16"])

Every check runs in :meth:`FinetuneConfig.validate`, before anything is loaded or written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eqloop.config import ConfigBase, load_config_data
from eqloop.training.config import (
    SCHEDULES,
    SolveConfig,
    TrainingConfigMixin,
    check_backward,
    check_penalty_start,
    check_run_options,
)
from solvers import checks

if TYPE_CHECKING:
    from eqloop.core.backward import Backward

__all__ = [
    "BACKWARDS",
    "MODES",
    "PARALLEL",
    "PENALTY_PRODUCTS",
    "PRECISIONS",
    "FinetuneConfig",
    "LoraOptions",
    "load_finetune_config",
]

MODES: tuple[str, ...] = ("sft", "stars")
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
PARALLEL: tuple[str, ...] = ("ddp", "fsdp")
PENALTY_PRODUCTS: tuple[str, ...] = ("auto", "vjp", "jvp")
BACKWARDS: tuple[str, ...] = ("unroll", "ift", "phantom")  # "ift", "phantom": with solve


def _stars_depth() -> dict[str, Any]:
    """The STARS sampler for Ouro-1.4B: clamp(round(LogNormal(1.7, 0.4)), 1, 16)."""
    return {"kind": "lognormal", "mu": 1.7, "sigma": 0.4, "lo": 1, "hi": 16}


@dataclass
class LoraOptions(ConfigBase):
    """LoRA adapters (peft) instead of full fine-tuning; merged into the weights on save."""

    r: int = 8  # adapter rank
    alpha: float = 16.0  # scaling numerator: the update is alpha / r * B A
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] | None = None  # module names; None: eqloop.training.lora.DEFAULT_TARGETS

    def validate(self) -> None:
        """Check every field (messages name them as ``lora.<field>``)."""
        checks.integer("lora.r", self.r, low=1)
        checks.number("lora.alpha", self.alpha, low=0.0, low_open=True)
        checks.number("lora.dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.targets is not None and (
            isinstance(self.targets, str)
            or not self.targets
            or not all(isinstance(t, str) and t for t in self.targets)
        ):
            raise ValueError(f"lora.targets must be null or a list of names, got {self.targets!r}")


@dataclass
class FinetuneConfig(TrainingConfigMixin, ConfigBase):
    """Everything that defines a fine-tuning run (see ``eqloop.recipes.finetune.train``).

    ``from_dict(data, complete=...)`` passes ``complete`` to :meth:`validate`.
    """

    # -- model and data ------------------------------------------------------------------
    init_from: str = ""  # pretrained directory (HF layout: Ouro, Huginn) or eqloop run dir
    train_file: str = ""  # JSONL, GSM8K (question/answer "#### N") or prompt/completion
    eval_file: str | None = None  # JSONL evaluated after training (None: no evaluation)
    data_format: str = "auto"  # "auto" | "gsm8k" | "prompt_completion"
    prompt: str = "Question: {question}\nAnswer:"  # prompt template (lm-eval's gsm8k)
    delimiter: str = " "  # between prompt and completion
    max_len: int = 512  # longest training sequence in tokens
    seed: int = 0  # seeds the data order, depth draws, dropout, penalty vectors, LoRA init
    # -- what is trained -----------------------------------------------------------------
    mode: str = "stars"  # "sft": fixed loops | "stars": depth sampler + Jacobian penalty
    loops: int | None = None  # SFT loop count; None: the model's trained depth
    depth: dict[str, Any] = field(
        default_factory=_stars_depth
    )  # STARS sampler (eqloop.training.depth)
    lam: float = 0.1  # STARS: loss = (1 - lam) * CE + lam * JSRR; in [0, 1]
    # STARS: first step with the penalty, a step (integer >= 0) or a fraction of steps in (0, 1)
    penalty_start: float | int = 0
    power_steps: int = 1  # Jacobian products per penalty (paper: 1)
    penalty_target: float | None = None  # hinge relu(||J v|| - target)^2; None: ||J v||^2
    penalty_product: str = "auto"  # "vjp" (paper) | "jvp" | "auto": vjp, jvp under FSDP
    penalty_rows: int | None = None  # sequences per micro-batch in the penalty; None: all
    lora: LoraOptions | None = None  # None: full fine-tuning
    # -- optimisation --------------------------------------------------------------------
    batch_size: int = 32  # global batch in sequences (split over ranks, then micro-batches)
    grad_accum: int = 1  # micro-batches per rank and step
    steps: int = 1000  # optimisation steps
    lr: float = 1e-5  # peak learning rate of AdamW
    weight_decay: float = 0.01  # AdamW weight decay on matrices
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    warmup_steps: int = 50  # linear warm-up steps
    schedule: str = "cosine"  # "cosine" decay to min_lr_ratio * lr | "constant"
    min_lr_ratio: float = 0.1  # final learning rate of the cosine schedule, relative to lr
    grad_clip: float = 1.0  # clip the global gradient norm; 0 disables clipping
    precision: str = "auto"  # "bf16" autocast | "fp32" | "auto": bf16 on CUDA if supported
    backprop_loops: int | None = None  # backprop through the last k loops only (Huginn: 8)
    grad_checkpointing: bool = False  # recompute each loop in the backward (memory ~ 1 loop)
    parallel: str = "ddp"  # with torchrun: "ddp" | "fsdp" (shards every layer list's blocks)
    # -- training at the fixed point -----------------------------------------------------
    # Each step solves the loop to its equilibrium with these settings (eqloop.training.config.
    # SolveConfig, as TrainConfig.solve; loops and the depth sampler are then not used)
    # and backward ("ift" or "phantom") takes the gradient there. Needs a model whose loop
    # sees its input (a LoopLM with injection, Huginn; not Ouro). None: run the loops.
    solve: SolveConfig | None = None
    backward: str = "unroll"  # "unroll": through the loops | with solve: "ift" | "phantom"
    backward_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"max_iter": 20}
    # -- evaluation, checkpoints, logging ------------------------------------------------
    eval_loops: list[int] = field(default_factory=lambda: list(range(1, 17)))  # loop counts
    eval_equilibrium: bool = True  # also evaluate at the anderson fixed point
    eval_limit: int | None = None  # evaluate at most this many eval_file records
    max_new_tokens: int = 256  # generation budget per evaluation answer
    checkpoint_every: int = 200  # resumable checkpoint every n steps (0: only at the end)
    out_dir: str = "runs/finetune"  # run directory: checkpoints/, metrics.jsonl, model/
    resume: bool = False  # continue from out_dir's latest checkpoint
    overwrite: bool = False  # delete the run already in out_dir and start over
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda[:n]"
    progress: bool = True  # tqdm progress bar (rank 0)
    # Read the step statistics from the device every n steps (and before an evaluation, a
    # checkpoint or the end): metrics.jsonl gets every step's record then, and a
    # non-finite loss stops the run at that read, naming its step (see
    # eqloop.training.step_stats). 1: read after every step (a host sync per step).
    log_every: int = 10
    # Run the model's per-loop step compiled (torch.compile through eqloop.compile_model,
    # forward and backward; the STARS penalty runs on the eager step); the results equal
    # eager ones to float tolerance.
    compile: bool = False

    def validate(self, *, complete: bool = True) -> None:
        """Check every field; raise ``ValueError``/``TypeError`` naming the field.

        Args:
            complete: require ``init_from`` and ``train_file``; False accepts them empty
                (a template to fill in, as ``eqloop finetune --print-config`` shows).
        """
        self._check_paths_and_choices(complete)
        self._check_numbers()
        for name in ("grad_checkpointing", "eval_equilibrium"):
            checks.boolean(name, getattr(self, name))
        check_run_options(self)
        for name in ("prompt", "delimiter"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.eval_loops, list) or not self.eval_loops:
            raise ValueError(f"eval_loops must be a non-empty list, got {self.eval_loops!r}")
        for t in self.eval_loops:
            checks.integer("eval_loops entries", t, low=1)
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                f"({self.grad_accum})"
            )
        if self.lora is not None:
            if not isinstance(self.lora, LoraOptions):
                raise ValueError(f"lora must be null or an object, got {self.lora!r}")
            self.lora.validate()
        if self.mode == "stars":
            self.make_sampler()  # raises TypeError/ValueError on a bad depth dict
        self._check_solve()

    def _check_paths_and_choices(self, complete: bool) -> None:
        """The paths (see :meth:`validate` on ``complete``) and the fields with a set of choices."""
        for name in ("init_from", "train_file", "out_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or (not value and (complete or name == "out_dir")):
                raise ValueError(f"{name} must be a non-empty path, got {value!r}")
        if self.eval_file is not None and (
            not isinstance(self.eval_file, str) or not self.eval_file
        ):
            raise ValueError(f"eval_file must be null or a path, got {self.eval_file!r}")
        checks.choice("data_format", self.data_format, ("auto", "gsm8k", "prompt_completion"))
        checks.choice("mode", self.mode, MODES)
        checks.choice("precision", self.precision, PRECISIONS)
        checks.choice("parallel", self.parallel, PARALLEL)
        checks.choice("penalty_product", self.penalty_product, PENALTY_PRODUCTS)
        checks.choice("schedule", self.schedule, SCHEDULES)
        if self.parallel == "fsdp" and self.penalty_product == "vjp":
            raise ValueError(
                "penalty_product='vjp' (a double backward) does not run under FSDP in torch "
                "2.13 (per-block sharding crashes); use penalty_product='jvp' or 'auto'"
            )

    def _check_numbers(self) -> None:
        """The integer and real fields: types and ranges."""
        for name, low in (
            ("max_len", 2),
            ("seed", 0),
            ("power_steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("steps", 1),
            ("warmup_steps", 0),
            ("max_new_tokens", 1),
            ("checkpoint_every", 0),
            ("log_every", 1),
        ):
            checks.integer(name, getattr(self, name), low=low)
        check_penalty_start(self.penalty_start)
        for name in ("loops", "penalty_rows", "eval_limit", "backprop_loops"):
            if getattr(self, name) is not None:
                checks.integer(name, getattr(self, name), low=1)
        checks.number("lam", self.lam, low=0.0, high=1.0)
        checks.number("lr", self.lr, low=0.0, low_open=True)
        for name in ("weight_decay", "min_lr_ratio", "grad_clip"):
            checks.number(name, getattr(self, name), low=0.0)
        if self.penalty_target is not None:
            checks.number("penalty_target", self.penalty_target, low=0.0)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for beta in self.betas:
            checks.number("betas", beta, low=0.0, high=1.0, high_open=True)

    def _check_solve(self) -> None:
        """Check ``solve``, ``backward`` and ``backward_options``, and what a solve excludes."""
        check_backward(self.backward, self.backward_options, self.solve, modes=BACKWARDS)
        if self.solve is None:
            if self.backward != "unroll":
                raise ValueError(
                    f"backward={self.backward!r} takes its gradient at the fixed point a "
                    "solver returns: set solve too (e.g. solve.solver=anderson), or keep "
                    "backward='unroll' (backprop through the loops; backprop_loops truncates)"
                )
            return
        for name, meaning in (
            ("loops", "the SFT loop count"),
            ("backprop_loops", "truncated backprop through the last loops"),
            ("grad_checkpointing", "recomputing each loop in the backward"),
        ):
            if getattr(self, name):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} ({meaning}) applies to unrolled loops, "
                    "but solve trains at the fixed point the solver returns (the backward "
                    f"{self.backward!r} keeps no loop): set {name} to its default, or "
                    "solve=null"
                )

    def make_backward(self) -> Backward | None:
        """The backward mode object (``eqloop.core.backward``) of a training step.

        With ``solve``: ``backward`` with its options (IFT or Phantom at the fixed point).
        Without it, the mode of the unrolled loops (``backward="unroll"``) as
        :meth:`eqloop.models.looped.LoopedLM.loop` takes it: ``eqloop.Truncated(backprop_loops)``
        (the last ``backprop_loops`` loops with a graph), or ``None`` (every loop).
        """
        from eqloop.core.backward import Truncated

        if self.solve is None:
            return None if self.backprop_loops is None else Truncated(self.backprop_loops)
        return super().make_backward()


def load_finetune_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
    complete: bool = True,
) -> FinetuneConfig:
    """A validated :class:`FinetuneConfig` from defaults, an optional file, overrides and
    typed values (the command line's flags, applied last).

    Read as ``eqloop train`` reads its config (:func:`eqloop.config.load_config_data`): a
    file's ``lora`` or ``solve`` section updates its defaults entry by entry, so
    ``lora.r=16`` (in the file or as an override) switches LoRA on with the other LoRA
    options at their defaults; ``lora=null`` switches it off. ``complete=False`` accepts an
    empty ``init_from`` and ``train_file`` (see :meth:`FinetuneConfig.validate`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, unknown keys or invalid values.
        TypeError: a section of the file that is not an object/table.
    """
    data = load_config_data(
        FinetuneConfig().to_dict(), path, overrides, schema=FinetuneConfig, values=values
    )
    return FinetuneConfig.from_dict(data, complete=complete)
