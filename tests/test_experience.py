"""PPO experience functions: the dense reward layout (seed 000 get_reward_kl), EOS penalty, score normalisation,
explained variance, minibatching, and the buffer's select."""

import pytest
import torch

from lit_rlhf.advantages import gae
from lit_rlhf.experience import (
    Experience,
    RunningMoments,
    apply_missing_eos_penalty,
    dense_rewards,
    explained_variance,
    last_token_index,
    minibatches,
    normalize_scores,
    sequence_sums,
    update_moments,
)
from lit_rlhf.types import Rollout


def seed_get_reward_kl(end, prob_old, prob_ref, reward, beta=0.1):
    """Seed 000 §5.2, verbatim apart from beta as an argument."""
    reward_kl = -beta * (prob_old - prob_ref)
    for i, e in enumerate(end):
        reward_kl[i, e] += reward[i].clamp(-5, 5)
    return reward_kl


def test_reward_layout_kl_on_every_token_score_on_last_only():
    """Two rows, lengths 3 and 2 (R = 4); k1 KL = logps - ref_logps; beta = 0.5; scores 2.0 and -1.0.

    rewards[n, t] = -0.5 (logps - ref)[n, t] on response tokens, plus the score at t = len - 1, 0 on padding:
      row 0: log-ratios [0.2, -0.4, 0.6] -> [-0.1, 0.2, -0.3 + 2.0], pad 0
      row 1: log-ratios [1.0, 0.2]       -> [-0.5, -0.1 - 1.0], pads 0
    """
    logps = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.5, -1.0, -9.0, -9.0]])
    ref = torch.tensor([[-1.2, -1.6, -1.1, -7.0], [-1.5, -1.2, -1.0, -2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards, kl = dense_rewards(torch.tensor([2.0, -1.0]), logps * mask, ref * mask, mask, kl_coef=0.5, estimator="k1")
    expected = torch.tensor([[-0.1, 0.2, 1.7, 0.0], [-0.5, -1.1, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, torch.tensor([[0.2, -0.4, 0.6, 0.0], [1.0, 0.2, 0.0, 0.0]]))
    # the score sits on the last response token only: removing it leaves exactly -beta * KL everywhere
    without_score, _ = dense_rewards(torch.zeros(2), logps * mask, ref * mask, mask, kl_coef=0.5)
    diff = rewards - without_score
    assert torch.count_nonzero(diff) == 2 and diff[0, 2] == 2.0 and diff[1, 1] == -1.0


def test_reward_layout_matches_seed_get_reward_kl_with_clipping():
    """Same as seed 000's get_reward_kl (beta 0.1, score clamped to [-5, 5]) on full rows with random values."""
    g = torch.Generator().manual_seed(0)
    logps, ref = -torch.rand(3, 6, generator=g) * 3, -torch.rand(3, 6, generator=g) * 3
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    scores = torch.tensor([7.5, -2.0, -12.0])  # two beyond the clip range
    rewards, _ = dense_rewards(scores, logps * mask, ref * mask, mask, kl_coef=0.1, estimator="k1", score_clip=5.0)
    seed = seed_get_reward_kl(last_token_index(mask), logps * mask, ref * mask, scores) * mask
    torch.testing.assert_close(rewards, seed)
    assert rewards[0, 5] == pytest.approx(-0.1 * float(logps[0, 5] - ref[0, 5]) + 5.0)
    assert rewards[2, 0] == pytest.approx(-0.1 * float(logps[2, 0] - ref[2, 0]) - 5.0)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_reward_layout_other_estimators(estimator):
    """k2 = r^2/2, k3 = exp(-r) + r - 1 with r = logps - ref; both >= 0, so rewards without a score are <= 0."""
    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    rewards, kl = dense_rewards(torch.zeros(1), logps, ref, mask, kl_coef=1.0, estimator=estimator)
    r = logps - ref
    expected = 0.5 * r**2 if estimator == "k2" else torch.exp(-r) + r - 1
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(rewards, -expected)


def test_rewards_feed_gae_returns_score_at_gamma_one():
    """With beta = 0, gamma = lam = 1 and zero values, every token's return is the final score (seed 002)."""
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, _ = dense_rewards(torch.tensor([3.0]), torch.zeros(1, 4), torch.zeros(1, 4), mask, kl_coef=0.0)
    advantages, returns = gae(rewards, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[3.0, 3.0, 3.0, 0.0]]))
    torch.testing.assert_close(advantages, returns)


def test_empty_row_is_an_error():
    with pytest.raises(ValueError, match="no response token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 0.5, -1.0])
    truncated = torch.tensor([False, True, True])
    torch.testing.assert_close(apply_missing_eos_penalty(scores, truncated, 1.0), torch.tensor([1.0, -0.5, -2.0]))
    assert apply_missing_eos_penalty(scores, truncated, None) is scores


def test_score_normalisation_modes():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert normalize_scores(s, "none") is s
    batch = normalize_scores(s, "batch")
    assert float(batch.mean()) == pytest.approx(0.0, abs=1e-6) and float(batch.std()) == pytest.approx(1.0, abs=1e-6)
    moments = update_moments(RunningMoments(), torch.tensor([1.0, 3.0]))  # mean 2, population var 1
    torch.testing.assert_close(normalize_scores(torch.tensor([4.0]), "running", moments), torch.tensor([2.0]))
    with pytest.raises(ValueError):
        normalize_scores(s, "running", RunningMoments())
    with pytest.raises(ValueError):
        normalize_scores(s, "zscore")  # type: ignore[arg-type]


def test_running_moments_equal_moments_of_everything_seen():
    """Merging batch moments (Chan et al.) gives the mean and population variance of the concatenation."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 17, 8)]
    moments = RunningMoments()
    for b in batches:
        moments = update_moments(moments, b)
    everything = torch.cat(batches)
    assert moments.count == everything.numel()
    assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-5)
    assert moments.var == pytest.approx(float(everything.var(unbiased=False)), abs=1e-5)


def test_explained_variance():
    """1 - Var[R - V] / Var[R]: a perfect critic gives 1, predicting the mean gives 0 (masked entries ignored)."""
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(returns, 2.0), returns, mask)) == pytest.approx(0.0)
    # residuals [0.5, 0, -0.5]: Var = 1/6; Var[R] = 2/3 -> 1 - 0.25 = 0.75
    values = torch.tensor([[0.5, 2.0, 3.5, 0.0]])
    assert float(explained_variance(values, returns, mask)) == pytest.approx(0.75)
    assert torch.isnan(explained_variance(returns, torch.ones_like(returns), mask))


def test_sequence_sums():
    torch.testing.assert_close(sequence_sums(torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[1, 1, 0]])), torch.tensor([3.0]))


def test_minibatches_cover_every_row_once():
    parts = minibatches(10, 4, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    again = minibatches(10, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    with pytest.raises(ValueError):
        minibatches(4, 0)


def test_experience_select_keeps_rows_aligned():
    """Rows 2 and 0 of a 3-completion buffer: every per-row tensor and the rollout follow the same order."""
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_ids = torch.tensor([[1, 2], [3, 0], [4, 5]])
    response_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    rollout = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor([0, 0, 1]), torch.tensor([False, True, False]))
    per_token = torch.arange(6.0).view(3, 2)
    exp = Experience(rollout, per_token, per_token + 10, per_token + 20, torch.tensor([0.0, 1.0, 2.0]), per_token, per_token, per_token, per_token)
    sub = exp.select(torch.tensor([2, 0]))
    torch.testing.assert_close(sub.scores, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(sub.ref_logps, torch.tensor([[14.0, 15.0], [10.0, 11.0]]))
    assert sub.rollout.response_ids.tolist() == [[4, 5], [1, 2]]
    assert sub.rollout.prompt_index.tolist() == [1, 0]
    assert sub.mask.tolist() == [[1, 1], [1, 1]]
