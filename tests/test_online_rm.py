"""Online-updated reward model (lit_rlhf.online_rm; DeepSeekMath §4.1.4) and iterative RL in pipelines: the BCE loss and
the replay count in closed form, the RM's fresh-batch metrics by hand (computed from the scores it rewarded with,
before its update), weights that change exactly at the update steps, the replay share of each update, its state
through a checkpoint, GRPO end to end with resume equal to an uninterrupted run, refused settings, and a two-iteration
pipeline whose second iteration starts from the first's policy, reference and RM."""

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lit_rlhf import models
from lit_rlhf.experiments import pipeline
from lit_rlhf.losses import outcome_bce_loss
from lit_rlhf.online_rm import (
    KEY,
    OnlineRMComposer,
    OnlineRMSettings,
    check_settings,
    pair_accuracy,
    replay_count,
    sign_accuracy,
)
from lit_rlhf.rewards import RewardSpec
from tests.distributed_runs import step_metrics
from tests.test_report import undocumented

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "grpo" / "tiny-online-rm.yaml")


# ------------------------------------------------------------------------------------------------ closed forms
def test_outcome_bce_loss_closed_form():
    """BCE with logits: l(x, y) = log(1 + e^x) - y x (= -log sigmoid(x) for y = 1, -log(1 - sigmoid(x)) for y = 0);
    the mean over the batch; gradient (sigmoid(x) - y) / n."""
    x = torch.tensor([0.0, 2.0, -1.0, 3.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    expected = (math.log(2) + math.log(1 + math.e**2) + math.log(1 + math.e**-1) + math.log(1 + math.e**3) - 3) / 4
    loss = outcome_bce_loss(x, y)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert x.grad.tolist() == pytest.approx(((torch.sigmoid(x.detach()) - y) / 4).tolist(), rel=1e-6)
    assert outcome_bce_loss(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_replay_count_makes_older_examples_the_replay_fraction_of_an_update():
    """n_old = round(f n / (1 - f)) so that n_old / (n + n_old) = f; at most what the history holds."""
    assert replay_count(90, 0.1, 1000) == 10  # 10 / 100 = 0.1
    assert replay_count(32, 0.1, 1000) == 4  # round(3.56): 4 / 36 = 0.11
    assert replay_count(10, 0.5, 1000) == 10
    assert replay_count(32, 0.1, 2) == 2  # capped by the history
    assert replay_count(32, 0.0, 100) == 0 and replay_count(0, 0.1, 100) == 0


def test_sign_and_pair_accuracy_by_hand():
    """scores [2, -1, 0.5 | -3, 0, 1], labels [1, 0, 0 | 0, 1, 1] (two groups of 3). Verdicts score > 0: T F T F F T
    vs labels T F F F T T: 4 of 6 agree. Pairs (correct, wrong) within a group: (0, 1) 2 > -1, (0, 2) 2 > 0.5,
    (4, 3) 0 > -3, (5, 3) 1 > -3: 4 of 4. With score 4 set to -3, the pair (4, 3) ties: (1 + 1 + 0.5 + 1) / 4."""
    scores = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0, 1.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert sign_accuracy(scores, labels) == pytest.approx(4 / 6)
    assert pair_accuracy(scores, labels, groups) == pytest.approx(1.0)
    scores[4] = -3.0
    assert sign_accuracy(scores, labels) == pytest.approx(4 / 6)
    assert pair_accuracy(scores, labels, groups) == pytest.approx(0.875)
    assert pair_accuracy(scores, torch.tensor([1.0, 1, 1, 0, 0, 0]), groups) is None  # no group has both


@pytest.mark.parametrize(
    "field, value",
    [("update_every", -1), ("lr", 0.0), ("lr", math.nan), ("replay_fraction", 1.0), ("replay_fraction", -0.1),
     ("buffer_size", -1), ("batch_size", 0), ("epochs", 0), ("max_length", 1), ("weight", math.inf),
     ("max_grad_norm", 0.0)],
)  # fmt: skip
def test_bad_settings_are_refused_naming_the_option(field, value):
    with pytest.raises(ValueError, match=f"model.online_rm.{field}="):
        check_settings(OnlineRMSettings(**{field: value}))


def test_settings_that_cannot_work_together_are_refused():
    from lit_rlhf.stages.grpo import GRPOModule

    with pytest.raises(ValueError, match="no older example is kept"):
        check_settings(OnlineRMSettings(replay_fraction=0.1, buffer_size=0))
    check_settings(OnlineRMSettings(replay_fraction=0.0, buffer_size=0))
    policy, rm = models.ModelSpec(name="tiny", lora=None), OnlineRMSettings(model=models.ModelSpec("tiny", lora=None))
    for estimator in ("process", "gdpo"):  # refused before any model loads
        with pytest.raises(ValueError, match=f"outcome reward: not with advantage_estimator={estimator}"):
            GRPOModule(policy=policy, online_rm=rm, advantage_estimator=estimator)
    zero = OnlineRMSettings(model=models.ModelSpec("tiny", lora=None), weight=0.0)
    with pytest.raises(ValueError, match="every reward weight is 0"):
        GRPOModule(policy=policy, rewards=[RewardSpec("numeric_correctness", 0.0)], online_rm=zero)


# ------------------------------------------------------------------------------------------------ the composer
def tiny_composer(**overrides) -> OnlineRMComposer:
    settings = dict(model=models.ModelSpec("tiny", lora=None, seed=1), update_every=2, lr=1e-2, batch_size=4,
                    replay_fraction=0.2, buffer_size=100, max_length=64, device="cpu")  # fmt: skip
    return OnlineRMComposer([RewardSpec("numeric_correctness", 0.0)], OnlineRMSettings(**{**settings, **overrides}))


def fixed_batch(step: int):
    """Two prompts x three completions; labels [1, 0, 0, 1, 0, 1] (the verifier: the last number vs the answer)."""
    a, b = 10 + step, 20 + step
    prompts = [f"What is {a} + 3?", f"What is {b} + 4?"]
    completions = [f"The answer is {a + 3}.", f"The answer is {a + 4}.", "I do not know 7.",
                   f"The answer is {b + 4}.", "The answer is 1.", f"So {b} + 4 = {b + 4}."]  # fmt: skip
    rollout = SimpleNamespace(prompts=prompts, completions=completions, prompt_index=torch.tensor([0, 0, 0, 1, 1, 1]))
    return rollout, {"answer": [a + 3, b + 4]}, torch.tensor([1.0, 0, 0, 1, 0, 1])


def score_and_observe(composer: OnlineRMComposer, step: int):
    rollout, extras, labels = fixed_batch(step)
    prompts = [rollout.prompts[i] for i in rollout.prompt_index.tolist()]
    answers = [extras["answer"][i] for i in rollout.prompt_index.tolist()]
    scores = composer(prompts, rollout.completions, {"answer": answers})
    return scores, composer.observe(rollout, scores, extras), labels


def weights(composer: OnlineRMComposer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in composer.model.state_dict().items()}


def test_the_rm_scores_learns_only_at_update_steps_with_its_replay_share_and_metrics_from_before_the_update():
    """update_every=2, replay 0.2: steps 1 and 3 leave the weights alone, steps 2 and 4 change them. The update of
    step 2 trains on the 12 examples of steps 1-2 (no history yet); that of step 4 on the 12 of steps 3-4 plus
    round(0.2 * 12 / 0.8) = 3 drawn from steps 1-2. Each step's accuracy/pair accuracy equal the hand computation on
    the scores the completions were rewarded with (before that step's update), and the total reward is the RM score
    (the rule reward has weight 0)."""
    composer = tiny_composer()
    trained: list[list[list[int]]] = []
    losses: list[float | None] = []
    real_logits = composer.logits
    composer.logits = lambda rows: (trained[-1].extend(rows), real_logits(rows))[1]
    encoded: dict[int, list[list[int]]] = {}
    for step in (1, 2, 3, 4):
        before = weights(composer)
        trained.append([])
        scores, stats, labels = score_and_observe(composer, step)
        rollout, _, _ = fixed_batch(step)
        prompts = [rollout.prompts[i] for i in rollout.prompt_index.tolist()]
        encoded[step] = composer.encode(prompts, rollout.completions)
        rm = scores.per_function[KEY]
        assert torch.equal(scores.total, rm)
        agree = sum(int((s > 0) == (y == 1)) for s, y in zip(rm.tolist(), labels.tolist()))
        assert stats["online_rm/accuracy"] == pytest.approx(agree / 6)
        pairs = [(i, j) for i in range(6) for j in range(6) if i // 3 == j // 3 and labels[i] == 1 and labels[j] == 0]
        wins = [1.0 if rm[i] > rm[j] else 0.5 if rm[i] == rm[j] else 0.0 for i, j in pairs]
        assert stats["online_rm/pair_accuracy"] == pytest.approx(sum(wins) / len(wins))
        assert stats["online_rm/positive_frac"] == pytest.approx(0.5)
        changed = any(not torch.equal(before[k], v) for k, v in weights(composer).items())
        assert changed == (step % 2 == 0), step
        losses.append(stats.get("online_rm/loss"))
        assert stats["online_rm/updates"] == step // 2
        assert stats["online_rm/buffer_size"] == 12 * (step // 2)
        if step % 2 == 0:  # the scores of the same batch after the update differ: the metrics came from before
            after = composer.scorer.score_ids(encoded[step])
            assert not torch.allclose(after, rm)
    assert len(trained[1]) == 12 and sorted(trained[1]) == sorted(encoded[1] + encoded[2])
    assert trained[0] == trained[2] == []
    assert losses[0] is None and losses[1] == losses[2] != losses[3]  # the latest update's loss, from the first on
    fresh, older = encoded[3] + encoded[4], encoded[1] + encoded[2]
    assert len(trained[3]) == 15
    assert sum(r in fresh for r in trained[3]) == 12 and sum(r in older for r in trained[3]) == 3


def test_a_frozen_rm_logs_its_accuracy_and_never_changes():
    composer = tiny_composer(update_every=0)
    before = weights(composer)
    for step in (1, 2):
        _, stats, _ = score_and_observe(composer, step)
        assert "online_rm/accuracy" in stats and "online_rm/loss" not in stats
    assert all(torch.equal(before[k], v) for k, v in weights(composer).items()) and composer.pending == []


def test_state_roundtrip_continues_exactly():
    """After 3 steps (one update, 6 examples pending), the state through torch.save/load into a fresh composer:
    step 4 (an update with replay draws) gives the same metrics and weights as the original."""
    a, b = tiny_composer(), tiny_composer(seed=5)
    for step in (1, 2, 3):
        score_and_observe(a, step)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    (_, stats_a, _), (_, stats_b, _) = score_and_observe(a, 4), score_and_observe(b, 4)
    assert stats_a == stats_b and "online_rm/loss" in stats_a
    assert all(torch.equal(v, weights(b)[k]) for k, v in weights(a).items())
    with pytest.raises(ValueError, match="do not match"):
        tiny_composer(model=models.ModelSpec("tiny", lora=models.LoRASettings(), seed=1)).load_state_dict(
            a.state_dict()
        )


# ------------------------------------------------------------------------------------------------ GRPO end to end
def assert_resumed_equals_uninterrupted(full: dict, resumed: dict, keys: list[str], tmp_path: Path) -> None:
    """The resumed run (``tmp_path/resumed``, from the step-2 checkpoint) logs the uninterrupted run's (``tmp_path/
    full``) steps 3-4 with the same ``keys``, and exports the same online RM weights."""
    from transformers import AutoModelForSequenceClassification

    assert sorted(resumed) == sorted(full)[2:]
    for step in resumed:
        for key in keys:
            if key in full[step]:
                assert resumed[step][key] == pytest.approx(full[step][key], abs=1e-6), (step, key)
    a, b = (AutoModelForSequenceClassification.from_pretrained(tmp_path / run / "export/online_rm/merged").state_dict()
            for run in ("full", "resumed"))  # fmt: skip
    assert all(torch.allclose(v, b[k], atol=1e-6) for k, v in a.items())


def grpo_run(out: Path, *extra: str) -> dict[int, dict[str, float]]:
    from lit_rlhf.experiments.grpo import main

    args = ["--config", TINY, "--output_dir", str(out), "--trainer.enable_progress_bar=false", "--wandb.mode=disabled"]
    main(args=[*args, "--checkpoint_every_n_steps=1", "--validate_before_fit=false", *extra])
    return step_metrics(out)


@pytest.mark.slow
def test_grpo_with_an_online_rm_end_to_end_and_resumed_equals_uninterrupted(tmp_path):
    """tiny-online-rm.yaml (4 steps, RM updates at steps 2 and 4): the RM's metrics every step, the latest update's
    loss from step 2 on, every metric documented; the export holds the RM (a sequence classifier) and its 48 labelled
    examples. Resumed from the step-2 checkpoint, steps 3-4 equal the uninterrupted run's (policy and RM metrics, the
    RM's exported weights): the RM's weights, AdamW state, buffers and replay generator are restored."""
    from transformers import AutoModelForSequenceClassification

    full = grpo_run(tmp_path / "full")
    train = {s: m for s, m in full.items() if "train/loss" in m}
    assert len(train) == 4
    for m in train.values():
        assert 0 <= m["train/online_rm/accuracy"] <= 1 and math.isfinite(m["train/rewards/online_rm/mean"])
    losses = [m.get("train/online_rm/loss") for _, m in sorted(train.items())]
    assert losses[0] is None and losses[1] == losses[2] != losses[3]  # the latest update's, from the first on
    assert [m["train/online_rm/updates"] for _, m in sorted(train.items())] == [0, 1, 1, 2]
    assert undocumented({k for m in full.values() for k in m}) == []
    export = tmp_path / "full" / "export" / "online_rm"
    assert AutoModelForSequenceClassification.from_pretrained(export / "merged").config.num_labels == 1
    assert len((export / "replay.jsonl").read_text().splitlines()) == 4 * 3 * 4  # steps x prompts x completions

    resumed = grpo_run(tmp_path / "resumed", "--ckpt_path", str(tmp_path / "full" / "checkpoints" / "step=2.ckpt"))
    later = {s: m for s, m in resumed.items() if "train/loss" in m}
    keys = ["train/loss", "train/rewards/mean", "train/kl", "train/online_rm/accuracy", "train/online_rm/loss",
            "train/online_rm/buffer_size", "train/rewards/online_rm/mean"]  # fmt: skip
    assert_resumed_equals_uninterrupted(train, later, keys, tmp_path)


# ------------------------------------------------------------------------------------------------ PPO end to end
def ppo_run(out: Path, *extra: str) -> dict[int, dict[str, float]]:
    from lit_rlhf.experiments.ppo import main

    config = str(ROOT / "experiments" / "ppo" / "tiny-online-rm.yaml")
    args = ["--config", config, "--output_dir", str(out), "--wandb.mode=disabled", "--checkpoint_every_n_steps=1"]
    main(args=[*args, "--validate_before_fit=false", *extra])
    return step_metrics(out)


@pytest.mark.slow
def test_ppo_with_an_online_rm_end_to_end_and_resumed_equals_uninterrupted(tmp_path):
    """PPO's tiny-online-rm.yaml (4 iterations of 4 completions, RM updates at 2 and 4): the RM is the whole reward
    (the rule is logged at weight 0), its metrics every iteration, every metric documented; the export holds the RM and
    its labelled examples; resumed from the iteration-2 checkpoint, iterations 3-4 and the RM equal the uninterrupted
    run's. A frozen RM (update_every 0) logs the same first-iteration accuracy and exports no update."""
    from transformers import AutoModelForSequenceClassification

    full = ppo_run(tmp_path / "full")
    train = {s: m for s, m in sorted(full.items()) if "train/rewards/mean" in m}
    assert len(train) == 4
    for m in train.values():  # the total reward is the RM's score: weight 1 x logit + 0 x rule
        assert m["train/rewards/mean"] == pytest.approx(m["train/rewards/online_rm/mean"], abs=1e-5)
        assert 0 <= m["train/online_rm/accuracy"] <= 1
    assert [m["train/online_rm/updates"] for m in train.values()] == [0, 1, 1, 2]
    assert undocumented({k for m in full.values() for k in m}) == []
    export = tmp_path / "full" / "export" / "online_rm"
    assert AutoModelForSequenceClassification.from_pretrained(export / "merged").config.num_labels == 1
    examples = len((export / "replay.jsonl").read_text().splitlines())
    assert 0 < examples <= 4 * 4  # iterations x completions, the ungradable ones left out

    resumed = ppo_run(tmp_path / "resumed", "--ckpt_path", str(tmp_path / "full" / "checkpoints" / "step=2.ckpt"))
    later = {s: m for s, m in resumed.items() if "train/rewards/mean" in m}
    keys = ["train/rewards/mean", "train/kl", "train/online_rm/accuracy", "train/online_rm/loss", "train/value_loss",
            "train/online_rm/buffer_size"]  # fmt: skip
    assert_resumed_equals_uninterrupted(train, later, keys, tmp_path)
    a = AutoModelForSequenceClassification.from_pretrained(export / "merged").state_dict()

    frozen = ppo_run(tmp_path / "frozen", "--model.online_rm.update_every=0", "--trainer.max_steps=2")
    first = {s: m for s, m in sorted(frozen.items()) if "train/rewards/mean" in m}
    assert [m["train/online_rm/updates"] for m in first.values()] == [0, 0]
    step1 = min(first)
    assert first[step1]["train/online_rm/accuracy"] == pytest.approx(train[step1]["train/online_rm/accuracy"])
    c = AutoModelForSequenceClassification.from_pretrained(tmp_path / "frozen/export/online_rm/merged").state_dict()
    assert not all(torch.allclose(v, c[k], atol=1e-6) for k, v in a.items())  # the updated RM moved, the frozen not


# ------------------------------------------------------------------------------------------------ iterative RL
def test_iterations_expand_into_steps_that_carry_the_previous_iteration(tmp_path, monkeypatch):
    grpo_config = "experiments/grpo/tiny-online-rm.yaml"
    raw = {"name": "it", "steps": [
        {"name": "sft", "stage": "sft", "config": "experiments/sft/tiny.yaml"},
        {"name": "rm", "stage": "rm", "config": "experiments/rm/tiny.yaml", "inputs": {"model.backbone.name": "sft"}},
        {"name": "grpo", "stage": "grpo", "config": grpo_config, "iterations": 3,
         "inputs": {"model.policy.name": "sft", "model.online_rm.model.name": "rm"},
         "overrides": {"trainer.max_steps": 5},
         "carry": {"model.policy.name": "export/merged", "model.online_rm.model.name": "export/online_rm/merged"}},
        {"name": "after", "stage": "rm", "config": "experiments/rm/tiny.yaml",
         "inputs": {"model.backbone.name": "grpo"}},
    ]}  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(ROOT)  # config paths are relative to the working directory
    spec = pipeline.load_pipeline(path)
    assert [s.name for s in spec.steps] == ["sft", "rm", "grpo-1", "grpo-2", "grpo-3", "after"]
    g1, g2, g3 = spec.steps[2:5]
    assert g1.inputs == {"model.policy.name": "sft", "model.online_rm.model.name": "rm"}
    assert g3.inputs == {"model.policy.name": "grpo-2:export/merged",
                         "model.online_rm.model.name": "grpo-2:export/online_rm/merged"}  # fmt: skip
    assert g2.overrides == g3.overrides == {"trainer.max_steps": 5} and g2.iterations == 1
    assert spec.steps[-1].inputs == {"model.backbone.name": "grpo-3:export/merged"}
    args = pipeline.step_args(spec, g2, Path("R"), "r")
    assert "--model.online_rm.model.name=R/grpo-1/export/online_rm/merged" in args
    assert "--model.policy.name=R/grpo-1/export/merged" in args
    assert "--model.backbone.name=R/grpo-3/export/merged" in pipeline.step_args(spec, spec.steps[-1], Path("R"), "r")
    default = pipeline.expand_iterations([pipeline.Step("g", "grpo", grpo_config, iterations=2)])
    assert default[1].inputs == {"model.policy.name": "g-1:export/merged"}
    for bad in (0, "2", True):
        raw["steps"][2]["iterations"] = bad
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
            pipeline.load_pipeline(path)


@pytest.mark.slow
def test_a_two_iteration_pipeline_starts_the_second_from_the_first(tmp_path, monkeypatch):
    """experiments/pipeline/grpo-online-iterative-tiny.yaml: grpo-2 runs with the policy, the RM and the replay
    examples of grpo-1's export; its reference is that policy (the KL of its first step, one pass before any update,
    is 0), and its RM starts with grpo-1's 24 labelled examples as history."""
    monkeypatch.chdir(ROOT)
    spec = pipeline.load_pipeline("experiments/pipeline/grpo-online-iterative-tiny.yaml")
    spec = pipeline.PipelineSpec(spec.name, spec.steps, str(tmp_path), spec.tags)
    assert pipeline.run(spec, "ci", in_process=True) == {"grpo-1": "ran", "grpo-2": "ran"}
    run = tmp_path / "ci"
    config = yaml.safe_load((run / "grpo-2" / "config.yaml").read_text())["model"]
    first = run / "grpo-1" / "export"
    assert config["policy"]["name"] == str(first / "merged")
    assert config["online_rm"]["model"]["name"] == str(first / "online_rm" / "merged")
    assert config["online_rm"]["replay_from"] == str(first / "online_rm" / "replay.jsonl")
    history = len((first / "online_rm" / "replay.jsonl").read_text().splitlines())
    assert history == 2 * 3 * 4
    steps = {s: m for s, m in step_metrics(run / "grpo-2").items() if "train/loss" in m}
    first_step = steps[min(steps)]
    assert first_step["train/kl"] == pytest.approx(0.0, abs=1e-7)  # the reference is grpo-1's policy
    assert first_step["train/online_rm/buffer_size"] == history  # no update yet: the carried history
    final = json.loads((run / "grpo-2" / "final_metrics.json").read_text())
    assert final["global_step"] == 2
