"""``lit-rlhf chat`` (multi-turn history through the chat template, /reset, /exit, context trimming; a real terminal
session on the tiny model) and ``lit-rlhf generate`` (a prompt file -> JSONL of completions)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import torch

from lit_rlhf import models
from lit_rlhf.experiments import chat
from lit_rlhf.rollout import SamplingSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripted_replies(monkeypatch, seen: list[str]) -> None:
    """sample_completions answers "reply <k>" to the k-th prompt and records every prompt text."""

    def fake(lm, tokenizer, batch, group_size, settings, generator, backend="kv_cache"):
        seen.append(batch.prompts[0])
        assert batch.input_ids.shape[0] == 1 and group_size == 1
        return SimpleNamespace(completions=[f" reply {len(seen)} "], truncated=torch.tensor([len(seen) == 3]))

    monkeypatch.setattr("lit_rlhf.rollout.sample_completions", fake)


def test_chat_keeps_the_history_resets_and_exits(monkeypatch):
    seen, written = [], []
    scripted_replies(monkeypatch, seen)
    tokenizer = models.load_tokenizer("tiny")
    session = chat.Chat(torch.nn.Linear(1, 1), tokenizer, SamplingSettings(max_new_tokens=8), system="Be brief.")
    lines = iter(["hello there", "", "and now?", "/reset", "/nope", "fresh start", "/exit", "never read"])
    assert chat.run(session, read=lambda _: next(lines), write=written.append) == 0
    assert next(lines) == "never read"  # /exit stopped reading
    assert len(seen) == 3
    first, second, third = seen
    assert first == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert "hello there" in second and "reply 1" in second and "and now?" in second  # multi-turn history
    assert "Be brief." in third and "hello there" not in third and "fresh start" in third  # after /reset
    assert written == [
        "assistant> reply 1",
        "assistant> reply 2",
        "(history cleared)",
        "(unknown command /nope; " + chat.HELP + ")",
        "assistant> reply 3 [cut at --max_new_tokens]",
    ]
    assert session.history == [{"role": "user", "content": "fresh start"}, {"role": "assistant", "content": "reply 3"}]


def test_chat_drops_the_oldest_turns_when_the_context_is_full(monkeypatch):
    seen = []
    scripted_replies(monkeypatch, seen)
    tokenizer = models.load_tokenizer("tiny")
    model = torch.nn.Linear(1, 1)
    model.config = SimpleNamespace(max_position_embeddings=140)
    session = chat.Chat(model, tokenizer, SamplingSettings(max_new_tokens=40))
    for i in range(6):
        session.reply(f"message number {i}: " + "words " * 10)
    assert session.max_prompt_tokens == 100
    assert all(len(tokenizer(p, add_special_tokens=False).input_ids) <= 100 for p in seen)
    assert "message number 5" in seen[-1] and "message number 0" not in seen[-1]
    assert session.history[0]["role"] == "user"  # whole exchanges are dropped


def test_chat_in_a_terminal_session_on_the_tiny_model():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.experiments.chat", "tiny", "--max_new_tokens", "4", "--temperature", "0"],
        input="What is 2 + 2?\n/reset\nhi\n/exit\n",
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant> ") == 2 and "(history cleared)" in proc.stdout
    assert "[lit_rlhf] chat with tiny" in proc.stdout


def test_generate_writes_one_jsonl_row_per_prompt(tmp_path, fixtures_dir):
    from lit_rlhf.experiments.generate import main

    data = os.path.join(fixtures_dir, "prompts_plain.jsonl")
    records = [json.loads(line) for line in open(data)]
    common = ["tiny", "--prompts", data, "--prompt_field", "text", "--max_new_tokens", "3", "--no_progress"]
    outs = [tmp_path / f"{name}.jsonl" for name in ("a", "b", "c", "greedy")]
    assert main([*common, "--num_samples", "2", "--batch_size", "2", "--output", str(outs[0])]) == 0
    assert main([*common, "--num_samples", "2", "--batch_size", "2", "--output", str(outs[1])]) == 0
    assert main([*common, "--num_samples", "2", "--seed", "1", "--output", str(outs[2])]) == 0
    assert main([*common, "--temperature", "0", "--output", str(outs[3])]) == 0
    rows = [json.loads(line) for line in outs[0].read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["text"] for r in records]
    assert all(len(r["completions"]) == 2 and all(isinstance(c, str) for c in r["completions"]) for r in rows)
    assert outs[0].read_text() == outs[1].read_text()  # the same seed: the same samples
    assert outs[0].read_text() != outs[2].read_text()
    greedy = [json.loads(line) for line in outs[3].read_text().splitlines()]
    assert len(greedy) == len(records) and all(set(r) == {"prompt", "completion"} for r in greedy)
    assert main(["tiny", "--prompts", data, "--num_samples", "0"]) == 2
