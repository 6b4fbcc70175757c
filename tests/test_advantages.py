"""Advantage estimators against hand-derived closed forms and the written-out formulas of GRPO's group advantage
(DeepSeekMath, Shao et al. 2024, §4.1.2) and GAE (Schulman et al. 2016, Eq. 16)."""

import math

import pytest
import torch

from lit_rlhf.advantages import (
    check_grpo_settings,
    gae,
    gdpo_advantages,
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    whiten,
    zero_variance_groups,
)
from lit_rlhf.logprobs import masked_whiten

# Two groups of 3: (1, 2, 3) has mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1; (5, 5, 5) is all equal.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=torch.float64)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_group_advantages_group_scale():
    """(r - mean) / (std + eps) = (-1, 0, 1) / (1 + eps) in group 0; the all-equal group gives 0 / eps = 0."""
    eps = 1e-4
    expected = _t([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / torch.tensor([1 + eps] * 3 + [1.0] * 3, dtype=torch.float64)
    torch.testing.assert_close(group_advantages(REWARDS, 3, eps=eps), expected)
    assert zero_variance_groups(REWARDS, 3).tolist() == [False, True]


def test_group_advantages_batch_and_none_scale():
    """'none' (Dr. GRPO): r - group mean = (-1, 0, 1, 0, 0, 0). 'batch': divide by the std of all six rewards:
    mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 3 * 2.25 = 15.5, unbiased var 15.5 / 5 = 3.1."""
    centred = _t([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 3, scale="none"), centred)
    torch.testing.assert_close(group_advantages(REWARDS, 3, scale="batch", eps=0.0), centred / math.sqrt(3.1))


def test_group_advantages_matches_deepseekmath_single_group():
    """DeepSeekMath §4.1.2 written out: (r - mean) / (std + epsilon) over one group (epsilon fixed here)."""
    rewards = [2.0, 0.0, 0.5, 3.0]
    r = torch.tensor(rewards)
    written_out = (r - r.mean()) / (r.std() + 1e-3)
    torch.testing.assert_close(group_advantages(r, 4, eps=1e-3), written_out)


def test_group_shapes_are_validated():
    with pytest.raises(ValueError, match="groups of group_size=4"):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError, match="groups of group_size=4"):
        zero_variance_groups(REWARDS, 4)
    with pytest.raises(ValueError, match="unknown scale"):
        group_advantages(REWARDS, 3, scale="max")


def test_rloo_advantages():
    """r_i - mean of the other two: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; all-equal group -> 0.
    (Equivalently G/(G-1) (r - mean) = 1.5 * (-1, 0, 1).)"""
    torch.testing.assert_close(rloo_advantages(REWARDS, 3), _t([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(REWARDS, 1)


# A group of 4 with one completion that got no reward (NaN), an all-equal group with one missing, a group with one
# reward only, and a group with none: (1, 3, NaN, 5) | (2, 2, NaN, 2) | (NaN, 4, NaN, NaN) | (NaN, NaN, NaN, NaN).
NAN = math.nan
GAPPY = _t([1.0, 3.0, NAN, 5.0, 2.0, 2.0, NAN, 2.0, NAN, 4.0, NAN, NAN, NAN, NAN, NAN, NAN])


def test_group_advantages_leave_missing_rewards_out():
    """Group 0 over its 3 rewards (1, 3, 5): mean 3, unbiased std sqrt((4 + 0 + 4) / 2) = 2, so advantages
    (-2, 0, 2) / (2 + eps), the missing completion 0 (as if the group were (1, 3, 5)). Group 1: (2, 2, 2), all 0.
    Group 2: one reward, nothing to compare with: 0. Group 3: none: 0. No NaN anywhere."""
    eps = 1e-4
    expected = _t([-2.0, 0.0, 0.0, 2.0] + [0.0] * 12)
    expected[:4] /= 2 + eps
    torch.testing.assert_close(group_advantages(GAPPY, 4, eps=eps), expected)
    without_missing = group_advantages(_t([1.0, 3.0, 5.0]), 3, eps=eps)
    torch.testing.assert_close(group_advantages(GAPPY, 4, eps=eps)[[0, 1, 3]], without_missing)
    # the same through an explicit validity mask (the missing entries' values are ignored)
    valid = ~torch.isnan(GAPPY)
    torch.testing.assert_close(group_advantages(torch.nan_to_num(GAPPY, nan=99.0), 4, eps=eps, valid=valid), expected)
    assert zero_variance_groups(GAPPY, 4).tolist() == [False, True, True, True]


def test_group_advantages_none_and_batch_scale_with_missing_rewards():
    """'none': r - group mean over the valid rewards: (-2, 0, 0, 2) in group 0, 0 elsewhere. 'batch': divided by the
    unbiased std of the 7 valid rewards (1, 3, 5, 2, 2, 2, 4): sum 19, sum of squares 63, so sum of squared deviations
    63 - 19^2/7 = 80/7 and variance 80/42 = 40/21."""
    centred = _t([-2.0, 0.0, 0.0, 2.0] + [0.0] * 12)
    torch.testing.assert_close(group_advantages(GAPPY, 4, scale="none"), centred)
    torch.testing.assert_close(group_advantages(GAPPY, 4, scale="batch", eps=0.0), centred / math.sqrt(40 / 21))


def test_rloo_advantages_leave_missing_rewards_out():
    """Group 0: r_i minus the mean of the other VALID rewards: 1 - (3 + 5)/2 = -3, 3 - (1 + 5)/2 = 0, 5 - (1 + 3)/2 = 3,
    missing 0. Group 1: all equal, 0. Group 2: no other valid reward, 0. Group 3: 0."""
    expected = _t([-3.0, 0.0, 0.0, 3.0] + [0.0] * 12)
    torch.testing.assert_close(rloo_advantages(GAPPY, 4), expected)
    with pytest.raises(ValueError, match="valid must have the shape"):
        rloo_advantages(GAPPY, 4, valid=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_generations": 1, "advantage_estimator": "group", "scale_rewards": "none"},
         r"model\.num_generations=1 cannot learn: .*advantage_estimator=group subtracts the group's mean reward.*"
         r"whatever scale_rewards \(here none\).*every advantage is 0.*Set model\.num_generations to 2 or more"),
        ({"num_generations": 1, "advantage_estimator": "group", "scale_rewards": "group"},
         r"model\.num_generations=1 cannot learn: .*here group; it would also divide by the undefined std of one "
         r"reward\)"),
        ({"num_generations": 1, "advantage_estimator": "group", "scale_rewards": "batch"},
         r"model\.num_generations=1 cannot learn: .*\(here batch\)"),
        ({"num_generations": 1, "advantage_estimator": "rloo"},
         r"model\.num_generations=1 cannot learn: .*rloo subtracts the mean reward of the prompt's other completions"),
        ({"num_generations": 0}, r"model\.num_generations=0 cannot learn"),
        ({"num_iterations": 0}, r"model\.num_iterations=0 cannot learn: .*no optimizer step"),
        ({"beta": -0.1}, r"model\.beta=-0\.1 cannot learn: a negative KL coefficient"),
    ],
)  # fmt: skip
def test_grpo_settings_that_cannot_learn_are_refused(kwargs, message):
    settings = {"num_generations": 4, "advantage_estimator": "group", "scale_rewards": "group", "num_iterations": 1,
                "beta": 0.0, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        check_grpo_settings(**settings)


def test_grpo_settings_that_can_learn_pass():
    """At the boundary: 2 generations are accepted for every estimator and scaling, 1 is refused."""
    for estimator in ("group", "rloo"):
        for scale in ("group", "batch", "none"):
            assert check_grpo_settings(2, estimator, scale, num_iterations=1, beta=0.0) is None
            with pytest.raises(ValueError, match="model.num_generations=1"):
                check_grpo_settings(1, estimator, scale, num_iterations=1, beta=0.0)
    assert check_grpo_settings(8, "group", "none", num_iterations=4, beta=0.04) is None


# GAE: one fully masked row, rewards (0, 0, 1) (reward on the last token), values (0.5, 0.2, 0.4); V after the end = 0.
R, V, M = _t([[0.0, 0.0, 1.0]]), _t([[0.5, 0.2, 0.4]]), _t([[1.0, 1.0, 1.0]])


def test_gae_lambda_one_is_monte_carlo():
    """lam = 1, gamma = 1: A_t = sum_{k>=t} r_k - V_t = (1 - 0.5, 1 - 0.2, 1 - 0.4) = (0.5, 0.8, 0.6); returns = 1.
    gamma = 0.5: A_t = sum_k gamma^k r_{t+k} - V_t = (0.25 - 0.5, 0.5 - 0.2, 1 - 0.4) = (-0.25, 0.3, 0.6)."""
    adv, ret = gae(R, V, M, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, _t([[0.5, 0.8, 0.6]]))
    torch.testing.assert_close(ret, _t([[1.0, 1.0, 1.0]]))
    adv, _ = gae(R, V, M, gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, _t([[-0.25, 0.3, 0.6]]))


def test_gae_lambda_zero_is_td_error():
    """lam = 0: A_t = delta_t = r_t + V_{t+1} - V_t = (0 + 0.2 - 0.5, 0 + 0.4 - 0.2, 1 + 0 - 0.4) = (-0.3, 0.2, 0.6);
    returns = delta + V = (0.2, 0.4, 1.0) (one-step TD targets)."""
    adv, ret = gae(R, V, M, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, _t([[-0.3, 0.2, 0.6]]))
    torch.testing.assert_close(ret, _t([[0.2, 0.4, 1.0]]))


def test_gae_respects_prompt_and_padding():
    """Mask (0, 1, 1, 0): prompt token first, padding last, both holding junk 9s. Only the response (values 0.2,
    0.4; rewards 0, 1) counts and the state after it has value 0, so with lam = 1: A = (0, 0.8, 0.6, 0) and
    returns (0, 1, 1, 0)."""
    adv, ret = gae(_t([[9.0, 0.0, 1.0, 9.0]]), _t([[9.0, 0.2, 0.4, 9.0]]), _t([[0, 1, 1, 0]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, _t([[0.0, 0.8, 0.6, 0.0]]))
    torch.testing.assert_close(ret, _t([[0.0, 1.0, 1.0, 0.0]]))


def get_delta(value_old, reward_kl):
    """GAE written out as a standalone backward recursion over a batch whose response tokens start at position 255
    (0.95 = gamma * lam with gamma = 1; V after the last token is 0)."""
    delta = []
    for i in reversed(range(255, value_old.shape[1])):
        value_next = 0.0
        if i != value_old.shape[1] - 1:
            value_next = value_old[:, i + 1]
        d = reward_kl[:, i] + value_next - value_old[:, i]
        if len(delta):
            d += 0.95 * delta[-1]
        delta.append(d)
    delta = torch.stack(delta[::-1], dim=1)
    return delta


def test_gae_matches_written_out_recursion():
    """On a 255-token prompt + 6-token response (every response position masked), gae(gamma=1, lam=0.95) equals the
    written-out recursion on the response and is 0 on the prompt."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 261, generator=g, dtype=torch.float64)
    rewards = 0.1 * torch.randn(3, 261, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 261, dtype=torch.float64)
    mask[:, 255:] = 1
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv[:, 255:], get_delta(values, rewards))
    torch.testing.assert_close(ret[:, 255:], get_delta(values, rewards) + values[:, 255:])
    assert (adv[:, :255] == 0).all() and (ret[:, :255] == 0).all()


def test_whiten_is_masked_whiten():
    """(1, 2, 3) has mean 2 and unbiased std 1 -> (-1, 0, 1); a masked entry stays 0."""
    assert whiten is masked_whiten
    out = whiten(_t([1.0, 2.0, 3.0, 100.0]), _t([1, 1, 1, 0]), eps=0.0)
    torch.testing.assert_close(out, _t([-1.0, 0.0, 1.0, 0.0]))


# ---------------------------------------------------------------- REINFORCE++ (Hu 2025) and GDPO (Liu et al. 2026)


def test_reinforce_pp_returns_and_batch_whitening():
    """Token rewards (0, 0, 1 | -0.1, 0.5, pad junk 7): the score on the last token, -beta KL elsewhere.
    gamma = 1: returns (1, 1, 1 | 0.4, 0.5, 0); gamma = 0.5: (0.25, 0.5, 1 | -0.1 + 0.25 = 0.15, 0.5, 0).
    Advantages whiten the gamma = 1 returns over the 5 valid tokens: mean 3.9 / 5 = 0.78, squared deviations
    3 * 0.0484 + 0.1444 + 0.0784 = 0.368, unbiased var 0.092: A = (x - 0.78) / sqrt(0.092 + 1e-8)."""
    rewards, mask = _t([[0.0, 0.0, 1.0], [-0.1, 0.5, 7.0]]), _t([[1, 1, 1], [1, 1, 0]])
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    torch.testing.assert_close(ret, _t([[1.0, 1.0, 1.0], [0.4, 0.5, 0.0]]))
    torch.testing.assert_close(adv, _t([[0.22, 0.22, 0.22], [-0.38, -0.28, 0.0]]) / math.sqrt(0.092 + 1e-8))
    _, ret = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, _t([[0.25, 0.5, 1.0], [0.15, 0.5, 0.0]]))


def test_reinforce_pp_matches_verl():
    """verl compute_reinforce_plus_plus_outcome_advantage: running = r_t + gamma running from the end, reset by the
    mask; masked whitening (unbiased var, eps 1e-8) of the returns, times the mask."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([6, 3, 5, 1])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).double()
    rewards = 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64) * mask
    for gamma in (1.0, 0.9):
        returns, running = torch.zeros_like(rewards), torch.zeros(4, dtype=torch.float64)
        for t in reversed(range(6)):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
            running = running * mask[:, t]
        mean = (returns * mask).sum() / mask.sum()
        var = (((returns - mean) ** 2) * mask).sum() / (mask.sum() - 1)
        verl = (returns - mean) * torch.rsqrt(var + 1e-8) * mask
        adv, ret = reinforce_pp_advantages(rewards, mask, gamma=gamma)
        torch.testing.assert_close((adv, ret), (verl, returns))


def test_reinforce_pp_baseline():
    """Rewards (1, 0 | 3, 3) in groups of 2: centred (0.5, -0.5 | 0, 0), put on every response token (lengths 2, 1,
    2, 2), then whitened over the 7 tokens: x = (0.5, 0.5, -0.5, 0, 0, 0, 0), mean 0.5 / 7, unbiased var
    sum (x - mean)^2 / 6. Matches verl's baseline estimator (group mean, tile, masked_whiten) on random data."""
    mask = _t([[1, 1], [1, 0], [1, 1], [1, 1]])
    adv = reinforce_pp_baseline_advantages(_t([1.0, 0.0, 3.0, 3.0]), mask, group_size=2)
    x = [0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    mean = sum(x) / 7
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / 6 + 1e-8)
    expected = [[(0.5 - mean) / std] * 2, [(-0.5 - mean) / std, 0.0], [-mean / std] * 2, [-mean / std] * 2]
    torch.testing.assert_close(adv, _t(expected))
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]).double()
    centred = scores - scores.view(-1, 3).mean(-1).repeat_interleave(3)
    tiled = centred[:, None] * mask
    m = (tiled * mask).sum() / mask.sum()
    var = (((tiled - m) ** 2) * mask).sum() / (mask.sum() - 1)
    verl = (tiled - m) * torch.rsqrt(var + 1e-8) * mask
    torch.testing.assert_close(reinforce_pp_baseline_advantages(scores, mask, group_size=3), verl)
    with pytest.raises(ValueError, match="group_size >= 2"):
        reinforce_pp_baseline_advantages(scores, mask, group_size=1)


def test_gdpo_separates_what_summing_first_merges():
    """Two reward functions, groups of 2: group 0 rewards (0, 0), (1, 0); group 1 (0, 0), (1, 1). Sum-then-normalise
    (GRPO) sees totals (0, 1) and (0, 2) and gives both groups the same advantages +-1/sqrt2 (eps = 0). GDPO
    normalises each function in its group: f1 -> (-a, a) in both groups, a = 0.5 / (sqrt 0.5 + 1e-4); f2 -> (0, 0)
    in group 0 (zero std) and (-a, a) in group 1. Totals (-a, a, -2a, 2a): batch mean 0, unbiased std a sqrt(10/3), so
    A = totals / (a sqrt(10/3) + 1e-4): the group with both rewards gets twice the advantage."""
    rewards = _t([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    grpo = group_advantages(rewards.sum(-1), 2, eps=0.0)
    torch.testing.assert_close(grpo[:2], grpo[2:])
    adv, normalised = gdpo_advantages(rewards, group_size=2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(normalised, _t([[-a, 0.0], [a, 0.0], [-a, -a], [a, a]]))
    torch.testing.assert_close(adv, _t([-a, a, -2 * a, 2 * a]) / (a * math.sqrt(10 / 3) + 1e-4))


def _nanstd(x, dim=None, keepdim=False):
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.nan)
    out = var.sqrt()
    return out if keepdim or dim is None else out.squeeze(dim)


def test_gdpo_matches_trl_normalize_then_sum():
    """TRL multi_objective_aggregation="normalize_then_sum": per-function nanmean/nanstd (unbiased) in the group,
    (r - mean) / (std + 1e-4), weighted nansum, unscorable rows NaN, then (x - nanmean) / (nanstd + 1e-4) over the
    batch, NaN -> 0. Random rewards of 3 functions with weights (1, 0.5, 2), some None (NaN), one unscorable row."""
    g = torch.Generator().manual_seed(5)
    rewards = torch.rand(9, 3, generator=g, dtype=torch.float64)
    rewards[1, 2] = rewards[4, 0] = rewards[5, 0] = torch.nan  # group 1 keeps one f0 value: its std is undefined
    rewards[7] = torch.nan
    weights = [1.0, 0.5, 2.0]
    grouped = rewards.view(-1, 3, 3)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (_nanstd(grouped, dim=1, keepdim=True) + 1e-4)).view(-1, 3)
    total = (reward_k * torch.tensor(weights, dtype=torch.float64)).nansum(dim=1)
    total[torch.isnan(rewards).all(dim=1)] = torch.nan
    trl = torch.nan_to_num((total - torch.nanmean(total)) / (_nanstd(total) + 1e-4), nan=0.0)
    adv, normalised = gdpo_advantages(rewards, group_size=3, weights=weights)
    torch.testing.assert_close(adv, trl)
    assert adv[7] == 0 and torch.isnan(normalised[7]).all() and normalised[3, 0] == 0
    with pytest.raises(ValueError, match="one weight per reward function"):
        gdpo_advantages(rewards, group_size=3, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="groups of group_size"):
        gdpo_advantages(rewards, group_size=2)
