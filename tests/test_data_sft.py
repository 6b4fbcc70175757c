"""SFT data: response-only loss masks (prompt/response and multi-turn), the NL2SQL fixture, packing, errors."""

import json
from pathlib import Path

import pytest
import torch

from lit_rlhf import models
from lit_rlhf.data.sft import SFTDataModule, pack_examples
from lit_rlhf.data.sources import DataError
from lit_rlhf.data.tasks import arithmetic_problems, arithmetic_worked_sft, worked_answer
from lit_rlhf.rewards import is_correct

FIXTURES = Path(__file__).parent / "fixtures"


def sft_data(**kw) -> SFTDataModule:
    """An SFTDataModule given the tiny model's tokenizer (SmolLM2's), as a stage gives it its own."""
    kw.setdefault("batch_size", 1)  # tiny files: one example is a full batch
    dm = SFTDataModule(**kw)
    dm.connect(models.load_tokenizer("tiny"))
    return dm


def scored_text(dm, example) -> str:
    return dm.tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


def unscored_text(dm, example) -> str:
    return dm.tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if not m])


def test_prompt_tokens_are_not_scored():
    dm = sft_data(num_train=4, num_val=2)
    dm.setup()
    e = dm.train_examples[0]
    response = arithmetic_worked_sft(1, 0)[0]["response"][0]["content"]
    assert scored_text(dm, e) == response + "<|im_end|>\n"
    assert unscored_text(dm, e) == dm.tokenizer.decode(e.prompt_ids)  # exactly the prompt (chat template + question)
    assert "What is" in unscored_text(dm, e) and e.loss_mask[: len(e.prompt_ids)] == [0] * len(e.prompt_ids)


def test_multi_turn_scores_only_assistant_turns():
    dm = sft_data(path=str(FIXTURES / "sft_chat.jsonl"), val_fraction=0.0)
    dm.setup()
    texts = {scored_text(dm, e) for e in dm.train_examples + dm.val_examples}
    assert texts == {"5<|im_end|>\n8<|im_end|>\n", "Hi!<|im_end|>\n"}
    multi = next(e for e in dm.train_examples + dm.val_examples if "8" in scored_text(dm, e))
    rest = unscored_text(dm, multi)
    for piece in ("You add numbers.", "What is 2 + 3?", "And 4 + 4?", "<|im_start|>assistant\n"):
        assert piece in rest  # system, user turns and role headers are context, never targets


def test_nl2sql_fixture_plain_prompt_format():
    """NL2SQL SFT records (fixture): prompt "context: ... question: ... answer: " + chosen SQL, no chat template."""
    dm = sft_data(path=str(FIXTURES / "sft_nl2sql.jsonl"), chat_template=False, val_fraction=0.2)
    dm.setup()
    records = [json.loads(line) for line in (FIXTURES / "sft_nl2sql.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"]: r["chosen"] for r in records}
    assert len(dm.train_examples) + len(dm.val_examples) == len(records)
    for e in dm.train_examples + dm.val_examples:
        prompt = unscored_text(dm, e)
        assert prompt.startswith("context: CREATE TABLE") and "question:" in prompt and prompt.endswith("answer: ")
        assert scored_text(dm, e) == by_prompt[prompt] + "<|im_end|>"


def test_missing_fields_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"text": "c"}\n')
    dm = sft_data(path=str(path))
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*fields found: \['text'\]"):
        dm.setup()


def test_packing_rows_fit_and_positions_restart():
    dm = sft_data(num_train=40, num_val=4, packing=True, max_length=256, batch_size=2)
    dm.setup()
    assert sum(len(r) for r in dm.train_rows) == len(dm.train_examples)
    assert all(sum(len(e.input_ids) for e in r) <= 256 for r in dm.train_rows)
    assert max(len(r) for r in dm.train_rows) > 1
    batch = dm.collate(dm.train_rows[:2])
    row = dm.train_rows[0]
    starts = torch.tensor([0] + [len(e.input_ids) for e in row]).cumsum(0)[:-1]
    assert (batch.position_ids[0, starts] == 0).all()
    first = len(row[0].input_ids)
    assert batch.position_ids[0, :first].tolist() == list(range(first))
    assert batch.loss_mask[0, starts].sum() == 0  # the first token of an example is never a target
    val = next(iter(dm.val_dataloader()[0]))
    assert val.position_ids is None  # validation rows are never packed


def test_pack_examples_is_greedy_and_sequential():
    from lit_rlhf.data.sft import SFTExample

    examples = [SFTExample([1] * n, [0] * n) for n in (5, 4, 3, 8, 2)]
    assert [[len(e.input_ids) for e in r] for r in pack_examples(examples, 9)] == [[5, 4], [3], [8], [2]]


def test_builtin_split_and_eval_prompts():
    dm = sft_data(num_train=50, num_val=10, eval_prompts=6)
    dm.setup()
    train_q = {dm.tokenizer.decode(e.prompt_ids) for e in dm.train_examples}
    assert not train_q & {dm.tokenizer.decode(e.prompt_ids) for e in dm.val_examples}
    rows, prompts = dm.val_dataloader()
    batch = next(iter(prompts))
    assert len(batch.prompts) == 6 and batch.attention_mask[:, -1].all()  # left-padded
    assert batch.extras["answer"] == [x for _, x in arithmetic_problems(6, 1)]


@pytest.mark.parametrize("seed", [0, 1])
def test_worked_answers_are_right(seed):
    for record in arithmetic_worked_sft(300, seed):
        assert is_correct(record["response"][0]["content"], record["answer"])
    assert worked_answer(47, "+", 38) == "Ones: 7 + 8 = 15, write 5 carry 1. Tens: 4 + 3 + 1 = 8. The answer is 85."
    assert worked_answer(83, "-", 47) == "Ones: 3 < 7, borrow: 13 - 7 = 6. Tens: 8 - 1 - 4 = 3. The answer is 36."


def test_empty_responses_are_skipped_and_counted(tmp_path, capsys):
    """A blank response (or a conversation whose assistant turns are all blank) would train only the template's
    end-of-turn tokens: skipped, counted as ``skipped_empty`` and reported."""
    rows = [
        {"prompt": "What is 1 + 1?", "response": "2"},
        {"prompt": "What is 2 + 2?", "response": ""},
        {"prompt": "What is 3 + 3?", "response": [{"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = sft_data(path=str(path), val_fraction=0.0)
    dm.setup()
    assert len(dm.train_examples) == 2 and dm.stats["skipped_empty"] == 3
    assert "'skipped_empty': 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a", "response": 7}, r"bad\.jsonl:1: field 'response' is a number \(7\), not text"),
        ({"prompt": {"q": "a"}, "response": "b"}, r"bad\.jsonl:1: field 'prompt' must be a string .* got dict"),
        ({"question": None, "chosen": "b"}, r"bad\.jsonl:1: field 'question' is null"),
        ({"messages": "hi"}, r"bad\.jsonl:1: field 'messages' must be a list of \{role, content\} messages"),
        ({"messages": None}, r"bad\.jsonl:1: field 'messages' is null"),
    ],
)
def test_wrong_types_name_the_line_and_the_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        sft_data(path=str(path), val_fraction=0.0).setup()


def test_long_prompts_keep_response_tokens():
    dm = sft_data(num_train=8, num_val=2, max_length=40, max_prompt_length=36)
    dm.setup()
    assert dm.stats["truncated"] == 10 and dm.stats["skipped_unscored"] == 0
    for e in dm.train_examples:
        assert len(e.input_ids) == 40 and sum(e.loss_mask) >= 4
