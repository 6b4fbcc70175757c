"""PPO experience: the pure functions between a rollout and the update epochs (seed 000 §5.1.2 / §5.2, seed 002 §3).

After sampling N completions, the stage collects, without gradients: ``old_logps`` (the sampling policy),
``ref_logps`` (the reference), ``values`` (the critic) and one ``scores`` [N] per completion (reward model and/or
reward functions). This module turns them into the PPO buffer:

1. ``scores``: :func:`apply_missing_eos_penalty` (completions that hit the token budget lose ``penalty``), then
   :func:`normalize_scores` (``none`` / ``batch`` whitening / ``running`` mean-std over the run).
2. :func:`dense_rewards`: the per-token reward of seed 000 ``get_reward_kl`` / InstructGPT Eq. 2::

       rewards[n, t] = -beta * KL_t(logps, ref_logps)                    every response token t
                     + clip(scores[n], -c, c)                            added at the LAST response token only

3. :func:`lit_rlhf.advantages.gae` gives ``(advantages, returns)``; advantages are whitened over the batch
   (:func:`lit_rlhf.logprobs.masked_whiten`).
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

from lit_rlhf.logprobs import masked_mean
from lit_rlhf.losses.kl import KLEstimator, kl_penalty
from lit_rlhf.types import Rollout

ScoreNorm = Literal["none", "batch", "running"]


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [N] of each row's last masked token; every row needs at least one (right-padded masks)."""
    lengths = mask.long().sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError(f"rows {torch.nonzero(lengths == 0).flatten().tolist()} have no response token to score")
    return lengths - 1


def apply_missing_eos_penalty(scores: torch.Tensor, truncated: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """``scores - penalty`` where the completion produced no EOS within the budget (``truncated``); unchanged for None."""
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
    """The moments after also seeing ``x`` (Chan et al. pairwise merge; population variance)."""
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
    """``none``: as is; ``batch``: (s - mean) / std over this batch; ``running``: over ``moments`` (update them first)."""
    if mode == "none":
        return scores
    if mode == "batch":
        if scores.numel() < 2:
            raise ValueError("score_norm='batch' needs at least 2 scores per batch")
        return (scores - scores.mean()) / (scores.std() + eps)
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
    ``[-score_clip, score_clip]`` when set, is added on each row's last response token.
    """
    mask = mask.to(logps.dtype)
    kl = kl_penalty(logps, ref_logps, estimator) * mask
    rewards = -kl_coef * kl
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def sequence_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum over the response tokens: [N, R] -> [N] (e.g. the sequence KL)."""
    return (x * mask.to(x.dtype)).sum(-1)


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

    def select(self, rows: torch.Tensor) -> "Experience":
        """The buffer restricted to completions ``rows`` (a minibatch), prompts compacted."""
        picked = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "rollout"}
        return Experience(rollout=self.rollout.select(rows), **picked)


# ------------------------------------------------------------------------------------------------ entropy bonus
class LogitsRecorder(nn.Module):
    """Calls ``lm`` unchanged and keeps the logits of each call with their graph, so the entropy bonus comes from the
    very forward that gives the logps (:func:`lit_rlhf.logprobs.response_logps`: a prompt pass, then a response pass)."""

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
        head = token_entropy(self.logits[0][r.prompt_index, -1] / temperature) * scored[:, 0]
        tail = torch.zeros(scored[:, 1:].shape, device=head.device)
        if len(self.logits) > 1:
            rest = self.logits[1]
            rest = rest[F.pad(scored[:, 1:], (0, 1))] if rest.dim() == 3 else rest
            tail = tail.masked_scatter(scored[:, 1:], token_entropy(rest / temperature))
        return torch.cat([head[:, None], tail], dim=1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, float32, differentiable: [M, V] -> [M]."""
    logps = F.log_softmax(logits.float(), dim=-1)
    return -(logps.exp() * logps).sum(-1)
