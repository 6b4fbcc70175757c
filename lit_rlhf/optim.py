"""Optimizer + learning-rate schedule shared by the stages (AdamW, linear warmup, then constant/cosine/linear)."""

from __future__ import annotations

import math
import weakref
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
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, betas=tuple(settings.betas)
    )
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


def clip_and_step(module, optimizer, max_grad_norm: float | None, count: bool) -> None:
    """Clip the gradient norm of ``optimizer``'s parameters (``max_grad_norm``; None: no clipping), step, zero the
    gradients, under manual optimization (``module``: the LightningModule, ``optimizer``: one of its
    ``self.optimizers()``).

    Lightning counts every ``LightningOptimizer.step`` as one ``trainer.global_step``. The RL stages count one step
    per rollout batch however many optimizer steps it takes: its first step is counted (``count=True``,
    ``LightningOptimizer.step``), every other one runs through ``Strategy.optimizer_step`` (the same precision-plugin
    and distributed path and ``on_before_optimizer_step`` hooks, not counted).

    The total gradient norm before clipping is left for the step's ``on_before_optimizer_step`` hooks
    (:func:`take_pre_clip_norm`; :class:`lit_rlhf.callbacks.DivergenceGuard` logs it and stops on a non-finite one).
    """
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if (norm := total_grad_norm(params)) is not None:
            _PRE_CLIP_NORMS[optimizer.optimizer] = norm
        module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    if count:
        optimizer.step()
    else:
        module.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)
    optimizer.zero_grad(set_to_none=True)


_PRE_CLIP_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def take_pre_clip_norm(optimizer) -> torch.Tensor | None:
    """The total gradient norm :func:`clip_and_step` measured before clipping for ``optimizer``'s (the torch
    optimizer's) coming step, once; None when it did not clip."""
    return _PRE_CLIP_NORMS.pop(optimizer, None)


def total_grad_norm(params) -> torch.Tensor | None:
    """The total 2-norm of the gradients of ``params`` (as ``torch.nn.utils.clip_grad_norm_`` measures it; FSDP2
    DTensor shards give the full norm); None when no parameter has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
