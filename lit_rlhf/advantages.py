"""Advantage estimators, pure functions.

- ``group_advantages``:     (r_i - mean_group) / (std + eps)  GRPO group-relative advantage (seed 000 §7.2.1;
                            DeepSeekMath, Shao et al. 2024, §4.1.2); ``scale="none"`` is Dr. GRPO (Liu et al.
                            2025), ``scale="batch"`` divides by the std of the whole batch
- ``zero_variance_groups``: groups whose rewards are all equal (zero advantage, no learning signal)
- ``rloo_advantages``:      r_i - mean_{j != i} r_j          REINFORCE leave-one-out (Ahmadian et al. 2024, Eq. 4)
- ``gae``:                  delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}
                            (Schulman et al. 2016, Eq. 16; seed 000 §5.2 ``get_delta``, seed 002)
- ``whiten``:               masked (x - mean) / std (:func:`lit_rlhf.logprobs.masked_whiten`)

Rewards for groups are laid out ``[N]`` with the ``group_size`` completions of one prompt consecutive.
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_rlhf.logprobs import masked_whiten as whiten

GroupScale = Literal["group", "batch", "none"]

__all__ = ["GroupScale", "gae", "group_advantages", "rloo_advantages", "whiten", "zero_variance_groups"]


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] -> [N // group_size, group_size], with a clear error when N is not a multiple of group_size."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of group_size={group_size}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: GroupScale = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages [N]: reward minus its group mean, scaled by ``scale`` (std unbiased)."""
    groups = _groups(rewards, group_size)
    centred = (groups - groups.mean(-1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 for a group std")
        std = groups.std(-1, keepdim=True).expand_as(groups).reshape(-1)
    elif scale == "batch":
        if rewards.numel() < 2:
            raise ValueError("scale='batch' needs at least 2 rewards for a batch std")
        std = rewards.std()
    else:
        raise ValueError(f"unknown scale {scale!r}; choose one of 'group', 'batch', 'none'")
    return centred / (std + eps)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [N // group_size]: True where every reward in the group is equal."""
    groups = _groups(rewards, group_size)
    return (groups == groups[:, :1]).all(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages [N]: r_i minus the mean of the other group_size - 1 rewards of its group."""
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2, got {group_size}")
    groups = _groups(rewards, group_size)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).view(-1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens: returns ``(advantages, returns)``, all [B, T].

    ``mask`` [B, T] marks each row's response tokens (one contiguous run); the episode ends after the last one, so
    V there is 0. Positions outside the mask get advantage and return 0; ``returns = advantages + values``.
    Pass detached ``values``.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = values.shape[-1]
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = [next_advantage] * T
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[t] = next_advantage
        next_value = values[:, t]  # already 0 outside the mask, so the state after the last token has V = 0
    adv = torch.stack(advantages, dim=-1)
    return adv, (adv + values) * mask
