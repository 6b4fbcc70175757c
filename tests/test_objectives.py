"""lit_rlhf.objectives: the options a stage passes select and bind the right pure function, and the batch-level
glue (KL in the reward, unscored completions, token masks, loss normaliser units) computes what the functions
compute on hand-built inputs."""

import pytest
import torch

from lit_rlhf import objectives
from lit_rlhf.advantages import (
    gae,
    gdpo_advantages,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from lit_rlhf.logprobs import masked_whiten
from lit_rlhf.losses import (
    cispo_loss,
    dr_grpo_loss,
    dual_clip_loss,
    grpo_loss,
    kl_in_reward,
    off_policy_sequence_mask,
    ppo_dual_clip_loss,
    ppo_policy_loss,
    sapo_loss,
    top_entropy_mask,
)
from lit_rlhf.objectives import GRPOObjective, ObjectiveSettings
from lit_rlhf.rewards import RewardResult
from lit_rlhf.types import Rollout

N, R, G = 4, 5, 2


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(N, R, generator=g, dtype=torch.float64) * 2
    old = logps + 0.3 * torch.randn(N, R, generator=g, dtype=torch.float64)
    ref = logps + 0.2 * torch.randn(N, R, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -0.5, -1.5, 0.7], dtype=torch.float64)
    return logps, old, ref, mask, advantages


def _minibatch(mask, sample_logps=None) -> Rollout:
    n, r = mask.shape
    ids = torch.ones(n, r, dtype=torch.long)
    return Rollout(
        ids[:1],
        ids[:1],
        ids,
        mask.long(),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=bool),
        sample_logps=sample_logps,
    )


# ------------------------------------------------------------------------------------------------ loss binding
@pytest.mark.parametrize(
    ("settings", "fn", "expected"),
    [
        (ObjectiveSettings(), grpo_loss, {"epsilon_low": 0.2, "epsilon_high": 0.2}),
        (ObjectiveSettings(loss="cispo"), cispo_loss, {}),  # the loss's own 1.0 / 4.0
        (ObjectiveSettings(loss="cispo", epsilon_high=2.0), cispo_loss, {"epsilon_high": 2.0}),
        (ObjectiveSettings(loss="dual_clip", dual_clip_c=2.5), dual_clip_loss, {"dual_clip_c": 2.5}),
        (ObjectiveSettings(loss="sapo", tau_pos=0.5, tau_neg=2.0), sapo_loss, {"tau_pos": 0.5, "tau_neg": 2.0}),
        (ObjectiveSettings(loss="dr_grpo", max_length=7), dr_grpo_loss, {"max_length": 7}),
    ],
)
def test_the_named_loss_is_bound_with_the_loss_defaults_unless_set(settings, fn, expected):
    logps, old, ref, mask, adv = _inputs()
    bound = objectives.grpo_loss_fn(settings)
    assert bound.func is fn
    assert "epsilon_low" not in bound.keywords or settings.epsilon_low is not None
    got, _ = bound(logps, old, ref, adv, mask)
    want, _ = fn(logps, old, ref, adv, mask, **expected)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kl_in_the_reward_takes_the_kl_out_of_the_loss():
    logps, old, ref, mask, adv = _inputs()
    in_loss = objectives.grpo_loss_fn(ObjectiveSettings(beta=0.1))
    in_reward = objectives.grpo_loss_fn(ObjectiveSettings(beta=0.1, kl_placement="reward"))
    assert in_loss.keywords["beta"] == 0.1 and in_reward.keywords["beta"] == 0.0
    assert float(in_reward(logps, old, ref, adv, mask)[1]["kl"]) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kl_placement": "reward", "kl_estimator": "k3_iw"}, "k3\\+ and k3_iw are k3 there"),
        ({"kl_placement": "reward", "advantage_estimator": "gdpo"}, "takes no KL in the reward"),
        ({"kl_placement": "middle"}, "choose 'loss' or 'reward'"),
        ({"top_entropy_quantile": 0.0}, "in \\(0, 1\\]"),
        ({"off_policy_mask_threshold": -1.0}, ">= 0"),
    ],
)
def test_settings_that_make_no_sense_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveSettings(**kwargs)


def test_settings_from_a_stages_options_take_the_fields_by_name():
    options = {"loss": "sapo", "tau_pos": 0.3, "num_iterations": 2, "beta": 0.5, "group_size": 99}
    s = ObjectiveSettings.from_options(options, group_size=4, max_length=9)
    assert (s.loss, s.tau_pos, s.beta, s.group_size, s.max_length, s.tau_neg) == ("sapo", 0.3, 0.5, 4, 9, 1.05)


# ------------------------------------------------------------------------------------------------- advantages
def _scores(total, per_function=None):
    return RewardResult(torch.tensor(total, dtype=torch.float32), per_function or {})


def test_group_and_rloo_are_the_estimators_themselves():
    scores, mask = _scores([1.0, 0.0, 2.0, 5.0]), torch.ones(N, R)
    adv, stats = GRPOObjective(ObjectiveSettings(group_size=G)).advantages(scores, mask, None, None)
    assert torch.equal(adv, group_advantages(scores.total, G)) and stats == {}
    adv, _ = GRPOObjective(ObjectiveSettings(group_size=G, advantage_estimator="rloo")).advantages(
        scores, mask, None, None
    )
    assert torch.equal(adv, rloo_advantages(scores.total, G))


def test_kl_in_the_reward_is_subtracted_before_the_group_advantage():
    logps, old, ref, mask, _ = (t.float() for t in _inputs())
    s = ObjectiveSettings(group_size=G, beta=0.1, kl_placement="reward", kl_estimator="k1")
    scores = _scores([1.0, 0.0, 2.0, 5.0])
    adv, stats = GRPOObjective(s).advantages(scores, mask, old, ref)
    penalised = scores.total - 0.1 * ((old - ref) * mask).sum(-1)  # k1 of the sampling policy, summed
    torch.testing.assert_close(adv, group_advantages(penalised, G))
    assert stats["kl_in_reward"] == pytest.approx(float(((old - ref) * mask).sum(-1).mean()), rel=1e-6)
    torch.testing.assert_close(kl_in_reward(scores.total, old, ref, mask, 0.1)[0], penalised)


def test_reinforce_pp_whitens_the_returns_over_the_scored_completions_tokens():
    """Without a KL in the reward every token's return is its completion's score; a completion with no score gets
    0 and is left out of the statistics."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.float32)
    s = ObjectiveSettings(group_size=G, advantage_estimator="reinforce_pp")
    adv, _ = GRPOObjective(s).advantages(_scores([1.0, 0.0, 3.0, float("nan")]), mask, None, None)
    valid = mask.clone()
    valid[3] = 0
    returns = torch.tensor([[1.0, 1, 0], [0, 0, 0], [3, 3, 3], [0, 0, 0]])
    torch.testing.assert_close(adv, masked_whiten(returns, valid))
    assert adv[3].abs().sum() == 0 and adv.shape == mask.shape
    values = torch.tensor([1.0, 1, 0, 3, 3, 3])  # the 6 scored tokens
    torch.testing.assert_close(adv[valid.bool()], (values - values.mean()) / values.std(), atol=1e-4, rtol=0)


def test_reinforce_pp_with_the_kl_in_the_reward_is_the_dense_reward_return():
    logps, old, ref, mask, _ = (t.float() for t in _inputs())
    s = ObjectiveSettings(
        group_size=G, advantage_estimator="reinforce_pp", beta=0.1, kl_placement="reward", kl_estimator="k1"
    )
    adv, stats = GRPOObjective(s).advantages(_scores([1.0, 0.0, 2.0, 5.0]), mask, old, ref)
    rewards = -0.1 * (old - ref) * mask
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(N), last] += torch.tensor([1.0, 0.0, 2.0, 5.0])
    torch.testing.assert_close(adv, reinforce_pp_advantages(rewards, mask)[0])
    assert "kl_in_reward" in stats


def test_reinforce_pp_baseline_subtracts_the_group_mean_of_the_scored_and_zeroes_the_unscored():
    mask = torch.ones(N, 2)
    s = ObjectiveSettings(group_size=G, advantage_estimator="reinforce_pp_baseline")
    adv, _ = GRPOObjective(s).advantages(_scores([1.0, 3.0, float("nan"), 4.0]), mask, None, None)
    centred = torch.tensor([-1.0, 1.0, 0.0])  # group 1: 4 alone, its own mean
    tokens = centred.repeat_interleave(2)  # whitened over the scored completions' tokens (unbiased, as verl)
    expected = (centred - tokens.mean()) / tokens.std()
    torch.testing.assert_close(adv[[0, 1, 3], 0], expected, atol=1e-6, rtol=0)
    assert adv[2].abs().sum() == 0 and torch.equal(adv[:, 0], adv[:, 1])


def test_gdpo_normalises_each_function_and_logs_its_share():
    per_function = {"a": torch.tensor([1.0, 0.0, 1.0, 1.0]), "b": torch.tensor([10.0, 30.0, 5.0, 7.0])}
    s = ObjectiveSettings(group_size=G, advantage_estimator="gdpo", reward_weights=(("a", 1.0), ("b", 0.5)))
    adv, stats = GRPOObjective(s).advantages(_scores([6.0, 15.0, 3.5, 4.5], per_function), torch.ones(N, 3), None, None)
    want, normalised = gdpo_advantages(torch.stack([per_function["a"], per_function["b"]], -1), G, [1.0, 0.5])
    torch.testing.assert_close(adv, want)
    assert stats["gdpo/a/abs_mean"] == pytest.approx(float(normalised[:, 0].abs().mean()))
    assert stats["gdpo/a/abs_mean"] == pytest.approx(0.25 / (0.5**0.5 + 1e-4), rel=1e-6)  # group 2 is flat
    assert stats["gdpo/b/abs_mean"] > 0


def test_online_rft_is_one_on_correct_completions_and_zero_elsewhere():
    s = ObjectiveSettings(group_size=G, advantage_estimator="online_rft", rft_threshold=1.0)
    adv, stats = GRPOObjective(s).advantages(_scores([1.5, 0.4, float("nan"), 1.0]), torch.ones(N, 2), None, None)
    assert adv.tolist() == [1.0, 0.0, 0.0, 1.0] and stats["rft/correct_frac"] == 0.5


def test_an_empty_batch_has_no_advantages():
    adv, stats = GRPOObjective(ObjectiveSettings(advantage_estimator="gdpo")).advantages(
        _scores([]), torch.ones(0, 3), None, None
    )
    assert adv.numel() == 0 and stats == {}


# -------------------------------------------------------------------------------------------------- token masks
def test_without_masks_the_loss_is_the_bound_loss_with_no_weights():
    logps, old, ref, mask, adv = _inputs()
    objective = GRPOObjective(ObjectiveSettings(loss="sapo", beta=0.05))
    got, metrics = objective.loss(logps, None, old, ref, adv, _minibatch(mask))
    want, want_metrics = sapo_loss(logps, old, ref, adv, mask, beta=0.05)
    assert torch.equal(got, want) and metrics.keys() == want_metrics.keys()


def test_top_entropy_and_off_policy_masks_multiply_into_the_weights():
    logps, old, ref, mask, adv = _inputs()
    entropy = torch.rand(N, R, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler = old + 0.5  # every completion drifted by 0.5 nats from the sampler
    s = ObjectiveSettings(top_entropy_quantile=0.5, off_policy_mask_threshold=0.1)
    got, metrics = GRPOObjective(s).loss(logps, entropy, old, ref, adv, _minibatch(mask, sampler))
    keep_entropy, _ = top_entropy_mask(entropy, mask, 0.5)
    keep_policy, _ = off_policy_sequence_mask(adv, logps, sampler, mask, 0.1)
    want, _ = grpo_loss(logps, old, ref, adv, mask, weights=keep_entropy * keep_policy)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert {"entropy_mask/kept_fraction", "off_policy_mask/masked_fraction", "clip_ratio/region"} <= metrics.keys()
    assert 0 < float(metrics["entropy_mask/kept_fraction"]) < 1
    assert 0 < float(metrics["off_policy_mask/masked_fraction"]) < 1  # only the negative-advantage rows
    without_sampler, more = GRPOObjective(ObjectiveSettings(off_policy_mask_threshold=0.0)).loss(
        logps, None, logps.detach(), ref, adv, _minibatch(mask)
    )
    assert float(more["off_policy_mask/masked_fraction"]) == 0.0  # old == current: no drift, nothing masked
    with pytest.raises(ValueError, match="needs the token entropies"):
        GRPOObjective(ObjectiveSettings(top_entropy_quantile=0.2)).loss(logps, None, old, ref, adv, _minibatch(mask))


def test_loss_weights_count_tokens_for_token_mean_losses_and_sequences_otherwise():
    lengths = torch.tensor([3, 1, 4])
    for loss in ("dapo", "cispo"):
        assert objectives.loss_weights(loss, lengths).tolist() == [3.0, 1.0, 4.0]
    for loss in ("grpo", "dr_grpo", "gspo", "dual_clip", "sapo"):
        assert objectives.loss_weights(loss, lengths).tolist() == [1.0, 1.0, 1.0]


def test_sequence_advantages_average_per_token_ones_over_each_completion():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    per_token = torch.tensor([[1.0, 3.0, 9.0], [-2.0, 5.0, 5.0]])
    assert objectives.sequence_advantages(per_token, mask).tolist() == [2.0, -2.0]
    flat = torch.tensor([0.5, -1.0])
    assert objectives.sequence_advantages(flat, mask) is flat


# ------------------------------------------------------------------------------------------------------------ PPO
def test_ppo_policy_loss_and_advantages_by_name():
    logps, old, _, mask, _ = _inputs()
    adv = torch.randn(N, R, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain, dual = objectives.ppo_policy_loss("ppo", 0.2, 3.0), objectives.ppo_policy_loss("dual_clip", 0.1, 2.0)
    assert plain.func is ppo_policy_loss and "dual_clip_c" not in plain.keywords
    torch.testing.assert_close(
        dual(logps, old, adv, mask)[0],
        ppo_dual_clip_loss(logps, old, adv, mask, clip_range=0.1, dual_clip_c=2.0)[0],
        rtol=0,
        atol=0,
    )
    rewards, values = adv, torch.rand(N, R, dtype=torch.float64)
    for got, want in zip(
        objectives.ppo_advantages("gae", rewards, values, mask, 1.0, 0.9), gae(rewards, values, mask, 1.0, 0.9)
    ):
        assert torch.equal(got, want)
    for got, want in zip(
        objectives.ppo_advantages("reinforce_pp", rewards, values, mask, 0.9, 0.9),
        reinforce_pp_advantages(rewards, mask, 0.9),
    ):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="choose 'gae' or 'reinforce_pp'"):
        objectives.ppo_advantages("vtrace", rewards, values, mask, 1.0, 1.0)
