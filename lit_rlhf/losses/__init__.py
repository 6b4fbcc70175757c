"""Pure loss functions, one per variant, selected by name in YAML. Grouped by family:

- :mod:`.preference` — DPO, IPO, hinge, robust DPO (offline preference optimisation)
- :mod:`.distill`    — full-vocabulary reverse KL to a teacher (GKD on-policy distillation)
- :mod:`.kl`         — k1/k2/k3, k3+ and importance-weighted k3 per-token KL estimators; KL in the reward
- :mod:`.policy`     — GRPO family (GRPO, DAPO, Dr. GRPO, GSPO, dual clip, CISPO, SAPO): ``GRPO_LOSSES``
- :mod:`.ppo`        — PPO clipped and dual-clip policy losses (``PPO_POLICY_LOSSES``), clipped value loss
- :mod:`.correction` — rollout correction: truncated / masked importance weights (``ROLLOUT_CORRECTIONS``)
- :mod:`.selection`  — token selection: top-entropy mask, off-policy sequence mask
- :mod:`.reward`     — reward-model losses (Bradley–Terry, pointwise, K-wise ranking, centering, PRM steps, outcome BCE)
"""

from lit_rlhf.losses.correction import (
    ROLLOUT_CORRECTIONS,
    logp_diff_metrics,
    masked_is_weights,
    truncated_is_weights,
)
from lit_rlhf.losses.distill import full_forward_kl, full_reverse_kl, generalized_jsd
from lit_rlhf.losses.kl import KLEstimator, RewardKLEstimator, kl_in_reward, kl_penalty
from lit_rlhf.losses.policy import (
    GRPO_LOSSES,
    cispo_loss,
    dapo_loss,
    dr_grpo_loss,
    dual_clip_loss,
    grpo_loss,
    gspo_loss,
    sapo_loss,
)
from lit_rlhf.losses.ppo import PPO_POLICY_LOSSES, ppo_dual_clip_loss, ppo_policy_loss, ppo_value_loss
from lit_rlhf.losses.preference import PREFERENCE_LOSSES, dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss
from lit_rlhf.losses.reward import (
    bradley_terry_loss,
    outcome_bce_loss,
    pointwise_regression_loss,
    ranking_loss,
    reward_centering_penalty,
    step_bce_loss,
)
from lit_rlhf.losses.selection import off_policy_sequence_mask, top_entropy_mask

__all__ = [
    "GRPO_LOSSES",
    "KLEstimator",
    "PPO_POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "RewardKLEstimator",
    "bradley_terry_loss",
    "cispo_loss",
    "dapo_loss",
    "dpo_loss",
    "dr_grpo_loss",
    "dual_clip_loss",
    "full_forward_kl",
    "full_reverse_kl",
    "generalized_jsd",
    "grpo_loss",
    "gspo_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_in_reward",
    "kl_penalty",
    "logp_diff_metrics",
    "masked_is_weights",
    "off_policy_sequence_mask",
    "outcome_bce_loss",
    "pointwise_regression_loss",
    "ppo_dual_clip_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranking_loss",
    "reward_centering_penalty",
    "robust_dpo_loss",
    "sapo_loss",
    "step_bce_loss",
    "top_entropy_mask",
    "truncated_is_weights",
]
