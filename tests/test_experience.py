"""PPO experience functions: the dense reward layout (InstructGPT Eq. 2), EOS penalty, score normalisation,
explained variance, minibatching, the buffer's select, completions without a reward (NaN scores), the metric names
of the shared schema, and the settings that cannot learn."""

import pytest
import torch

from lit_rlhf.advantages import gae
from lit_rlhf.experience import (
    Experience,
    RunningMoments,
    apply_missing_eos_penalty,
    check_ppo_settings,
    dense_rewards,
    drop_unscored,
    explained_variance,
    iteration_metrics,
    last_token_index,
    minibatches,
    normalize_scores,
    update_moments,
    validation_metrics,
)
from lit_rlhf.online_rm import OnlineRMSettings
from lit_rlhf.reward_models import RewardModelSettings
from lit_rlhf.rewards import RewardSpec
from lit_rlhf.types import Rollout


def written_out_reward_kl(end, prob_old, prob_ref, reward, beta=0.1):
    """The per-token reward (InstructGPT Eq. 2, k1 KL) written out row by row, score clamped to [-5, 5]."""
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


def test_reward_layout_matches_written_out_reward_with_clipping():
    """Same as :func:`written_out_reward_kl` (beta 0.1, score clamped to [-5, 5]) on full rows with random values."""
    g = torch.Generator().manual_seed(0)
    logps, ref = -torch.rand(3, 6, generator=g) * 3, -torch.rand(3, 6, generator=g) * 3
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    scores = torch.tensor([7.5, -2.0, -12.0])  # two beyond the clip range
    rewards, _ = dense_rewards(scores, logps * mask, ref * mask, mask, kl_coef=0.1, estimator="k1", score_clip=5.0)
    reference = written_out_reward_kl(last_token_index(mask), logps * mask, ref * mask, scores) * mask
    torch.testing.assert_close(rewards, reference)
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
    """With beta = 0, gamma = lam = 1 and zero values, every token's return is the final score."""
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
    rollout = Rollout(
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        torch.tensor([0, 0, 1]),
        torch.tensor([False, True, False]),
    )
    per_token = torch.arange(6.0).view(3, 2)
    exp = Experience(
        rollout,
        per_token,
        per_token + 10,
        per_token + 20,
        torch.tensor([0.0, 1.0, 2.0]),
        per_token,
        per_token,
        per_token,
        per_token,
    )
    sub = exp.select(torch.tensor([2, 0]))
    torch.testing.assert_close(sub.scores, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(sub.ref_logps, torch.tensor([[14.0, 15.0], [10.0, 11.0]]))
    assert sub.rollout.response_ids.tolist() == [[4, 5], [1, 2]]
    assert sub.rollout.prompt_index.tolist() == [1, 0]
    assert sub.mask.tolist() == [[1, 1], [1, 1]]


def test_iteration_metrics_by_hand():
    """2 completions, masks [1, 1] and [1, 0]; per-token KL [[0.5, 0.25], [1.0, 9.0]] (9 is outside the mask): sequence
    KLs 0.75 and 1.0, so with kl_coef 0.2 the non-score reward is -0.2 x 0.875 = -0.175 and the RLHF reward the raw
    score mean (1.0 + 3.0) / 2 plus it; the token-mean KL is (0.5 + 0.25 + 1.0) / 3; values, returns and advantages
    are means over the 3 masked tokens. Names are the shared schema's (README "Metric schema")."""
    rollout = Rollout(
        torch.tensor([[5, 6]]),
        torch.ones(1, 2, dtype=torch.long),
        torch.tensor([[1, 2], [3, 0]]),
        torch.tensor([[1, 1], [1, 0]]),
        torch.tensor([0, 0]),
        torch.tensor([False, True]),
    )
    kl = torch.tensor([[0.5, 0.25], [1.0, 9.0]])
    values, returns = torch.tensor([[1.0, 2.0], [3.0, 7.0]]), torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    advantages = torch.tensor([[0.5, -0.5], [3.0, 0.0]])
    exp = Experience(rollout, kl, kl, values, torch.zeros(2), kl, kl, advantages, returns)
    update = {"loss": 0.5, "value_loss": 0.25, "policy/clipfrac": 0.1, "policy/approxkl": 0.01, "value/clipfrac": 0.2,
              "ppo/updates": 4.0}  # fmt: skip
    got = iteration_metrics(exp, torch.tensor([1.0, 3.0]), kl=0.8, kl_coef=0.2, update=update)
    assert got["kl_sequence"] == 0.8 and got["kl_coef"] == 0.2
    assert got["kl"] == pytest.approx(1.75 / 3)
    assert got["non_score_reward"] == pytest.approx(-0.175)
    assert got["rlhf_reward"] == pytest.approx(2.0 - 0.175)
    rewards = [got[f"rewards/{k}"] for k in ("mean", "std", "min", "max", "missing_frac")]
    assert rewards == [2.0, 1.0, 1.0, 3.0, 0.0]
    assert got["completions/mean_length"] == 1.5 and got["completions/truncated_rate"] == 0.5
    assert (got["completions/min_length"], got["completions/max_length"]) == (1.0, 2.0)
    assert got["values/mean"] == pytest.approx(2.0) and got["returns/mean"] == pytest.approx(7 / 3)
    assert got["advantages/mean"] == pytest.approx(1.0)
    # residuals returns - values = [0, 0, 1]: variance 2/9 over returns' variance 14/9 (mean 7/3)
    assert got["explained_variance"] == pytest.approx(1 - (2 / 9) / (14 / 9))
    assert (got["loss"], got["value_loss"], got["clip_ratio/region"]) == (0.5, 0.25, 0.1)
    assert (got["approx_kl"], got["value_clip_ratio"], got["ppo/updates"]) == (0.01, 0.2, 4.0)
    assert "entropy" not in got and not any(k.startswith(("objective/", "score/", "policy/")) for k in got)
    rollout.entropy = torch.tensor([[1.0, 3.0], [2.0, 100.0]])
    assert iteration_metrics(exp, torch.tensor([1.0, 3.0]), 0.8, 0.2)["entropy"] == pytest.approx(2.0)
    # a completion without a reward (NaN raw score) is left out of the reward statistics and counted
    missing = iteration_metrics(exp, torch.tensor([float("nan"), 3.0]), 0.8, 0.2)
    assert (missing["rewards/mean"], missing["rewards/std"], missing["rewards/missing_frac"]) == (3.0, 0.0, 0.5)
    assert missing["rlhf_reward"] == pytest.approx(3.0 - 0.175)


def test_validation_metrics_by_hand():
    """Per-token KL [[0.5, 0.25], [1.0, 9.0]] on masks [1, 1] and [1, 0]: token mean 1.75 / 3, sequence sums 0.75 and
    1.0 (mean 0.875); lengths 2 and 1, one truncated."""
    rollout = Rollout(
        torch.tensor([[5, 6]]),
        torch.ones(1, 2, dtype=torch.long),
        torch.tensor([[1, 2], [3, 0]]),
        torch.tensor([[1, 1], [1, 0]]),
        torch.tensor([0, 0]),
        torch.tensor([False, True]),
    )
    got = validation_metrics(rollout, torch.tensor([[0.5, 0.25], [1.0, 9.0]]))
    assert float(got["kl"]) == pytest.approx(1.75 / 3) and float(got["kl_sequence"]) == pytest.approx(0.875)
    assert float(got["completions/mean_length"]) == 1.5 and float(got["completions/truncated_rate"]) == 0.5


# ----------------------------------------------------------------------------- completions without a reward
def test_a_nan_score_adds_nothing_to_the_dense_rewards():
    """Scores [2, NaN], beta 0.5, k1 log-ratios [[0.2, -0.4], [1.0, 0.2]]: row 0 as always (-0.1, 0.2 + 2); row 1
    only -beta KL (-0.5, -0.1), no NaN anywhere."""
    logps, ref = torch.tensor([[0.2, -0.4], [1.0, 0.2]]), torch.zeros(2, 2)
    rewards, _ = dense_rewards(torch.tensor([2.0, float("nan")]), logps, ref, torch.ones(2, 2), kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 2.2], [-0.5, -0.1]]))


def test_drop_unscored_zeroes_advantages_and_makes_returns_the_values():
    """Row 1 has no score: its advantages become 0 and its returns its own values (no actor or critic signal);
    row 0 is unchanged; the row mask [N, 1] is [1, 0]."""
    advantages, returns = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    values = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    adv, ret, scored = drop_unscored(advantages, returns, values, torch.tensor([1.0, float("nan")]))
    torch.testing.assert_close(adv, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[5.0, 6.0], [0.25, 0.75]]))
    assert scored.tolist() == [[1.0], [0.0]]


def test_score_normalisation_leaves_nan_out():
    """batch: [1, NaN, 3] -> mean 2, unbiased std sqrt(2) over the two scores: (-1, NaN, 1) / sqrt(2); one score
    left: std 0, so it becomes 0 (centred); running moments skip NaN ([1, NaN, 3]: mean 2, population var 1)."""
    eps = 1e-8
    out = normalize_scores(torch.tensor([1.0, float("nan"), 3.0]), "batch", eps=eps)
    torch.testing.assert_close(out, torch.tensor([-1.0, float("nan"), 1.0]) / (2**0.5 + eps), equal_nan=True)
    one_left = normalize_scores(torch.tensor([4.0, float("nan")]), "batch")
    torch.testing.assert_close(one_left, torch.tensor([0.0, float("nan")]), equal_nan=True)
    assert normalize_scores(torch.tensor([float("nan")] * 2), "batch").isnan().all()
    moments = update_moments(RunningMoments(), torch.tensor([1.0, float("nan"), 3.0]))
    assert (moments.mean, moments.var, moments.count) == (2.0, 1.0, 2)
    assert update_moments(moments, torch.tensor([float("nan")])) == moments


# ------------------------------------------------------------------------------------- settings that cannot learn
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples_per_prompt": 0}, r"model\.samples_per_prompt=0 cannot learn: no completion is sampled"),
        ({"ppo_epochs": 0}, r"model\.ppo_epochs=0 cannot learn: .*no optimizer step"),
        ({"score_clip": 0.0}, r"model\.score_clip=0\.0 cannot learn: .*same score"),
        ({"score_clip": -1.0}, r"model\.score_clip=-1\.0 cannot learn"),
        (
            {"rewards": [RewardSpec("numeric_correctness", 0.0)]},
            r"model\.reward_model\.weight, model\.online_rm\.weight and model\.rewards cannot learn: "
            r"every reward weight is 0 \(\[0\.0\]\)",
        ),
        (
            {"reward_model": RewardModelSettings(path="rm", weight=0.0), "rewards": [RewardSpec("strict_format", 0.0)]},
            r"every reward weight is 0 \(\[0\.0, 0\.0\]\)",
        ),
        ({"rewards": []}, "PPO needs a reward"),
    ],
)
def test_ppo_settings_that_cannot_learn_are_refused(kwargs, message):
    settings = {"samples_per_prompt": 1, "ppo_epochs": 2, "score_clip": 5.0, "reward_model": None,
                "rewards": [RewardSpec("numeric_correctness")], **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        check_ppo_settings(**settings)


def test_ppo_settings_that_can_learn_pass():
    """At the boundary: one sample and one epoch are accepted, zero of either is refused."""
    assert check_ppo_settings(1, 1, None, None, [RewardSpec("numeric_correctness")]) is None
    with pytest.raises(ValueError, match="model.samples_per_prompt=0"):
        check_ppo_settings(0, 1, None, None, [RewardSpec("numeric_correctness")])
    with pytest.raises(ValueError, match="model.ppo_epochs=0"):
        check_ppo_settings(1, 0, None, None, [RewardSpec("numeric_correctness")])
    # a reward model with functions of weight 0 (logged, not rewarded) still learns from the reward model
    rm, logged_only = RewardModelSettings(path="rm"), [RewardSpec("numeric_correctness", 0.0)]
    assert check_ppo_settings(2, 1, 5.0, rm, logged_only) is None
    with pytest.raises(ValueError, match="cannot learn"):  # the same functions without the reward model
        check_ppo_settings(2, 1, 5.0, None, logged_only)
    # an online RM alone is a reward; at weight 0 beside logged-only functions it is not
    assert check_ppo_settings(2, 1, 5.0, None, None, OnlineRMSettings()) is None
    assert check_ppo_settings(2, 1, 5.0, None, logged_only, OnlineRMSettings()) is None
    with pytest.raises(ValueError, match=r"every reward weight is 0 \(\[0\.0, 0\.0\]\)"):
        check_ppo_settings(2, 1, 5.0, None, logged_only, OnlineRMSettings(weight=0.0))
