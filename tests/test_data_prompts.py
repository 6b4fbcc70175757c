"""PromptDataModule: built-in task, GSM8K-style answers, field mapping, chat template / system prompt, truncation,
collation, and the dynamic-sampling refill stream."""

import os

import pytest
import torch

from lit_rlhf import models
from lit_rlhf.data.prompts import TASKS, PromptDataModule, PromptFields, concat_prompt_batches, with_instructions
from lit_rlhf.data.sources import DataError, builtin_split
from lit_rlhf.data.tasks import arithmetic_prompts
from lit_rlhf.rewards import answer_value


def prompt_data(**kw) -> PromptDataModule:
    """A PromptDataModule given the SmolLM2 tokenizer, as a stage gives it its own."""
    kw.setdefault("batch_size", 1)  # tiny files: one prompt is a full batch
    dm = PromptDataModule(**kw)
    dm.connect(models.load_tokenizer("smollm2-135m"))
    return dm


def test_builtin_arithmetic_is_deterministic_and_held_out():
    train, val = builtin_split(TASKS, "arithmetic", 200, 32, seed=0)
    assert len(train) == 200 and len(val) == 32
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in val}
    assert val == arithmetic_prompts(32, 1)  # the TRL harness' evaluation prompts (seed 1)
    assert builtin_split(TASKS, "arithmetic", 200, 32, seed=0) == (train, val)
    with pytest.raises(ValueError, match=r"unknown built-in task 'chess'; available: \['arithmetic'\]"):
        builtin_split(TASKS, "chess", 1, 1, 0)


@pytest.mark.parametrize(
    "answer, value",
    [
        (72, 72),
        (2.5, 2.5),
        ("72", 72),
        ("Natalia sold 24 clips.\n#### 72", 72),
        ("#### 1,234", 1234),
        ("-3.5", -3.5),
        ("no number", None),
        (None, None),
    ],
)
def test_answer_value(answer, value):
    """GSM8K: the number after the last '####'; other strings: their last number; numbers as they are."""
    assert answer_value(answer) == value


def test_builtin_batches_render_the_chat_template_with_the_default_system_prompt():
    dm = prompt_data(num_train=16, num_val=4, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[0] == 4 and batch.attention_mask.shape == batch.input_ids.shape
    assert (batch.attention_mask[:, -1] == 1).all()  # left-padded
    assert batch.prompts[0].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert batch.prompts[0].endswith("<|im_start|>assistant\n") and "What is" in batch.prompts[0]
    assert set(batch.extras) == {"answer"} and all(isinstance(a, int) for a in batch.extras["answer"])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert dm.tokenizer.decode(ids) == batch.prompts[0]


def test_system_prompt_and_instruction():
    """A system turn replaces the template's default unless the prompt has its own; the instruction goes at the end
    of the last user turn; the record itself is not modified."""
    assert with_instructions("Hi", "Be brief.", None) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}]
    assert with_instructions(own, "Be brief.", "Now.") == [own[0], {"role": "user", "content": "Hi Now."}]
    assert own[1]["content"] == "Hi"
    assert with_instructions("Hi", None, None) == "Hi"
    dm = prompt_data(num_train=4, num_val=2, system_prompt="You add.", instruction="Answer with just the number.")
    dm.setup()
    assert dm.train_examples[0].prompt.startswith("<|im_start|>system\nYou add.<|im_end|>")
    assert (
        "?  Answer" not in dm.train_examples[0].prompt
        and "? Answer with just the number.<|im_end|>" in dm.train_examples[0].prompt
    )


def test_gsm8k_file_question_field_and_hash_answers(fixtures_dir):
    """GSM8K records {question, answer: '... #### 72'}: the prompt falls back to 'question', answers become numbers."""
    dm = prompt_data(path=os.path.join(fixtures_dir, "gsm8k_sample.jsonl"), val_fraction=0.34, seed=0)
    dm.setup()
    examples = dm.train_examples + dm.val_examples
    assert len(dm.val_examples) == 2 and len(examples) == 6
    assert sorted(e.columns["answer"] for e in examples) == [5, 10, 35, 42, 72, 624]
    natalia = next(e for e in examples if "Natalia" in e.prompt)
    assert natalia.columns["answer"] == 72 and natalia.prompt.endswith("<|im_start|>assistant\n")


def test_field_mapping_extra_columns_and_plain_prompts(fixtures_dir):
    path = os.path.join(fixtures_dir, "prompts_plain.jsonl")
    dm = prompt_data(
        path=path,
        fields=PromptFields(prompt="text", answer="target", extra=["topic"]),
        chat_template=False,
        val_fraction=0.0,
    )
    dm.setup()
    cols = [e.columns for e in dm.train_examples + dm.val_examples]
    assert sorted(c["topic"] for c in cols) == ["animals", "free", "powers", "primes"]
    by_topic = {c["topic"]: c["answer"] for c in cols}
    assert by_topic == {"primes": 11, "powers": 1024, "free": None, "animals": 8}
    assert {e.prompt for e in dm.train_examples + dm.val_examples} >= {"Write one word."}  # verbatim, no template
    with pytest.raises(DataError, match=r"missing field 'prompt'.*'text'.*--data.fields.prompt"):
        prompt_data(path=path, val_fraction=0.0).setup()
    with pytest.raises(DataError, match="missing field 'level'.*--data.fields.extra"):
        prompt_data(path=path, fields=PromptFields(prompt="text", extra=["level"])).setup()


def test_long_prompts_are_cut_from_the_left_and_counted():
    dm = prompt_data(num_train=8, num_val=2, max_prompt_length=12)
    dm.setup()
    assert dm.stats["truncated"] == 10
    assert all(len(e.prompt_ids) == 12 and e.prompt.endswith("assistant\n") for e in dm.train_examples)


def test_refill_stream_is_disjoint_across_ranks_and_concat_repads():
    dm = prompt_data(num_train=20, num_val=2, batch_size=3)
    dm.setup()
    seen = []
    for rank in range(2):
        stream = dm.refill_batches(rank, 2)
        seen.append({p for _ in range(3) for p in next(stream).prompts})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    a, b = dm.collate(dm.train_examples[:2]), dm.collate(dm.train_examples[2:5])
    both = concat_prompt_batches([a, b], dm.tokenizer.pad_token_id)
    assert both.prompts == a.prompts + b.prompts and both.extras["answer"] == a.extras["answer"] + b.extras["answer"]
    for i, e in enumerate(dm.train_examples[:5]):
        assert both.input_ids[i][both.attention_mask[i].bool()].tolist() == e.prompt_ids
    assert torch.equal(both.attention_mask[:, -1], torch.ones(5, dtype=both.attention_mask.dtype))


def test_prompt_types_name_the_line_and_the_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "What is 1 + 1?", "answer": 2}\n{"prompt": 12, "answer": 12}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'prompt' is a number \(12\), not text"):
        prompt_data(path=str(path), val_fraction=0.0).setup()
    dm = prompt_data(path=str(path), val_fraction=0.0, numbers_as_text=True, chat_template=False)
    dm.setup()
    assert sorted(e.prompt for e in dm.train_examples) == ["12", "What is 1 + 1?"]
    path.write_text('{"prompt": [{"role": "user", "content": null}]}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'prompt' message 0: 'content' must be a string, got null"):
        prompt_data(path=str(path), val_fraction=0.0).setup()
