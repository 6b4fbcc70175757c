"""Process supervision (lit_rlhf.steps): step splitters, the rule step verifier on correct and corrupted worked
answers, step -> token mapping on the real tokenizer, the step-reward composer, GRPO+PS through the stage's wiring
(equal to GRPO+OS when every completion is one step) and a tiny GRPO+PS run through the entry point."""

import json
import math
import os
import random

import pytest
import torch

from lit_rlhf import models, objectives
from lit_rlhf.data.tasks import arithmetic_problems, worked_answer, worked_answer_reaching
from lit_rlhf.rewards import REWARD_FUNCTIONS, RewardSpec, numeric_closeness
from lit_rlhf.rollout import SamplingSettings, group_index
from lit_rlhf.stages.grpo import GRPOModule
from lit_rlhf.steps import (
    PROCESS_KEY,
    STEP_REWARDS,
    ProcessRewardComposer,
    arithmetic_steps,
    cap_steps,
    grpo_rewards,
    process_advantages,
    register_step_reward,
    resolve_step_reward,
    split_steps,
    step_token_ends,
)
from lit_rlhf.types import Rollout
from tests.test_report import undocumented

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PS = os.path.join(ROOT, "experiments", "grpo", "tiny-ps.yaml")
WORKED = "Ones: 7 + 8 = 15, write 5 carry 1. Tens: 4 + 3 + 1 = 8. The answer is 85."
PROMPT = "<|im_start|>user\nWhat is 47 + 38?<|im_end|>\n<|im_start|>assistant\n"


def texts(completion, splitter="auto"):
    return [completion[s:e] for s, e in split_steps(completion, splitter)]


# ------------------------------------------------------------------------------------------------ splitters
def test_worked_splitter_gives_the_three_sentences():
    assert split_steps(WORKED, "worked") == [(0, 34), (35, 55), (56, 73)]
    assert texts(WORKED) == ["Ones: 7 + 8 = 15, write 5 carry 1.", "Tens: 4 + 3 + 1 = 8.", "The answer is 85."]


def test_text_before_the_first_and_after_the_last_marker_joins_the_first_and_last_step():
    text = "Sure. Ones: 3 - 1 = 2.\nTens: 5 - 2 = 3. The answer is 32. Done\n"
    assert texts(text, "worked") == ["Sure. Ones: 3 - 1 = 2.", "Tens: 5 - 2 = 3.", "The answer is 32. Done"]


def test_newline_none_regex_and_blank():
    assert split_steps("a\n\n b \nc  ", "newline") == [(0, 1), (4, 5), (7, 8)]
    assert texts("step one\nstep two\n  tail", "newline") == ["step one", "step two", "tail"]
    assert texts(" one whole ", "none") == ["one whole"]
    assert texts("a; b;c", r";\s*") == ["a", "b", "c"]
    assert split_steps("", "newline") == [(0, 0)] and split_steps("  \n", "worked") == [(0, 3)]


def test_auto_is_worked_when_a_marker_occurs_else_newline():
    assert texts(WORKED, "auto") == texts(WORKED, "worked")
    assert texts("first\nsecond", "auto") == ["first", "second"]
    assert len(texts("Ones: 1 + 2 = 3.\nTens: 1 + 1 = 2.", "auto")) == 2  # worked wins over the newline


def test_cap_merges_the_steps_past_the_cap_into_the_last():
    spans = [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert cap_steps(spans, 2) == [(0, 1), (2, 7)] and cap_steps(spans, 4) == spans


# ------------------------------------------------------------------------------------------------ step verifier
def score(completion, prompt=PROMPT, answer=None):
    steps = [texts(completion)]
    return arithmetic_steps([prompt], [completion], steps, answer=None if answer is None else [answer])[0]


def test_every_step_of_every_worked_answer_is_correct():
    for question, x in arithmetic_problems(200, seed=3):
        a, op, b = question[len("What is ") : -1].split(" ")
        completion = worked_answer(int(a), op, int(b))
        prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        assert score(completion, prompt, x) == [1.0, 1.0, 1.0], completion
        assert score(completion, prompt) == [1.0, 1.0, 1.0]  # no answer column: A op B from the prompt


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Ones: 7 + 8 = 15, write 5 carry 0. Tens: 4 + 3 + 1 = 8. The answer is 85.", [0.0, 1.0, 1.0]),  # carry
        ("Ones: 7 + 8 = 15. Tens: 4 + 3 = 7. The answer is 75.", [0.0, 0.0, 0.0]),  # carry dropped throughout
        ("Ones: 7 + 8 = 14, write 4 carry 1. Tens: 4 + 3 + 1 = 8. The answer is 84.", [0.0, 1.0, 0.0]),  # sum
        ("Ones: 7 + 8 = 15, write 5 carry 1. Tens: 4 + 3 + 1 = 9. The answer is 95.", [1.0, 0.0, 0.0]),  # tens
        ("Ones: 7 + 8 = 15, write 5 carry 1. Tens: 4 + 3 + 1 = 8. The answer is 86.", [1.0, 1.0, 0.0]),  # final
        ("Ones: 8 + 7 = 15, write 5 carry 1. Tens: 4 + 3 + 1 = 8. The answer is 85.", [0.0, 1.0, 1.0]),  # operands
        ("Ones:7+8=15,  write 5 carry 1 Tens: 4 + 3 + 1 = 8. The answer is 85", [1.0, 1.0, 1.0]),  # spacing, periods
        ("The answer is 85.", [1.0]),
        ("Ones: 7 + 8 = 15, write 5 carry 1. Ones: 7 + 8 = 15, write 5 carry 1. The answer is 85.", [1.0, 0.0, 1.0]),
        ("I think\nit is 85", [0.0, 0.0]),  # no worked step: newline steps of no known kind
    ],
)
def test_corrupted_steps_are_flagged(completion, expected):
    assert score(completion, answer=85) == expected


def test_subtraction_borrow_and_the_answer_column():
    prompt = PROMPT.replace("47 + 38", "83 - 47")
    assert score("Ones: 3 < 7, borrow: 13 - 7 = 6. Tens: 8 - 1 - 4 = 3. The answer is 36.", prompt) == [1.0] * 3
    assert score("Ones: 3 - 7 = 6. Tens: 8 - 4 = 4. The answer is 46.", prompt) == [0.0] * 3  # borrow missed
    assert score("Ones: 3 < 7, borrow: 13 - 7 = 6. Tens: 8 - 1 - 4 = 3. The answer is 36.", prompt, 37)[2] == 0.0


def test_worked_answers_reaching_a_wrong_result_fail_a_step():
    rng = random.Random(0)
    for question, x in arithmetic_problems(100, seed=5):
        a, op, b = question[len("What is ") : -1].split(" ")
        y = x + rng.choice([-3, -1, 1, 2, 10])
        if y < 0 or y == x:
            continue
        prompt = f"<|im_start|>user\n{question}<|im_end|>\n"
        scores = score(worked_answer_reaching(int(a), op, int(b), y), prompt, x)
        assert scores[-1] == 0.0 and 0.0 in scores[:-1], (question, y, scores)


def test_a_prompt_without_a_problem_leaves_every_step_unscored():
    assert score(WORKED, "Tell me a story.") == [None, None, None]


# ------------------------------------------------------------------------------------------------ token mapping
@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny")


def encoded(tokenizer, completions, eos=True, pad_to=None):
    end = [tokenizer.eos_token_id] if eos else []
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + end for c in completions]
    width = pad_to or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def test_step_ends_fall_on_each_steps_last_token_and_the_last_on_eos(tokenizer):
    completions = [WORKED, "first line\nsecond one\nthird"]
    ids, mask = encoded(tokenizer, completions, pad_to=50)
    decoded = tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(ids, mask)], skip_special_tokens=True)
    assert decoded == completions
    spans = [split_steps(c) for c in decoded]
    scores = [[1.0, 0.0, 1.0], [0.5, None, 0.25]]
    ends, rewards = step_token_ends(tokenizer, ids, mask, spans, scores)
    assert ends.shape == rewards.shape == (2, 50) and ends.dtype == torch.bool
    for i, row_spans in enumerate(spans):
        marked = ends[i].nonzero().squeeze(-1).tolist()
        last = int(mask[i].sum()) - 1
        assert marked[-1] == last  # the last step ends on the EOS token
        for t, k in zip(marked[:-1], [k for k, v in enumerate(scores[i]) if v is not None][:-1]):
            prefix = tokenizer.decode(ids[i, : t + 1].tolist(), skip_special_tokens=True)
            shorter = tokenizer.decode(ids[i, :t].tolist(), skip_special_tokens=True)
            end = row_spans[k][1]
            assert len(prefix) >= end > len(shorter)  # token t holds the step's last character
        assert rewards[i, marked].tolist() == [v for v in scores[i] if v is not None]
    assert len(ends[0].nonzero()) == 3 and len(ends[1].nonzero()) == 2  # the unscored step is not marked
    assert tokenizer.decode(ids[0, : ends[0].nonzero()[0] + 1]).endswith("carry 1.")
    assert tokenizer.decode(ids[0, : ends[0].nonzero()[1] + 1]).endswith("= 8.")


def test_two_steps_on_one_token_count_once_with_the_smaller_reward(tokenizer):
    ids, mask = encoded(tokenizer, ["Hello world"], eos=False)
    assert int(mask.sum()) == 2  # "Hello", " world"
    ends, rewards = step_token_ends(tokenizer, ids, mask, [[(0, 2), (2, 5), (6, 11)]], [[0.75, 0.25, 1.0]])
    assert ends[0].tolist() == [True, True] and rewards[0].tolist() == [0.25, 1.0]


def test_process_advantages_leave_groups_without_two_scored_steps_at_zero():
    ends = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0], [0, 0, 1]]).bool()
    values = torch.tensor([[0, 1.0, 0.0], [0, 0, 1.0], [0, 0, 0], [0, 0, 1.0]])
    mask = torch.ones(4, 3)
    adv, stats = process_advantages(values, ends, mask, group_size=2)
    assert adv[2:].abs().sum() == 0  # group 2 has one scored step: no std
    assert adv[:2].abs().sum() > 0 and stats["steps/per_completion"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ composer
def length_parity(prompts, completions, steps):
    """1.0 for a step of even length, 0.0 for an odd one: varies on random text (the tiny model's)."""
    return [[float(len(s) % 2 == 0) for s in row] for row in steps]


def process(prompts, completions):
    """An outcome reward whose name clashes with the step rewards' entry."""
    return [0.0] * len(completions)


def outcome_as_one_step(prompts, completions, steps, answer):
    """numeric_closeness of the completion, as the score of its one step."""
    return [[v] for v in numeric_closeness(prompts, completions, answer)]


def test_composer_sums_weighted_step_rewards_and_pads_with_nan():
    def half(prompts, completions, steps):
        return [[0.5 if k == 0 else None for k in range(len(row))] for row in steps]

    STEP_REWARDS["test_half_first"] = half
    try:
        composer = ProcessRewardComposer(
            [RewardSpec("numeric_correctness")],
            [RewardSpec("arithmetic_steps", 2.0), RewardSpec("test_half_first", -1.0)],
            splitter="worked",
            max_steps=5,
        )
        wrong = WORKED.replace("= 8.", "= 9.")
        result = composer([PROMPT, PROMPT], [WORKED, wrong], {"answer": [85, 85]})
    finally:
        del STEP_REWARDS["test_half_first"]
    process = result.per_function[PROCESS_KEY]
    assert process.shape == (2, 5) and result.total.tolist() == [1.0, 1.0]  # the wrong tens step: right answer
    assert process[0, :3].tolist() == [1.5, 2.0, 2.0] and process[1, :3].tolist() == [1.5, 0.0, 2.0]
    assert torch.isnan(process[:, 3:]).all()


def test_register_step_reward_refuses_a_second_function_under_one_name():
    def first(prompts, completions, steps):
        return [[1.0] * len(row) for row in steps]

    def second(prompts, completions, steps):
        return [[0.0] * len(row) for row in steps]

    try:
        assert register_step_reward("test_twice")(first) is first and STEP_REWARDS["test_twice"] is first
        register_step_reward("test_twice")(first)  # the same function again: fine
        with pytest.raises(ValueError, match="already registered"):
            register_step_reward("test_twice")(second)
    finally:
        STEP_REWARDS.pop("test_twice", None)


def test_step_rewards_resolve_by_name_including_the_prm_registered_elsewhere():
    assert resolve_step_reward("arithmetic_steps") is arithmetic_steps
    assert resolve_step_reward("tests.test_steps:length_parity").__name__ == "length_parity"
    assert resolve_step_reward("prm").__module__ == "lit_rlhf.process_rewards"


def test_bad_step_rewards_and_settings_are_refused():
    def short(prompts, completions, steps):
        return [[1.0] for _ in steps]

    STEP_REWARDS["test_short"] = short
    try:
        composer = ProcessRewardComposer([RewardSpec("numeric_correctness")], [RewardSpec("test_short")], "worked")
        with pytest.raises(ValueError, match="test_short"):
            composer([PROMPT], [WORKED], {"answer": [85]})
    finally:
        del STEP_REWARDS["test_short"]
    with pytest.raises(ValueError, match="step_splitter"):
        ProcessRewardComposer([RewardSpec("numeric_correctness")], [RewardSpec("arithmetic_steps")], "([")
    REWARD_FUNCTIONS[PROCESS_KEY] = process
    try:
        with pytest.raises(ValueError, match="clash"):
            ProcessRewardComposer([RewardSpec(PROCESS_KEY)], [RewardSpec("arithmetic_steps")])
    finally:
        del REWARD_FUNCTIONS[PROCESS_KEY]
    with pytest.raises(ValueError, match="unknown step reward"):
        ProcessRewardComposer([RewardSpec("numeric_correctness")], [RewardSpec("no_such_step_reward")])
    with pytest.raises(ValueError, match="advantage_estimator=process"):
        grpo_rewards(None, [RewardSpec("arithmetic_steps")], "auto", "group", SamplingSettings())
    with pytest.raises(ValueError, match="process"):
        objectives.ObjectiveSettings(advantage_estimator="process", kl_placement="reward", beta=0.1)


# ------------------------------------------------------------------------------------------------ GRPO wiring
def hand_rollout(tokenizer, prompts, completions, group_size):
    ids, mask = encoded(tokenizer, completions)
    prompt_ids, prompt_mask = encoded(tokenizer, prompts, eos=False)
    index, truncated = group_index(len(prompts), group_size), torch.zeros(len(ids), dtype=torch.bool)
    rollout = Rollout(prompt_ids, prompt_mask, ids, mask, index, truncated)
    rollout.prompts, rollout.completions = prompts, completions
    return rollout


def test_grpo_ps_with_one_step_per_completion_is_grpo_os_on_every_token(tokenizer):
    """Through the stage: the same rollout scored and given advantages by a GRPO+OS module (numeric_closeness,
    group advantages) and a GRPO+PS module whose one step per completion (splitter none) scores numeric_closeness."""
    prompts = [PROMPT, PROMPT.replace("47 + 38", "83 - 47")]
    completions = [WORKED, "The answer is 80.", "Ones: 7 + 8 = 15. The answer is 75.", "no idea",
                   "The answer is 36.", "The answer is 30.", "Tens: 8 - 4 = 4.\nThe answer is 46.", "36"]  # fmt: skip
    extras = {"answer": [85, 36]}
    rewards = [RewardSpec("numeric_closeness")]
    common = dict(policy=models.ModelSpec(name="tiny", lora=None), rewards=rewards, num_generations=4)
    os_module = GRPOModule(**common)
    ps_module = GRPOModule(
        **common,
        advantage_estimator="process",
        process_rewards=[RewardSpec("tests.test_steps:outcome_as_one_step")],
        step_splitter="none",
    )
    rollout = hand_rollout(tokenizer, prompts, completions, 4)
    os_scores, ps_scores = os_module.score(rollout, extras), ps_module.score(rollout, extras)
    os_adv, _ = os_module.advantages(rollout, os_scores, None, None)
    ps_adv, stats = ps_module.advantages(rollout, ps_scores, None, None)
    assert os_adv.shape == (8,) and ps_adv.shape == rollout.response_ids.shape
    expected = os_adv[:, None] * rollout.response_mask
    torch.testing.assert_close(ps_adv, expected.to(ps_adv.dtype))
    assert stats["steps/per_completion"] == 1.0 and os_adv.abs().sum() > 0


def test_grpo_ps_on_worked_answers_through_the_stage_is_the_papers_formula(tokenizer):
    """The rule verifier through the stage, by hand: step rewards (1, 1, 1), (1, 0, 0), (1, 1, 1), (0) in one group;
    mean 0.7, unbiased std sqrt(2.1 / 9), so r~ = 0.3 / std for a right step and -0.7 / std for a wrong one. Token
    advantages sum r~ over the steps ending at or after them: the completion with the wrong tens step has
    (0.3 - 0.7 - 0.7) / std on its ones step, (-0.7 - 0.7) / std on its tens step and -0.7 / std on its answer, so
    the right step before the mistake keeps a higher advantage than the wrong one; the right completion has 0.9, 0.6,
    0.3 (/ std) and the one-step wrong answer -0.7 / std on every token."""
    wrong = WORKED.replace("4 + 3 + 1 = 8. The answer is 85", "4 + 3 + 1 = 9. The answer is 95")
    completions = [WORKED, wrong, WORKED, "The answer is 80."]
    module = GRPOModule(
        policy=models.ModelSpec(name="tiny", lora=None), num_generations=4, advantage_estimator="process"
    )
    rollout = hand_rollout(tokenizer, [PROMPT], completions, 4)
    scores = module.score(rollout, {"answer": [85]})
    assert scores.per_function[PROCESS_KEY][:, :3].tolist()[:2] == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    adv, _ = module.advantages(rollout, scores, None, None)
    std = math.sqrt(2.1 / 9) + 1e-4

    def segments(i):
        row = adv[i][rollout.response_mask[i].bool()].tolist()
        return [v for k, v in enumerate(row) if k == 0 or v != row[k - 1]]

    assert segments(0) == pytest.approx([0.9 / std, 0.6 / std, 0.3 / std], rel=1e-5)
    assert segments(1) == pytest.approx([-1.1 / std, -1.4 / std, -0.7 / std], rel=1e-5)
    assert segments(3) == pytest.approx([-0.7 / std], rel=1e-5)
    row = adv[1].tolist()
    tens_start = row.index(segments(1)[1])
    assert tokenizer.decode(rollout.response_ids[1, :tens_start].tolist()).endswith("carry 1.")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_grpo_ps_run_end_to_end(tmp_path, monkeypatch):
    """The entry point with advantage_estimator=process on the tiny model, word steps scored by their length's
    parity: finite loss, per-token advantages that vary within a completion, step metrics logged and documented."""
    from lit_rlhf.experiments.grpo import main

    seen = []
    original = objectives.GRPOObjective.advantages

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append((out[0].detach().clone(), args[1].detach().clone()))
        return out

    monkeypatch.setattr(objectives.GRPOObjective, "advantages", spy)
    steps = ['--model.process_rewards=[{"name": "tests.test_steps:length_parity"}]', r"--model.step_splitter=\s+"]
    args = ["--config", TINY_PS, "--output_dir", str(tmp_path), "--trainer.enable_progress_bar=false", "--export=false"]
    main(args=args + steps)
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    metrics = {**summary["train_last"], **summary["end"]}
    assert math.isfinite(metrics["train/loss"])
    for key in ["train/steps/per_completion", "train/rewards/process/mean"]:
        assert key in metrics
    assert metrics["train/steps/per_completion"] > 1
    assert undocumented(metrics) == []
    assert len(seen) == 2
    varied = 0
    for adv, mask in seen:
        assert adv.shape == mask.shape and torch.isfinite(adv).all()
        varied += sum(len(set(a[m.bool()].tolist())) > 1 for a, m in zip(adv, mask))
    assert varied > 0
