"""Advantage estimators against hand-derived closed forms and the seed 000 §5.2 / §7.2.1 formulas."""

import math

import pytest
import torch

from lit_rlhf.advantages import gae, group_advantages, rloo_advantages, whiten, zero_variance_groups
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


def test_group_advantages_matches_seed_single_group():
    """Seed 000 §7.2.1 grpo_advantage: (r - mean) / (std + epsilon) over one group (epsilon fixed here)."""
    rewards = [2.0, 0.0, 0.5, 3.0]
    r = torch.tensor(rewards)
    seed = (r - r.mean()) / (r.std() + 1e-3)
    torch.testing.assert_close(group_advantages(r, 4, eps=1e-3), seed)


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
    """Seed 000 §5.2 get_delta, verbatim (response tokens start at position 255; 0.95 = gamma * lam with gamma = 1)."""
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


def test_gae_matches_seed_get_delta():
    """On a 255-token prompt + 6-token response (every response position masked), gae(gamma=1, lam=0.95) equals the
    seed's recursion on the response and is 0 on the prompt."""
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
