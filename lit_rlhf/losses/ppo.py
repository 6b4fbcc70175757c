"""PPO policy and value losses on per-token advantages ``[B, T]`` (GAE or REINFORCE++), averaged over masked tokens.

- ``ppo_policy_loss``:      max(-A r, -A clip(r, 1 - eps, 1 + eps))   (PPO, Schulman et al. 2017, Eq. 7)
- ``ppo_dual_clip_loss``:   the same, and for A < 0 at most c |A| (dual-clip PPO, Ye et al. 2020, arXiv:1912.09729;
                            verl's ``compute_policy_loss_vanilla`` with ``clip_ratio_c = 3``, token mean: the same)
- ``ppo_value_loss``:       0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)   (the clipped value loss of
                            OpenAI Baselines' PPO2, Dhariwal et al. 2017; not in the PPO paper)

``r = exp(logps - old_logps)``. ``weights`` (``[B, T]``/``[B, 1]``, no gradient) multiply each token's policy
term (rollout correction, token masks), the normaliser unchanged. ``PPO_POLICY_LOSSES`` selects by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_rlhf.logprobs import masked_mean
from lit_rlhf.losses.policy import LossAndMetrics


def _ppo_terms(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ratio, log_ratio, unclipped -A r, clipped -A clip(r)), all [B, T]."""
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    return ratio, log_ratio, -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)


def _ppo_metrics(ratio, log_ratio, unclipped, clipped, mask) -> dict[str, torch.Tensor]:
    return {
        "policy/clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask).detach(),
        "policy/approxkl": masked_mean(0.5 * log_ratio.detach() ** 2, mask).detach(),
        "policy/ratio_mean": masked_mean(ratio.detach(), mask).detach(),
    }


def _weighted(term: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return term if weights is None else term * weights.detach().to(term.dtype)


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """PPO clipped surrogate with per-token advantages [B, T], averaged over the masked tokens."""
    mask = mask.to(logps.dtype)
    ratio, log_ratio, unclipped, clipped = _ppo_terms(logps, old_logps, advantages, clip_range)
    loss = masked_mean(_weighted(torch.maximum(unclipped, clipped), weights), mask)
    return loss, _ppo_metrics(ratio, log_ratio, unclipped, clipped, mask)


def ppo_dual_clip_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    dual_clip_c: float = 3.0,
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """Dual-clip PPO: ``ppo_policy_loss``, with each negative-advantage token's loss capped at c |A|.

    ``policy/dual_clipfrac``: fraction of tokens where the cap binds (A < 0 and ratio beyond c).
    """
    if dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    mask = mask.to(logps.dtype)
    ratio, log_ratio, unclipped, clipped = _ppo_terms(logps, old_logps, advantages, clip_range)
    ppo_term = torch.maximum(unclipped, clipped)
    cap = -dual_clip_c * advantages
    term = torch.where(advantages < 0, torch.minimum(ppo_term, cap), ppo_term)
    metrics = _ppo_metrics(ratio, log_ratio, unclipped, clipped, mask)
    metrics["policy/dual_clipfrac"] = masked_mean(((advantages < 0) & (ppo_term > cap)).to(mask.dtype), mask).detach()
    return masked_mean(_weighted(term, weights), mask), metrics


PPO_POLICY_LOSSES: dict[str, Callable[..., LossAndMetrics]] = {"ppo": ppo_policy_loss, "dual_clip": ppo_dual_clip_loss}
"""Name -> PPO policy loss; both take ``clip_range`` and ``weights``, ``dual_clip`` also ``dual_clip_c``."""


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
