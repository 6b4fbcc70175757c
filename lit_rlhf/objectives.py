"""RL objectives by name: the glue between a stage's settings and the pure losses and estimators.

The GRPO stage (:mod:`lit_rlhf.stages.grpo`) builds one :class:`GRPOObjective` from its options; it gives the
advantages of a rollout batch (:meth:`GRPOObjective.advantages`) and the loss of a minibatch
(:meth:`GRPOObjective.loss`, token masks included). :func:`ppo_policy_loss` (:func:`ppo_corrected_loss`: with
rollout correction) and :func:`ppo_advantages` select PPO's.

- ``loss``: :data:`lit_rlhf.losses.GRPO_LOSSES` (grpo, dapo, dr_grpo, gspo, dual_clip, cispo, sapo); clip ranges left
  ``None`` take the loss's own defaults (0.2/0.2; CISPO 1.0/4.0, MiniMax-M1 §3.1).
- ``kl_placement``: ``loss`` (beta KL_t in the loss, DeepSeekMath Eq. 3) or ``reward`` (beta sum_t KL_t subtracted
  from each completion's reward before the advantages, :func:`lit_rlhf.losses.kl_in_reward`, as InstructGPT Eq. 2 and
  verl's ``use_kl_in_reward``; the loss then has beta = 0). ``reinforce_pp`` takes it per token
  (:func:`lit_rlhf.experience.dense_rewards`).
- ``advantage_estimator``: ``group`` / ``rloo`` (per sequence), ``reinforce_pp`` / ``reinforce_pp_baseline`` (per
  token, whitened over the batch's tokens; Hu 2025), ``gdpo`` (each reward function normalised in its group, Liu et
  al. 2026), ``online_rft`` (coefficient 1 on correct completions, 0 on wrong ones; DeepSeekMath §5.2.1: correct
  means a total reward >= ``rft_threshold``), ``process`` (per token: step rewards normalised over the group's steps,
  summed over the steps ending at or after the token; DeepSeekMath §4.1.3, :mod:`lit_rlhf.steps`). Under DDP the
  batch statistics of the per-token and gdpo estimators are each rank's.
- token masks (``weights=`` of the losses): ``top_entropy_quantile`` rho keeps the minibatch's highest-entropy
  tokens (Wang et al. 2025); ``off_policy_mask_threshold`` delta drops negative-advantage completions that drifted
  from the sampler (DeepSeek-V3.2 Eq. 9), :mod:`lit_rlhf.losses.selection`; ``rollout_correction``
  (:class:`RolloutCorrection`: TIS/MIS weights for the sampler-trainer mismatch, :mod:`lit_rlhf.losses.correction`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

import torch

from lit_rlhf.advantages import (
    gae,
    gdpo_advantages,
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rft_coefficients,
    rloo_advantages,
)
from lit_rlhf.experience import dense_rewards
from lit_rlhf.logprobs import masked_mean
from lit_rlhf.losses import GRPO_LOSSES, PPO_POLICY_LOSSES, kl_in_reward, off_policy_sequence_mask, top_entropy_mask
from lit_rlhf.losses.correction import ROLLOUT_CORRECTIONS, CorrectionLevel
from lit_rlhf.rewards import RewardResult
from lit_rlhf.steps import process_advantages
from lit_rlhf.types import Rollout

GRPOLoss = Literal["grpo", "dapo", "dr_grpo", "gspo", "dual_clip", "cispo", "sapo"]
GRPOAdvantage = Literal["group", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gdpo", "online_rft", "process"]
KLPlacement = Literal["loss", "reward"]
PPOLoss = Literal["ppo", "dual_clip"]
PPOAdvantage = Literal["gae", "reinforce_pp"]
TOKEN_MEAN_LOSSES = ("dapo", "cispo")
"""Losses reduced by the token mean over the batch (the others: per sequence)."""
Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RolloutCorrection:
    """Rollout correction (:mod:`lit_rlhf.losses.correction`): importance weights rho = exp(trainer - sampler logps)
    on each token's policy term, for the mismatch between the sampler (``rollout_backend``) and the trainer.

    Args:
        mode: ``none``; ``tis``: truncated IS, weight clamp(rho, low, high); ``mis``: masked IS, rho inside
            [low, high], 0 outside.
        level: ``token`` (a ratio per token) or ``sequence`` (the product over the completion, on all its tokens).
        low: lower bound; ``null``: 0 for tis (no floor), 0.5 for mis.
        high: upper bound (C of TIS).
    """

    mode: Literal["none", "tis", "mis"] = "none"
    level: CorrectionLevel = "token"
    low: float | None = None
    high: float = 2.0

    def __post_init__(self) -> None:
        if self.mode != "none" and self.mode not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"model.rollout_correction.mode={self.mode!r}: choose none, tis or mis")
        if self.level not in ("token", "sequence"):
            raise ValueError(f"model.rollout_correction.level={self.level!r}: choose token or sequence")
        low = self.low if self.low is not None else (0.5 if self.mode == "mis" else 0.0)
        if not 0.0 <= low <= 1.0 <= self.high:
            raise ValueError(f"model.rollout_correction: need 0 <= low <= 1 <= high, got low={low}, high={self.high}")

    def weights(self, old_logps, sample_logps, mask) -> tuple[torch.Tensor | None, Metrics]:
        """(weights [N, R] or None when off or without sampler logps, ``rollout_correction/*`` metrics)."""
        if self.mode == "none" or sample_logps is None:
            return None, {}
        bounds = {"high": self.high} if self.low is None else {"low": self.low, "high": self.high}
        return ROLLOUT_CORRECTIONS[self.mode](old_logps, sample_logps, mask, level=self.level, **bounds)

    @classmethod
    def coerce(cls, value) -> RolloutCorrection:
        """From itself, a mapping or a namespace (stage hparams as the CLI passes them)."""
        if isinstance(value, cls):
            return value
        values = dict(value) if isinstance(value, Mapping) else vars(value)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass(frozen=True)
class ObjectiveSettings:
    """The GRPO stage's objective options (its ``__init__`` documents each); ``reward_weights``: (function name,
    weight) of each reward function, in the order of :class:`lit_rlhf.rewards.RewardResult`'s ``per_function``."""

    group_size: int = 8
    loss: GRPOLoss = "grpo"
    advantage_estimator: GRPOAdvantage = "group"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    beta: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3", "k3+", "k3_iw"] = "k3"
    kl_placement: KLPlacement = "loss"
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    dual_clip_c: float = 3.0
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    top_entropy_quantile: float | None = None
    off_policy_mask_threshold: float | None = None
    rft_threshold: float = 1.0
    max_length: int = 1
    reward_weights: tuple[tuple[str, float], ...] = ()
    rollout_correction: RolloutCorrection = RolloutCorrection()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rollout_correction", RolloutCorrection.coerce(self.rollout_correction))
        if self.kl_placement not in ("loss", "reward"):
            raise ValueError(f"model.kl_placement={self.kl_placement!r}: choose 'loss' or 'reward'")
        if self.kl_placement == "reward" and self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(
                f"model.kl_estimator={self.kl_estimator} with kl_placement=reward: no gradient flows through a reward, "
                "so k3+ and k3_iw are k3 there; choose k1, k2 or k3"
            )
        if self.kl_placement == "reward" and self.advantage_estimator in ("gdpo", "online_rft", "process"):
            raise ValueError(f"advantage_estimator={self.advantage_estimator} takes no KL in the reward")
        if self.top_entropy_quantile is not None and not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"model.top_entropy_quantile={self.top_entropy_quantile}: the kept fraction, in (0, 1]")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError(f"model.off_policy_mask_threshold={self.off_policy_mask_threshold}: a KL, >= 0")

    @classmethod
    def from_options(cls, options: Mapping, **fixed) -> ObjectiveSettings:
        """Settings from a stage's options (its hparams): every field found there by name, then ``fixed``."""
        names = {f.name for f in fields(cls)} - set(fixed)
        return cls(**{k: options[k] for k in names if k in options}, **fixed)

    @property
    def kl_in_reward(self) -> bool:
        return self.kl_placement == "reward" and self.beta > 0


def grpo_loss_fn(s: ObjectiveSettings):
    """The named loss with the stage's settings bound (module doc); beta = 0 when the KL is in the reward."""
    kwargs = {"beta": 0.0 if s.kl_placement == "reward" else s.beta, "kl_estimator": s.kl_estimator}
    clip = {"epsilon_low": s.epsilon_low, "epsilon_high": s.epsilon_high}
    kwargs.update({k: v for k, v in clip.items() if v is not None})
    extra = {"dr_grpo": {"max_length": s.max_length}, "dual_clip": {"dual_clip_c": s.dual_clip_c}}
    extra["sapo"] = {"tau_pos": s.tau_pos, "tau_neg": s.tau_neg}
    return functools.partial(GRPO_LOSSES[s.loss], **kwargs, **extra.get(s.loss, {}))


def _fill_missing(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """NaN rewards replaced by the mean of their group's other rewards (0 without any): centred, they give 0."""
    groups = rewards.view(-1, group_size)
    ok = ~torch.isnan(groups)
    mean = torch.where(ok, groups, 0.0).sum(-1, keepdim=True) / ok.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(ok, groups, mean).view(-1)


class GRPOObjective:
    """Loss, advantage estimator and token masks of a GRPO run, selected by name (module doc)."""

    def __init__(self, settings: ObjectiveSettings) -> None:
        self.settings = settings
        self.loss_fn = grpo_loss_fn(settings)

    @property
    def needs_entropy(self) -> bool:
        """The loss needs the minibatch's token entropies (top-entropy mask)."""
        return self.settings.top_entropy_quantile is not None

    @property
    def needs_old_logps(self) -> bool:
        """The sampling policy's logps are needed before the update (KL in the reward)."""
        return self.settings.kl_in_reward

    def advantages(
        self,
        scores: RewardResult,
        mask: torch.Tensor,
        old_logps: torch.Tensor | None,
        ref_logps: torch.Tensor | None,
        steps: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(advantages [N] or [N, R], metrics) of a batch from its rewards; ``old_logps``/``ref_logps`` [N, R] are
        used only with the KL in the reward (``old_logps`` then the sampling policy's); ``steps``: ``(step_ends,
        step_rewards)`` [N, R] of ``process`` (:meth:`lit_rlhf.steps.ProcessRewardComposer.step_tensors`)."""
        s, g, device = self.settings, self.settings.group_size, mask.device
        total, stats = scores.total.to(device), {}
        if total.numel() == 0:  # every group dropped
            return total, stats
        scored = ~torch.isnan(total)
        token_mask = mask.to(torch.float32) * scored.unsqueeze(-1).to(torch.float32)
        name = s.advantage_estimator
        if s.kl_in_reward and name != "reinforce_pp":
            total, kl = kl_in_reward(total, old_logps, ref_logps, mask, s.beta, s.kl_estimator)
            stats["kl_in_reward"] = float(kl.sum(-1).mean())
        if name == "group":
            return group_advantages(total, g, scale=s.scale_rewards), stats
        if name == "rloo":
            return rloo_advantages(total, g), stats
        if name == "reinforce_pp":  # token-level: -beta KL_t on every token with the KL in the reward
            if s.kl_in_reward:
                rewards, kl = dense_rewards(total, old_logps, ref_logps, mask, s.beta, s.kl_estimator)
                stats["kl_in_reward"] = float(kl.sum(-1).mean())
            else:
                zeros = torch.zeros(mask.shape, device=device)
                rewards, _ = dense_rewards(total, zeros, zeros, mask, 0.0)
            return reinforce_pp_advantages(rewards, token_mask)[0], stats
        if name == "reinforce_pp_baseline":
            return reinforce_pp_baseline_advantages(_fill_missing(total, g), token_mask, g), stats
        if name == "gdpo":
            names = [n for n, _ in s.reward_weights]
            values = torch.stack([scores.per_function[n].to(device) for n in names], dim=-1)
            advantages, normalised = gdpo_advantages(values, g, [w for _, w in s.reward_weights])
            for i, n in enumerate(names):
                column = normalised[:, i]
                valid = ~torch.isnan(column)
                stats[f"gdpo/{n}/abs_mean"] = float(column[valid].abs().mean()) if valid.any() else float("nan")
            return advantages, stats
        if name == "online_rft":
            correct = total >= s.rft_threshold  # NaN (no reward): not correct
            stats["rft/correct_frac"] = float(correct.float().mean())
            return rft_coefficients(correct).to(total.dtype), stats
        if name == "process":
            if steps is None:
                raise ValueError("advantage_estimator=process needs the step rewards (model.process_rewards)")
            ends, values = (t.to(device) for t in steps)
            advantages, more = process_advantages(values, ends, mask, g)
            return advantages, {**stats, **more}
        raise ValueError(f"unknown advantage_estimator {name!r}")

    def loss(
        self,
        logps: torch.Tensor,
        entropy: torch.Tensor | None,
        old_logps: torch.Tensor,
        ref_logps: torch.Tensor | None,
        advantages: torch.Tensor,
        minibatch: Rollout,
    ) -> tuple[torch.Tensor, Metrics]:
        """(loss, metrics) of a minibatch: the token masks (top entropy, off-policy) and the rollout-correction weights
        (``old_logps`` vs ``minibatch.sample_logps``) as ``weights``, then the loss. The off-policy mask compares with
        the sampler's logps (``minibatch.sample_logps``), or ``old_logps``."""
        s, weights, metrics = self.settings, None, {}
        mask, sample_logps = minibatch.response_mask, minibatch.sample_logps
        if s.top_entropy_quantile is not None:
            if entropy is None:
                raise ValueError("top_entropy_quantile needs the token entropies of the minibatch")
            weights, metrics = top_entropy_mask(entropy, mask, s.top_entropy_quantile)
        if s.off_policy_mask_threshold is not None:
            sampler = old_logps if sample_logps is None else sample_logps
            keep, more = off_policy_sequence_mask(advantages, logps, sampler, mask, s.off_policy_mask_threshold)
            weights, metrics = (keep if weights is None else weights * keep), {**metrics, **more}
        correction, more = s.rollout_correction.weights(old_logps, sample_logps, mask)  # rollout correction
        if correction is not None:
            weights, metrics = (correction if weights is None else weights * correction), {**metrics, **more}
        loss, loss_metrics = self.loss_fn(logps, old_logps, ref_logps, advantages, mask, weights=weights)
        return loss, {**loss_metrics, **metrics}


def loss_weights(loss: str, rollout_lengths: torch.Tensor) -> torch.Tensor:
    """Per-row units of the loss normaliser [N]: a token mean (dapo, cispo) counts tokens, the others sequences."""
    lengths = rollout_lengths.float()
    return lengths if loss in TOKEN_MEAN_LOSSES else torch.ones_like(lengths)


def sequence_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N]: the advantages themselves, or per-token ones averaged over each completion's tokens (for tables)."""
    return advantages if advantages.dim() == 1 else masked_mean(advantages, mask.to(advantages.dtype), dim=-1)


def ppo_policy_loss(name: PPOLoss, clip_range: float, dual_clip_c: float):
    """PPO's policy loss by name (:data:`lit_rlhf.losses.PPO_POLICY_LOSSES`) with its settings bound."""
    extra = {"dual_clip_c": dual_clip_c} if name == "dual_clip" else {}
    return functools.partial(PPO_POLICY_LOSSES[name], clip_range=clip_range, **extra)


def ppo_corrected_loss(
    name: PPOLoss, clip_range: float, dual_clip_c: float, rollout_correction: RolloutCorrection = RolloutCorrection()
):
    """PPO's policy loss (:func:`ppo_policy_loss`) with rollout correction: ``loss(logps, old_logps, advantages, mask,
    sample_logps=None) -> (loss, metrics)`` (:func:`corrected_policy_loss`)."""
    correction = RolloutCorrection.coerce(rollout_correction)
    return functools.partial(corrected_policy_loss, ppo_policy_loss(name, clip_range, dual_clip_c), correction)


def corrected_policy_loss(
    loss_fn, correction: RolloutCorrection, logps, old_logps, advantages, mask, sample_logps=None
) -> tuple[torch.Tensor, Metrics]:
    """``loss_fn`` (a PPO policy loss) with ``correction``'s weights (``old_logps``, the trainer's before the update,
    vs the sampler's ``sample_logps``) on each token's term, as :meth:`GRPOObjective.loss` applies them, and their
    ``rollout_correction/*`` metrics; unweighted when the correction is off or there are no sampler logps."""
    weights, more = correction.weights(old_logps, sample_logps, mask)
    loss, metrics = loss_fn(logps, old_logps, advantages, mask, weights=weights)
    return loss, {**metrics, **more}


def ppo_advantages(
    name: PPOAdvantage, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [N, R] from PPO's dense rewards: ``gae`` (with the critic's values) or ``reinforce_pp``
    (discounted returns whitened over the batch, no critic in the advantages; the critic still fits the returns)."""
    if name == "gae":
        return gae(rewards, values, mask, gamma, lam)
    if name == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, gamma)
    raise ValueError(f"unknown advantage_estimator {name!r}; choose 'gae' or 'reinforce_pp'")
