"""Reward-model losses against hand-derived closed forms (scored / pairwise / ranked records; InstructGPT Eq. 1)."""

import math

import pytest
import torch

from lit_rlhf.losses import bradley_terry_loss, pointwise_regression_loss, ranking_loss, reward_centering_penalty


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def softplus(x):
    """-log sigmoid(d) = log(1 + e^{-d}); softplus(-d) written out for the hand values."""
    return math.log1p(math.exp(x))


def test_bradley_terry_without_margin():
    """r_c - r_r = (1, 0, -2): -log sigmoid(d) = log(1 + e^{-d}) = (log(1 + e^-1), ln 2, log(1 + e^2)).
    d/dr_c = -sigmoid(-d), d/dr_r = +sigmoid(-d); at d = 0 that is -1/2 and 1/2."""
    chosen = _t([1.0, 0.0, 0.0]).requires_grad_()
    rejected = _t([0.0, 0.0, 2.0]).requires_grad_()
    losses = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(losses.detach(), _t([softplus(-1), math.log(2), softplus(2)]))
    losses[1].backward()
    assert chosen.grad.tolist() == [0.0, -0.5, 0.0] and rejected.grad.tolist() == [0.0, 0.5, 0.0]


def test_bradley_terry_with_margin():
    """Margin m = (1, -1) on d = (1, 0): -log sigmoid(d - m) = (-log sigmoid(0), -log sigmoid(1))
    = (ln 2, log(1 + e^-1))."""
    losses = bradley_terry_loss(_t([1.0, 0.0]), _t([0.0, 0.0]), margin=_t([1.0, -1.0]))
    torch.testing.assert_close(losses, _t([math.log(2), softplus(-1)]))


def test_pointwise_regression():
    """(predicted - target)^2: (1 - 0)^2 = 1, (2 - 4)^2 = 4."""
    torch.testing.assert_close(pointwise_regression_loss(_t([1.0, 2.0]), _t([0.0, 4.0])), _t([1.0, 4.0]))


def test_ranking_loss_k3_by_hand():
    """Rewards (3, 2, 0), best first: pairs (1,2), (1,3), (2,3) have differences 1, 3, 2, so
    loss = [log(1 + e^-1) + log(1 + e^-3) + log(1 + e^-2)] / C(3,2) = /3. All-equal rewards give ln 2."""
    losses = ranking_loss(_t([[3.0, 2.0, 0.0], [1.0, 1.0, 1.0]]))
    expected = (softplus(-1) + softplus(-3) + softplus(-2)) / 3
    torch.testing.assert_close(losses, _t([expected, math.log(2)]))


def test_ranking_loss_padded_row():
    """Row 0 has K = 3 valid; row 1 only 2 valid (third entry padding, even NaN): one pair, difference 1,
    normalised by C(2,2) = 1 -> log(1 + e^-1). Gradients stay finite and 0 on the padding."""
    rewards = _t([[3.0, 2.0, 0.0], [1.0, 0.0, float("nan")]]).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    losses = ranking_loss(rewards, mask)
    torch.testing.assert_close(losses.detach(), _t([(softplus(-1) + softplus(-3) + softplus(-2)) / 3, softplus(-1)]))
    losses.sum().backward()
    assert torch.isfinite(rewards.grad).all() and rewards.grad[1, 2] == 0


def test_ranking_loss_k2_is_bradley_terry():
    """K = 2: one pair, C(2,2) = 1, so the loss is the Bradley-Terry loss of (best, worst)."""
    r = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ranking_loss(r), bradley_terry_loss(r[:, 0], r[:, 1]))


def test_ranking_loss_rejects_bad_masks():
    with pytest.raises(ValueError, match="at least 2"):
        ranking_loss(_t([[1.0, 0.0]]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="prefix"):
        ranking_loss(_t([[1.0, 0.0, 2.0]]), torch.tensor([[True, False, True]]))


def test_reward_centering_penalty():
    """0.01 * mean(1, 4, 9) = 0.01 * 14 / 3."""
    torch.testing.assert_close(reward_centering_penalty(_t([1.0, -2.0, 3.0]), 0.01), _t(0.14 / 3))
