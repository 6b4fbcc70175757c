"""KL coefficient controllers for PPO: a fixed beta, or the adaptive controller of Ziegler et al. (2019).

The per-token reward carries ``-beta * KL_t`` (:func:`lit_rlhf.experience.dense_rewards`). With a fixed beta the
KL the policy settles at depends on the task; the adaptive controller instead steers beta so that the observed
sequence KL tracks a target (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2)::

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)          proportional error, clipped
    beta_t+1 = beta_t * (1 + e_t * n_t / horizon)             n_t: samples in this batch

i.e. the paper's ``beta_{t+1} = beta_t (1 + K_beta e_t)`` with ``K_beta = n_t / horizon`` (the form of the authors'
``lm-human-preferences`` code and of TRL). ``KL_t`` is the mean over the batch of the summed per-token KL of a
sequence (nats per sequence). Controllers are tiny stateful objects whose whole state is ``value``; it is saved in
and restored from checkpoints (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_rlhf.losses.kl import RewardKLEstimator


def adaptive_kl_coef(kl_coef: float, current_kl: float, n_steps: int, target: float, horizon: int) -> float:
    """One update of the adaptive controller (module doc): the new beta after a batch of ``n_steps`` samples."""
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target ({target}) and horizon ({horizon}) must be positive")
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


@dataclass
class KLSettings:
    """The KL penalty of the per-token reward.

    Args:
        coef: initial KL coefficient beta (typically 0.02 - 0.2; InstructGPT, Ouyang et al. 2022, uses 0.02).
        target: target KL in nats per sequence for the adaptive controller; ``null`` keeps beta fixed at ``coef``.
        horizon: adaptive controller horizon in samples (larger: slower adaptation).
        estimator: per-token KL estimator in the reward, ``k1`` (log-ratio, InstructGPT Eq. 2), ``k2`` or ``k3``.
    """

    coef: float = 0.05
    target: float | None = None
    horizon: int = 10000
    estimator: RewardKLEstimator = "k1"


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """beta follows :func:`adaptive_kl_coef` towards ``target`` nats per sequence."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL control needs a positive target and horizon, got {target} and {horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        self.value = adaptive_kl_coef(self.value, current_kl, n_steps, self.target, self.horizon)
        return self.value


def build_kl_controller(settings: KLSettings) -> FixedKLController:
    """The controller for ``settings``: adaptive when a target is set, fixed otherwise."""
    if settings.coef < 0:
        raise ValueError(f"the KL coefficient must be >= 0, got {settings.coef}")
    if settings.target is None:
        return FixedKLController(settings.coef)
    return AdaptiveKLController(settings.coef, settings.target, settings.horizon)
