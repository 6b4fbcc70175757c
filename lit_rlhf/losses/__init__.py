"""Pure loss functions, one per variant, selected by name in YAML. Grouped by family:

- :mod:`.preference` — DPO, IPO, hinge, robust DPO (offline preference optimisation)
- :mod:`.kl`         — k1/k2/k3 per-token KL estimators
"""

from lit_rlhf.losses.kl import KLEstimator, kl_penalty
from lit_rlhf.losses.preference import PREFERENCE_LOSSES, dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss

__all__ = [
    "KLEstimator",
    "PREFERENCE_LOSSES",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "robust_dpo_loss",
]
