"""GRPO-family policy losses on per-token logps, one function per variant, selected by name (``GRPO_LOSSES``).

Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``mask`` are ``[B, T]`` (``mask`` 1 on completion tokens);
``advantages`` are ``[B]`` (one per completion, GRPO) or ``[B, T]`` (per token: REINFORCE++, process supervision).
Every function takes the same arguments (``dr_grpo`` also ``max_length``; other variant knobs have defaults) and
returns ``(loss, metrics)``: a scalar loss and a dict of detached scalar tensors. ``weights`` (``[B, T]`` or
``[B, 1]``, no gradient) multiply each token's policy term, not its KL term, with the normaliser unchanged: rollout
correction, top-entropy and off-policy masks (:mod:`.correction`, :mod:`.selection`) enter here, as TRL's
``grpo_trainer.py`` multiplies them in.

With ``r = exp(logps - old_logps)`` and ``KL_k`` of :mod:`.kl`, the token term and the reduction of each variant:

- ``grpo``:      -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta KL      (DeepSeekMath, Shao et al. 2024,
                 Eq. 3; the PPO surrogate, Schulman et al. 2017, Eq. 7), (1/B) sum_i (1/|o_i|) sum_t
- ``dapo``:      the same term, sum_{i,t} / sum_i |o_i|     (DAPO, Yu et al. 2025, Eq. 8; eps_high > eps_low is
                 DAPO's "clip-higher")
- ``dr_grpo``:   the same term, sum_{i,t} / (B * max_length)             (Dr. GRPO, Liu et al. 2025, Eq. 3)
- ``gspo``:      r replaced by s_i = exp((1/|o_i|) sum_t (logps - old_logps)), clipped per sequence (GSPO, Zheng
                 et al. 2025, Eq. 5-7), in its GSPO-token form s_i,t = sg[s_i] pi / sg[pi] so per-token
                 advantages work; identical to GSPO (value and gradient) when A is per sequence; reduced as grpo
- ``dual_clip``: grpo, and for A < 0 the token loss is also capped at c |A| (dual-clip PPO, Ye et al. 2020,
                 "Mastering Complex Control in MOBA Games with Deep RL", arXiv:1912.09729; c = 3), reduced as grpo
- ``cispo``:     -sg[clip(r, 1 - eps_low, 1 + eps_high)] A logps + beta KL: the clipped, stop-gradient IS weight
                 times the log-prob, so clipped tokens keep their gradient (MiniMax-M1, 2025, arXiv:2506.13585,
                 §3.1, Eqs. 4-5), reduced as dapo (token mean, as the paper)
- ``sapo``:      -f(r) A + beta KL, f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos if A > 0 else tau_neg: a
                 soft gate instead of a hard clip, df/dr = 1 at r = 1 (SAPO, Gao et al. 2025, arXiv:2511.20347),
                 reduced as grpo
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_rlhf.logprobs import masked_mean
from lit_rlhf.losses.kl import KLEstimator, kl_penalty

Metrics = dict[str, torch.Tensor]
LossAndMetrics = tuple[torch.Tensor, Metrics]


def token_advantages(advantages: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1]`` (broadcast over tokens); ``[B, T]`` is checked against ``logps`` and returned as is."""
    if advantages.dim() == 1 and advantages.shape[0] == logps.shape[0]:
        return advantages.unsqueeze(-1)
    if advantages.shape == logps.shape:
        return advantages
    raise ValueError(f"advantages must be [B] or [B, T] like logps {tuple(logps.shape)}, got {tuple(advantages.shape)}")


def _kl(
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    old_logps: torch.Tensor,
    beta: float,
    kl_estimator: KLEstimator,
) -> torch.Tensor:
    """Per-token KL estimate [B, T]; zeros when beta == 0 (the term is then neither used nor reported)."""
    if beta == 0.0:
        return torch.zeros_like(logps)
    if ref_logps is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logps for the KL penalty, got None")
    return kl_penalty(logps, ref_logps, kl_estimator, old_logps=old_logps)


def clip_metrics(
    ratio: torch.Tensor, advantages: torch.Tensor, weight: torch.Tensor, eps_low: float, eps_high: float
) -> Metrics:
    """Fractions (weighted by ``weight``) of entries where the PPO clip is engaged on the low/high side."""
    low = (advantages < 0) & (ratio < 1.0 - eps_low)
    high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return {
        "clip_ratio/low": masked_mean(low.to(weight.dtype), weight).detach(),
        "clip_ratio/high": masked_mean(high.to(weight.dtype), weight).detach(),
        "clip_ratio/region": masked_mean((low | high).to(weight.dtype), weight).detach(),
    }


def _with_kl(
    policy_term: torch.Tensor,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    beta: float,
    kl_estimator: KLEstimator,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """(per_token = (policy_term * weights + beta KL) * mask, float mask, {"kl": masked mean KL})."""
    mask = mask.to(logps.dtype)
    if weights is not None:
        policy_term = policy_term * weights.detach().to(logps.dtype)
    kl = _kl(logps, ref_logps, old_logps, beta, kl_estimator)
    return (policy_term + beta * kl) * mask, mask, {"kl": masked_mean(kl.detach(), mask).detach()}


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i (1/|o_i|) sum_t: GRPO's reduction."""
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{i,t} / sum_i |o_i|: DAPO's token-level reduction."""
    return per_token.sum() / mask.sum().clamp(min=1.0)


def _clipped_surrogate(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    kl_estimator: KLEstimator,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """Token-level PPO-clip term of grpo/dapo/dr_grpo: (per_token [B, T] already masked, float mask, metrics)."""
    ratio = torch.exp(logps - old_logps.detach())
    adv = token_advantages(advantages, logps)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    policy_term = -torch.minimum(ratio * adv, clipped * adv)
    per_token, mask, metrics = _with_kl(policy_term, logps, old_logps, ref_logps, mask, beta, kl_estimator, weights)
    metrics.update(clip_metrics(ratio, adv.expand_as(ratio), mask, epsilon_low, epsilon_high))
    return per_token, mask, metrics


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """GRPO: per-sequence token mean, then mean over sequences."""
    per_token, mask, metrics = _clipped_surrogate(
        logps, old_logps, ref_logps, advantages, mask, epsilon_low, epsilon_high, beta, kl_estimator, weights
    )
    return _sequence_mean(per_token, mask), metrics


def dapo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """DAPO token-level loss: sum over all completion tokens / their number (long answers weigh more)."""
    per_token, mask, metrics = _clipped_surrogate(
        logps, old_logps, ref_logps, advantages, mask, epsilon_low, epsilon_high, beta, kl_estimator, weights
    )
    return _token_mean(per_token, mask), metrics


def dr_grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_length: int,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """Dr. GRPO: sum over all completion tokens / (B * max_length), a constant free of length bias."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    per_token, _, metrics = _clipped_surrogate(
        logps, old_logps, ref_logps, advantages, mask, epsilon_low, epsilon_high, beta, kl_estimator, weights
    )
    return per_token.sum() / (logps.shape[0] * max_length), metrics


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """GSPO: clip the length-normalised sequence ratio s_i. With per-sequence advantages the clip metrics are
    fractions of sequences, with per-token advantages fractions of tokens.

    The GSPO paper uses much smaller clip ranges than PPO (eps ~ 3e-4 / 4e-4); set them in the config.
    """
    fmask = mask.to(logps.dtype)
    log_s = ((logps - old_logps.detach()) * fmask).sum(-1) / fmask.sum(-1).clamp(min=1.0)
    s_token = torch.exp(log_s.detach().unsqueeze(-1) + logps - logps.detach())  # value s_i, gradient s_i dlogp_t
    adv = token_advantages(advantages, logps)
    clipped = torch.clamp(s_token, 1.0 - epsilon_low, 1.0 + epsilon_high)
    policy_term = -torch.minimum(s_token * adv, clipped * adv)
    per_token, fmask, metrics = _with_kl(policy_term, logps, old_logps, ref_logps, mask, beta, kl_estimator, weights)
    if advantages.dim() == 1:
        seq_ratio = torch.exp(log_s.detach())
        metrics.update(clip_metrics(seq_ratio, advantages, torch.ones_like(seq_ratio), epsilon_low, epsilon_high))
    else:
        metrics.update(clip_metrics(s_token.detach(), adv, fmask, epsilon_low, epsilon_high))
    return _sequence_mean(per_token, fmask), metrics


def dual_clip_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip_c: float = 3.0,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """GRPO with dual clip: a negative-advantage token's loss is at most c |A| (no gradient beyond ratio c).

    Confirmed against verl ``compute_policy_loss_vanilla`` (``clip_ratio_c = 3``; there with the loss's
    ``loss_agg_mode``, here GRPO's per-sequence mean). ``clip_ratio/dual``: fraction of tokens where the cap binds.
    """
    if dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (a lower bound on the ratio's effect), got {dual_clip_c}")
    ratio = torch.exp(logps - old_logps.detach())
    adv = token_advantages(advantages, logps)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    ppo_term = -torch.minimum(ratio * adv, clipped * adv)
    cap = -dual_clip_c * adv  # c |A| where A < 0
    capped = (adv < 0) & (ppo_term > cap)
    policy_term = torch.where(adv < 0, torch.minimum(ppo_term, cap), ppo_term)
    per_token, mask, metrics = _with_kl(policy_term, logps, old_logps, ref_logps, mask, beta, kl_estimator, weights)
    metrics.update(clip_metrics(ratio, adv.expand_as(ratio), mask, epsilon_low, epsilon_high))
    metrics["clip_ratio/dual"] = masked_mean(capped.expand_as(mask).to(mask.dtype), mask).detach()
    return _sequence_mean(per_token, mask), metrics


def cispo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 1.0,
    epsilon_high: float = 4.0,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """CISPO: -sg[clip(r)] A logps, token mean; gradient -clip(r) A dlogp on every token, clipped or not.

    The value is a surrogate whose gradient is the clipped-IS REINFORCE gradient, not an objective estimate. The
    paper sets eps_low large (no lower bound; ``epsilon_low >= 1``) and tunes eps_high; the defaults cap the weight
    at 5 (ScaleRL's eps_max = 5). Confirmed against verl ``compute_policy_loss_cispo`` (clip to
    [1 - eps_low, 1 + eps_high], token mean: the same) and TRL's ``cispo`` branch, which clips only above and
    takes ``epsilon_high`` as the bound itself: TRL ``epsilon_high=5.0`` is ours ``epsilon_high=4.0``. Clip metrics
    count tokens whose weight was truncated, whatever the sign of A (as verl; TRL counts A > 0 only).
    """
    ratio = torch.exp(logps - old_logps.detach())
    adv = token_advantages(advantages, logps)
    weight = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high).detach()
    policy_term = -weight * adv * logps
    per_token, mask, metrics = _with_kl(policy_term, logps, old_logps, ref_logps, mask, beta, kl_estimator, weights)
    low, high = (ratio < 1.0 - epsilon_low).to(mask.dtype), (ratio > 1.0 + epsilon_high).to(mask.dtype)
    metrics["clip_ratio/low"] = masked_mean(low, mask).detach()
    metrics["clip_ratio/high"] = masked_mean(high, mask).detach()
    metrics["clip_ratio/region"] = masked_mean(low + high, mask).detach()
    return _token_mean(per_token, mask), metrics


def sapo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    weights: torch.Tensor | None = None,
) -> LossAndMetrics:
    """SAPO: -sigmoid(tau (r - 1)) (4 / tau) A, per-sequence mean then mean (module doc).

    The gradient is g r A dlogp with the soft gate g = 4 sigmoid (1 - sigmoid) in (0, 1], 1 at r = 1: it decays
    smoothly as r leaves 1, faster for tau_neg > tau_pos on negative tokens. Metrics: ``gate/mean`` (masked mean of
    g) and ``gate/damped`` (fraction of tokens with g < 1/2); ``clip_ratio/*`` say where a hard clip at
    ``epsilon_low``/``epsilon_high`` would have engaged (SAPO itself does not clip; they compare with ``grpo``).
    Confirmed against TRL's ``sapo`` branch (defaults tau_pos 1.0, tau_neg 1.05; A > 0 takes tau_pos) and verl
    ``compute_policy_loss_sapo`` (seq-mean-token-mean): the same formula and reduction.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"SAPO temperatures must be positive, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    ratio = torch.exp(logps - old_logps.detach())
    adv = token_advantages(advantages, logps)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    sig = torch.sigmoid(tau * (ratio - 1.0))
    policy_term = -sig * (4.0 / tau) * adv
    per_token, mask, metrics = _with_kl(policy_term, logps, old_logps, ref_logps, mask, beta, kl_estimator, weights)
    gate = (4.0 * sig * (1.0 - sig)).detach()
    metrics["gate/mean"] = masked_mean(gate, mask).detach()
    metrics["gate/damped"] = masked_mean((gate < 0.5).to(mask.dtype), mask).detach()
    metrics.update(clip_metrics(ratio, adv.expand_as(ratio), mask, epsilon_low, epsilon_high))
    return _sequence_mean(per_token, mask), metrics


GRPO_LOSSES: dict[str, Callable[..., LossAndMetrics]] = {
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "dr_grpo": dr_grpo_loss,
    "gspo": gspo_loss,
    "dual_clip": dual_clip_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
}
"""Name -> GRPO-family loss, as selected in YAML. Every one takes ``epsilon_low``, ``epsilon_high``, ``beta``,
``kl_estimator`` and ``weights``; ``dr_grpo`` also needs ``max_length``, ``dual_clip`` takes ``dual_clip_c``,
``sapo`` ``tau_pos``/``tau_neg``."""
