"""The optimiser and learning-rate schedule of every eqloop training run.

Shared by ``eqloop train`` and ``eqloop finetune``: AdamW over the trainable parameters,
weight decay on matrices and embeddings only, and a linear warm-up followed by a cosine
decay (or a constant rate). The recipes pass their config; only the fields of
:class:`OptimConfig` are read.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["OptimConfig", "lr_factor", "make_optimizer", "make_scheduler"]


class OptimConfig(Protocol):
    """The optimiser fields of a run's config (``TrainConfig``, ``FinetuneConfig``)."""

    lr: float  # peak learning rate
    betas: tuple[float, float]  # AdamW moment decay rates
    weight_decay: float  # on matrices and embeddings
    warmup_steps: int  # linear warm-up steps
    schedule: str  # "cosine" | "constant"
    min_lr_ratio: float  # final rate of the cosine schedule, relative to lr
    steps: int  # optimisation steps of the run


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices and embeddings only.

    Args:
        model: the parameters with ``requires_grad`` are optimised (all of a LoopLM; the
            adapters of a LoRA fine-tune), in ``model.parameters()`` order.
        config: ``lr``, ``betas`` and ``weight_decay``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def lr_factor(step: int, config: OptimConfig) -> float:
    """Learning rate of ``step`` (0-based) relative to ``config.lr``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> LambdaLR:
    """The per-step schedule :func:`lr_factor` of ``config`` on ``optimizer``."""
    return LambdaLR(optimizer, partial(lr_factor, config=config))
