"""Per-token KL estimators of KL(pi || pi_ref) from samples, and the KL-in-the-reward penalty.

With ``x = logps - ref_logps`` (log pi/pi_ref at the sampled token; Schulman, "Approximating KL divergence", 2020,
which names k1/k2/k3):

- ``k1``    = x                                unbiased, high variance, can be negative
- ``k2``    = x^2 / 2                          biased, low variance, >= 0; d/dlogp = x
- ``k3``    = exp(-x) + x - 1                  unbiased, low variance, >= 0 (DeepSeekMath, Shao et al. 2024, Eq. 4)
- ``k3+``   = k3's value with k2's gradient x (straight-through); k3's own gradient 1 - exp(-x) is not an unbiased
              estimate of grad KL, x is (verl ``core_algos.kl_penalty``, confirmed there; verl also clamps x and k3
              to [-20, 20] / [-10, 10], we do not)
- ``k3_iw`` = (pi / pi_old) k3, ratio = exp(logps - old_logps) WITH gradient: the importance-weighted k3 of
              DeepSeek-V3.2 (DeepSeek-AI 2025, §3.1, Eq. 7). Samples come from pi_old, so plain k3 is biased once
              pi moves; the weight removes that bias, and the gradient becomes ratio * x (TRL
              ``use_bias_correction_kl``, ``trl/trainer/grpo_trainer.py``: ``per_token_kl * coef_1``, the same)

``kl_in_reward`` is the other placement (``kl_placement=reward``): a per-sequence penalty on the score before the
advantages are formed, as InstructGPT (Ouyang et al. 2022, Eq. 2) and verl's ``apply_kl_penalty`` + GRPO outcome
advantage (which sums the token-level rewards) do.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3", "k3+", "k3_iw"]
"""Estimators for the KL term of the loss (``k3_iw`` needs ``old_logps``)."""
RewardKLEstimator = Literal["k1", "k2", "k3"]
"""Estimators for a KL penalty in the reward (no gradient flows there, so k3+ / k3_iw reduce to k3)."""


def kl_penalty(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    estimator: KLEstimator = "k3",
    old_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL estimate, same shape as ``logps`` (module doc); ``old_logps`` only for ``k3_iw``."""
    x = logps - ref_logps
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x**2
    k3 = torch.exp(-x) + x - 1.0
    if estimator == "k3":
        return k3
    if estimator == "k3+":
        k2 = 0.5 * x**2
        return k2 - k2.detach() + k3.detach()
    if estimator == "k3_iw":
        if old_logps is None:
            raise ValueError("kl_estimator='k3_iw' needs old_logps (the sampling policy's logps) for pi / pi_old")
        return torch.exp(logps - old_logps.detach()) * k3
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of 'k1', 'k2', 'k3', 'k3+', 'k3_iw'")


def kl_in_reward(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: RewardKLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL in the reward: ``(scores - beta * sum_t KL_t, KL)``, [N] and [N, R] (0 outside ``mask``), no gradient.

    ``logps`` are the sampling policy's (old) logps. The loss then takes ``beta = 0``; per-token rewards for
    REINFORCE++ / PPO are :func:`lit_rlhf.experience.dense_rewards` (the same KL, spread over the tokens).
    """
    with torch.no_grad():
        kl = kl_penalty(logps, ref_logps, estimator) * mask.to(logps.dtype)
        return scores - beta * kl.sum(-1).to(scores.dtype), kl
