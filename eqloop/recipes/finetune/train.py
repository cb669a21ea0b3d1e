"""Fine-tune a pretrained looped LM with SFT or STARS, fully or with LoRA.

One process (CPU or one GPU)::

    eqloop finetune --init-from ouro-1.4b --train-file gsm8k_train.jsonl --mode stars \\
        --out-dir runs/ouro-stars

Data parallel on one machine with N GPUs (NCCL; gloo on CPU)::

    torchrun --standalone --nproc_per_node=8 -m eqloop.cli finetune --init-from ouro-1.4b \\
        --train-file gsm8k_train.jsonl --mode stars --out-dir runs/ouro-stars \\
        --set batch_size=128 --set grad_accum=4 --set lr=1e-5 --set grad_checkpointing=true

Add ``--set parallel=fsdp`` to shard parameters, gradients and optimizer states over the
ranks (FSDP2 ``fully_shard`` on every block of the model's layer lists, then the whole
model) when a full fine-tune does not fit one device.

Every step draws one loop count ``t`` (SFT: always the model's trained depth, or
``loops``; STARS: the depth sampler, by default clamp(round(LogNormal(1.7, 0.4)), 1, 16)
as in the STARS paper's Ouro-1.4B run), runs ``t`` loops of the model's map ``f`` from
``z0`` (``core_map``), reads out the logits and minimises

    loss = (1 - lam) * CE(completion tokens) + lam * JSRR(f, z_t.detach())

with the penalty (STARS only) from ``penalty_start`` on (a step, or a fraction of
``steps``). With ``solve`` (training at the fixed point, as in ``eqloop train``; see
:mod:`eqloop.training.solve`) the loop is solved to its equilibrium instead of run ``t``
times (no loop count is drawn) and ``backward`` (``ift`` or ``phantom``) takes the
gradient at the point the solver returned; the steps log ``fwd_*`` (and with IFT
``bwd_*``) statistics. A model whose loop does not see its input (Ouro) is refused
(:func:`check_solvable`). The forward runs under bf16 autocast where the device supports it
(``precision``); the penalty always runs in float32 with the math attention kernel (its
double backward needs it), on the float32 master weights. ``grad_checkpointing``
recomputes each loop during the backward, so the activation memory of the loop is that of
one loop plus one state per loop.

LoRA (``lora``): peft adapters on the named modules; only they train, only they are
checkpointed (with the optimizer state), and they are merged into the weights when the
final model is saved in the model's own layout to ``out_dir/model`` (for Ouro and Huginn
``save_pretrained``, which ``eqloop.models.load`` reads back).

The run directory follows :mod:`eqloop.training.run_dir`, as ``eqloop train`` does: a
directory holding a run (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``model/``,
``eval.json``) is continued with ``resume``, replaced with ``overwrite`` or refused; it may
not be, contain or lie inside ``init_from``; a resumed run that trains further replaces
``model/``. SIGINT and SIGTERM checkpoint the finished step and raise
:class:`~eqloop.training.run_dir.TrainingInterrupted`; a non-finite loss stops the run
(:class:`~eqloop.training.run_dir.NonFiniteLoss`) before that step is saved. As in
``eqloop train``, the step statistics are read from the device every ``log_every`` steps
(every step when ``on_step`` is given) and before each checkpoint, so a non-finite step is
found up to ``log_every - 1`` steps later and DDP ranks agree on a signal at those reads;
``compile`` compiles the model's per-loop step, the penalty differentiates the eager one.

Exact resume: the data order, dropout RNG and penalty vectors of every step derive from
``(seed, step, rank)``; optimizer, scheduler and depth-sampler states are checkpointed
(eqloop.training.checkpoint: atomic, checksummed), so an interrupted run resumed with
``--set resume=true`` reaches bit-identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from eqloop.core.compiling import compile_model, eager_map
from eqloop.core.stars import PenaltySchedule, jsrr_penalty
from eqloop.data import IGNORE_INDEX
from eqloop.data.qa import (
    Example,
    PromptTemplate,
    encode_examples,
    load_jsonl,
    warn_shared_prompts,
)
from eqloop.files import write_json_atomic
from eqloop.models.auto import (
    LoadedModel,
    check_base_model,
    freeze_unreached,
    load_for_finetuning,
    save_model,
)
from eqloop.recipes.finetune.config import FinetuneConfig
from eqloop.training import run_dir
from eqloop.training.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from eqloop.training.config import penalty_start_step
from eqloop.training.depth import DepthSampler, make_depth_sampler
from eqloop.training.env import RunEnv, batch_rows, mix_seed, run_env
from eqloop.training.loop import OnStep, TrainingLoop  # OnStep: re-exported
from eqloop.training.lora import DEFAULT_TARGETS, attach_lora, merge_lora
from eqloop.training.optim import make_optimizer, make_scheduler
from eqloop.training.solve import (
    converged_targets,
    merge_solve_stats,
    quiet_solves,
    solve_forward,
    solve_stats,
)
from eqloop.training.timing import penalty_step_times

if TYPE_CHECKING:
    from eqloop.core.backward import Backward
    from eqloop.models.looped import CoreMap, LoopInfo
    from eqloop.training.config import SolveConfig

__all__ = [
    "Objective",
    "OnStep",
    "check_solvable",
    "finetune",
    "make_sampler",
    "prepare_model",
    "step_time_ratio",
]

# Options a resumed run may change (besides run_dir.RESUME_MAY_CHANGE); every other field
# must match the checkpoint's config.
_RESUME_MAY_CHANGE = run_dir.RESUME_MAY_CHANGE | {
    "eval_file",
    "eval_equilibrium",
    "eval_limit",
    "max_new_tokens",
}
MODEL_DIR = "model"  # sub-directory of out_dir holding the final model in its own layout
EVAL_FILE = "eval.json"  # the final evaluation in out_dir


# --------------------------------------------------------------------------- objective


class Objective(nn.Module):
    """The loss of one micro-batch: CE after ``loops`` loops, plus ``lam`` * JSRR.

    The whole computation is this module's ``forward``, so that DDP's and FSDP's hooks
    see every use of the parameters (the penalty applies the map once more).

    Args:
        model: a looped LM with ``core_map`` and ``readout`` (see ``eqloop.models.auto``).
        lam: penalty weight in [0, 1].
        power_steps, target, product: passed to :func:`eqloop.jsrr_penalty`.
        penalty_rows: sequences of the micro-batch used by the penalty (None: all).
        grad_checkpointing: recompute each loop in the backward.
        autocast: bf16 autocast of the forward (not of the penalty).
        solve: train at the fixed point: the forward solves the loop with these settings
            (``loops`` is then not used, nor ``grad_checkpointing``) through
            :func:`eqloop.training.solve.solve_forward`; None: run the loops.
        backward: with ``solve``, the backward mode (``IFT``/``Phantom``) that takes the
            gradient at the point the solver returned (required); without it, ``None``
            (backprop through every loop, the STARS paper) or ``eqloop.Truncated(k)``
            (the last k loops only, Huginn's truncated backprop), as
            :meth:`eqloop.models.looped.LoopedLM.loop` takes it
            (:meth:`~eqloop.recipes.finetune.config.FinetuneConfig.make_backward` maps the
            config's ``backprop_loops`` to it).

    Attributes:
        solve_info: with ``solve``, the LoopInfo of the last forward (its solves' records,
            the IFT adjoint's after the backward), for
            :func:`eqloop.training.solve.solve_stats`; None otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lam: float,
        power_steps: int = 1,
        target: float | None = None,
        product: str = "vjp",
        penalty_rows: int | None = None,
        grad_checkpointing: bool = False,
        autocast: bool = False,
        solve: SolveConfig | None = None,
        backward: Backward | None = None,
    ) -> None:
        super().__init__()
        if solve is not None and backward is None:
            raise ValueError("solve needs a backward mode (eqloop.IFT() or eqloop.Phantom())")
        self.model = model
        self.lam = lam
        self.power_steps = power_steps
        self.target = target
        self.product = product
        self.penalty_rows = penalty_rows
        self.grad_checkpointing = grad_checkpointing
        self.autocast = autocast
        self.solve = solve
        self.backward = backward
        self.solve_info: LoopInfo | None = None

    def forward(
        self,
        inputs: Tensor,
        targets: Tensor,
        loops: int | None,
        penalty_on: bool = False,
        generator: torch.Generator | None = None,
        ce_scale: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Loss of a micro-batch.

        Args:
            inputs: (B, S) token ids.
            targets: (B, S) next tokens, -100 where no loss is taken.
            loops: loop count of this step (None with ``solve``, which ignores it).
            penalty_on: add the STARS penalty.
            generator: random start vectors of the penalty.
            ce_scale: the CE is the sum over target tokens times this (a 0-d tensor);
                None: the mean over this micro-batch's target tokens. The training step
                passes ``ranks * micro-batches / target tokens of the global batch``, so
                that every token of the global batch weighs the same.

        Returns:
            ``(loss, ce, penalty, rho)``: scalars; ``penalty`` and ``rho`` (the mean
            one-step estimate ``||J v||``, detached) are None without the penalty.
        """
        device = inputs.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast):
            if self.solve is not None:  # z: the point the solver returned
                logits, self.solve_info = solve_forward(
                    self.model, inputs, self.solve, self.backward
                )
                f, z = self.solve_info.f, self.solve_info.z
            else:
                logits, f, z = self._unrolled(inputs, loops)
        kept = targets
        if self.solve is not None:
            kept = converged_targets(targets, self.solve_info, self.solve)
        ce = F.cross_entropy(
            logits.float().flatten(0, 1),
            kept.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="mean" if ce_scale is None and kept is targets else "sum",
        )
        if ce_scale is not None:
            ce = ce * ce_scale
        elif kept is not targets:  # skipped sequences' tokens weigh zero in the mean
            ce = ce / (targets != IGNORE_INDEX).sum().clamp_min(1)
        if not penalty_on:
            return ce, ce, None, None
        with torch.autocast(device, enabled=False):
            state = z.detach().float()
            penalty_map = f
            rows = self.penalty_rows
            if rows is not None and rows < inputs.shape[0]:
                penalty_map, _ = self.model.core_map(inputs[:rows])
                state = state[:rows]
            # The penalty's double backward does not run through a compiled step.
            penalty_map = eager_map(self.model, penalty_map)
            result = jsrr_penalty(
                penalty_map,
                state,
                product=self.product,
                power_steps=self.power_steps,
                target=self.target,
                generator=generator,
                return_details=True,
            )
        loss = (1 - self.lam) * ce + self.lam * result.penalty
        return loss, ce, result.penalty.detach(), result.rho.mean()

    def _unrolled(self, inputs: Tensor, loops: int) -> tuple[Tensor, CoreMap, Tensor]:
        """``loops`` loops of the map from z0 through the model's one loop
        (:meth:`eqloop.models.looped.LoopedLM.loop`, with ``backward`` and ``grad_checkpointing``).

        Returns:
            ``(logits, f, z)``: logits (B, S, V), the batch's map and the (B, S, d) state.
        """
        f, z = self.model.core_map(inputs)
        result = self.model.loop(
            f, z, loops, backward=self.backward, grad_checkpointing=self.grad_checkpointing
        )
        if result is not None:
            z = result.z
        return self.model.readout(z), f, z


# ------------------------------------------------------------------------------ set-up


def make_sampler(config: FinetuneConfig, trained_loops: int) -> DepthSampler:
    """SFT: always ``config.loops`` (default: the trained depth); STARS: ``config.depth``."""
    if config.mode == "sft":
        return make_depth_sampler("fixed", t=config.loops or trained_loops, seed=config.seed)
    return config.make_sampler()


def _autocast_on(config: FinetuneConfig, device: torch.device) -> bool:
    if config.precision == "fp32":
        return False
    if config.precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"precision='bf16' but {torch.cuda.get_device_name(device)} lacks bf16"
            )
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _product(config: FinetuneConfig, world: int) -> str:
    if config.penalty_product != "auto":
        return config.penalty_product
    return "jvp" if config.parallel == "fsdp" and world > 1 else "vjp"


def prepare_model(loaded: LoadedModel, config: FinetuneConfig) -> list[str]:
    """Attach LoRA adapters if the config asks for them; returns the adapted module names."""
    if config.lora is None:
        return []
    targets = config.lora.targets or list(DEFAULT_TARGETS[loaded.arch])
    torch.manual_seed(mix_seed(config.seed, 2))  # the adapters' initialisation
    return attach_lora(
        loaded.model,
        targets,
        r=config.lora.r,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
    )


def check_solvable(loaded: LoadedModel, config: FinetuneConfig) -> None:
    """Refuse ``solve`` for a model whose loop does not see its input.

    Training at the fixed point needs a map that takes the input, ``z <- f(z; x)``: then
    z*(x) is a function of the input, and the implicit (or phantom) gradient at it
    reaches everything before the loop through ``x``. Without input injection (Ouro's
    ``z <- norm(layers(z))``, a LoopLM with ``injection='none'``) the input only sets the
    starting state: the start picks one of many fixed points, and the gradient at it
    never reaches the start. Huginn injects its input (``adapter([z, e])``), as a LoopLM
    does by default.

    Raises:
        ValueError: ``config.solve`` is set and the model's loop has no input injection.
    """
    if config.solve is None:
        return
    if loaded.arch == "ouro":
        why = "Ouro's loop z <- norm(layers(z)) has no input injection"
    elif loaded.arch == "looplm" and loaded.model.config.injection == "none":
        why = "this LoopLM has injection='none'"
    else:
        return
    raise ValueError(
        f"solve: {config.init_from} cannot be trained at its fixed point: {why}, so the "
        "input only sets the starting state; the fixed point is not a function of the "
        f"input (the start picks one of many) and the {config.backward} gradient at it "
        "never reaches the start. Fine-tune it through its loops (solve=null)"
    )


def _shard(objective: Objective) -> None:
    """FSDP2: one unit per block of every ``nn.ModuleList`` of the model, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in objective.model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(objective)


# ---------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """What a run carries from step to step."""

    loaded: LoadedModel
    objective: Objective
    net: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: LambdaLR
    sampler: DepthSampler
    env: RunEnv
    fsdp: bool
    lora_modules: list[str]
    step: int = 0
    train_time: float = 0.0
    last_train: dict[str, Any] | None = field(default_factory=dict)

    def full_state(self) -> dict[str, Tensor]:
        """Every weight (base and adapters); gathered over the ranks on CPU under FSDP."""
        if not self.fsdp:
            return self.loaded.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.loaded.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def weights(self) -> dict[str, Tensor]:
        """What a checkpoint stores: every weight, or with LoRA only the adapters."""
        full = self.full_state()
        if not self.lora_modules:
            return full
        keep = {n for n, p in self.loaded.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in keep}

    def optimizer_state(self) -> dict[str, Any]:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            self.loaded.model,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )

    def save(self, out_dir: Path, config: FinetuneConfig) -> Path | None:
        """Checkpoint the current step; collective under FSDP, written by rank 0."""
        weights, optimizer = self.weights(), self.optimizer_state()
        if not self.env.main:
            return None
        return save_checkpoint(
            out_dir,
            self.step,
            weights=weights,
            config=config.to_dict(),
            metrics={"step": self.step, "train_time": self.train_time, "train": self.last_train},
            training_state={
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "train_time": self.train_time,
                "base_fingerprint": self.loaded.fingerprint,  # checked on resume (LoRA)
            },
        )

    def restore(self, ckpt: Checkpoint) -> None:
        """Load weights, optimizer, scheduler and sampler state of a checkpoint."""
        saved = ckpt.training_state(map_location="cpu")
        check_base_model(saved, self.loaded, ckpt.path, adapters_only=bool(self.lora_modules))
        model = self.loaded.model
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, strict=not self.lora_modules)
            set_model_state_dict(model, ckpt.weights, options=options)
            set_optimizer_state_dict(
                model, self.optimizer, optim_state_dict=saved["optimizer"], options=options
            )
        else:
            device = next(model.parameters()).device
            weights = {k: v.to(device) for k, v in ckpt.weights.items()}
            missing, unexpected = model.load_state_dict(weights, strict=False)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if unexpected or (trainable & set(missing)):
                raise ValueError(
                    f"checkpoint {ckpt.path} does not fit the model: missing "
                    f"{sorted(trainable & set(missing))[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.sampler.load_state_dict(saved["sampler"])
        self.step, self.train_time = ckpt.step, float(saved["train_time"])
        self.last_train = ckpt.metrics.get("train") or {}


def _build(
    config: FinetuneConfig, env: RunEnv, loaded: LoadedModel | None, ckpt: Checkpoint | None
) -> _Run:
    """Model (with adapters), wrappers, optimizer, scheduler, sampler; restored from ``ckpt``."""
    if loaded is None:
        loaded = load_for_finetuning(config.init_from, device=env.device)
    check_solvable(loaded, config)
    lora_modules = prepare_model(loaded, config)
    loaded.model.to(env.device).train()
    if config.compile:  # in place, after the adapters and the move; the penalty stays eager
        compile_model(loaded.model)
    objective = Objective(
        loaded.model,
        lam=config.lam,
        power_steps=config.power_steps,
        target=config.penalty_target,
        product=_product(config, env.world),
        penalty_rows=config.penalty_rows,
        grad_checkpointing=config.grad_checkpointing,
        autocast=_autocast_on(config, env.device),
        solve=config.solve,
        backward=config.make_backward(),
    )
    # What the objective never reaches (Ouro's exit gate) does not train: DDP needs a
    # gradient for every trainable parameter. Probed on one 2-token sequence, 1 loop.
    probe = torch.zeros(1, 2, dtype=torch.long, device=env.device)
    with quiet_solves():  # with solve, the probe's solve converging or not tells nothing
        freeze_unreached(loaded.model, lambda: objective(probe, probe, 1)[0])
    objective.solve_info = None  # the probe's
    fsdp = config.parallel == "fsdp" and env.world > 1
    net: nn.Module = objective
    if fsdp:
        _shard(objective)
    elif env.world > 1:
        net = env.data_parallel(objective)
    optimizer = make_optimizer(loaded.model, config)
    scheduler = make_scheduler(optimizer, config)
    run = _Run(
        loaded,
        objective,
        net,
        optimizer,
        scheduler,
        make_sampler(config, loaded.trained_loops),
        env,
        fsdp,
        lora_modules,
    )
    if ckpt is not None:
        run.restore(ckpt)
    return run


@quiet_solves()
def _train_step(
    run: _Run, inputs: Tensor, targets: Tensor, config: FinetuneConfig, penalty_on: bool
) -> dict[str, Any]:
    """One optimisation step over this rank's rows, in ``grad_accum`` micro-batches.

    Returns:
        The rank-local mean over micro-batches of ``loss``, ``ce``, ``penalty`` and
        ``rho`` (None without the penalty) and the ``grad_norm``, as 0-d device tensors
        (nothing is read from the device: see :mod:`eqloop.training.step_stats`); with
        ``solve`` the solves' statistics (``fwd_*``, with IFT ``bwd_*``; see
        :func:`eqloop.training.solve.merge_solve_stats`); and the host value ``loops``
        (None with ``solve``).
    """
    step, env = run.step, run.env
    generator = env.seed_step(config.seed, step)  # dropout, penalty vectors
    # Training at the fixed point runs no sampled depth: the sampler is not drawn.
    loops = run.sampler.sample() if config.solve is None else None
    micro = inputs.shape[0] // config.grad_accum
    tokens = (targets != IGNORE_INDEX).sum().double()
    if env.world > 1:
        dist.all_reduce(tokens)
    ce_scale = env.world * config.grad_accum / tokens
    run.optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, ce, penalty
    rho_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    solves = []  # what each micro-batch's solves did (with solve; an IFT adjoint)
    for k in range(config.grad_accum):
        rows = slice(k * micro, (k + 1) * micro)
        last = k == config.grad_accum - 1
        ddp = isinstance(run.net, DistributedDataParallel)
        with run.net.no_sync() if ddp and not last else nullcontext():
            if run.fsdp:
                run.net.set_requires_gradient_sync(last)
            loss, ce, penalty, rho = run.net(
                inputs[rows], targets[rows], loops, penalty_on, generator, ce_scale
            )
            (loss / config.grad_accum).backward()
        if run.objective.solve_info is not None:  # read after the backward (IFT adjoint)
            solves.append(solve_stats(run.objective.solve_info, config.solve))
            run.objective.solve_info = None  # its graph and states go now
        penalty = penalty if penalty is not None else ce.new_zeros(())
        sums += torch.stack([loss.detach(), ce.detach(), penalty]).double()
        if rho is not None:
            rho_sum += rho.double()
    grad_norm = nn.utils.clip_grad_norm_(
        [p for p in run.loaded.model.parameters() if p.requires_grad], config.grad_clip or math.inf
    )
    run.optimizer.step()
    run.scheduler.step()
    loss, ce, penalty, rho = torch.cat([sums, rho_sum.view(1)]) / config.grad_accum
    return {
        "loss": loss,
        "ce": ce,
        "penalty": penalty if penalty_on else None,
        "rho": rho if penalty_on else None,
        "grad_norm": getattr(grad_norm, "full_tensor", lambda: grad_norm)(),
        **merge_solve_stats(solves),
        "loops": loops,
    }


def _train_tensors(
    config: FinetuneConfig, loaded: LoadedModel, examples: Sequence[Example]
) -> tuple[Tensor, Tensor]:
    template = PromptTemplate(config.prompt, config.delimiter)
    return encode_examples(examples, loaded.tokenizer, template, max_len=config.max_len)


def finetune(
    config: FinetuneConfig,
    *,
    loaded: LoadedModel | None = None,
    eval_examples: Sequence[Example] | None = None,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Fine-tune (or resume) a run; see the module docstring.

    Run under ``torchrun`` for data parallelism (the process group is created here and
    destroyed at the end unless the caller made one).

    Args:
        config: the run; validated before anything is loaded or written.
        loaded: an already loaded model (default: ``load_for_finetuning(init_from)``).
        eval_examples: evaluated after training at ``config.eval_loops`` (default: the
            records of ``config.eval_file``, if set).
        on_step: called as ``on_step(step, stats)`` after every step (on every rank); if
            it raises, that step is checkpointed and the exception propagates.

    Returns:
        ``step``, ``train_time`` (s), ``train`` (last step's ``loss``, ``ce``, ``penalty``,
        ``rho``, ``grad_norm``, ``loops``, ``lr``), ``checkpoint``, ``model`` (the saved
        model directory) and ``eval`` (accuracy per loop count, or None).

    Raises:
        ValueError: invalid config or data (JSONL errors name the line), an existing run
            in ``out_dir`` without ``resume`` or ``overwrite``, an ``out_dir`` that is,
            contains or lies inside ``init_from``, or a checkpoint that does not fit.
        TrainingInterrupted: SIGINT or SIGTERM arrived; the last step was checkpointed.
        NonFiniteLoss: a step's loss or gradient norm was not finite (a ``ValueError``
            naming the step); the newest checkpoint is the last finite one.
    """
    try:
        config.validate()
    except TypeError as err:
        raise ValueError(str(err)) from None
    with run_env(config.device) as env:  # no DDP wrapper outlives the group it made
        return _finetune(config, env, loaded, eval_examples, on_step)


def _finetune(
    config: FinetuneConfig,
    env: RunEnv,
    loaded: LoadedModel | None,
    eval_examples: Sequence[Example] | None,
    on_step: OnStep | None,
) -> dict[str, Any]:
    """:func:`finetune` in the process environment ``env``."""
    if config.batch_size % (env.world * config.grad_accum):
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by {env.world} ranks x "
            f"grad_accum {config.grad_accum}"
        )
    train_examples = load_jsonl(config.train_file, format=config.data_format)
    if eval_examples is None and config.eval_file is not None:
        eval_examples = load_jsonl(
            config.eval_file, format=config.data_format, limit=config.eval_limit
        )
    if eval_examples is not None and env.main:
        warn_shared_prompts(train_examples, eval_examples)
    plan = run_dir.plan_run_dir(
        config.to_dict(),
        may_change=_RESUME_MAY_CHANGE,
        outputs=(MODEL_DIR, EVAL_FILE),
        schema=FinetuneConfig,
    )
    if env.world > 1:
        dist.barrier()  # every rank has looked at out_dir before rank 0 changes it
    run = _build(config, env, loaded, plan.checkpoint)
    inputs, targets = _train_tensors(config, run.loaded, train_examples)
    if inputs.shape[0] < config.batch_size:
        raise ValueError(
            f"{config.train_file} holds {inputs.shape[0]} examples, fewer than batch_size "
            f"{config.batch_size}"
        )
    inputs, targets = inputs.to(env.device), targets.to(env.device)
    out_dir = Path(config.out_dir)
    if run.step >= config.steps:  # a finished run: only its outputs may be missing
        return _finish(run, config, eval_examples, latest_checkpoint(out_dir))
    log = plan.start(config.to_dict()) if env.main else None  # nothing is written before
    lam = config.lam if config.mode == "stars" else 0.0  # SFT has no penalty to miss
    schedule = PenaltySchedule(penalty_start_step(config.penalty_start, config.steps, lam=lam), 1)

    def one_step(step: int) -> tuple[dict[str, Any], int | None, float]:
        """Optimisation step ``step`` on this rank's rows of its global batch."""
        rows = batch_rows(step, inputs.shape[0], config.batch_size, config.seed)
        rows = rows[env.rank :: env.world].to(env.device)
        lr = run.scheduler.get_last_lr()[0]
        penalty_on = config.mode == "stars" and config.lam > 0 and schedule.active(step)
        stats = _train_step(run, inputs[rows], targets[rows], config, penalty_on)
        return stats, stats.pop("loops"), lr

    loop = TrainingLoop(
        config,
        env,
        run,
        one_step,
        save=lambda: run.save(out_dir, config),  # collective under FSDP; rank 0 writes
        log=log,
        desc=f"finetune {config.mode}",
        on_step=on_step,
    )
    try:
        checkpoint_path = loop.run()
    finally:
        run.net = run.objective  # the DDP wrapper goes while the group lives (see run_env)
    return _finish(run, config, eval_examples, checkpoint_path)


def _finish(
    run: _Run,
    config: FinetuneConfig,
    eval_examples: Sequence[Example] | None,
    checkpoint_path: Path | None,
) -> dict[str, Any]:
    """Merge adapters, save the model in its own layout, evaluate (rank 0)."""
    from eqloop.evaluation import accuracy_vs_loops

    out_dir = Path(config.out_dir)
    model = run.loaded.model
    if run.fsdp:  # gather the shards (every rank) into an unsharded copy (rank 0)
        full = run.full_state()
        if run.env.main:
            fresh = load_for_finetuning(config.init_from)
            prepare_model(fresh, config)
            fresh.model.load_state_dict(full)
            model = fresh.model
    if not run.env.main:
        return {"step": run.step, "train_time": run.train_time, "train": run.last_train}
    merge_lora(model)
    model.eval()
    target = out_dir / MODEL_DIR
    if not target.exists():  # a resumed run that trained further has removed the old one
        save_model(model, target, source=config.init_from, metrics={"train": run.last_train})
    result: dict[str, Any] = {
        "step": run.step,
        "train_time": run.train_time,
        "train": run.last_train,
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "model": str(target),
        "eval": None,
    }
    if eval_examples:
        template = PromptTemplate(config.prompt, config.delimiter)
        result["eval"] = accuracy_vs_loops(
            model,
            run.loaded.tokenizer,
            eval_examples,
            loops=config.eval_loops,
            equilibrium=config.eval_equilibrium,
            template=template,
            max_new_tokens=config.max_new_tokens,
            progress=config.progress,
        )
        write_json_atomic(out_dir / EVAL_FILE, result["eval"])
    return result


# ------------------------------------------------------------------------ measurements


def step_time_ratio(
    loaded: LoadedModel,
    inputs: Tensor,
    targets: Tensor,
    config: FinetuneConfig,
    *,
    loops: int,
    steps: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """Median time of an SFT step and of a STARS step at the same loop count.

    The two kinds alternate on the same model and batches (so load changes on a shared
    machine hit both alike); nothing is written.

    Returns:
        ``loops``, ``step_time_sft`` and ``step_time_stars`` (seconds) and their ``ratio``.
    """
    objective = Objective(
        loaded.model,
        lam=config.lam,
        power_steps=config.power_steps,
        target=config.penalty_target,
        product=_product(config, 1),
        penalty_rows=config.penalty_rows,
        grad_checkpointing=config.grad_checkpointing,
        backward=config.make_backward(),
    )
    optimizer = make_optimizer(loaded.model, config)

    def run_step(rows: Tensor, penalty_on: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, *_ = objective(inputs[rows], targets[rows], loops, penalty_on)
        loss.backward()
        optimizer.step()

    sft, stars = penalty_step_times(
        lambda i: batch_rows(i, inputs.shape[0], config.batch_size, config.seed),
        run_step,
        steps=steps,
        warmup=warmup,
    )
    return {"loops": loops, "step_time_sft": sft, "step_time_stars": stars, "ratio": stars / sft}
