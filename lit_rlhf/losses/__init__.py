"""Pure loss functions, one per variant, selected by name in YAML. Grouped by family:

- :mod:`.preference` — DPO, IPO, hinge, robust DPO (offline preference optimisation)
- :mod:`.kl`         — k1/k2/k3 per-token KL estimators
- :mod:`.policy`     — GRPO family (GRPO, DAPO, Dr. GRPO, GSPO) and PPO clipped policy/value losses
- :mod:`.reward`     — reward-model losses (Bradley–Terry, pointwise, K-wise ranking, centering)
"""

from lit_rlhf.losses.kl import KLEstimator, kl_penalty
from lit_rlhf.losses.policy import (
    GRPO_LOSSES,
    dapo_loss,
    dr_grpo_loss,
    grpo_loss,
    gspo_loss,
    ppo_policy_loss,
    ppo_value_loss,
)
from lit_rlhf.losses.preference import PREFERENCE_LOSSES, dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss
from lit_rlhf.losses.reward import (
    bradley_terry_loss,
    pointwise_regression_loss,
    ranking_loss,
    reward_centering_penalty,
)

__all__ = [
    "GRPO_LOSSES",
    "KLEstimator",
    "PREFERENCE_LOSSES",
    "bradley_terry_loss",
    "dapo_loss",
    "dpo_loss",
    "dr_grpo_loss",
    "grpo_loss",
    "gspo_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "pointwise_regression_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranking_loss",
    "reward_centering_penalty",
    "robust_dpo_loss",
]
