"""Rollout correction: importance weights for the mismatch between the sampler and the trainer.

A sampler (vLLM, bf16 kernels) does not give exactly the trainer's probabilities, so a rollout is slightly off-policy
even before any update. With ``old_logps`` the trainer's logps of the sampled tokens before the update (no gradient)
and ``sample_logps`` the sampler's, the per-token ratio is ``rho_t = exp(old_logps - sample_logps)``; at level
``sequence`` one ratio per completion, ``rho = exp(sum_t (old_logps - sample_logps)) = prod_t rho_t`` (the
trajectory importance ratio, unbiased), broadcast over its tokens.

- ``truncated_is_weights`` (TIS): w = clamp(rho, low, high)   (truncated IS; Ionides 2008; Yao et al. 2025, "Your
  efficient RL framework secretly brings you off-policy RL training", the TIS of TRL/verl); ``low = 0``: no floor
- ``masked_is_weights`` (MIS): w = rho where low <= rho <= high, else 0   (masked IS: outliers are dropped, not
  truncated; Liu, Li et al. 2025, "When speed kills stability")

The weights multiply each token's policy term (``weights=`` of every loss in :mod:`.policy` / :mod:`.ppo`), the
normaliser unchanged, as TRL (``vllm_importance_sampling_mode`` ``token_truncate``/``token_mask``/
``sequence_truncate``/``sequence_mask``, ``trl/trainer/grpo_trainer.py``) does. Sequence level follows TRL's
``sequence_*`` modes and verl's ``rollout_is="sequence"`` (``verl/trainer/ppo/rollout_corr_helper.py``): the
product, not the geometric mean, which verl uses only as a rejection statistic (Geo-RS) and which is not an
importance weight. Log-ratios are clamped to [-20, 20] before ``exp`` as in verl; masking decisions use the
unclamped log-ratio. Where we differ from verl: verl's rejection masks also shrink the normaliser.

Metrics (``rollout_correction/``): ``weight_min|mean|max`` of the final weights over valid tokens (token level) or
completions (sequence level), and the fraction of those outside [low, high] (``truncated_fraction`` for TIS,
``masked_fraction`` for MIS).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from lit_rlhf.logprobs import masked_mean

CorrectionLevel = Literal["token", "sequence"]
LOG_RATIO_BOUND = 20.0

Metrics = dict[str, torch.Tensor]


def _log_ratio(
    old_logps: torch.Tensor, sample_logps: torch.Tensor, mask: torch.Tensor, level: CorrectionLevel
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log rho [N, R] or [N, 1], the mask its statistics run over: tokens, or completions with a token)."""
    mask = mask.to(old_logps.dtype)
    log_rho = (old_logps - sample_logps).detach() * mask
    if level == "token":
        return log_rho, mask
    if level == "sequence":
        return log_rho.sum(-1, keepdim=True), (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
    raise ValueError(f"unknown rollout-correction level {level!r}; choose 'token' or 'sequence'")


def _bounds(low: float, high: float) -> tuple[float, float]:
    if not 0.0 <= low <= 1.0 <= high:
        raise ValueError(f"rollout-correction bounds need 0 <= low <= 1 <= high, got low={low}, high={high}")
    return (math.log(low) if low > 0 else -math.inf), math.log(high)


def _metrics(weights: torch.Tensor, stat_mask: torch.Tensor, outside: torch.Tensor, name: str) -> Metrics:
    """Weight statistics over ``stat_mask`` (tokens [N, R] or completions [N, 1])."""
    valid = stat_mask.bool()
    w = weights.expand_as(stat_mask)[valid] if valid.any() else weights.new_ones(1)
    return {
        "rollout_correction/weight_min": w.min().detach(),
        "rollout_correction/weight_mean": w.mean().detach(),
        "rollout_correction/weight_max": w.max().detach(),
        f"rollout_correction/{name}": masked_mean(outside.to(stat_mask.dtype), stat_mask).detach(),
    }


def truncated_is_weights(
    old_logps: torch.Tensor,
    sample_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: CorrectionLevel = "token",
    low: float = 0.0,
    high: float = 2.0,
) -> tuple[torch.Tensor, Metrics]:
    """TIS weights [N, R] (0 outside ``mask``): rho clamped to [low, high] (module doc)."""
    log_low, log_high = _bounds(low, high)
    log_rho, stat_mask = _log_ratio(old_logps, sample_logps, mask, level)
    rho = torch.exp(log_rho.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    weights = rho.clamp(min=low, max=high)
    outside = (log_rho < log_low) | (log_rho > log_high)
    metrics = _metrics(weights, stat_mask, outside, "truncated_fraction")
    metrics["rollout_correction/masked_fraction"] = torch.zeros_like(metrics["rollout_correction/weight_mean"])
    return weights.expand_as(old_logps) * mask.to(old_logps.dtype), metrics


def masked_is_weights(
    old_logps: torch.Tensor,
    sample_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: CorrectionLevel = "token",
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[torch.Tensor, Metrics]:
    """MIS weights [N, R] (0 outside ``mask``): rho where it lies in [low, high], 0 where it does not."""
    log_low, log_high = _bounds(low, high)
    log_rho, stat_mask = _log_ratio(old_logps, sample_logps, mask, level)
    outside = (log_rho < log_low) | (log_rho > log_high)
    weights = torch.exp(log_rho.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)).masked_fill(outside, 0.0)
    metrics = _metrics(weights, stat_mask, outside, "masked_fraction")
    metrics["rollout_correction/truncated_fraction"] = torch.zeros_like(metrics["rollout_correction/weight_mean"])
    return weights.expand_as(old_logps) * mask.to(old_logps.dtype), metrics


ROLLOUT_CORRECTIONS: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "tis": truncated_is_weights,
    "mis": masked_is_weights,
}
"""Name -> rollout correction (``rollout_correction: none`` passes no weights); both take level, low, high."""


def logp_diff_metrics(old_logps: torch.Tensor, sample_logps: torch.Tensor, mask: torch.Tensor) -> Metrics:
    """``rollout/logp_diff/mean|max``: |trainer - sampler| logp per valid token (0 without valid tokens)."""
    mask = mask.to(old_logps.dtype)
    diff = (old_logps - sample_logps).detach().abs() * mask
    largest = diff.max() if diff.numel() else diff.sum()
    return {"rollout/logp_diff/mean": masked_mean(diff, mask), "rollout/logp_diff/max": largest}
