"""PPO experience: the pure functions between a rollout and the update epochs (InstructGPT Eq. 2, GAE, PPO).

After sampling N completions, the stage collects, without gradients: ``old_logps`` (the sampling policy),
``ref_logps`` (the reference), ``values`` (the critic) and one ``scores`` [N] per completion (reward model and/or
reward functions; NaN where no source gave a reward, see :mod:`lit_rlhf.rewards`). This module turns them into the PPO
buffer:

1. ``scores``: :func:`apply_missing_eos_penalty` (completions that hit the token budget lose ``penalty``), then
   :func:`normalize_scores` (``none`` / ``batch`` whitening / ``running`` mean-std over the run); NaN scores are left
   out of the statistics and stay NaN.
2. :func:`dense_rewards`: the per-token reward of InstructGPT Eq. 2 (Ouyang et al. 2022; Ziegler et al. 2019)::

       rewards[n, t] = -beta * KL_t(logps, ref_logps)                    every response token t
                     + clip(scores[n], -c, c)                            added at the LAST response token only

3. :func:`lit_rlhf.advantages.gae` gives ``(advantages, returns)``; :func:`drop_unscored` gives a completion without
   a score advantage 0 and its own values as returns (no signal for actor or critic); advantages are whitened over
   the batch's scored completions (:func:`lit_rlhf.logprobs.masked_whiten`).
4. :func:`minibatches` shuffles the buffer into minibatches for ``ppo_epochs`` passes; :class:`LogitsRecorder` gives
   the entropy bonus (with gradient) from the very forward that computes the minibatch's ``logps``.

Shapes follow :mod:`lit_rlhf.types`: per-token tensors are [N, R] aligned with ``response_ids`` (right-padded,
``mask`` = ``response_mask``); ``scores`` [N].
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_rlhf.logprobs import entropy_from_logits, masked_mean, sequence_logps
from lit_rlhf.losses.correction import logp_diff_metrics
from lit_rlhf.losses.kl import KLEstimator, kl_penalty
from lit_rlhf.rewards import check_reward_weights, reward_stats
from lit_rlhf.types import Rollout

ScoreNorm = Literal["none", "batch", "running"]


def check_ppo_settings(
    samples_per_prompt: int, ppo_epochs: int, score_clip: float | None, reward_model, rewards, online_rm=None
) -> None:
    """Refuse PPO settings under which nothing is learned (a ValueError naming the option, its value and why): no
    reward at all (``reward_model``: its settings or None; ``rewards``: the reward functions' specs or None;
    ``online_rm``: the online RM's settings or None), or one whose every weight is 0, ``samples_per_prompt < 1`` (no
    rollout), ``ppo_epochs < 1`` (no update: no training step is ever counted) and ``score_clip <= 0`` (every score
    clipped to one constant)."""
    if reward_model is None and not rewards and online_rm is None:
        raise ValueError("PPO needs a reward: set model.reward_model, model.rewards and/or model.online_rm")
    if samples_per_prompt < 1:
        raise ValueError(
            f"model.samples_per_prompt={samples_per_prompt} cannot learn: no completion is sampled; set it to 1 or more"
        )
    if ppo_epochs < 1:
        raise ValueError(
            f"model.ppo_epochs={ppo_epochs} cannot learn: it is the number of update passes over each rollout batch, "
            "so no optimizer step (and no training step) would ever be taken. Set it to 1 or more."
        )
    if score_clip is not None and score_clip <= 0:
        raise ValueError(
            f"model.score_clip={score_clip} cannot learn: scores are clipped to [-score_clip, score_clip], so every "
            "completion gets the same score. Set a positive bound, or null for no clipping."
        )
    weights = [x.weight for x in (reward_model, online_rm, *(rewards or [])) if x is not None]
    check_reward_weights(weights, "model.reward_model.weight, model.online_rm.weight and model.rewards")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [N] of each row's last masked token; every row needs at least one (right-padded masks)."""
    lengths = mask.long().sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError(f"rows {torch.nonzero(lengths == 0).flatten().tolist()} have no response token to score")
    return lengths - 1


def apply_missing_eos_penalty(scores: torch.Tensor, truncated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """``scores - penalty`` where the completion produced no EOS within the budget (``truncated``); as is for None."""
    if penalty is None:
        return scores
    return scores - penalty * truncated.to(scores.dtype)


@dataclass
class RunningMoments:
    """Mean and variance of every score seen so far (parallel Welford update), for ``score_norm=running``."""

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}


def update_moments(moments: RunningMoments, x: torch.Tensor) -> RunningMoments:
    """The moments after also seeing the values of ``x`` that are not NaN (Chan et al. pairwise merge; population
    variance)."""
    x = x[~torch.isnan(x)]
    n = x.numel()
    if n == 0:
        return moments
    batch_mean, batch_var = float(x.float().mean()), float(x.float().var(unbiased=False))
    total = moments.count + n
    if moments.count == 0:
        return RunningMoments(batch_mean, batch_var, n)
    delta = batch_mean - moments.mean
    mean = moments.mean + delta * n / total
    m2 = moments.var * moments.count + batch_var * n + delta**2 * moments.count * n / total
    return RunningMoments(mean, m2 / total, total)


def normalize_scores(
    scores: torch.Tensor, mode: ScoreNorm, moments: RunningMoments | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """``none``: as is; ``batch``: (s - mean) / std over this batch; ``running``: over ``moments`` (updated first).
    NaN scores (no reward) stay NaN and are left out of the batch statistics (std 0 with fewer than 2 others)."""
    if mode == "none":
        return scores
    if mode == "batch":
        if scores.numel() < 2:
            raise ValueError("score_norm='batch' needs at least 2 scores per batch")
        scored = scores[~torch.isnan(scores)]
        std = scored.std() if scored.numel() >= 2 else scores.new_zeros(())
        return (scores - scored.mean()) / (std + eps) if scored.numel() else scores
    if mode == "running":
        if moments is None or moments.count == 0:
            raise ValueError("score_norm='running' needs moments that have seen at least one batch")
        return (scores - moments.mean) / (moments.var**0.5 + eps)
    raise ValueError(f"unknown score normalisation {mode!r}; choose 'none', 'batch' or 'running'")


def dense_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
    score_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards and KL, both [N, R] (module doc, step 2); 0 outside ``mask``.

    ``kl`` is the per-token estimate ``KL_t(logps, ref_logps)`` (k1: ``logps - ref_logps``); the score, clipped to
    ``[-score_clip, score_clip]`` when set, is added on each row's last response token (a NaN score, no reward, adds
    nothing).
    """
    mask = mask.to(logps.dtype)
    kl = kl_penalty(logps, ref_logps, estimator) * mask
    rewards = -kl_coef * kl
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += torch.nan_to_num(scores.to(rewards.dtype), nan=0.0)
    return rewards, kl


def drop_unscored(
    advantages: torch.Tensor, returns: torch.Tensor, values: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, mask [N, 1]) with the completions whose score is NaN (no reward) given advantage 0 and
    their own ``values`` as returns, so they move neither the actor nor the critic; ``mask`` is 1 on the scored rows
    (multiply the response mask by it to whiten over scored tokens only)."""
    scored = (~torch.isnan(scores)).to(advantages.dtype)[:, None]
    return advantages * scored, torch.where(scored.bool(), returns, values), scored


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked tokens (1: perfect critic, <= 0: no better than
    a constant); NaN when the returns do not vary."""
    mask = mask.to(values.dtype)
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)  # noqa: E731
    var_returns = var(returns)
    if float(var_returns) == 0.0:
        return torch.tensor(float("nan"), device=values.device)
    return 1.0 - var(returns - values) / var_returns


def minibatches(n: int, minibatch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A random permutation of ``range(n)`` cut into minibatches of ``minibatch_size`` (the last may be smaller)."""
    if minibatch_size < 1:
        raise ValueError(f"minibatch_size must be >= 1, got {minibatch_size}")
    return list(torch.randperm(n, generator=generator).split(minibatch_size))


@dataclass
class Experience:
    """The PPO buffer of one iteration: a rollout and its no-grad statistics.

    Per-token [N, R] (aligned with ``rollout.response_ids``, 0 outside ``rollout.response_mask``): ``old_logps``,
    ``ref_logps``, ``values``, ``kl``, ``rewards``, ``advantages``, ``returns``. Per completion [N]: ``scores``
    (after penalty, normalisation; before clipping).
    """

    rollout: Rollout
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def select(self, rows: torch.Tensor) -> Experience:
        """The buffer restricted to completions ``rows`` (a minibatch), prompts compacted."""
        picked = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "rollout"}
        return Experience(rollout=self.rollout.select(rows), **picked)


UPDATE_METRIC_NAMES = {
    "policy/clipfrac": "clip_ratio/region", "policy/dual_clipfrac": "clip_ratio/dual", "policy/approxkl": "approx_kl",
    "policy/ratio_mean": "ratio_mean", "value/clipfrac": "value_clip_ratio",
}  # fmt: skip
"""Names of :mod:`lit_rlhf.losses.ppo`'s metrics in the shared schema (README "Metric schema"): ``policy/clipfrac``
(the clipped term above the unclipped one) is the fraction GRPO's losses call ``clip_ratio/region``."""


def iteration_metrics(
    exp: Experience, raw_scores: torch.Tensor, kl: float, kl_coef: float, update: dict[str, float] | None = None
) -> dict[str, float]:
    """The figures of one PPO iteration, logged as ``train/<name>`` (README "Metric schema"):

    ``rewards/{mean,std,min,max,missing_frac}`` of the ``raw_scores`` (before penalty and normalisation; NaN: no
    reward), ``kl`` (mean per-token KL estimate to the reference over the response tokens), ``kl_sequence`` (``kl``
    argument: the mean summed-over-tokens KL over all ranks, what the KL controller sees), ``kl_coef``,
    ``non_score_reward`` (-``kl_coef`` x sequence KL, averaged), ``rlhf_reward`` (mean raw score + non-score reward),
    ``completions/{mean,min,max}_length`` and ``completions/truncated_rate``, the means of ``values``, ``returns``
    and ``advantages``, ``explained_variance``, ``entropy`` and ``rollout/logp_diff/{mean,max}`` (sampler vs
    ``old_logps``) when the sampler recorded them, and the ``update`` metrics renamed by :data:`UPDATE_METRIC_NAMES`."""
    r, mask, lengths = exp.rollout, exp.mask, exp.rollout.completion_lengths.float()
    non_score = float(sequence_logps(-kl_coef * exp.kl, mask).mean())
    rewards = reward_stats(raw_scores)
    metrics = {
        **rewards, "kl": masked_mean(exp.kl, mask), "kl_sequence": kl, "kl_coef": kl_coef,
        "non_score_reward": non_score, "rlhf_reward": rewards["rewards/mean"] + non_score,
        "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(), "completions/truncated_rate": r.truncated.float().mean(),
        "values/mean": masked_mean(exp.values, mask), "returns/mean": masked_mean(exp.returns, mask),
        "advantages/mean": masked_mean(exp.advantages, mask),
        "explained_variance": explained_variance(exp.values, exp.returns, mask),
    }  # fmt: skip
    if r.entropy is not None:
        metrics["entropy"] = masked_mean(r.entropy, mask)
    if r.sample_logps is not None:  # the sampler's logps against the trainer's before the update
        metrics.update(logp_diff_metrics(exp.old_logps, r.sample_logps, mask))
    metrics.update({UPDATE_METRIC_NAMES.get(k, k): v for k, v in (update or {}).items()})
    return {k: float(v) for k, v in metrics.items()}


def validation_metrics(rollout: Rollout, token_kl: torch.Tensor) -> dict[str, torch.Tensor]:
    """``kl`` (mean of the per-token ``token_kl`` [N, R] over the response tokens), ``kl_sequence`` (its sum over
    each completion, averaged), ``completions/mean_length`` and ``completions/truncated_rate`` of a held-out rollout."""
    mask = rollout.response_mask
    return {
        "kl": masked_mean(token_kl, mask), "kl_sequence": sequence_logps(token_kl, mask).mean(),
        "completions/mean_length": rollout.completion_lengths.float().mean(),
        "completions/truncated_rate": rollout.truncated.float().mean(),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ entropy bonus
def critic_inputs(r: Rollout) -> tuple[torch.Tensor, ...]:
    """The arguments of a critic's forward (:mod:`lit_rlhf.critics`) for the rollout's completions."""
    return r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.prompt_index


class LogitsRecorder(nn.Module):
    """Calls ``lm`` unchanged and keeps the logits of each call with their graph, so the entropy bonus comes from the
    very forward that gives the logps (:func:`lit_rlhf.logprobs.response_logps`: a prompt pass, a response pass)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm, self.logits = lm, []

    def forward(self, **inputs):
        out = self.lm(**inputs)
        self.logits.append(out.logits)
        return out

    def entropy(self, r: Rollout, temperature: float) -> torch.Tensor:
        """Per-token entropy [N, R] (with grad) of the tempered distributions that scored ``r``'s tokens."""
        scored = r.response_mask.bool()
        head = entropy_from_logits(self.logits[0][r.prompt_index, -1] / temperature) * scored[:, 0]
        tail = torch.zeros(scored[:, 1:].shape, device=head.device)
        if len(self.logits) > 1:
            rest = self.logits[1]
            rest = rest[F.pad(scored[:, 1:], (0, 1))] if rest.dim() == 3 else rest
            tail = tail.masked_scatter(scored[:, 1:], entropy_from_logits(rest / temperature))
        return torch.cat([head[:, None], tail], dim=1)
