"""Reward registry, built-in verifiers, composer (weights, None/NaN as "no reward", ±inf and other errors), the
statistics over scored samples, and the model-based reward."""

from __future__ import annotations

import math

import pytest
import torch

from lit_rlhf import rewards as R
from lit_rlhf.rewards import (
    REWARD_FUNCTIONS,
    RewardComposer,
    RewardFunctionError,
    RewardSpec,
    add_rewards,
    answer_value,
    check_reward_weights,
    extract_hash_answer,
    extract_xml_answer,
    grade,
    is_correct,
    parse_number,
    predicted_value,
    resolve_reward,
    reward_stats,
    scored_mean,
    validation_means,
)

GOOD = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>\n"


def my_reward(prompts, completions, answer):
    """Test-module reward resolved through its import path: 1.0 when the completion mentions the answer."""
    return [1.0 if str(a) in c else 0.0 for c, a in zip(completions, answer)]


def _one(name, completion, **columns):
    return REWARD_FUNCTIONS[name](["p"], [completion], **{k: [v] for k, v in columns.items()})[0]


# --------------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>\n 42 \n</answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>\n7", "7"),  # unclosed tag: the rest of the text
        ("no tags, 42", None),
        ("<answer></answer>", ""),
    ],
)
def test_extract_xml_answer(text, expected):
    assert extract_xml_answer(text) == expected


def test_extract_hash_answer():
    assert extract_hash_answer("48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert extract_hash_answer("####  1,000 ") == "1,000"
    assert extract_hash_answer("no marker 72") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,234.5.", 1234.5),
        ("from 3 to -12", -12.0),
        ("x-3", 3.0),  # a minus after a word character is subtraction, not a sign
        ("5 - 3 = 2", 2.0),
        ("total: 1,000,000 dollars", 1e6),
        ("72.", 72.0),
        ("(-4)", -4.0),
        ("no digits here", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


# ------------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("so the answer is 72", 72, 1.0),
        ("so the answer is 72.0", "72", 1.0),
        ("it is 72 ... no, 73", 72, 0.0),  # last number counts
        ("<answer>72</answer> and 5 more words", 72, 1.0),  # tagged answer wins over the last number
        ("<answer>\n 1,234 \n</answer>", 1234, 1.0),
        ("<answer>-5</answer>", -5, 1.0),
        ("<answer>-5</answer>", 5, 0.0),
        ("answer: 72", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),
        ("answer: 24", "Natalia sold 48/2 = 24 clips.\n#### 72", 0.0),
        ("<answer>seventy-two</answer> 72", 72, 0.0),  # tag present but no number in it
        ("no number at all", 72, 0.0),
        ("0.5", 0.5, 1.0),
        ("0.5000001", 0.5, 0.0),
    ],
)
def test_numeric_correctness(completion, answer, expected):
    assert _one("numeric_correctness", completion, answer=answer) == expected


@pytest.mark.parametrize("answer", ["not a number", None, True, ["72"]])
def test_numeric_correctness_non_numeric_answer_is_none(answer):
    assert _one("numeric_correctness", "72", answer=answer) is None


def test_numeric_correctness_tensor_answer():
    assert _one("numeric_correctness", "72", answer=torch.tensor(72)) == 1.0


def test_numeric_tolerance():
    fn = REWARD_FUNCTIONS["numeric_tolerance"]
    comps = ["3.1415", "3.14", "3.2", "1e", "100.9"]
    answers = [3.1415, 3.14159, 3.14159, 1, 100]
    assert fn(["p"] * 5, comps, answers) == [1.0, 0.0, 0.0, 1.0, 0.0]  # "1e" -> 1
    assert fn(["p"] * 5, comps, answers, tolerance=0.01) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert fn(["p"] * 5, comps, answers, rel_tolerance=0.01) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert fn(["p"], ["x"], ["n/a"]) == [None]


def test_numeric_closeness():
    fn = REWARD_FUNCTIONS["numeric_closeness"]
    comps = ["The answer is 68.", "71", "<answer>58</answer> not 68", "no number", "  ", "68"]
    answers = [68, 68, 68, 68, 68, "n/a"]
    got = fn(["p"] * 6, comps, answers)
    assert got[:2] == [1.0, pytest.approx(math.exp(-0.3))]  # exact -> 1; |71 - 68| = 3 -> e^(-3/10)
    assert got[2] == pytest.approx(math.exp(-1.0))  # the <answer> tag wins over the last number
    assert got[3:] == [0.0, 0.0, None]  # no number (incl. whitespace only); non-numeric answer
    assert fn(["p"], ["70"], [68], scale=2.0) == [pytest.approx(math.exp(-1.0))]
    with pytest.raises(ValueError, match="scale"):
        fn(["p"], ["70"], [68], scale=0.0)


# ------------------------------------------------------------------------------------------- the one verifier
@pytest.mark.parametrize(
    "answer, value",
    [
        (72, 72),
        (2.5, 2.5),
        (72.0, 72.0),
        ("72", 72),
        ("Natalia sold 24 clips.\n#### 72", 72),
        ("#### 1,234", 1234),
        ("-3.5", -3.5),
        (torch.tensor(7), 7),
        (torch.tensor(0.5), 0.5),
        ("no number", None),
        (None, None),
        (True, None),
        (["72"], None),
        ("#### ", None),
    ],
)
def test_answer_value(answer, value):
    """GSM8K: the number after the last '####'; other strings: their last number; numbers (and 0-d tensors) as they
    are, integral ones as int; anything else: None."""
    got = answer_value(answer)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "completion, value",
    [
        ("The answer is 85.", 85.0),
        ("82 + 18 = 100\n\n", 100.0),
        ("5-3", 3.0),
        ("1,2", 2.0),
        ("<answer>7</answer> 9", 7.0),
        ("<answer>none</answer> 9", None),
        ("", None),
    ],
)
def test_predicted_value(completion, value):
    """The last number of the <answer> tag, else of the text; "5-3" reads 3 (a minus after a word character or digit is
    subtraction) and "1,2" reads 2 (commas group thousands only in threes)."""
    assert predicted_value(completion) == value


def test_is_correct_and_grade_are_the_one_rule():
    """is_correct: exact by default, tolerances as in numeric_tolerance, None (ungraded) without a numeric answer;
    grade: the graded pairs only; numeric_correctness is is_correct as 0/1/None."""
    assert is_correct("it is 72", "#### 72") is True and is_correct("it is 73", 72) is False
    assert is_correct("it is 72", None) is None and is_correct("no number", 72) is False
    assert is_correct("3.14", 3.14159, tolerance=0.01) is True and is_correct("101", 100, rel_tolerance=0.001) is False
    completions, answers = ["72", "5", "no", "9"], [72, 6, 1, None]
    assert grade(completions, answers) == [True, False, False]
    assert REWARD_FUNCTIONS["numeric_correctness"](["p"] * 4, completions, answers) == [1.0, 0.0, 0.0, None]
    with pytest.raises(ValueError):
        grade(["72"], [72, 5])  # misaligned columns are an error, not a silent truncation


def test_default_rewards_are_correctness_plus_half_closeness():
    assert [(s.name, s.weight) for s in R.DEFAULT_REWARDS] == [("numeric_correctness", 1.0), ("numeric_closeness", 0.5)]
    result = RewardComposer(R.DEFAULT_REWARDS)(["p", "p"], ["68", "71"], {"answer": [68, 68]})
    assert result.total.tolist() == pytest.approx([1.5, 0.5 * math.exp(-0.3)])


# ---------------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 0.5),
        ("<answer>\n72\n</answer>", 0.5),
        ("<answer> -1,000 </answer>", 0.5),
        ("72", 0.5),  # no tags: the whole stripped completion
        ("  72\n", 0.5),
        ("<answer>72.0</answer>", 0.0),
        ("<answer>72 apples</answer>", 0.0),
        ("the answer is 72", 0.0),
        ("<answer></answer>", 0.0),
    ],
)
def test_integer_answer(completion, expected):
    assert _one("integer_answer", completion) == expected


@pytest.mark.parametrize(
    "completion, strict, soft",
    [
        (GOOD, 0.5, 0.5),
        (GOOD.rstrip("\n"), 0.5, 0.5),  # final newline optional
        (GOOD + "extra", 0.0, 0.5),  # trailing text breaks strict only
        ("preamble\n" + GOOD, 0.0, 0.5),
        ("<reasoning>r</reasoning><answer>4</answer>", 0.0, 0.5),  # no newlines
        ("<reasoning>\nr\n</reasoning>\n\n<answer>\n4\n</answer>\n", 0.0, 0.5),  # extra blank line
        ("<reasoning>\n multi\nline \n</reasoning>\n<answer>\n4\n</answer>", 0.5, 0.5),
        ("<answer>\n4\n</answer>", 0.0, 0.0),  # missing reasoning
        ("<reasoning>\nr\n</reasoning>\n", 0.0, 0.0),  # missing answer
        ("<answer>4</answer><reasoning>r</reasoning>", 0.0, 0.0),  # wrong order
        ("", 0.0, 0.0),
    ],
)
def test_strict_and_soft_format(completion, strict, soft):
    assert _one("strict_format", completion) == strict
    assert _one("soft_format", completion) == soft


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 0.5),
        (GOOD.rstrip("\n"), 0.5),
        (GOOD + "abc", 0.5 - 0.003),  # 0.001 per trailing character
        ("<reasoning>\nr\n</reasoning>\n", 0.25),
        ("<answer>\n4\n</answer>\n", 0.125),  # "\n<answer>\n" needs a newline before the tag
        ("\n<answer>\n4\n</answer>\n", 0.25),
        (GOOD + GOOD, 0.0),  # every tag twice
        ("plain text", 0.0),
    ],
)
def test_xml_count(completion, expected):
    assert _one("xml_count", completion) == pytest.approx(expected)


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (384, 0.0), (385, -1 / 128), (448, -0.5), (511, -127 / 128), (512, -1.0), (513, -1.0), (5000, -1.0)],
)
def test_length_penalty_default_boundaries(length, expected):
    assert _one("length_penalty", "x" * length) == pytest.approx(expected)


def test_length_penalty_kwargs_and_zero_buffer():
    fn = REWARD_FUNCTIONS["length_penalty"]
    assert fn(["p"] * 4, ["abcd", "abcdef", "abcdefgh", "a" * 9], max_length=8, buffer=4) == [0.0, -0.5, -1.0, -1.0]
    assert fn(["p"] * 2, ["a" * 8, "a" * 9], max_length=8, buffer=0) == [0.0, -1.0]


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("I think 72 is right, or maybe 80", 72, 1.0),  # anywhere, not only last
        ("the total is 1,072", 72, 0.0),  # whole numbers only
        ("1,072", 1072, 1.0),
        ("172", 72, 0.0),
        ("-72", -72, 1.0),
        ("x = -3", 3, 0.0),
        ("answer 72", "#### 72", 1.0),
        ("answer 72", 72.0, 1.0),
        ("answer 72", 72.5, None),
        ("answer 72", "abc", None),
        ("nothing", 72, 0.0),
    ],
)
def test_answer_in_text(completion, answer, expected):
    assert _one("answer_in_text", completion, answer=answer) == expected


# ------------------------------------------------------------------------------------------------- resolution
def test_registry_names():
    expected = {
        "numeric_correctness", "numeric_tolerance", "integer_answer", "strict_format", "soft_format",
        "xml_count", "length_penalty", "answer_in_text", "model_reward", "numeric_closeness",
    }  # fmt: skip
    assert expected <= set(REWARD_FUNCTIONS)


def test_register_reward_rejects_a_different_function_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("strict_format")(my_reward)


def test_register_and_resolve_custom(monkeypatch):
    monkeypatch.setattr(R, "REWARD_FUNCTIONS", dict(REWARD_FUNCTIONS))

    @R.register_reward("always_one")
    def always_one(prompts, completions):
        return [1.0] * len(completions)

    assert R.resolve_reward("always_one") is always_one
    assert "always_one" not in REWARD_FUNCTIONS  # the real registry was not touched


def test_resolve_import_paths():
    assert resolve_reward("strict_format") is REWARD_FUNCTIONS["strict_format"]
    assert resolve_reward(f"{__name__}:my_reward").__name__ == "my_reward"
    assert resolve_reward(f"{__name__}.my_reward").__name__ == "my_reward"
    assert resolve_reward("lit_rlhf.rewards:xml_count") is REWARD_FUNCTIONS["xml_count"]
    assert resolve_reward("os.path.join") is __import__("os").path.join


def test_resolve_unknown_name():
    with pytest.raises(ValueError) as info:
        resolve_reward("no_such_reward")
    msg = str(info.value)
    assert "no_such_reward" in msg and "numeric_correctness" in msg and "package.module:function" in msg
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("lit_rlhf.rewards:no_such_function")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_package.module:fn")
    with pytest.raises(ValueError, match="non-callable"):
        resolve_reward("lit_rlhf.rewards:REWARD_FUNCTIONS")


# --------------------------------------------------------------------------------------------------- composer
def test_composer_weights_none_and_stats():
    """answers [4, "n/a", 6]: correctness [1, None, 0]; strict [0.5, 0.5, 0]; length_penalty (max 56, buffer 10)
    on lengths [56, 56, 3] gives [-1, -1, 0].  total = 2*corr + 1*strict + 0.5*len = [2.0, 0.0, 0.0] (None -> 0)."""
    comps = [GOOD, GOOD, "5 !"]
    composer = RewardComposer(
        [
            RewardSpec("numeric_correctness", weight=2.0),
            RewardSpec("strict_format"),
            RewardSpec("length_penalty", weight=0.5, kwargs={"max_length": 56, "buffer": 10}),
        ]
    )
    assert len(GOOD) == 56
    result = composer(["q1", "q2", "q3"], comps, {"answer": [4, "n/a", 6], "id": [0, 1, 2]})
    corr = result.per_function["numeric_correctness"]
    assert corr.dtype == torch.float32 and corr[0] == 1.0 and math.isnan(corr[1]) and corr[2] == 0.0
    assert result.per_function["strict_format"].tolist() == [0.5, 0.5, 0.0]
    assert result.per_function["length_penalty"].tolist() == [-1.0, -1.0, 0.0]
    assert result.total.dtype == torch.float32 and result.total.shape == (3,)
    assert result.total.tolist() == pytest.approx([2.0, 0.0, 0.0])

    stats = result.stats()
    assert stats["rewards/numeric_correctness/mean"] == pytest.approx(0.5)  # None ignored: mean of [1, 0]
    assert stats["rewards/numeric_correctness/std"] == pytest.approx(0.5)
    assert stats["rewards/strict_format/mean"] == pytest.approx(1 / 3)
    assert stats["rewards/mean"] == pytest.approx(2 / 3)
    assert stats["rewards/std"] == pytest.approx(torch.tensor([2.0, 0.0, 0.0]).std(correction=0).item())
    assert (stats["rewards/min"], stats["rewards/max"]) == (0.0, 2.0)
    assert all(isinstance(v, float) for v in stats.values())


def test_stats_all_none_is_nan():
    """No function scored the sample: its total is NaN ("no reward", not 0), every statistic NaN, missing_frac 1."""
    result = RewardComposer([RewardSpec("numeric_correctness")])(["p"], ["1"], {"answer": [None]})
    stats = result.stats()
    assert math.isnan(stats["rewards/numeric_correctness/mean"]) and math.isnan(result.total.item())
    assert result.scored.tolist() == [False]
    assert math.isnan(stats["rewards/mean"]) and math.isnan(stats["rewards/std"])
    assert stats["rewards/missing_frac"] == 1.0


def gappy_a(prompts, completions):
    return [1.0, None, float("nan"), 4.0, None]


def gappy_b(prompts, completions):
    return [2.0, 3.0, 5.0, None, float("nan")]


def test_none_and_nan_mean_no_reward_from_that_function():
    """a = [1, None, NaN, 4, None] (weight 1), b = [2, 3, 5, None, NaN] (weight 0.5): None and NaN are both "no
    reward"; the total sums the weighted rewards that exist: [1 + 1, 1.5, 2.5, 4, NaN] (the last sample has none).
    Statistics are over the 4 scored samples: mean 10 / 4 = 2.5, population std sqrt((0.25 + 1 + 0 + 2.25) / 4),
    min 1.5, max 4; missing_frac 1 / 5. Per function: a over [1, 4], b over [2, 3, 5]."""
    composer = RewardComposer([RewardSpec(f"{__name__}:gappy_a"), RewardSpec(f"{__name__}:gappy_b", weight=0.5)])
    result = composer(["p"] * 5, ["c"] * 5)
    torch.testing.assert_close(result.total, torch.tensor([2.0, 1.5, 2.5, 4.0, math.nan]), equal_nan=True)
    assert result.scored.tolist() == [True, True, True, True, False]
    stats = result.stats()
    assert stats["rewards/mean"] == pytest.approx(2.5) and stats["rewards/std"] == pytest.approx(math.sqrt(3.5 / 4))
    assert (stats["rewards/min"], stats["rewards/max"], stats["rewards/missing_frac"]) == (1.5, 4.0, 0.2)
    assert stats[f"rewards/{__name__}:gappy_a/mean"] == pytest.approx(2.5)
    assert stats[f"rewards/{__name__}:gappy_b/mean"] == pytest.approx(10 / 3)


def test_reward_stats_scored_mean_and_add_rewards():
    """[1, NaN, 3]: mean 2 over the 2 scored, population std 1, missing 1/3; scored_mean (2, 2); an empty batch has
    no missing sample. add_rewards: base + total where total has a reward, base where it has none."""
    total = torch.tensor([1.0, math.nan, 3.0])
    stats = reward_stats(total)
    assert [stats[f"rewards/{k}"] for k in ("mean", "std", "min", "max")] == [2.0, 1.0, 1.0, 3.0]
    assert stats["rewards/missing_frac"] == pytest.approx(1 / 3)
    assert reward_stats(torch.tensor([]))["rewards/missing_frac"] == 0.0
    mean, count = scored_mean(total)
    assert (float(mean), count) == (2.0, 2)
    assert [float(v) for v in scored_mean(torch.tensor([math.nan]))] == [0.0, 0.0]
    torch.testing.assert_close(add_rewards(torch.tensor([0.5, 0.5, 0.5]), total), torch.tensor([1.5, 0.5, 3.5]))
    torch.testing.assert_close(add_rewards(None, total), total, equal_nan=True)


def test_validation_means_weights_each_mean_by_what_it_is_over():
    """Rewards [1, NaN, 0.5] and answers [4, 5, None] with completions "4", "6", "7": rewards/mean 0.75 over the 2
    scored (weight 2); accuracy 1/2 over the 2 graded (weight 2). Nothing scored or graded: nothing returned."""
    means = validation_means(torch.tensor([1.0, math.nan, 0.5]), ["4", "6", "7"], [4, 5, None])
    assert [({k: float(v) for k, v in m.items()}, w) for m, w in means] == [
        ({"val/rewards/mean": 0.75}, 2),
        ({"val/accuracy": 0.5}, 2),
    ]
    assert validation_means(torch.tensor([math.nan]), ["4"], None) == []
    assert validation_means(torch.tensor([1.0]), ["4"], [None], prefix="") == [({"rewards/mean": torch.tensor(1.0)}, 1)]


def infinite_reward(prompts, completions):
    return [0.0, float("inf")] if len(completions) == 2 else [-math.inf]


def test_an_infinite_reward_is_an_error_naming_function_and_sample():
    composer = RewardComposer([RewardSpec("strict_format"), RewardSpec(f"{__name__}:infinite_reward")])
    with pytest.raises(RewardFunctionError) as info:
        composer(["first prompt", "second prompt"], ["ok", "too good"])
    msg = str(info.value)
    assert f"reward function '{__name__}:infinite_reward' returned inf for sample 1" in msg
    assert "prompt='second prompt'" in msg and "completion='too good'" in msg and "must be finite" in msg
    with pytest.raises(RewardFunctionError, match=r"returned -inf for sample 0 \(prompt='p'"):
        composer(["p"], ["c"])


def test_reward_weights_must_be_finite_and_not_all_zero():
    with pytest.raises(ValueError, match=r"must be finite numbers, got \['strict_format: inf'\]"):
        RewardComposer([RewardSpec("strict_format", weight=math.inf)])
    with pytest.raises(ValueError, match=r"model\.rewards cannot learn: every reward weight is 0 \(\[0\.0, 0\]\)"):
        check_reward_weights([0.0, 0], "model.rewards")
    check_reward_weights([0.0, 0.5], "model.rewards")
    check_reward_weights([], "model.rewards")  # no reward at all is the stages' own error


def test_composer_passes_only_accepted_columns():
    seen = {}

    def wants_kwargs(prompts, completions, **columns):
        seen.update(columns)
        return [0.0] * len(completions)

    R.REWARD_FUNCTIONS["_test_wants_kwargs"] = wants_kwargs
    try:
        composer = RewardComposer(
            [RewardSpec("strict_format"), RewardSpec(f"{__name__}:my_reward"), RewardSpec("_test_wants_kwargs")]
        )
        result = composer(["p"], ["72"], {"answer": [72], "difficulty": ["hard"]})
    finally:
        del R.REWARD_FUNCTIONS["_test_wants_kwargs"]
    assert result.per_function[f"{__name__}:my_reward"].tolist() == [1.0]
    assert seen == {"answer": [72], "difficulty": ["hard"]}


def test_composer_missing_column_or_kwarg():
    with pytest.raises(ValueError, match=r"'numeric_correctness' needs \['answer'\]"):
        RewardComposer([RewardSpec("numeric_correctness")])(["p"], ["1"], {"solution": ["1"]})
    with pytest.raises(ValueError, match=r"'model_reward' needs \['path'\]"):
        RewardComposer([RewardSpec("model_reward")])(["p"], ["1"], {})


def test_composer_validates_lengths_and_names():
    composer = RewardComposer([RewardSpec("strict_format")])
    with pytest.raises(ValueError, match="'answer' has 1 entries for 2 completions"):
        composer(["p", "q"], ["a", "b"], {"answer": [1]})
    with pytest.raises(ValueError, match="duplicate"):
        RewardComposer([RewardSpec("strict_format"), RewardSpec("strict_format", weight=2.0)])
    with pytest.raises(ValueError, match="at least one"):
        RewardComposer([])
    with pytest.raises(ValueError, match="unknown reward"):
        RewardComposer([RewardSpec("nope")])


def failing_reward(prompts, completions):
    return [1.0 / len(c) for c in completions]  # ZeroDivisionError on an empty completion


def test_composer_wraps_exceptions_with_sample():
    composer = RewardComposer([RewardSpec("strict_format"), RewardSpec(f"{__name__}:failing_reward")])
    with pytest.raises(RewardFunctionError) as info:
        composer(["first prompt", "second prompt", "third prompt"], ["ok", "", "fine"])
    msg = str(info.value)
    assert "failing_reward" in msg and "sample 1" in msg
    assert "'second prompt'" in msg and "completion=''" in msg and "ZeroDivisionError" in msg
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def batch_only_failure(prompts, completions):
    if len(completions) > 1:
        raise RuntimeError("batch too large")
    return [0.0]


def test_composer_batch_failure_without_single_culprit():
    composer = RewardComposer([RewardSpec(f"{__name__}:batch_only_failure")])
    with pytest.raises(RewardFunctionError, match="no single sample.*batch too large"):
        composer(["a", "b"], ["x", "y"])


def wrong_length(prompts, completions):
    return [1.0]


def non_numeric(prompts, completions):
    return ["good"] * len(completions)


def test_composer_bad_return_values():
    with pytest.raises(ValueError, match="wrong_length' returned 1 values for 2 completions"):
        RewardComposer([RewardSpec(f"{__name__}:wrong_length")])(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="non_numeric.*non-numeric"):
        RewardComposer([RewardSpec(f"{__name__}:non_numeric")])(["a"], ["x"])


def test_composer_accepts_tensor_and_bool_returns():
    def tensor_reward(prompts, completions):
        return torch.tensor([True, False])

    R.REWARD_FUNCTIONS["_test_tensor"] = tensor_reward
    try:
        result = RewardComposer([RewardSpec("_test_tensor", weight=3.0)])(["a", "b"], ["x", "y"])
    finally:
        del R.REWARD_FUNCTIONS["_test_tensor"]
    assert result.total.tolist() == [3.0, 0.0]


# ---------------------------------------------------------------------------------------------- model reward
@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A random 2-layer Llama with a scalar head and a WordLevel tokenizer, saved as an HF directory (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = "[PAD] [UNK] what is 2 + ? the answer 4 5 maybe hello world".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model, tokenizer


def test_model_reward_matches_direct_logits(tiny_reward_model, monkeypatch):
    path, model, tokenizer = tiny_reward_model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = ["what is 2 + 2 ? ", "what is 2 + 2 ? ", "hello "]
    completions = ["the answer is 4", "5", "world world maybe"]
    expected = []
    with torch.no_grad():  # one unpadded sample at a time
        for p, c in zip(prompts, completions):
            expected.append(model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item())

    got = REWARD_FUNCTIONS["model_reward"](prompts, completions, path=path, batch_size=2, device="cpu")
    assert all(isinstance(v, float) for v in got)
    assert got == pytest.approx(expected, abs=1e-5)
    cached = R._REWARD_MODELS[(path, "cpu")]

    result = RewardComposer([RewardSpec("model_reward", weight=2.0, kwargs={"path": path, "device": "cpu"})])(
        prompts, completions, {"answer": [4, 4, 0]}
    )
    assert R._REWARD_MODELS[(path, "cpu")] is cached  # loaded once per path
    assert result.total.tolist() == pytest.approx([2 * v for v in expected], abs=1e-5)


def test_model_reward_truncates(tiny_reward_model):
    path, model, tokenizer = tiny_reward_model
    long = " ".join(["hello"] * 50)
    got = REWARD_FUNCTIONS["model_reward"](["what "], [long], path=path, max_length=8, device="cpu")
    with torch.no_grad():
        ids = tokenizer("what " + long, return_tensors="pt")["input_ids"][:, :8]
        assert got[0] == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
