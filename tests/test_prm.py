"""Process reward model: the per-step loss against hand values, step-labelled records (parsing, errors, token
positions, truncation), the built-in corrupted worked answers (Lightman et al.'s labels), the RM stage's step
branch, and a tiny end-to-end run whose export is the ``prm`` step reward."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lit_rlhf import models, process_rewards
from lit_rlhf.data.scored import TASKS, RewardDataModule
from lit_rlhf.data.sources import DataError, builtin_split
from lit_rlhf.data.step_labels import (
    CORRUPTIONS,
    arithmetic_step_labels,
    corrupt_worked,
    join_steps,
    locate_steps,
    split_worked,
)
from lit_rlhf.data.tasks import worked_answer
from lit_rlhf.experiments import rm as rm_entry
from lit_rlhf.losses import step_bce_loss
from lit_rlhf.process_rewards import ProcessRewardScorer, first_error_index, step_logits
from lit_rlhf.reward_models import load_exported, sequence_rewards
from lit_rlhf.rewards import RewardSpec
from lit_rlhf.stages.reward_model import RewardModule
from lit_rlhf.steps import STEP_REWARDS, ProcessRewardComposer, split_steps

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "rm" / "prm-tiny.yaml")
CLEAN = ["Ones: 7 + 8 = 15, write 5 carry 1.", "Tens: 4 + 3 + 1 = 8.", "The answer is 85."]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------------------- loss
def test_step_bce_loss_is_the_mean_over_the_batch_steps():
    """Steps (logit, label): (0, 1), (2, 0), (-1, 0) and two padding entries (NaN, inf). BCE(l, 1) = softplus(-l),
    BCE(l, 0) = softplus(l): (ln 2 + softplus(2) + softplus(-1)) / 3; d/dl = (sigmoid(l) - y) / 3, 0 on padding."""
    logits = torch.tensor([[0.0, 2.0, math.nan], [-1.0, math.inf, 0.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = step_bce_loss(logits, labels, mask)
    want = (math.log(2) + softplus(2) + softplus(-1)) / 3
    torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float64))
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want_grad = [[(0.5 - 1) / 3, sig(2) / 3, 0.0], [sig(-1) / 3, 0.0, 0.0]]
    torch.testing.assert_close(logits.grad, torch.tensor(want_grad, dtype=torch.float64))
    # per batch, not per sequence: the one-step row weighs 1/3, not 1/2
    per_sequence = (math.log(2) + softplus(2)) / 4 + softplus(-1) / 2
    assert abs(loss.item() - per_sequence) > 1e-3
    assert step_bce_loss(logits.detach(), labels, torch.zeros_like(mask)).item() == 0.0


def test_first_error_index():
    correct = torch.tensor([[True, False, False], [True, True, True], [False, True, True], [True, True, False]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, True, True], [True, True, False]])
    assert first_error_index(correct, mask).tolist() == [1, 3, 0, 2]  # the last row's third entry is padding


# ----------------------------------------------------------------------------------------- built-in task
def test_corruptions_of_a_hand_example():
    """47 + 38 (ones carry): each corruption breaks its step; later steps follow from the error."""
    rng = random.Random(0)
    assert split_worked(worked_answer(47, "+", 38)) == CLEAN
    steps, first, kind = corrupt_worked(47, "+", 38, "carry", rng)
    assert (steps, first, kind) == ([CLEAN[0], "Tens: 4 + 3 = 7.", "The answer is 75."], 1, "carry")
    steps, first, kind = corrupt_worked(47, "+", 38, "final", rng)
    assert steps[:2] == CLEAN[:2] and steps[2] != CLEAN[2] and first == 2
    assert 75 <= int(steps[2][len("The answer is ") : -1]) <= 95
    steps, first, _ = corrupt_worked(47, "+", 38, "ones", rng)
    digit = int(steps[0].split("write ")[1][0])
    assert first == 0 and digit != 5 and steps[0] == f"Ones: 7 + 8 = {10 + digit}, write {digit} carry 1."
    assert steps[1:] == [CLEAN[1], f"The answer is {80 + digit}."]
    steps, first, _ = corrupt_worked(47, "+", 38, "tens", rng)
    tens = int(steps[1].split("= ")[1][:-1])
    assert first == 1 and tens != 8 and abs(tens - 8) <= 3 and steps[2] == f"The answer is {10 * tens + 5}."
    # 52 - 31 has no borrow: "carry" becomes a wrong tens digit; 83 - 47 borrows: the borrow is dropped
    assert corrupt_worked(52, "-", 31, "carry", rng)[2] == "tens"
    steps, first, _ = corrupt_worked(83, "-", 47, "carry", rng)
    assert steps == ["Ones: 3 < 7, borrow: 13 - 7 = 6.", "Tens: 8 - 4 = 4.", "The answer is 46."] and first == 1
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_worked(47, "+", 38, "sign", rng)


def test_builtin_step_labels_follow_lightman_and_are_deterministic():
    records = arithmetic_step_labels(400, 3)
    assert records == arithmetic_step_labels(400, 3) and records != arithmetic_step_labels(400, 4)
    corrupted = [r for r in records if r["corruption"] is not None]
    assert 0.4 < len(corrupted) / len(records) < 0.6 and {r["corruption"] for r in corrupted} == set(CORRUPTIONS)
    for r in records:
        a, op, b = r["prompt"][0]["content"][len("What is ") : -1].split(" ")
        clean = split_worked(worked_answer(int(a), op, int(b)))
        if r["corruption"] is None:
            assert r["steps"] == clean and r["labels"] == [1, 1, 1]
        else:  # 1 before the first wrong step, 0 from it on (Lightman et al.: correct up to the first error)
            first = next(i for i, (s, c) in enumerate(zip(r["steps"], clean)) if s != c)
            assert first == CORRUPTIONS[r["corruption"]]
            assert r["labels"] == [int(i < first) for i in range(3)]
    assert all(r["corruption"] is None for r in arithmetic_step_labels(50, 0, corrupt_fraction=0.0))
    assert all(0 in r["labels"] for r in arithmetic_step_labels(50, 0, corrupt_fraction=1.0))
    train, val = builtin_split(TASKS["steps"], "arithmetic", 200, 32, 0)
    assert not {r["prompt"][0]["content"] for r in val} & {r["prompt"][0]["content"] for r in train}


# ---------------------------------------------------------------------------------------------- records
def data_module(path=None, **kwargs) -> RewardDataModule:
    args = {"format": "steps", "path": path, "num_train": 16, "num_val": 8, "batch_size": 4, "val_batch_size": 8}
    dm = RewardDataModule(**{**args, **kwargs})
    dm.connect(models.load_tokenizer("tiny", for_reward_model=True))
    return dm


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_step_positions_are_each_steps_last_token_and_long_solutions_lose_late_steps(tmp_path):
    records = [{"prompt": "What is 47 + 38?", "steps": CLEAN, "labels": [1, 1, 0]}] * 4
    records += [{"question": "Say two lines.", "steps": ["first line", "second line"], "labels": [True, False]}]
    dm = data_module(write_jsonl(tmp_path / "steps.jsonl", records), val_fraction=0.0)
    dm.setup("fit")
    tok = dm.tokenizer
    pick = [next(e for e in dm.train_examples if text in e.prompt) for text in ("47 + 38", "two lines")]
    batch = dm.collate(pick)
    assert batch.step_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.step_labels.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    for row, ends in enumerate((["1.", "8.", "85."], ["line", "line"])):
        for k, end in enumerate(ends):
            at = int(batch.step_positions[row, k])  # the token that completes the step
            assert tok.decode(batch.response_ids[row, : at + 1]).endswith(end)
            assert not tok.decode(batch.response_ids[row, :at]).endswith(end)
    text = tok.decode(batch.response_ids[0][batch.response_mask[0].bool()])
    assert text.startswith(" ".join(CLEAN))  # the steps joined by step_separator, then the template's end of turn
    lines = data_module(write_jsonl(tmp_path / "lines.jsonl", records[-1:] * 6), step_separator="\n")
    lines.setup("fit")
    assert lines.train_examples[0].response.startswith("first line\nsecond line")
    whole = pick[0]  # too long by one token: the last step ("The answer is 85.") loses its last token and is dropped
    budget = len(whole.prompt_ids) + whole.positions[-1]
    cut = {"max_length": budget, "max_prompt_length": len(whole.prompt_ids), "val_fraction": 0.0}
    short = data_module(write_jsonl(tmp_path / "s.jsonl", records[:4]), **cut)
    short.setup("fit")
    assert [e.labels for e in short.train_examples] == [[1.0, 1.0]] * 4 and short.stats["truncated"] == 4
    assert short.train_examples[0].prompt_ids == whole.prompt_ids


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "labels": [1]}, r"missing field 'steps'.*--data.fields.steps"),
        ({"prompt": "q", "steps": "one step", "labels": [1]}, r"'steps' must be a non-empty list"),
        ({"prompt": "q", "steps": [], "labels": []}, r"'steps' must be a non-empty list"),
        ({"prompt": "q", "steps": ["a", "  "], "labels": [1, 0]}, r"'steps' item 1 must be a non-blank string"),
        ({"prompt": "q", "steps": ["a", None], "labels": [1, 0]}, r"'steps' item 1 is null"),
        ({"prompt": "q", "steps": ["a", "b"], "labels": [1]}, r"'labels' must be a list of one label per step"),
        ({"prompt": "q", "steps": ["a"], "labels": [-1]}, r"'labels' item 0 must be 1 \(correct\) or 0"),
        ({"prompt": "q", "steps": ["a"], "labels": ["1"]}, r"'labels' item 0 must be 1"),
        ({"prompt": "q", "steps": ["a"], "labels": [0.5]}, r"'labels' item 0 must be 1"),
    ],
)
def test_bad_step_records_name_the_line_and_field(tmp_path, record, message):
    good = {"prompt": "q", "steps": ["a", "b"], "labels": [1, 0]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, record])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        data_module(path).setup("fit")


def test_locate_steps_finds_a_splitters_pieces():
    completion, ends = join_steps(["a b.", "c d.  "], " ")
    assert completion == "a b. c d.  " and ends == [4, 9]
    assert locate_steps("x\n a b.\n\nc d.", ["a b.", " ", "c d."]) == [7, None, 13]  # ends after "." (6, 12)
    with pytest.raises(ValueError, match="not in the completion"):
        locate_steps("a b.", ["c"])


# ------------------------------------------------------------------------------------------------ the stage
def test_step_logits_read_each_step_prefix_and_the_stage_fits_them_with_bce():
    module = RewardModule(backbone=models.ModelSpec(name="tiny", lora=None))
    module.configure_model()
    dm = data_module()
    dm.connect(module.tokenizer)
    dm.setup("fit")
    batch = dm.collate(dm.train_examples[:3])
    with torch.no_grad():
        logits = step_logits(module.model, batch, module.tokenizer.pad_token_id)
        for row in range(3):  # the logit at step k is the outcome score of the prompt + response up to that token
            prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
            for k in range(int(batch.step_mask[row].sum())):
                ids = torch.cat([prompt, batch.response_ids[row, : batch.step_positions[row, k] + 1]])[None]
                want, _ = sequence_rewards(module.model, ids, torch.ones_like(ids))
                torch.testing.assert_close(logits[row, k], want[0], atol=1e-5, rtol=1e-5)
        loss, rewards, metrics = module._loss(batch)
    torch.testing.assert_close(loss, step_bce_loss(logits, batch.step_labels, batch.step_mask))
    correct = (logits[batch.step_mask] > 0) == batch.step_labels[batch.step_mask].bool()
    torch.testing.assert_close(metrics["step_accuracy"], correct.float().mean())
    torch.testing.assert_close(metrics["rewards/mean"], logits[batch.step_mask].mean())


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_prm_run_learns_exports_and_serves_the_prm_step_reward(tmp_path):
    args = ["--config", TINY, "--output_dir", str(tmp_path), "--trainer.enable_progress_bar=false"]
    cli = rm_entry.main(args=[*args, "--trainer.enable_checkpointing=false"])
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    start, end = summary["start"], summary["end"]
    for key in ("val/loss", "val/step_accuracy", "val/first_error_accuracy", "val/rewards/mean"):
        assert math.isfinite(end[key]), key
    # a random 17M-parameter model in 10 steps does not learn arithmetic: it learns the label prior, so the loss falls
    assert end["val/loss"] < start["val/loss"]
    merged = tmp_path / "export" / "merged"
    model, tok = load_exported(merged)
    dm = cli.datamodule
    examples = dm.val_examples[:4]
    prompts = [e.prompt for e in examples]
    completions = [e.response[: e.response.index("<|im_end|>")] for e in examples]
    steps = [[c[s:e] for s, e in split_steps(c, "auto")] for c in completions]
    assert [len(s) for s in steps] == [len(e.labels) for e in examples] == [3] * 4
    scores = STEP_REWARDS["prm"](prompts, completions, steps, path=str(merged))
    assert [len(s) for s in scores] == [3] * 4 and all(0 < v < 1 for row in scores for v in row)
    with torch.no_grad():  # the served logits are the trained model's logits at the trained positions
        want = step_logits(cli.model.model.eval(), dm.collate(examples), tok.pad_token_id)
    logits = process_rewards.prm(prompts, completions, steps, path=str(merged), probability=False)
    torch.testing.assert_close(torch.tensor(logits), want.float(), atol=1e-4, rtol=1e-4)
    prm_spec = RewardSpec("lit_rlhf.process_rewards:prm", kwargs={"path": str(merged)})  # by import path, in GRPO
    composer = ProcessRewardComposer([RewardSpec("integer_answer")], [prm_spec], "auto", max_steps=4)
    process = composer(prompts, completions).per_function["process"]
    assert torch.isfinite(process[:, :3]).all() and torch.isnan(process[:, 3]).all()
    rows = ProcessRewardScorer(model, tok).rows(prompts[0], completions[0], steps[0])
    completion_length = len(tok(completions[0], add_special_tokens=False)["input_ids"])
    scorer = ProcessRewardScorer(model, tok, max_length=completion_length - 1)  # no prompt, the completion's last token
    prompt_length, (ids, at) = len(rows[0]) - completion_length, rows
    shifted = [at[0] - prompt_length, at[1] - prompt_length, None]
    assert scorer.rows(prompts[0], completions[0], steps[0]) == (ids[prompt_length:-1], shifted)
    cut = scorer.score(prompts[:1], completions[:1], steps[:1])[0]
    assert cut[-1] is None and cut[0] is not None  # the last step's last token was cut away: unscored
