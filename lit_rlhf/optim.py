"""Optimizer + learning-rate schedule shared by the stages (AdamW, linear warmup, then constant/cosine/linear)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimizerSettings:
    """AdamW over the trainable parameters.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        betas: Adam betas.
        warmup_steps: linear warmup from 0 to ``lr``.
        schedule: after warmup: ``constant``, ``cosine`` (to 10% of lr) or ``linear`` (to 0) over the run.
    """

    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"


def build_optimizer(params: list[nn.Parameter], settings: OptimizerSettings, total_steps: int) -> dict:
    """Lightning ``configure_optimizers`` return value: AdamW + a per-step LambdaLR."""
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=tuple(settings.betas))
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = min(1.0, (step - settings.warmup_steps) / max(1, total - settings.warmup_steps))
        if settings.schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if settings.schedule == "linear":
            return 1.0 - progress
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def trainable_state_dict(module: nn.Module, state_dict: dict) -> dict:
    """The entries of ``state_dict`` that belong to trainable parameters (checkpoints skip frozen weights)."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable}
