"""Policy-gradient losses on per-token logps: the GRPO family (one function per variant) and PPO policy/value.

Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``mask`` are ``[B, T]`` (``mask`` 1 on completion tokens);
GRPO ``advantages`` are ``[B]`` (one per completion), PPO ``advantages`` ``[B, T]`` (per-token GAE).
Every function returns ``(loss, metrics)``: a scalar loss and a dict of detached scalar tensors.

GRPO family (seed 000 §7.2; DeepSeekMath, Shao et al. 2024, Eq. 3). With ``ratio = exp(logps - old_logps)``::

    per_token = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta * KL_k(logps, ref_logps)

and the variants differ only in how ``per_token`` is reduced:

- ``grpo_loss``:    (1/B) sum_i (1/|o_i|) sum_t            per-sequence mean, then mean (GRPO Eq. 3)
- ``dapo_loss``:    sum_{i,t} / sum_i |o_i|                token-level mean (DAPO, Yu et al. 2025, Eq. 8;
                                                           eps_high > eps_low is DAPO's "clip-higher")
- ``dr_grpo_loss``: sum_{i,t} / (B * max_length)           constant normaliser (Dr. GRPO, Liu et al. 2025, Eq. 3)
- ``gspo_loss``:    sequence ratio s_i = exp((1/|o_i|) sum_t (logps - old_logps)) clipped per sequence
                    (GSPO, Zheng et al. 2025, Eq. 5-7; the sequence-level form, s_i differentiated directly)

PPO (Schulman et al. 2017, Eq. 7; seed 000 §5.2 ``get_loss_actor`` / ``get_loss_critic``):

- ``ppo_policy_loss``: masked mean of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
- ``ppo_value_loss``:  0.5 * masked mean of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)
"""

from __future__ import annotations

from typing import Callable

import torch

from lit_rlhf.logprobs import masked_mean
from lit_rlhf.losses.kl import KLEstimator, kl_penalty

Metrics = dict[str, torch.Tensor]
LossAndMetrics = tuple[torch.Tensor, Metrics]


def _kl(logps: torch.Tensor, ref_logps: torch.Tensor | None, beta: float, kl_estimator: KLEstimator) -> torch.Tensor:
    """Per-token KL estimate [B, T]; zeros when beta == 0 (the term is then neither used nor reported)."""
    if beta == 0.0:
        return torch.zeros_like(logps)
    if ref_logps is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logps for the KL penalty, got None")
    return kl_penalty(logps, ref_logps, kl_estimator)


def _clip_metrics(
    ratio: torch.Tensor, advantages: torch.Tensor, weight: torch.Tensor, eps_low: float, eps_high: float
) -> Metrics:
    """Fractions (weighted by ``weight``) of entries where the clip is engaged on the low/high side."""
    low = (advantages < 0) & (ratio < 1.0 - eps_low)
    high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return {
        "clip_ratio/low": masked_mean(low.to(weight.dtype), weight).detach(),
        "clip_ratio/high": masked_mean(high.to(weight.dtype), weight).detach(),
        "clip_ratio/region": masked_mean((low | high).to(weight.dtype), weight).detach(),
    }


def _grpo_per_token(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    kl_estimator: KLEstimator,
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Shared token-level GRPO term: returns (per_token [B, T] already masked, float mask, metrics)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps.detach())
    adv = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    kl = _kl(logps, ref_logps, beta, kl_estimator)
    per_token = (-torch.minimum(ratio * adv, clipped * adv) + beta * kl) * mask
    metrics = {"kl": masked_mean(kl, mask).detach()}
    metrics.update(_clip_metrics(ratio, adv.expand_as(ratio), mask, epsilon_low, epsilon_high))
    return per_token, mask, metrics


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> LossAndMetrics:
    """GRPO: per-sequence token mean, then mean over sequences."""
    per_token, mask, metrics = _grpo_per_token(
        logps, old_logps, ref_logps, advantages, mask, epsilon_low, epsilon_high, beta, kl_estimator
    )
    loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return loss, metrics


def dapo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> LossAndMetrics:
    """DAPO token-level loss: sum over all completion tokens / their number (long answers weigh more)."""
    per_token, mask, metrics = _grpo_per_token(
        logps, old_logps, ref_logps, advantages, mask, epsilon_low, epsilon_high, beta, kl_estimator
    )
    return per_token.sum() / mask.sum().clamp(min=1.0), metrics


def dr_grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_length: int,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> LossAndMetrics:
    """Dr. GRPO: sum over all completion tokens / (B * max_length), a constant free of length bias."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    per_token, _, metrics = _grpo_per_token(
        logps, old_logps, ref_logps, advantages, mask, epsilon_low, epsilon_high, beta, kl_estimator
    )
    return per_token.sum() / (logps.shape[0] * max_length), metrics


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> LossAndMetrics:
    """GSPO: clip the length-normalised sequence ratio s_i; clip metrics are fractions of sequences.

    The GSPO paper uses much smaller clip ranges than PPO (eps ~ 3e-4 / 4e-4); set them in the config.
    """
    mask = mask.to(logps.dtype)
    lengths = mask.sum(-1).clamp(min=1.0)
    seq_ratio = torch.exp(((logps - old_logps.detach()) * mask).sum(-1) / lengths)
    clipped = torch.clamp(seq_ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_seq = -torch.minimum(seq_ratio * advantages, clipped * advantages)
    kl = _kl(logps, ref_logps, beta, kl_estimator)
    per_seq = per_seq + beta * (kl * mask).sum(-1) / lengths
    metrics = {"kl": masked_mean(kl, mask).detach()}
    metrics.update(_clip_metrics(seq_ratio, advantages, torch.ones_like(seq_ratio), epsilon_low, epsilon_high))
    return per_seq.mean(), metrics


GRPO_LOSSES: dict[str, Callable[..., LossAndMetrics]] = {
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "dr_grpo": dr_grpo_loss,
    "gspo": gspo_loss,
}
"""Name -> GRPO-family loss, as selected in YAML (``dr_grpo`` also needs ``max_length``)."""


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
) -> LossAndMetrics:
    """PPO clipped surrogate with per-token advantages [B, T], averaged over the masked tokens."""
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {
        "policy/clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask).detach(),
        "policy/approxkl": masked_mean(0.5 * log_ratio**2, mask).detach(),
        "policy/ratio_mean": masked_mean(ratio, mask).detach(),
    }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range_value: float = 0.2,
) -> LossAndMetrics:
    """Clipped value loss: the new value may move at most ``clip_range_value`` from ``old_values`` for free."""
    mask = mask.to(values.dtype)
    old_values = old_values.detach()
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    metrics = {"value/clipfrac": masked_mean((clipped_loss > unclipped_loss).to(mask.dtype), mask).detach()}
    return loss, metrics
