"""Every RL objective of lit_rlhf.objectives trains through the GRPO module (tiny model, fixed rollouts, one rollout
batch with mu = 2): the loss is finite, the weights move, the named function is the one called (a spy around it)
and its metrics are logged under names the README's metric schema lists. PPO: dual clip + REINFORCE++."""

import functools
import json

import pytest
import torch

from lit_rlhf import losses, objectives
from lit_rlhf.losses import policy as policy_losses
from lit_rlhf.rewards import RewardSpec
from tests.test_grpo import _module, _run_one_step
from tests.test_report import undocumented


class Spy:
    """Wraps a function, counts its calls and records one keyword of each call."""

    def __init__(self, fn, keyword: str | None = None) -> None:
        self.fn, self.keyword, self.calls, self.seen = fn, keyword, 0, []
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.keyword is not None:
            self.seen.append(kwargs.get(self.keyword, args[2] if len(args) > 2 else None))
        return self.fn(*args, **kwargs)


def _length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def _starts_with_digit(prompts, completions):
    return [float(c[:1].isdigit()) for c in completions]


TWO_REWARDS = [RewardSpec(f"{__name__}:_length_reward", 1.0), RewardSpec(f"{__name__}:_starts_with_digit", 2.0)]


def _train(**overrides):
    """One rollout batch (2 prompts x 4 completions, mu = 2, beta 0.04, reward: the completion's length in
    characters); returns (module, logged train metrics)."""
    overrides.setdefault("rewards", [RewardSpec(f"{__name__}:_length_reward")])
    module = _module(**overrides)
    module.configure_model()
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = _run_one_step(module, batch_size=2)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert torch.isfinite(torch.tensor(metrics["train/loss"])), metrics
    moved = [not torch.equal(a, b) for a, b in zip(before, module.policy.parameters())]
    assert sum(moved) >= len(moved) // 2, "the policy's weights moved"
    assert undocumented(metrics) == [], "every metric is in the README's metric schema"
    return module, metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "metric"),
    [("dual_clip", "train/clip_ratio/dual"), ("cispo", "train/clip_ratio/region"), ("sapo", "train/gate/mean")],
)
def test_each_new_loss_trains_and_is_the_one_called(monkeypatch, loss, metric):
    spy = Spy(losses.GRPO_LOSSES[loss])
    monkeypatch.setitem(losses.GRPO_LOSSES, loss, spy)
    module, metrics = _train(loss=loss)
    assert spy.calls == 2 and module.objective.loss_fn.func is spy  # one minibatch per pass, mu = 2
    assert metric in metrics
    if loss == "cispo":  # its own clip range (1.0 / 4.0), and a token-level normaliser like dapo
        assert "epsilon_low" not in module.objective.loss_fn.keywords
    if loss == "sapo":
        assert 0 < metrics["train/gate/mean"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["k3+", "k3_iw"])
def test_the_new_kl_estimators_are_the_ones_used_in_the_loss(monkeypatch, estimator):
    spy = Spy(policy_losses.kl_penalty, keyword="estimator")
    monkeypatch.setattr(policy_losses, "kl_penalty", spy)
    _, metrics = _train(kl_estimator=estimator)
    assert spy.calls == 2 and set(spy.seen) == {estimator}
    assert metrics["train/kl"] > 0  # the second pass moved away from the reference


@pytest.mark.slow
def test_kl_in_the_reward_penalises_the_reward_and_leaves_the_loss_without_kl(monkeypatch):
    spy = Spy(objectives.kl_in_reward)
    monkeypatch.setattr(objectives, "kl_in_reward", spy)
    module, metrics = _train(kl_placement="reward", kl_estimator="k1", num_iterations=1)
    assert spy.calls == 1 and module.objective.loss_fn.keywords["beta"] == 0.0
    assert "train/kl_in_reward" in metrics and metrics["train/kl"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("estimator", "function", "extra", "metric"),
    [
        ("reinforce_pp", "reinforce_pp_advantages", {"kl_placement": "reward", "kl_estimator": "k2"},
         "train/kl_in_reward"),
        ("reinforce_pp_baseline", "reinforce_pp_baseline_advantages", {}, None),
        ("gdpo", "gdpo_advantages", {"rewards": TWO_REWARDS}, f"train/gdpo/{__name__}:_starts_with_digit/abs_mean"),
        ("online_rft", "rft_coefficients", {"rft_threshold": 15.0}, "train/rft/correct_frac"),
    ],
)  # fmt: skip
def test_each_new_advantage_estimator_trains_and_is_the_one_called(monkeypatch, estimator, function, extra, metric):
    spy = Spy(getattr(objectives, function))
    monkeypatch.setattr(objectives, function, spy)
    module, metrics = _train(advantage_estimator=estimator, **extra)
    assert spy.calls == 1
    if metric is not None:
        assert metric in metrics
    if estimator.startswith("reinforce_pp"):  # per-token advantages reached the update
        assert len(module.seen) == 8


@pytest.mark.slow
def test_top_entropy_and_off_policy_masks_select_tokens():
    _, metrics = _train(top_entropy_quantile=0.5, off_policy_mask_threshold=0.0)
    assert 0.3 < metrics["train/entropy_mask/kept_fraction"] < 0.7
    assert metrics["train/off_policy_mask/masked_fraction"] > 0  # pass 2: drifted negative-advantage completions


@pytest.mark.slow
def test_ppo_with_dual_clip_and_reinforce_pp(tmp_path, monkeypatch):
    from lit_rlhf.experiments import ppo as entry

    spy = Spy(objectives.reinforce_pp_advantages)
    monkeypatch.setattr(objectives, "reinforce_pp_advantages", spy)
    args = [
        "--config",
        "experiments/ppo/tiny.yaml",
        "--output_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar=false",
    ]
    cli = entry.main(args=[*args, "--model.policy_loss=dual_clip", "--model.advantage_estimator=reinforce_pp"])
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    train = summary["train_last"]
    loss_fn = cli.model.policy_loss.args[0]  # PPO's loss inside the rollout-correction wrapper
    assert spy.calls == 2 and loss_fn.func is losses.ppo_dual_clip_loss
    assert "train/clip_ratio/dual" in train and torch.isfinite(torch.tensor(train["train/loss"]))
    assert undocumented(set(train)) == []
