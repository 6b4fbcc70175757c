"""Advantage estimators, pure functions.

Outcome rewards ``[N]`` of groups are laid out with the ``group_size`` completions of one prompt consecutive;
per-token tensors are ``[N, R]`` aligned with the responses (``mask`` 1 on response tokens, right-padded).

- ``group_advantages``:     (r_i - mean_group) / (std + eps)   GRPO group-relative advantage (DeepSeekMath, Shao
                            et al. 2024, §4.1.2); ``scale="none"`` is Dr. GRPO (Liu et al. 2025),
                            ``scale="batch"`` divides by the std of the whole batch
- ``zero_variance_groups``: groups whose rewards are all equal (zero advantage, no learning signal)
- ``rloo_advantages``:      r_i - mean_{j != i} r_j            REINFORCE leave-one-out (Ahmadian et al. 2024, Eq. 4)
- these three take ``valid`` [N] (default: the rewards that are not NaN): a completion without a reward is left out
  of its group's statistics and gets advantage 0; ``check_grpo_settings`` refuses settings that cannot learn
- ``gae``:                  delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}
                            (Schulman et al. 2016, Eq. 16)
- ``whiten``:               masked (x - mean) / std (:func:`lit_rlhf.logprobs.masked_whiten`)
- ``reinforce_pp_advantages``: discounted returns of token-level rewards (score on the last token minus beta KL_t
                            on every token), whitened over the whole batch's tokens (REINFORCE++, Hu 2025,
                            arXiv:2501.03262)
- ``reinforce_pp_baseline_advantages``: r_i - group mean, broadcast over the tokens, whitened over the batch
                            (REINFORCE++-baseline, same paper)
- ``gdpo_advantages``:      each reward function normalised within its group, weighted sum, whitened over the batch
                            (GDPO, Liu et al. 2026, arXiv:2601.05242)
- ``process_supervision_advantages``: step rewards normalised over all steps of the group, token t's advantage the
                            sum of the normalised rewards of the steps ending at or after t (DeepSeekMath §4.1.3)
- ``rft_coefficients``:     gradient coefficient 1 for a correct completion, 0 for a wrong one (RFT / Online RFT,
                            the gradient coefficient GC of DeepSeekMath §5.2.1)
- ``distillation_advantages``: minus the per-token reverse KL to a teacher, log pi_student - log pi_teacher of each
                            sampled token (on-policy distillation, Agarwal et al. 2024), optionally summed to the future
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_rlhf.logprobs import masked_whiten as whiten

GroupScale = Literal["group", "batch", "none"]

__all__ = [
    "GroupScale",
    "check_grpo_settings",
    "distillation_advantages",
    "gae",
    "gdpo_advantages",
    "group_advantages",
    "process_supervision_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rft_coefficients",
    "rloo_advantages",
    "whiten",
    "zero_variance_groups",
]


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] -> [N // group_size, group_size], with a clear error when N is not a multiple of group_size."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of group_size={group_size}")
    return rewards.view(-1, group_size)


def _valid_mask(rewards: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Bool mask [N] of the rewards to use: ``valid`` when given, else where ``rewards`` is not NaN (no reward)."""
    if valid is None:
        return ~torch.isnan(rewards)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid must have the shape of rewards {tuple(rewards.shape)}, got {tuple(valid.shape)}")
    return valid.bool()


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: GroupScale = "group",
    eps: float = 1e-4,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages [N]: reward minus its group mean, scaled by ``scale`` (std unbiased).

    ``valid`` [N] (default: the rewards that are not NaN) marks the completions that got a reward: the mean and std
    of a group are over its valid rewards only, an invalid completion gets advantage 0, and a group with one valid
    reward gives it 0 (no other completion to compare with); ``batch`` takes the std of all valid rewards.
    """
    groups, ok = _groups(rewards, group_size), _groups(_valid_mask(rewards, valid), group_size)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown scale {scale!r}; choose one of 'group', 'batch', 'none'")
    if scale == "group" and group_size < 2:
        raise ValueError("scale='group' needs group_size >= 2 for a group std")
    if scale == "batch" and rewards.numel() < 2:
        raise ValueError("scale='batch' needs at least 2 rewards for a batch std")
    values = torch.where(ok, groups, 0.0)
    count = ok.sum(-1, keepdim=True)
    mean = values.sum(-1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(ok, groups - mean, 0.0)
    if scale == "none":
        return centred.view(-1)
    if scale == "group":
        std = (centred.pow(2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    else:
        flat = rewards[ok.view(-1)]
        std = flat.std() if flat.numel() >= 2 else rewards.new_zeros(())
    return (centred / (std + eps)).view(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [N // group_size]: True where every valid reward of the group is equal (also with fewer than 2 valid
    rewards: no learning signal). ``valid`` as in :func:`group_advantages`."""
    groups, ok = _groups(rewards, group_size), _groups(_valid_mask(rewards, valid), group_size)
    inf = torch.finfo(groups.dtype).max
    return torch.where(ok, groups, inf).amin(-1) >= torch.where(ok, groups, -inf).amax(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out advantages [N]: r_i minus the mean of the other valid rewards of its group (``valid`` as in
    :func:`group_advantages`; with all valid, the other group_size - 1). 0 for an invalid completion and for one
    with no other valid reward in its group."""
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2, got {group_size}")
    groups, ok = _groups(rewards, group_size), _groups(_valid_mask(rewards, valid), group_size)
    values = torch.where(ok, groups, 0.0)
    others = ok.sum(-1, keepdim=True) - 1
    others_mean = (values.sum(-1, keepdim=True) - values) / others.clamp(min=1)
    return torch.where(ok & (others > 0), groups - others_mean, 0.0).view(-1)


def check_grpo_settings(
    num_generations: int, advantage_estimator: str, scale_rewards: str, num_iterations: int, beta: float
) -> None:
    """Refuse GRPO settings under which nothing is learned (a ValueError naming the option, its value and why):

    - ``num_generations < 2``: every estimator is relative to the group (``group``: r minus the group mean, 0 for a
      group of one whatever ``scale_rewards``; ``rloo``: minus the mean of the others, of which there are none), so
      every advantage is 0 and the loss has no policy gradient;
    - ``num_iterations < 1``: no optimisation pass, so no optimizer step and no training step is ever counted;
    - ``beta < 0``: the KL term rewards moving away from the reference, without bound.
    """
    if num_generations < 2:
        why = {
            "rloo": "advantage_estimator=rloo subtracts the mean reward of the prompt's other completions, and there "
            "are none",
            "group": "advantage_estimator=group subtracts the group's mean reward, which in a group of one is the "
            f"reward itself, whatever scale_rewards (here {scale_rewards}"
            + ("; it would also divide by the undefined std of one reward" if scale_rewards == "group" else "")
            + ")",
        }.get(advantage_estimator, f"advantage_estimator={advantage_estimator} needs group statistics")
        raise ValueError(
            f"model.num_generations={num_generations} cannot learn: GRPO's advantages compare the completions of one "
            f"prompt; {why}, so every advantage is 0 and the loss has no policy gradient. "
            "Set model.num_generations to 2 or more (8 is usual)."
        )
    if num_iterations < 1:
        raise ValueError(
            f"model.num_iterations={num_iterations} cannot learn: it is the number of optimisation passes over each "
            "sampled batch, so no optimizer step (and no training step) would ever be taken. Set it to 1 or more."
        )
    if beta < 0:
        raise ValueError(
            f"model.beta={beta} cannot learn: a negative KL coefficient rewards moving away from the reference "
            "without bound. Set model.beta >= 0 (0: no KL term, no reference model)."
        )


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


def _reverse_cumsum(x: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """out[:, t] = sum_{k >= t} gamma^(k - t) x[:, k] along the last dimension."""
    if gamma == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)
    out, running = torch.empty_like(x), torch.zeros_like(x[..., 0])
    for t in reversed(range(x.shape[-1])):
        running = x[..., t] + gamma * running
        out[..., t] = running
    return out


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: ``(advantages, returns)`` [N, R] from token-level ``rewards`` [N, R].

    ``rewards`` carry the score on each row's last response token and -beta KL_t on every token
    (:func:`lit_rlhf.experience.dense_rewards`); returns G_t = sum_{k >= t} gamma^(k-t) r_k, advantages the returns
    whitened over every valid token of the batch (no critic, no group). Confirmed against verl
    ``compute_reinforce_plus_plus_outcome_advantage`` (the same returns and token-level ``masked_whiten``).
    """
    mask = mask.to(rewards.dtype)
    returns = _reverse_cumsum(rewards * mask, gamma) * mask
    return whiten(returns, mask), returns


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-8
) -> torch.Tensor:
    """REINFORCE++-baseline: per-token advantages [N, R] from sequence rewards [N].

    r_i minus its group's mean, on every response token of row i, then whitened over every valid token of the batch
    (so longer completions weigh more in the batch statistics, as in verl
    ``compute_reinforce_plus_plus_baseline_outcome_advantage``). The paper puts the KL in the loss (k2); pass
    :func:`lit_rlhf.losses.kl_in_reward` scores for KL in the reward instead. verl leaves a singleton group
    uncentred; we require ``group_size >= 2``.
    """
    if group_size < 2:
        raise ValueError(f"reinforce_pp_baseline_advantages needs group_size >= 2 for a group mean, got {group_size}")
    groups = _groups(rewards, group_size)
    centred = (groups - groups.mean(-1, keepdim=True)).reshape(-1, 1)
    mask = mask.to(rewards.dtype)
    return whiten(centred * mask, mask, eps=eps)


def gdpo_advantages(
    rewards: torch.Tensor, group_size: int, weights: list[float] | None = None, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO: ``(advantages [N], normalised [N, K])`` from K reward functions' values ``rewards`` [N, K].

    Each function is normalised within its group, (r_k - mean_k) / (std_k + eps) (unbiased std), so a function with
    a small spread is not drowned by one with a large spread; the weighted sum is then whitened over the batch,
    (x - mean) / (std + eps). NaN marks a function that did not score a completion: it is left out of that
    function's statistics and counts 0 in the sum; a completion no function scored gets advantage 0 and is left out
    of the batch statistics. Confirmed against TRL ``multi_objective_aggregation="normalize_then_sum"`` (the same,
    including NaN handling and eps = 1e-4); the verl snapshot read has no GDPO.
    """
    if rewards.dim() != 2:
        raise ValueError(f"gdpo_advantages needs rewards [N, K], one column per function, got {tuple(rewards.shape)}")
    n, k = rewards.shape
    if group_size < 2 or n % group_size != 0:
        raise ValueError(f"{n} rewards cannot be split into groups of group_size={group_size} (>= 2)")
    w = rewards.new_ones(k) if weights is None else torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if w.shape != (k,):
        raise ValueError(f"need one weight per reward function ({k}), got {len(w)}")
    groups = rewards.view(-1, group_size, k)
    valid = ~torch.isnan(groups)
    count = valid.sum(1, keepdim=True)
    mean = torch.where(valid, groups, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    sq = torch.where(valid, (groups - mean) ** 2, 0.0).sum(1, keepdim=True)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    normalised = torch.where(valid & (count > 1), (groups - mean) / (std + eps), 0.0).view(n, k)
    normalised = torch.where(torch.isnan(rewards), torch.nan, normalised)
    total = (torch.nan_to_num(normalised) * w).sum(-1)
    scored = ~torch.isnan(rewards).all(-1)
    if scored.sum() < 2:
        raise ValueError("gdpo_advantages needs at least 2 scored completions for the batch statistics")
    batch = total[scored]
    advantages = torch.where(scored, (total - batch.mean()) / (batch.std() + eps), 0.0)
    return advantages, normalised


def process_supervision_advantages(
    step_rewards: torch.Tensor, step_ends: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-4
) -> torch.Tensor:
    """Process supervision (DeepSeekMath §4.1.3): per-token advantages [N, R] from step rewards.

    ``step_ends`` [N, R] (bool) marks the last token of each step and ``step_rewards`` [N, R] holds that step's
    reward there (anything elsewhere). All steps of the group's completions are normalised together,
    r~ = (r - mean(R)) / (std(R) + eps) (unbiased std, eps as :func:`group_advantages`), and
    A_t = sum of r~ over the row's steps ending at or after t; 0 outside ``mask`` and after the last step. One step
    per completion, ending on its last token, gives :func:`group_advantages` on every token (outcome supervision).
    """
    ends, mask = step_ends.bool(), mask.bool()
    if (ends & ~mask).any():
        raise ValueError("step_ends marks a token outside mask: every step must end on a response token")
    n, r = step_rewards.shape
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{n} completions cannot be split into groups of group_size={group_size}")
    values = torch.where(ends, step_rewards, 0.0).view(-1, group_size * r)
    flat_ends = ends.view(-1, group_size * r)
    count = flat_ends.sum(-1, keepdim=True)
    if (count < 2).any():
        raise ValueError("every group needs at least 2 steps in total for a step-reward std")
    mean = values.sum(-1, keepdim=True) / count
    std = (torch.where(flat_ends, (values - mean) ** 2, 0.0).sum(-1, keepdim=True) / (count - 1)).sqrt()
    normalised = torch.where(flat_ends, (values - mean) / (std + eps), 0.0).view(n, r)
    return _reverse_cumsum(normalised) * mask.to(normalised.dtype)


def rft_coefficients(correct: torch.Tensor) -> torch.Tensor:
    """RFT / Online RFT gradient coefficients [N]: 1.0 for a correct completion, 0.0 for a wrong one.

    With these as the (per-sequence) advantages the policy-gradient loss is the SFT loss on the correct samples
    (DeepSeekMath §5.2.1: RFT samples from the SFT model, Online RFT from the current policy; same coefficient).
    ``correct`` is bool, or 0/1 values.
    """
    if correct.dtype != torch.bool and not ((correct == 0) | (correct == 1)).all():
        raise ValueError("rft_coefficients takes correctness as bool or 0/1 values, not graded rewards")
    return correct.to(torch.float32)


def distillation_advantages(
    student_logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    mask: torch.Tensor,
    coef: float = 1.0,
    discount: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy distillation: ``(advantages, reverse_kl)`` [N, R] of completions the student sampled.

    The student's per-token reverse KL to the teacher on its own samples, estimated by the sampled token's log-ratio
    k_t = log pi_s(o_t | o_<t) - log pi_t(o_t | o_<t) (unbiased for KL(pi_s || pi_t) at position t), is a negative
    per-token reward r_t = -coef k_t. GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
    from Self-Generated Mistakes", Eq. 4 with lambda = 1 and D = reverse KL) minimises that divergence on student
    samples; a task reward mixes in as its Eq. 5 (§3.2). ``discount`` = 0 (default) keeps each token's own term,
    A_t = r_t: the Thinking Machines recipe (tinker-cookbook ``train_on_policy.py``, ``kl_discount_factor = 0``), which
    ignores o_t's effect on the later tokens' KL and has lower variance; ``discount`` = gamma > 0 gives the
    reward-to-go A_t = sum_{k >= t} gamma^(k - t) r_k (gamma = 1: the policy gradient of the sequence's reverse KL).
    No baseline, no whitening (the teacher's log-ratio is the signal). TRL's ``GKDTrainer`` instead differentiates the
    full-vocabulary generalised JSD (beta = 1: reverse KL) through the student's logits on stop-gradient samples, as
    GKD's Eq. 4 does (the teacher's whole distribution at every token); this needs only the sampled tokens' teacher
    logps. 0 outside ``mask``.
    """
    if student_logps.shape != teacher_logps.shape or student_logps.shape != mask.shape:
        shapes = [tuple(x.shape) for x in (student_logps, teacher_logps, mask)]
        raise ValueError(f"student_logps, teacher_logps and mask must have one shape [N, R], got {shapes}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount={discount}: a discount factor in [0, 1]")
    mask = mask.to(student_logps.dtype)
    reverse_kl = (student_logps - teacher_logps) * mask
    rewards = -coef * reverse_kl
    advantages = rewards if discount == 0.0 else _reverse_cumsum(rewards, discount) * mask
    return advantages, reverse_kl
