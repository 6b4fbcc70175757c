"""Bad inputs through the real entry points: every case fails before training with a message that names the file,
line (or row), field and option, and writes nothing into the run's output directory.

Each case runs ``python -m lit_rlhf.experiments.<stage> --config experiments/<stage>/tiny.yaml ...`` in-process
(``main(args=[...])``; two cases as subprocesses, for the exit status), with an output directory that already holds a
sentinel file: afterwards the directory holds exactly that file, unchanged. The errors come from the stage's
``__init__`` (settings) or the data module's ``setup`` (data, batch and validation sizes), before a model is loaded.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lit_rlhf.data.sources import DataError, holdout_split
from lit_rlhf.experiments import dpo, grpo, rm, sft

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"dpo": dpo.main, "sft": sft.main, "rm": rm.main, "grpo": grpo.main}
PAIR = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def write_jsonl(path: Path, rows: list) -> str:
    """``rows`` as JSONL: dicts are dumped, bytes are written as they are (one line each)."""
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return str(path)


def pairs(n: int, **overrides) -> list[dict]:
    return [{**PAIR, "prompt": f"What is {i} + 2?", **overrides} for i in range(n)]


def held_out_pairs(tmp: Path) -> list[str]:
    """10 pairs whose 2 held-out ones (val_fraction 0.2, seed 0) have chosen == rejected: validation ends up empty."""
    rows = pairs(10)
    _, val = holdout_split([{"i": i} for i in range(10)], 0.2, seed=0)
    for r in val:
        rows[r["i"]]["rejected"] = rows[r["i"]]["chosen"]
    return ["--data.path", write_jsonl(tmp / "heldout.jsonl", rows), "--data.val_fraction=0.2"]


NULL_CONTENT = {"role": "assistant", "content": None}
NON_UTF8 = json.dumps(PAIR).encode().replace(b"2 + 2", b"caf\xe9 2")
# (stage, extra arguments (a function of the tmp dir for data files), exception, message regex)
CASES = {
    # -- data files: where, which line, which field ------------------------------------------------------------------
    "dpo-non-utf8": (
        "dpo",
        lambda t: ["--data.path", write_jsonl(t / "latin1.jsonl", [PAIR, NON_UTF8])],
        DataError,
        rf"latin1\.jsonl:2: not UTF-8: byte\(s\) e9 at byte offset {len(json.dumps(PAIR)) + 1 + NON_UTF8.index(233)} ",
    ),
    "dpo-number": (
        "dpo",
        lambda t: ["--data.path", write_jsonl(t / "num.jsonl", [PAIR, {**PAIR, "chosen": 4}])],
        DataError,
        r"num\.jsonl:2: field 'chosen' is a number \(4\), not text; pass --data\.numbers_as_text=true",
    ),
    "dpo-dict": (
        "dpo",
        lambda t: ["--data.path", write_jsonl(t / "dict.jsonl", [{**PAIR, "rejected": {"text": "5"}}])],
        DataError,
        r"dict\.jsonl:1: field 'rejected' must be a string or a list of \{role, content\} chat messages, "
        r"got dict \{'text': '5'\}",
    ),
    "dpo-null": (
        "dpo",
        lambda t: ["--data.path", write_jsonl(t / "null.jsonl", [PAIR, PAIR, {**PAIR, "prompt": None}])],
        DataError,
        r"null\.jsonl:3: field 'prompt' is null; expected a string or a list of chat messages",
    ),
    "dpo-null-message-content": (
        "dpo",
        lambda t: ["--data.path", write_jsonl(t / "msg.jsonl", [{**PAIR, "chosen": [NULL_CONTENT]}])],
        DataError,
        r"msg\.jsonl:1: field 'chosen' message 0: 'content' must be a string, got null",
    ),
    "dpo-empty-file": (
        "dpo",
        lambda t: ["--data.path", write_jsonl(t / "empty.jsonl", [])],
        DataError,
        r"empty\.jsonl: file is empty \(no records\)",
    ),
    "dpo-blank-lines-file": (
        "dpo",
        lambda t: ["--data.path", write_jsonl(t / "blank.jsonl", [b"", b"  "])],
        DataError,
        r"blank\.jsonl: file is empty \(no records\)",
    ),
    "dpo-directory": (
        "dpo",
        lambda t: ["--data.path", str(t)],
        DataError,
        r": is a directory; --data\.path takes a data file \(\.csv, \.json, \.jsonl, \.parquet\) or a hub dataset",
    ),
    "sft-number": (
        "sft",
        lambda t: ["--data.path", write_jsonl(t / "sft.jsonl", [{"prompt": "1 + 1?", "response": 2}])],
        DataError,
        r"sft\.jsonl:1: field 'response' is a number \(2\), not text",
    ),
    "sft-null": (
        "sft",
        lambda t: ["--data.path", write_jsonl(t / "sft.jsonl", [{"prompt": None, "response": "2"}])],
        DataError,
        r"sft\.jsonl:1: field 'prompt' is null",
    ),
    "sft-message-dict-content": (
        "sft",
        lambda t: [
            "--data.path",
            write_jsonl(
                t / "chat.jsonl",
                [
                    {
                        "messages": [
                            {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": {"text": "hello"}},
                        ]
                    }
                ],
            ),
        ],
        DataError,
        r"chat\.jsonl:1: field 'messages' message 1: 'content' must be a string, got dict",
    ),
    "rm-nan-score": (
        "rm",
        lambda t: [
            "--data.format=scored",
            "--data.path",
            write_jsonl(
                t / "scored.jsonl",
                [
                    {"prompt": "a", "response": "b", "score": 1.0},
                    {"prompt": "a", "response": "c", "score": float("nan")},
                ],
            ),
        ],
        DataError,
        r"scored\.jsonl:2: field 'score' must be a finite number, got float nan",
    ),
    "rm-null-score": (
        "rm",
        lambda t: [
            "--data.format=scored",
            "--data.path",
            write_jsonl(t / "scored.jsonl", [{"prompt": "a", "response": "b", "score": None}]),
        ],
        DataError,
        r"scored\.jsonl:1: field 'score' must be a finite number, got null",
    ),
    "rm-ranked-number": (
        "rm",
        lambda t: [
            "--data.format=ranked",
            "--data.path",
            write_jsonl(t / "ranked.jsonl", [{"prompt": "a", "responses": ["b", 3]}]),
        ],
        DataError,
        r"ranked\.jsonl:1: field 'responses' item 1 is a number \(3\), not text",
    ),
    "grpo-null-prompt": (
        "grpo",
        lambda t: ["--data.path", write_jsonl(t / "prompts.jsonl", [{"prompt": None, "answer": 3}])],
        DataError,
        r"prompts\.jsonl:1: field 'prompt' is null",
    ),
    # -- length settings, batch and validation sizes -----------------------------------------------------------------
    "dpo-prompt-length": (
        "dpo",
        lambda t: ["--data.max_prompt_length=256"],
        ValueError,
        r"--data\.max_prompt_length=256 must be positive and smaller than --data\.max_length=128",
    ),
    "sft-prompt-length-equal": (
        "sft",
        lambda t: ["--data.max_prompt_length=128"],
        ValueError,
        r"--data\.max_prompt_length=128 must be positive and smaller than --data\.max_length=128",
    ),
    "rm-prompt-length": (
        "rm",
        lambda t: ["--data.max_length=64", "--data.max_prompt_length=100"],
        ValueError,
        r"--data\.max_prompt_length=100 must be positive and smaller than --data\.max_length=64",
    ),
    "dpo-batch-size": (
        "dpo",
        lambda t: ["--data.batch_size=17"],
        DataError,
        r"--data\.batch_size=17 is larger than the training set \(16 training pairs; .*no full batch, so no training "
        r"step; use --data\.batch_size=16 or less",
    ),
    "sft-batch-size": (
        "sft",
        lambda t: ["--data.batch_size=65"],
        DataError,
        r"--data\.batch_size=65 is larger than the training set \(64 training examples",
    ),
    "grpo-batch-size": (
        "grpo",
        lambda t: ["--data.batch_size=40"],
        DataError,
        r"--data\.batch_size=40 is larger than the training set \(32 training prompts",
    ),
    "dpo-empty-validation": (
        "dpo",
        held_out_pairs,
        DataError,
        r"the validation set is empty: all 2 validation records \(--data\.val_fraction=0\.2\) were skipped "
        r"\(\{'skipped_empty': 0, 'skipped_identical': 2, 'truncated': 0\}\); .*--data\.val_fraction=0",
    ),
    # -- settings that cannot learn ----------------------------------------------------------------------------------
    "dpo-beta-zero": (
        "dpo",
        lambda t: ["--model.beta=0"],
        ValueError,
        r"model\.beta must be a positive number, got 0\.0",
    ),
    "dpo-beta-negative": (
        "dpo",
        lambda t: ["--model.beta=-0.1"],
        ValueError,
        r"model\.beta must be a positive number, got -0\.1",
    ),
    "ipo-beta-zero": (
        "dpo",
        lambda t: ["--model.loss=ipo", "--model.beta=0"],
        ValueError,
        r"model\.beta must be a positive number, got 0\.0: the ipo loss",
    ),
    "dpo-label-smoothing": (
        "dpo",
        lambda t: ["--model.label_smoothing=0.5"],
        ValueError,
        r"model\.label_smoothing must be in \[0, 0\.5\), got 0\.5",
    ),
}
CONFIGS = {stage: str(ROOT / "experiments" / stage / "tiny.yaml") for stage in STAGES}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """An output directory that already holds a file (a sentinel that must stay as it is)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("an earlier run's file\n")
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_anything_is_written(case, tmp_path, output_dir):
    stage, extra, error, message = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    before = snapshot(output_dir)
    with pytest.raises(error, match=message):
        STAGES[stage](args=["--config", CONFIGS[stage], "--output_dir", str(output_dir), *extra(data)])
    assert snapshot(output_dir) == before


@pytest.mark.parametrize("case", ["dpo-directory", "sft-number"])
def test_command_line_exits_non_zero_with_the_message(case, tmp_path, output_dir):
    stage, extra, _, message = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    before = snapshot(output_dir)
    command = [sys.executable, "-m", f"lit_rlhf.experiments.{stage}", "--config", CONFIGS[stage]]
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run(
        [*command, "--output_dir", str(output_dir), *extra(data)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert re.search(message, done.stderr.splitlines()[-1]), done.stderr[-2000:]
    assert snapshot(output_dir) == before


@pytest.mark.parametrize(
    "path", sorted((ROOT / "experiments").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_every_config_has_room_for_responses(path):
    """Each stage YAML's max_prompt_length is below its max_length (the data module refuses it otherwise)."""
    import yaml

    from lit_rlhf.data.base import prompt_budget

    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    if isinstance(data, dict) and "max_length" in data:
        assert prompt_budget(data["max_length"], data.get("max_prompt_length")) < data["max_length"]
