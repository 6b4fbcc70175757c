"""Reward-model losses on scalar rewards (Bradley–Terry pairwise, pointwise, K-wise ranking, centering).

- ``bradley_terry_loss``:        -log sigmoid(r_c - r_r - m)               pairwise (InstructGPT, Ouyang et al.
                                                                           2022, Eq. 1; margin m as in Llama 2)
- ``pointwise_regression_loss``: (r - y)^2                                 scored records (MSE)
- ``ranking_loss``:              (1/C(K,2)) sum_{i<j} -log sigmoid(r_i - r_j)   K-wise ranked lists, best first
                                                                           (InstructGPT Eq. 1 over all K choose 2)
- ``reward_centering_penalty``:  c * mean(r^2)                             reward centering (Eisenstein et al.
                                                                           2023, "Helping or Herding?", §3)
- ``step_bce_loss``:              mean over labelled steps of               process reward model: per-step
                                  -[y log s(r) + (1 - y) log(1 - s(r))]     correctness (Lightman et al. 2023,
                                                                           "Let's Verify Step by Step", §2.6)
- ``outcome_bce_loss``:           mean over completions of                 outcome reward model as a verifier
                                  -[y log s(r) + (1 - y) log(1 - s(r))]     (Cobbe et al. 2021 §3; Lightman et al.
                                                                           2023 §2.5 ORM): y = answer correct
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise Bradley–Terry loss [B]; ``margin`` [B] (or None = 0) asks the chosen reward to win by that much."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def pointwise_regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error [B] between predicted rewards and scored targets."""
    return (predicted - target) ** 2


def ranking_loss(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """K-wise ranking loss [B] for rewards [B, K] ordered best -> worst.

    Each row averages -log sigmoid(r_i - r_j) over its C(k_b, 2) pairs i < j, where ``mask`` [B, K] (bool, valid
    entries a prefix; None = all valid) gives the row's own list length k_b.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    mask = mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("ranking_loss mask must mark a prefix of each row (valid entries first, padding after)")
    counts = mask.sum(-1)
    if (counts < 2).any():
        raise ValueError(f"every ranked list needs at least 2 valid entries, got lengths {counts.tolist()}")
    rewards = rewards.masked_fill(~mask, 0.0)  # padding may hold anything; keep it out of forward and backward
    k = rewards.shape[-1]
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    pairs = upper & mask.unsqueeze(-1) & mask.unsqueeze(-2)  # [B, K, K]: i < j, both valid
    pair_losses = -F.logsigmoid(rewards.unsqueeze(-1) - rewards.unsqueeze(-2))
    n_pairs = (counts * (counts - 1) // 2).to(rewards.dtype)
    return (pair_losses * pairs).sum((-1, -2)) / n_pairs


def reward_centering_penalty(rewards: torch.Tensor, coefficient: float) -> torch.Tensor:
    """Scalar ``coefficient * mean(rewards^2)``: pulls the reward model's outputs towards zero mean."""
    return coefficient * (rewards**2).mean()


def step_bce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scalar binary cross-entropy of step logits [B, K] against 0/1 labels [B, K], averaged over the ``mask``-ed
    (real) steps of the whole batch: every labelled step weighs the same, whatever the length of its solution (a
    PRM is a per-step classifier; a per-sequence mean would up-weight the steps of short solutions). 0 when no step
    is marked. Padding entries may hold anything: they are kept out of forward and backward."""
    mask = mask.bool()
    logits, labels = logits.masked_fill(~mask, 0.0), labels.to(logits.dtype).masked_fill(~mask, 0.0)
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def outcome_bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scalar binary cross-entropy of outcome-RM logits [B] (one score per completion) against 0/1 labels [B] (the
    answer verifier's correct/wrong), averaged over the batch: sigmoid(logit) is the predicted probability that the
    completion is correct, so a logit > 0 is the RM's verdict "correct". For labelled single completions (the online
    RM, :mod:`lit_rlhf.online_rm`): Bradley–Terry needs pairs and leaves the offset free. 0 for an empty batch."""
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="mean")
