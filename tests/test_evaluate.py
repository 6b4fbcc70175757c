"""Evaluation (lit_rlhf.evaluation, ``lit-rlhf evaluate``): the pass@k estimator against closed forms, the metrics of
scripted completions computed by hand, the held-out prompts of a run rebuilt exactly, a tiny GRPO run's
``val/accuracy`` reproduced from its export and its checkpoint (and by the callback during training), GSM8K-format
files, math-verify answers and reward-model pairwise accuracy."""

import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from lit_rlhf import evaluation as ev
from lit_rlhf import models
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.rewards import RewardComposer, RewardSpec
from lit_rlhf.rollout import SamplingSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_TINY = os.path.join(ROOT, "experiments", "grpo", "tiny.yaml")


# ------------------------------------------------------------------------------------------------------ pass@k
def test_pass_at_k_matches_the_binomial_closed_form():
    """Chen et al. 2021 Eq. 1: pass@k = 1 - C(n-c, k) / C(n, k); special cases c = 0 -> 0, c = n -> 1,
    k = 1 -> c / n, k = n -> [c > 0]; n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7."""
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
            assert ev.pass_at_k(n, c, 1) == pytest.approx(c / n)
            assert ev.pass_at_k(n, c, n) == (1.0 if c else 0.0)
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert ev.pass_at_k(200, 1, 100) == pytest.approx(0.5)  # one right among 200: half of all 100-subsets hold it
    for bad in [(4, 5, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(*bad)


# ------------------------------------------------------------------------------------ metrics of known completions
QUESTIONS = {"What is 1 + 2?": 3, "What is 2 + 3?": "5", "What is 3 + 4?": "so 3 + 4 = 7\n#### 7", "Say hi.": None}
GREEDY = {"What is 1 + 2?": "3", "What is 2 + 3?": "6", "What is 3 + 4?": "It is 7.", "Say hi.": "hi"}
SAMPLES = {  # 4 samples each: 2, 0, 4 right (the last prompt has no answer: ungraded)
    "What is 1 + 2?": ["3", "4", "<answer>3</answer>", "2"],
    "What is 2 + 3?": ["4", "6", "", "55"],
    "What is 3 + 4?": ["7", "7.0", "= 7", "x 7"],
    "Say hi.": ["hi", "hello", "hey", "yo"],
}


def scripted_sampler(calls):
    """A stand-in for sample_completions: the greedy / sampled completions above, by the question in the prompt."""

    def sample(lm, tokenizer, batch, group_size, settings, generator, backend="kv_cache"):
        calls.append((len(batch.prompts), group_size, settings.temperature))
        questions = [next(q for q in QUESTIONS if q in p) for p in batch.prompts]
        completions = [GREEDY[q] for q in questions] if group_size == 1 else [c for q in questions for c in SAMPLES[q]]
        n = len(completions)
        return SimpleNamespace(
            prompts=list(batch.prompts),
            completions=completions,
            truncated=torch.tensor([False] * n),
            prompt_index=torch.arange(len(questions)).repeat_interleave(group_size),
            completion_lengths=torch.tensor([len(c) + 1 for c in completions]),
        )

    return sample


def test_metrics_of_scripted_completions_are_computed_by_hand(tmp_path, monkeypatch):
    """Greedy: right, wrong, right (+ one ungraded) -> accuracy 2/3. Samples (n = 4) with c = 2, 0, 4:
    pass@1 = (2/4 + 0 + 1)/3 = 1/2; pass@2 = ((1 - C(2,2)/C(4,2)) + 0 + 1)/3 = (5/6 + 1)/3 = 11/18;
    pass@4 = (1 + 0 + 1)/3 = 2/3; mean@4 = (1/2 + 0 + 1)/3 = 1/2. numeric_correctness on the greedy completions: mean
    2/3 over the graded rows; the ungraded row has no reward at all, so the total's mean is over the 3 scored rows,
    2/3, with missing_frac 1/4 and the row's reward None. Prompts come in batches of 3 and 1."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS.items()))
    calls = []
    monkeypatch.setattr(ev, "sample_completions", scripted_sampler(calls))
    tokenizer = models.load_tokenizer("tiny")
    dm = ev.prompt_module({}, tokenizer)
    prompts = ev.file_prompts(dm, str(path))
    settings = ev.EvalSettings(num_samples=4, k=[1, 2, 4, 8], batch_size=3, rewards=[RewardSpec("numeric_correctness")])
    metrics, rows = ev.evaluate_policy(torch.nn.Linear(1, 1), tokenizer, prompts, dm.collate, settings)
    assert metrics["prompts"] == 4 and metrics["graded"] == 3
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["pass@1"] == pytest.approx(1 / 2)
    assert metrics["pass@2"] == pytest.approx(11 / 18)
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in metrics  # k > n is dropped
    assert metrics["mean@4"] == pytest.approx(1 / 2)
    assert metrics["rewards/numeric_correctness/mean"] == pytest.approx(2 / 3)
    assert metrics["rewards/mean"] == pytest.approx(2 / 3) and metrics["rewards/missing_frac"] == pytest.approx(1 / 4)
    assert sorted(r["reward"] is None for r in rows) == [False, False, False, True]
    assert metrics["completions/mean_length"] == pytest.approx((2 + 2 + 9 + 3) / 4)
    assert [r["correct"] for r in rows] == [True, False, True, None]
    assert [sum(r["samples_correct"]) for r in rows[:3]] == [2, 0, 4]
    assert calls == [(3, 1, 0.0), (3, 4, 1.0), (1, 1, 0.0), (1, 4, 1.0)]  # greedy is temperature 0


def test_validation_prompts_are_the_data_modules_validation_set():
    """The evaluated held-out prompts are exactly those PromptDataModule.setup validates on (ids, text, answers)."""
    tokenizer = models.load_tokenizer("tiny")
    settings = {"num_train": 40, "num_val": 6, "seed": 3, "instruction": "Answer with just the number."}
    settings["batch_size"] = 2
    prompts = ev.validation_prompts(ev.prompt_module(settings, tokenizer))
    dm = PromptDataModule(**settings)
    dm.connect(tokenizer)
    dm.setup("fit")
    assert [e.prompt_ids for e in prompts.examples] == [e.prompt_ids for e in dm.val_examples]
    assert [e.prompt for e in prompts.examples] == [e.prompt for e in dm.val_examples]
    assert prompts.answers == [e.columns["answer"] for e in dm.val_examples]
    assert "Answer with just the number." in prompts.examples[0].prompt and len(prompts.examples) == 6


# ----------------------------------------------------------------------------------------------- answer checking
def test_math_verifier_checks_latex_answers_and_names_the_extra(monkeypatch):
    assert ev.math_verify_correct(r"So the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}") is True
    assert ev.math_verify_correct(r"The answer is $0.5$", r"$\frac{1}{2}$") is True
    assert ev.math_verify_correct(r"$\boxed{\frac{1}{3}}$", r"\frac{1}{2}") is False
    assert ev.math_verify_correct("72 clips", "48 + 24 = 72\n#### 72") is True
    assert ev.math_verify_correct("73", 72) is False
    assert ev.math_verify_correct("7", None) is None
    monkeypatch.setitem(sys.modules, "math_verify", None)  # not installed
    with pytest.raises(ImportError, match=r"lit_rlhf\[math\]"):
        ev.math_verify_correct("1", "1")


# --------------------------------------------------------------------------------------------------- reward models
def test_pairwise_accuracy_counts_every_ordered_pair():
    """Scores best first [[2, 1], [0, 1], [3, 2, 1]]: pairs 2>1 yes, 0>1 no, 3>2, 3>1, 2>1 yes -> 4/5; chosen mean
    (2 + 0 + 3)/3, rejected mean (1 + 1 + 2 + 1)/4, margin their difference; a tie is not a win."""
    metrics = ev.pairwise_accuracy([[2.0, 1.0], [0.0, 1.0], [3.0, 2.0, 1.0]])
    assert metrics["pairs"] == 5 and metrics["rewards/accuracies"] == pytest.approx(4 / 5)
    assert metrics["rewards/chosen"] == pytest.approx(5 / 3) and metrics["rewards/rejected"] == pytest.approx(5 / 4)
    assert metrics["rewards/margins"] == pytest.approx(5 / 3 - 5 / 4)
    assert metrics["rewards/mean"] == pytest.approx(10 / 7)
    assert ev.pairwise_accuracy([[1.0, 1.0]])["rewards/accuracies"] == 0.0


def test_evaluate_cli_scores_a_reward_model_on_a_preference_file(tmp_path, fixtures_dir):
    """A tiny exported sequence classifier: evaluate detects it, renders the pairs with its tokenizer and reports the
    accuracy of the scores it gets from the model itself (each prompt + response scored as one row)."""
    from transformers import AutoModelForSequenceClassification

    from lit_rlhf.experiments.evaluate import main
    from lit_rlhf.reward_models import load_reward_model

    tokenizer = models.load_tokenizer("tiny", for_reward_model=True)
    rm = load_reward_model(models.ModelSpec(name="tiny", lora=None), tokenizer.pad_token_id)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    data = os.path.join(fixtures_dir, "seed_preference.jsonl")
    out = tmp_path / "rm.json"
    assert main([str(tmp_path / "rm"), "--data", data, "--output", str(out), "--no_progress"]) == 0
    result = json.loads(out.read_text())
    assert result["reward_model"] is True
    rows = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert result["metrics"]["pairs"] == len(rows) >= 2
    wins = sum(r["scores"][0] > r["scores"][1] for r in rows)
    assert result["metrics"]["rewards/accuracies"] == pytest.approx(wins / len(rows))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for row in rows[:2]:
        assert row["prompt"].startswith("<|im_start|>")  # rendered with the chat template
        for text, score in zip(row["responses"], row["scores"]):
            ids = tokenizer(row["prompt"] + text, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                assert hf(input_ids=ids).logits[0, 0].item() == pytest.approx(score, abs=1e-4)


# ---------------------------------------------------------------------------------------------- files, end to end
def test_evaluate_cli_on_a_gsm8k_file_writes_results_and_completions(tmp_path, fixtures_dir):
    from lit_rlhf.experiments.evaluate import main

    data = os.path.join(fixtures_dir, "gsm8k_sample.jsonl")
    out = tmp_path / "gsm8k.json"
    args = ["tiny", "--data", data, "--max_new_tokens", "3", "--num_samples", "2", "--k", "1", "2"]
    assert main([*args, "--output", str(out), "--no_progress", "--batch_size", "2"]) == 0
    result = json.loads(out.read_text())
    records = open(data).read().splitlines()
    assert result["metrics"]["prompts"] == result["metrics"]["graded"] == len(records)
    expected = {"accuracy", "pass@1", "pass@2", "mean@2", "rewards/mean", "completions/mean_length"}
    assert expected <= set(result["metrics"])
    assert result["settings"]["max_new_tokens"] == 3 and result["settings"]["prompts"] == "gsm8k_sample"
    rows = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == [json.loads(r)["answer"] for r in records]  # raw GSM8K answers
    assert all(len(r["samples"]) == 2 and isinstance(r["completion"], str) for r in rows)
    assert main(["tiny", "--data", str(tmp_path / "missing.jsonl"), "--no_progress"]) == 2


@pytest.mark.slow
def test_a_grpo_runs_val_accuracy_is_reproduced_from_its_export_checkpoint_and_callback(tmp_path):
    """The tiny GRPO run (with the evaluation callback every step) writes final_metrics.json; evaluate on the run
    directory (its export), on its last.ckpt, and the callback at the last step all give its end val/accuracy,
    val/rewards/mean and val/completions/mean_length."""
    from lit_rlhf.experiments.evaluate import main as evaluate
    from lit_rlhf.experiments.grpo import main as grpo

    run = tmp_path / "run"
    callback = ["--trainer.callbacks+=lit_rlhf.evaluation.EvaluationCallback", "--trainer.callbacks.every_n_steps=1"]
    cli = grpo(args=["--config", GRPO_TINY, "--output_dir", str(run), "--trainer.enable_progress_bar=false", *callback])
    end = json.loads((run / "final_metrics.json").read_text())["end"]
    keys = ["accuracy", "rewards/mean", "completions/mean_length"]
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, ev.EvaluationCallback)]
    for key in keys:
        assert cb.last_metrics[f"val/eval/{key}"] == pytest.approx(end[f"val/{key}"], abs=1e-5), key
    for model, name in [(str(run), "export"), (str(run / "checkpoints" / "last.ckpt"), "ckpt")]:
        out = tmp_path / f"{name}.json"
        assert evaluate([model, "--num_samples", "2", "--k", "1", "2", "--output", str(out), "--no_progress"]) == 0
        result = json.loads(out.read_text())
        for key in keys:
            assert result["metrics"][key] == pytest.approx(end[f"val/{key}"], abs=1e-5), (name, key)
        assert result["settings"]["max_new_tokens"] == 12 and result["settings"]["batch_size"] == 8
        assert [r["name"] for r in result["settings"]["rewards"]] == ["answer_in_text", "length_penalty"]
        assert result["run_final_metrics"]["val/accuracy"] == end["val/accuracy"]


def test_callback_evaluates_every_n_steps_and_logs_prefixed_metrics():
    """Steps 2 and 4 of every_n_steps=2 evaluate (once each), step 3 does not; the logged values are those of
    evaluate_policy on the module's policy with its own rewards and token budget."""
    tokenizer = models.load_tokenizer("tiny")
    dm = PromptDataModule(num_train=8, num_val=3, batch_size=2, val_batch_size=2)
    dm.connect(tokenizer)
    dm.setup("fit")
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).eval()
    rewards = RewardComposer([RewardSpec("numeric_closeness")])
    sampling = SamplingSettings(max_new_tokens=3)
    module = SimpleNamespace(policy=lm, tokenizer=tokenizer, sampling=sampling, rewards=rewards)
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    cb = ev.EvaluationCallback(every_n_steps=2)
    for step in [1, 2, 2, 3, 4]:
        trainer = SimpleNamespace(global_step=step, is_global_zero=True, loggers=[logger], datamodule=dm)
        cb.on_train_batch_end(trainer, module, None, None, 0)
    assert [s for s, _ in logged] == [2, 4]
    prompts = ev.PromptSet("v", dm.val_examples, [{"answer": e.columns["answer"]} for e in dm.val_examples])
    settings = ev.EvalSettings(max_new_tokens=3, batch_size=2, rewards=rewards.specs)
    expected, _ = ev.evaluate_policy(lm, tokenizer, prompts, dm.collate, settings)
    assert logged[0][1] == {f"val/eval/{k}": float(v) for k, v in expected.items()}
    assert "val/eval/rewards/numeric_closeness/mean" in logged[0][1]


@pytest.mark.slow
def test_a_reward_model_runs_held_out_pair_accuracy_is_reproduced_from_its_export(tmp_path):
    """The tiny RM run's end val/rewards/accuracies, val/rewards/chosen and val/rewards/rejected, from its export."""
    from lit_rlhf.experiments.evaluate import main as evaluate
    from lit_rlhf.experiments.rm import main as rm

    run = tmp_path / "rm"
    rm(
        args=[
            "--config",
            os.path.join(ROOT, "experiments", "rm", "tiny.yaml"),
            "--output_dir",
            str(run),
            "--trainer.enable_progress_bar=false",
        ]
    )
    end = json.loads((run / "final_metrics.json").read_text())["end"]
    out = tmp_path / "rm.json"
    assert evaluate([str(run), "--output", str(out), "--no_progress"]) == 0
    result = json.loads(out.read_text())
    assert result["reward_model"] and result["metrics"]["pairs"] == 16
    for key in ["rewards/accuracies", "rewards/chosen", "rewards/rejected"]:
        assert result["metrics"][key] == pytest.approx(end[f"val/{key}"], abs=1e-4), key
