"""Offline preference losses (DPO family) on sequence logps.

Every function takes the four summed sequence logps ``[B]`` (policy chosen/rejected, reference chosen/rejected)
and returns ``(losses, chosen_rewards, rejected_rewards)``, all ``[B]``, where the implicit rewards are
``beta * (policy - reference)`` logps (DPO paper, Rafailov et al. 2023, Eq. 5). With
``h = (pi_c - ref_c) - (pi_r - ref_r)`` the log-ratio margin:

- ``dpo_loss``:        -log sigmoid(beta h)                       (DPO Eq. 7); with label smoothing e (cDPO):
                        -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)
- ``ipo_loss``:        (h - 1/(2 beta))^2                          (IPO, Azar et al. 2023, Eq. 17, tau = beta)
- ``hinge_loss``:      max(0, 1 - beta h)                          (RSO/SLiC hinge, Liu et al. 2023, Eq. 9)
- ``robust_dpo_loss``: ((1-e)(-log sigmoid(beta h)) - e(-log sigmoid(-beta h))) / (1 - 2e)
                                                                   (robust DPO, Chowdhury et al. 2024, Eq. 9)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rewards_and_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not beta > 0:  # 0: a flat loss (IPO: a division by zero); < 0: the rejected response is preferred
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return chosen_logratios - rejected_logratios, chosen_rewards, rejected_rewards


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Losses:
    """Sigmoid DPO loss; ``label_smoothing`` in [0, 0.5) gives conservative DPO (cDPO)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _rewards_and_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> Losses:
    """IPO: squared distance of the log-ratio margin from 1/(2 beta)."""
    h, chosen_rewards, rejected_rewards = _rewards_and_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return (h - 1.0 / (2.0 * beta)) ** 2, chosen_rewards, rejected_rewards


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> Losses:
    """RSO hinge: max(0, 1 - beta h)."""
    h, chosen_rewards, rejected_rewards = _rewards_and_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return torch.relu(1.0 - beta * h), chosen_rewards, rejected_rewards


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Losses:
    """Robust DPO: an unbiased loss under preference labels flipped with probability ``label_smoothing``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _rewards_and_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    e = label_smoothing
    losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    return losses, chosen_rewards, rejected_rewards


PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust_dpo": robust_dpo_loss}
"""Name -> loss function, as selected by ``DPOModule(loss=...)``."""
