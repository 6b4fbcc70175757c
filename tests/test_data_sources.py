"""What the four data modules share: train/val splits, built-in task splits, the record-source arguments, the
tokenizer they are given (``connect``), hub subsets, and no import of a network or stage module from ``data/``."""

import ast
import inspect
import json
from pathlib import Path

import pytest

from lit_rlhf import models
from lit_rlhf.data import sources
from lit_rlhf.data.base import SOURCE_ARGS
from lit_rlhf.data.preference import PreferenceDataModule
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.data.scored import RewardDataModule
from lit_rlhf.data.sft import SFTDataModule
from lit_rlhf.data.sources import builtin_split, holdout_split, train_val_records

MODULES = [SFTDataModule, PreferenceDataModule, PromptDataModule, RewardDataModule]
DATA_DIR = Path(__file__).resolve().parents[1] / "lit_rlhf" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny")


@pytest.fixture
def all_fields(tmp_path) -> str:
    """Six records carrying every module's fields (SFT response, preference pair, prompt answer, RM score)."""
    path = tmp_path / "records.jsonl"
    rows = [
        {
            "prompt": f"What is {i} + 1?",
            "response": f"{i + 1}",
            "chosen": f"{i + 1}",
            "rejected": f"{i + 2}",
            "score": 1.0,
            "answer": i + 1,
        }
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_holdout_split_sizes_disjoint_and_seeded():
    records = [{"i": i} for i in range(8)]
    train, val = holdout_split(records, 0.25, seed=3)
    assert len(val) == 2 and len(train) == 6
    assert sorted(r["i"] for r in train + val) == list(range(8))
    assert holdout_split(records, 0.25, seed=3) == (train, val)
    assert holdout_split(records, 0.25, seed=4) != (train, val)
    assert len(holdout_split(records, 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one record
    train, val = holdout_split(records, 0.0, seed=0)  # none at 0 (train in the seeded order, as always)
    assert val == [] and sorted(r["i"] for r in train) == list(range(8))
    assert holdout_split(records[:1], 0.5, seed=0) == (records[:1], [])  # a single record is never held out
    with pytest.raises(ValueError, match="val_fraction"):
        holdout_split(records, 1.0, seed=0)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_val_fraction_zero_trains_on_every_record(module, all_fields, tokenizer):
    """The guard all four modules share: ``val_fraction=0`` holds out nothing (three of the four used to hold out
    one record)."""
    kw = {"format": "scored", "batch_size": 1} if module is RewardDataModule else {"batch_size": 1}
    dm = module(path=all_fields, val_fraction=0.0, chat_template=False, **kw)
    dm.connect(tokenizer)
    dm.setup()
    assert len(dm.train_examples) == 6 and dm.val_examples == []
    dm = module(path=all_fields, val_fraction=0.34, chat_template=False, **kw)
    dm.connect(tokenizer)
    dm.setup()
    assert len(dm.train_examples) == 4 and len(dm.val_examples) == 2


def test_builtin_split_holds_out_questions_and_names_the_tasks():
    def make(n, seed):
        return [{"prompt": [{"role": "user", "content": f"q{(seed * 7 + i) % 20}"}], "seed": seed} for i in range(n)]

    train, val = builtin_split({"toy": make}, "toy", num_train=10, num_val=4, seed=0)
    assert val == make(4, 1) and len(train) == 10 and all(r["seed"] == 0 for r in train)
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in val}
    with pytest.raises(ValueError, match=r"unknown built-in task 'chess'; available: \['toy'\]"):
        builtin_split({"toy": make}, "chess", 1, 1, 0)


def test_val_split_and_subset_reach_the_hub(monkeypatch):
    """``val_split`` is read as validation (capped at ``max_val_records``) and ``subset`` names the configuration."""
    calls = []

    class Dataset(list):
        def to_list(self):
            return list(self)

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return Dataset({"prompt": f"{split} {i}"} for i in range(5))

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    train, val = train_val_records("org/set", "train", "test", 0.5, 0, max_records=4, max_val_records=2, subset="main")
    assert calls == [("org/set", "main", "train"), ("org/set", "main", "test")]
    assert [r["prompt"] for r in train] == [f"train {i}" for i in range(4)] and len(val) == 2
    assert val[1]["_where"] == "org/set/main[test]#1"
    assert sources.read_records("org/set", "train")[0]["_where"] == "org/set[train]#0"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_module_declares_the_record_source_arguments(module):
    params = inspect.signature(module.__init__).parameters
    assert "tokenizer" not in params
    reference = inspect.signature(SFTDataModule.__init__).parameters
    for name in SOURCE_ARGS:
        assert name in params, f"{module.__name__} lacks {name}"
        if name not in ("task", "num_train"):  # built-in tasks and their sizes differ by record kind
            assert params[name].annotation == reference[name].annotation, name
            assert params[name].default == reference[name].default, name


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_a_module_without_a_tokenizer_says_connect(module):
    dm = module(num_train=2, num_val=1)
    with pytest.raises(RuntimeError, match=r"no tokenizer: call connect\(tokenizer\)"):
        dm.setup()


def test_data_imports_no_network_or_stage_module():
    """Layers run one way (data -> stages -> networks): nothing in lit_rlhf/data imports a network or a stage, at the
    top of a file or inside a function."""
    networks = ("lit_rlhf.models", "lit_rlhf.reward_models", "lit_rlhf.critics", "lit_rlhf.value_models")
    banned = (*networks, "lit_rlhf.stages")
    found = []
    for path in sorted(DATA_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names if n.startswith(banned)]
    assert found == []


# -- bad inputs: where, which line or row, which field --------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_bytes_that_are_not_utf8_name_line_and_offset(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    first = {".jsonl": b'{"prompt": "a"}\n', ".json": b'[{"prompt":\n', ".csv": b"prompt,response\n"}[suffix]
    path.write_bytes(first + b'"caf\xe9"\n')
    with pytest.raises(
        sources.DataError,
        match=rf"latin1\{suffix}:2: not UTF-8: byte\(s\) e9 at byte offset "
        rf"{len(first) + 4} \(column 5 of the line\)",
    ):
        sources.read_records(str(path))


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("empty.json", ""),
        ("list.json", "[]"),
        ("empty.csv", ""),
        ("header.csv", "prompt,response\n"),
    ],
)
def test_an_empty_file_says_so(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(sources.DataError, match=rf"{name}: file is empty \(no records\)"):
        sources.read_records(str(tmp_path / name))


def test_a_directory_is_not_reported_as_missing(tmp_path):
    for path in (str(tmp_path), "tests/fixtures"):
        with pytest.raises(sources.DataError, match=r": is a directory; --data\.path takes a data file"):
            sources.read_records(path)
    with pytest.raises(sources.DataError, match="data file not found"):
        sources.read_records(str(tmp_path / "nope.jsonl"))


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    assert sources.read_records(str(path))[0]["prompt"] == "a"


WHERE = {"_where": "f.jsonl:7"}


@pytest.mark.parametrize(
    "value, message",
    [
        (None, r"f\.jsonl:7: field 'chosen' is null; expected a string or a list of chat messages"),
        (3, r"f\.jsonl:7: field 'chosen' is a number \(3\), not text; pass --data\.numbers_as_text=true"),
        (2.5, r"field 'chosen' is a number \(2\.5\)"),
        (True, r"field 'chosen' must be a string or a list of \{role, content\} chat messages, got bool True"),
        ({"text": "x"}, r"field 'chosen' must be a string .* got dict \{'text': 'x'\}"),
        (["a", "b"], r"field 'chosen' must be a string .* got list \['a', 'b'\]"),
        ([{"role": "assistant"}], r"field 'chosen' message 0 lacks \['content'\]"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
            r"field 'chosen' message 1: 'content' must be a string, got null",
        ),
        ([{"role": 1, "content": "a"}], r"field 'chosen' message 0: 'role' must be a string, got int 1"),
    ],
)
def test_get_text_names_the_record_and_the_field(value, message):
    with pytest.raises(sources.DataError, match=message):
        sources.get_text({**WHERE, "chosen": value}, "chosen", "fields.chosen")


def test_get_text_passes_text_and_converts_numbers_only_when_asked():
    messages = [{"role": "assistant", "content": "4"}]
    assert sources.get_text({"c": "4"}, "c", "fields.c") == "4"
    assert sources.get_text({"c": messages}, "c", "fields.c") == messages
    assert sources.get_text({"c": []}, "c", "fields.c") == []  # an empty conversation: blank, skipped by the module
    assert sources.get_text({"c": 4}, "c", "fields.c", numbers_as_text=True) == "4"
    assert sources.get_text({"c": 0.5}, "c", "fields.c", numbers_as_text=True) == "0.5"
    with pytest.raises(sources.DataError, match="got bool"):
        sources.get_text({"c": False}, "c", "fields.c", numbers_as_text=True)


def test_csv_rows_are_named_by_row(tmp_path, tokenizer):
    path = tmp_path / "p.csv"
    path.write_text("prompt,response\nWhat is 1 + 1?,two\nWhat is 2 + 2?,\n")
    records = sources.read_records(str(path))
    assert [r["_where"] for r in records] == [f"{path} row 1", f"{path} row 2"]
    dm = SFTDataModule(path=str(path), val_fraction=0.0, batch_size=1)
    dm.connect(tokenizer)
    with pytest.raises(sources.DataError, match=r"p\.csv row 2: field 'response' is null"):
        dm.setup()  # pandas reads the empty cell as a missing value


# -- lengths, batches and validation sizes --------------------------------------------------------------------------
def test_prompt_budget_is_below_max_length():
    from lit_rlhf.data.base import prompt_budget

    assert prompt_budget(128, None) == 64 and prompt_budget(128, 100) == 100
    for max_length, max_prompt_length in ((128, 128), (128, 256), (128, 0), (1, None)):
        with pytest.raises(
            ValueError,
            match=rf"--data\.max_prompt_length=\d+ must be positive and smaller than "
            rf"--data\.max_length={max_length}",
        ):
            prompt_budget(max_length, max_prompt_length)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_length_settings_are_checked_when_the_module_is_built(module):
    if module is PromptDataModule:  # prompts only: no response budget to share
        assert "max_length" not in inspect.signature(module.__init__).parameters
        return
    with pytest.raises(ValueError, match=r"--data\.max_prompt_length=256 .* --data\.max_length=128"):
        module(max_length=128, max_prompt_length=256)
    assert module(max_length=128).max_prompt_length == 64


def test_truncate_pair_keeps_response_tokens():
    """Prompt cut from the left to max_prompt_length, the response from the right to what is left: never empty."""
    from lit_rlhf.data.render import truncate_pair

    prompt, response = list(range(100)), list(range(100, 150))
    p, r, cut = truncate_pair(prompt, response, 64, 48)
    assert cut and p == prompt[-48:] and r == response[:16]
    p, r, cut = truncate_pair(prompt[:10], response, 32, 16)  # a short prompt is kept whole
    assert cut and p == prompt[:10] and r == response[:22]
    assert truncate_pair(prompt[:10], response[:5], 32, 16) == (prompt[:10], response[:5], False)
    with pytest.raises(ValueError, match="0 < max_prompt_length < max_length"):
        truncate_pair(prompt, response, 64, 64)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_a_batch_larger_than_the_training_set_per_process_is_refused(module, all_fields, tokenizer, monkeypatch):
    """6 records, one held out: 5 training examples make one batch of 5 on one process, none over 2 processes."""
    kw = {"format": "scored"} if module is RewardDataModule else {}
    dm = module(path=all_fields, val_fraction=0.2, chat_template=False, batch_size=5, **kw)
    dm.connect(tokenizer)
    dm.setup()
    assert len(dm.train_examples) == 5
    monkeypatch.setattr("lit_rlhf.data.base.world", lambda: (2, 0))
    with pytest.raises(
        sources.DataError,
        match=r"--data\.batch_size=5 is larger than the training set \(5 training "
        r"\w+ over 2 processes: 2 per process; .*use --data\.batch_size=2 or less",
    ):
        dm.setup()  # the check runs on every setup call: here once the process group exists
    dm = module(path=all_fields, val_fraction=0.0, chat_template=False, batch_size=7, **kw)
    dm.connect(tokenizer)
    monkeypatch.setattr("lit_rlhf.data.base.world", lambda: (1, 0))
    with pytest.raises(sources.DataError, match=r"--data\.batch_size=7 is larger than the training set \(6 training"):
        dm.setup()
