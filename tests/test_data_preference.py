"""PreferenceDataModule: built-in task, file/hub shapes via field mapping, truncation, and bad input."""

import json
import os

import pytest

from lit_rlhf.data.preference import PreferenceDataModule, PreferenceFields
from lit_rlhf.data.sources import DataError
from lit_rlhf.data.tasks import arithmetic_preferences, is_correct


def make(path=None, **kw) -> PreferenceDataModule:
    kw.setdefault("val_fraction", 0.0)
    dm = PreferenceDataModule(tokenizer="tiny", path=path, **kw)
    dm.setup()
    return dm


def test_builtin_task_is_deterministic_and_verified():
    a, b = arithmetic_preferences(50, 0), arithmetic_preferences(50, 0)
    assert a == b and a != arithmetic_preferences(50, 1)
    for r in a:
        q = r["prompt"][0]["content"]
        assert is_correct(r["chosen"][0]["content"], r["answer"]) and not is_correct(r["rejected"][0]["content"], r["answer"]), q


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
    assert "Translate 'cat' to French." in ex.prompt and ex.chosen.startswith("Chat.") and ex.rejected.startswith("Chien.")


def test_seed_question_jsonl_and_empty_rejected(fixtures_dir):
    dm = make(os.path.join(fixtures_dir, "seed_preference.jsonl"))
    assert len(dm.train_examples) == 2 and dm.stats["skipped_empty"] == 1
    assert any("context: CREATE TABLE department" in e.prompt for e in dm.train_examples)


def test_csv_and_parquet(tmp_path):
    import datasets

    rows = [{"q": f"What is {i} + 1?", "good": f"{i + 1}", "bad": f"{i + 2}"} for i in range(6)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(tmp_path / "p.csv")
    ds.to_parquet(tmp_path / "p.parquet")
    for name in ("p.csv", "p.parquet"):
        dm = make(str(tmp_path / name), fields=PreferenceFields(prompt="q", chosen="good", rejected="bad"))
        assert len(dm.train_examples) == 6


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
    with pytest.raises(DataError, match=r"fields\.jsonl:1: missing field 'chosen'; fields found: \['good', 'prompt', 'rejected'\].*--data\.fields\.chosen"):
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
