"""PreferenceDataModule: built-in task, file/hub shapes via field mapping, truncation, and bad input."""

import json
import os

import pytest

from lit_rlhf import models
from lit_rlhf.data.preference import PreferenceDataModule, PreferenceFields
from lit_rlhf.data.sources import DataError
from lit_rlhf.data.tasks import arithmetic_preferences
from lit_rlhf.rewards import is_correct


def make(path=None, **kw) -> PreferenceDataModule:
    kw.setdefault("val_fraction", 0.0)
    kw.setdefault("batch_size", 1)  # tiny files: one pair is a full batch
    dm = PreferenceDataModule(path=path, **kw)
    dm.connect(models.load_tokenizer("tiny"))
    dm.setup()
    return dm


def test_builtin_task_is_deterministic_and_verified():
    a, b = arithmetic_preferences(50, 0), arithmetic_preferences(50, 0)
    assert a == b and a != arithmetic_preferences(50, 1)
    for r in a:
        q = r["prompt"][0]["content"]
        assert is_correct(r["chosen"][0]["content"], r["answer"]) and not is_correct(
            r["rejected"][0]["content"], r["answer"]
        ), q


def test_builtin_split_holds_out_questions():
    dm = make(num_train=200, num_val=40)
    train_q = {e.prompt for e in dm.train_examples}
    assert len(dm.train_examples) == 200 and len(dm.val_examples) == 40
    assert not train_q & {e.prompt for e in dm.val_examples}


def test_batch_layout_and_chat_template():
    dm = make(num_train=16, num_val=4, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.prompt_ids.shape[0] == 4 and batch.response_ids.shape[0] == 8
    assert batch.prompt_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert (batch.prompt_mask[:, -1] == 1).all(), "prompts are left-padded"
    assert (batch.response_mask[:, 0] == 1).all(), "responses are right-padded"
    assert "<|im_start|>system" in batch.prompts[0] and batch.prompts[0].endswith("<|im_start|>assistant\n")
    assert batch.chosen[0].endswith("<|im_end|>\n")
    tok = dm.tokenizer
    ids, attn, loss_mask, _ = batch.as_sequences()
    text = tok.decode(ids[0][attn[0].bool()])
    assert text == batch.prompts[0] + batch.chosen[0]


def test_hh_rlhf_implicit_prompt(fixtures_dir):
    dm = make(os.path.join(fixtures_dir, "hh_rlhf.jsonl"), chat_template=False)
    assert len(dm.train_examples) == 3
    multi = next(e for e in dm.train_examples if "Another one?" in e.prompt)
    assert multi.prompt.endswith("Another one?\n\nAssistant:") and multi.chosen.startswith(" Blue.")
    assert multi.chosen.endswith(dm.tokenizer.eos_token)


def test_ultrafeedback_binarized_messages(fixtures_dir):
    dm = make(os.path.join(fixtures_dir, "ultrafeedback_binarized.jsonl"))
    assert len(dm.train_examples) == 2 and dm.stats["skipped_identical"] == 1
    ex = next(e for e in dm.train_examples if "cat" in e.prompt)
    assert (
        "Translate 'cat' to French." in ex.prompt and ex.chosen.startswith("Chat.") and ex.rejected.startswith("Chien.")
    )


def test_seed_question_jsonl_and_empty_rejected(fixtures_dir):
    dm = make(os.path.join(fixtures_dir, "seed_preference.jsonl"))
    assert len(dm.train_examples) == 2 and dm.stats["skipped_empty"] == 1
    assert any("context: CREATE TABLE department" in e.prompt for e in dm.train_examples)


def test_csv_and_parquet(tmp_path):
    """Parquet keeps the string columns; CSV reads a column of digits as numbers, which only
    ``numbers_as_text=True`` turns into text (otherwise an error naming the row and the field)."""
    import datasets

    rows = [{"q": f"What is {i} + 1?", "good": f"{i + 1}", "bad": f"{i + 2}"} for i in range(6)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "p.csv")
    ds.to_parquet(tmp_path / "p.parquet")
    fields = PreferenceFields(prompt="q", chosen="good", rejected="bad")
    for name, numbers_as_text in (("p.csv", True), ("p.parquet", False)):
        dm = make(str(tmp_path / name), fields=fields, numbers_as_text=numbers_as_text)
        assert len(dm.train_examples) == 6
        assert {e.chosen for e in dm.train_examples} >= {"2<|im_end|>\n", "6<|im_end|>\n"}
    with pytest.raises(DataError, match=r"p\.csv row (\d): field 'good' is a number \(\1\), not text.*numbers_as_text"):
        make(str(tmp_path / "p.csv"), fields=fields)


def test_truncation_policy(tmp_path):
    """Prompt cut from the left to max_prompt_length, then the response from the right; counted."""
    path = tmp_path / "long.jsonl"
    long_prompt = " ".join(f"word{i}" for i in range(200))
    path.write_text(json.dumps({"prompt": long_prompt, "chosen": "yes " * 50, "rejected": "no " * 50}) + "\n")
    dm = make(str(path), chat_template=False, max_length=64, max_prompt_length=32)
    ex = dm.train_examples[0]
    assert len(ex.prompt_ids) == 32 and len(ex.prompt_ids) + len(ex.chosen_ids) == 64
    assert dm.stats["truncated"] == 1
    full = dm.tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert ex.prompt_ids == full[-32:], "the most recent prompt tokens are kept"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        make(str(path))


def test_missing_field_lists_fields_and_option(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text(json.dumps({"prompt": "a", "good": "b", "rejected": "c"}) + "\n")
    found = r"fields found: \['good', 'prompt', 'rejected'\]"
    with pytest.raises(DataError, match=rf"fields\.jsonl:1: missing field 'chosen'; {found}.*--data\.fields\.chosen"):
        make(str(path))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        make(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        make(str(tmp_path / "x.txt"))


def test_all_pairs_filtered_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "", "rejected": "c"}) + "\n")
    with pytest.raises(DataError, match="no usable preference pairs"):
        make(str(path))


def test_long_prompts_are_truncated_and_counted_never_emptied(tmp_path):
    """A quarter of the pairs with prompts far over max_length (the default budget: half of it for the prompt):
    every pair keeps its responses, is counted as truncated, and the validation set keeps its pairs."""
    rows = [{"prompt": f"What is {i} + 2?", "chosen": f"{i + 2}", "rejected": f"{i + 3}"} for i in range(8)]
    for r in rows[:2]:
        r["prompt"] = " ".join(f"word{j}" for j in range(300)) + r["prompt"]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = make(str(path), max_length=64, val_fraction=0.5)
    assert dm.max_prompt_length == 32
    assert dm.stats == {"skipped_empty": 0, "skipped_identical": 0, "truncated": 2}
    assert len(dm.train_examples) + len(dm.val_examples) == 8 and len(dm.val_examples) == 4
    for e in dm.train_examples + dm.val_examples:
        assert e.chosen_ids and e.rejected_ids and len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) <= 64


def test_a_validation_set_emptied_by_filtering_is_refused(tmp_path):
    from lit_rlhf.data.sources import holdout_split

    rows = [{"prompt": f"What is {i} + 2?", "chosen": f"{i + 2}", "rejected": f"{i + 3}"} for i in range(6)]
    for r in holdout_split([{"i": i} for i in range(6)], 0.34, seed=0)[1]:
        rows[r["i"]]["chosen"] = " "
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = (
        r"the validation set is empty: all 2 validation records \(--data\.val_fraction=0\.34\) were skipped "
        r"\(\{'skipped_empty': 2, .*--data\.val_fraction=0 "
    )
    with pytest.raises(DataError, match=message):
        make(str(path), val_fraction=0.34)
    assert len(make(str(path), val_fraction=0.0).train_examples) == 4  # no validation asked: trains on the rest


def test_numbers_in_text_fields_are_errors_unless_converted(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 2?", "chosen": 4, "rejected": 5.5}) + "\n")
    with pytest.raises(DataError, match=r"n\.jsonl:1: field 'chosen' is a number \(4\), not text"):
        make(str(path))
    ex = make(str(path), numbers_as_text=True, chat_template=False).train_examples[0]
    assert ex.chosen.startswith("4") and ex.rejected.startswith("5.5")
