"""Prompts (+ extra columns such as the verifier's ``answer``) for the online stages (GRPO, PPO).

Sources: the built-in ``arithmetic`` task (deterministic by seed, held-out questions disjoint from training), a local
JSON/JSONL/CSV/Parquet file or a hub dataset (``path``), with explicit field mapping (``fields``). A prompt is a
string or a chat-message list; message lists, and strings when ``chat_template`` is on, go through the tokenizer's
chat template with the generation prompt (SmolLM2's template adds its default system prompt when the prompt has no
system turn; ``system_prompt`` sets one, ``instruction`` is appended to the user turn). The ``answer`` column is
normalised to a number: ints and floats as they are, strings by their GSM8K final answer ("... #### 72" -> 72) or else
their last number; a record whose answer has no number keeps ``None`` (no accuracy for it, and reward functions skip
it). Prompts longer than ``max_prompt_length`` tokens are cut from the left (their end is kept) and counted. A prompt
that is null, a dict or (unless ``numbers_as_text``) a number is an error naming the record and the field.

A batch is a :class:`lit_rlhf.types.PromptBatch`: left-padded ids, the rendered prompt texts, and ``extras`` (column
name -> one value per prompt) for the reward functions. Under DDP every rank receives its own prompts (seeded
sharded loaders, :mod:`lit_rlhf.data.loaders`: the same global batches for any number of processes) and samples all
G completions of each, so a group never spans ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from lit_rlhf.data import render
from lit_rlhf.data.base import DataModule
from lit_rlhf.data.collate import pad_left
from lit_rlhf.data.loaders import batches_done_in_epoch, sharded_loader
from lit_rlhf.data.sources import DataError, get_field, get_text
from lit_rlhf.data.tasks import arithmetic_prompts
from lit_rlhf.rewards import answer_value
from lit_rlhf.types import PromptBatch

TASKS = {"arithmetic": arithmetic_prompts}
"""Built-in tasks (``--data.task``) -> record generator (:mod:`lit_rlhf.data.tasks`)."""


@dataclass
class PromptFields:
    """Column names: ``prompt`` (falls back to ``question`` when absent, as in GSM8K), ``answer`` (the reference
    answer for verifiers; optional), and ``extra``: further columns passed through to the reward functions."""

    prompt: str = "prompt"
    answer: str = "answer"
    extra: list[str] = field(default_factory=list)


@dataclass
class PromptExample:
    prompt_ids: list[int]
    prompt: str
    columns: dict[str, Any]


def with_instructions(prompt: render.Text, system_prompt: str | None, instruction: str | None) -> render.Text:
    """Append ``instruction`` to the last user turn and prepend a ``system_prompt`` turn unless the prompt has one
    (a string prompt becomes one user turn when either is set)."""
    if system_prompt is None and instruction is None:
        return prompt
    messages = [dict(m) for m in prompt] if render.is_messages(prompt) else [{"role": "user", "content": prompt}]
    if instruction is not None:
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last]["content"] = f"{messages[last]['content']} {instruction}"
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def concat_prompt_batches(batches: list[PromptBatch], pad_token_id: int) -> PromptBatch:
    """One PromptBatch of all rows (re-padded on the left to the widest prompt)."""
    width = max(b.input_ids.shape[1] for b in batches)

    def widen(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    extras = {k: [v for b in batches for v in b.extras[k]] for k in batches[0].extras}
    return PromptBatch(
        torch.cat([widen(b.input_ids, pad_token_id) for b in batches]),
        torch.cat([widen(b.attention_mask, 0) for b in batches]),
        [p for b in batches for p in b.prompts],
        extras,
    )


class PromptDataModule(DataModule):
    def __init__(
        self,
        path: str | None = None,
        subset: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        fields: PromptFields = PromptFields(),
        task: str = "arithmetic",
        num_train: int = 1000,
        num_val: int = 64,
        seed: int = 0,
        system_prompt: str | None = None,
        instruction: str | None = None,
        chat_template: bool = True,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        val_batch_size: int = 32,
        shuffle: bool = True,
        max_records: int | None = None,
        max_val_records: int | None = 200,
        numbers_as_text: bool = False,
    ) -> None:
        """The tokenizer is the stage's, given by :meth:`connect` (:mod:`lit_rlhf.data.base`).

        Args:
            path: local .json/.jsonl/.csv/.parquet file or hub dataset name; ``null`` uses the built-in ``task``.
            subset: hub dataset configuration (``main`` for ``openai/gsm8k``); ``null`` for datasets with one.
            split: split read from a hub dataset.
            val_split: hub split used for validation; ``null`` holds out ``val_fraction`` of the records.
            val_fraction: fraction of records held out for validation when there is no ``val_split``.
            fields: column names of the prompt, the reference answer and extra columns for reward functions.
            task: built-in task used when ``path`` is null (``arithmetic``).
            num_train: built-in task: training prompts.
            num_val: built-in task: held-out prompts (questions disjoint from training).
            seed: data seed (built-in generation, hold-out split, shuffling).
            system_prompt: system turn added to every prompt without one (``null``: the chat template's default).
            instruction: text appended to the (last) user turn of every prompt, e.g. ``Answer with just the number.``
            chat_template: wrap plain-string prompts in the tokenizer's chat template (message lists always are).
            max_prompt_length: prompt tokens kept (from the end) when a prompt is longer; counted and reported.
            batch_size: prompts per training step (per device); each gets G completions.
            val_batch_size: prompts per validation step.
            shuffle: shuffle the training prompts (seeded); off, batches follow the record order.
            max_records: read at most this many training records from ``path`` (quick experiments).
            max_val_records: validate on at most this many held-out records (greedy decoding is slow on a CPU).
            numbers_as_text: accept a number as the prompt (e.g. a CSV column of digits) as its ``str``; off, it is
                an error naming the record and the field.
        """
        super().__init__()
        self.save_hyperparameters()
        self.fields = fields
        self.train_examples: list[PromptExample] = []
        self.val_examples: list[PromptExample] = []
        self.stats: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.train_examples:
            self._load()
        self.require_batches(len(self.train_examples), len(self.val_examples), "prompts")

    def _load(self) -> None:
        train_records, val_records = self.records(TASKS, self.hparams.task, self.hparams.max_val_records)
        self.stats = {"truncated": 0}
        val_records = val_records[: self.hparams.max_val_records]
        self.train_examples, self.val_examples = self.make_examples(self.example, train_records, val_records)
        if not self.train_examples:
            raise DataError(f"{self.hparams.path or 'built-in task ' + repr(self.hparams.task)}: no training prompts")
        if self.stats["truncated"]:
            cut, limit = self.stats["truncated"], self.hparams.max_prompt_length
            print(f"[lit_rlhf] prompt data: {cut} prompts cut to {limit} tokens")

    def example(self, record: dict) -> PromptExample:
        """Render and tokenise one record; the answer column becomes a number (or None), extras pass through."""
        f, hp = self.fields, self.hparams
        gsm8k = f.prompt == "prompt" and "prompt" not in record and "question" in record
        prompt_field = "question" if gsm8k else f.prompt
        prompt = get_text(record, prompt_field, "fields.prompt", hp.numbers_as_text)
        prompt = with_instructions(prompt, hp.system_prompt, hp.instruction)
        text = render.render_prompt(self.tokenizer, prompt, hp.chat_template)
        ids = render.encode(self.tokenizer, text)
        if len(ids) > hp.max_prompt_length:
            ids, text = ids[-hp.max_prompt_length :], self.tokenizer.decode(ids[-hp.max_prompt_length :])
            self.stats["truncated"] += 1
        columns = {name: get_field(record, name, "fields.extra") for name in f.extra}
        if f.answer in record:
            columns["answer"] = answer_value(record[f.answer])
        return PromptExample(ids, text, columns)

    def collate(self, examples: list[PromptExample]) -> PromptBatch:
        ids = [e.prompt_ids for e in examples]
        names = examples[0].columns.keys()
        return PromptBatch(
            pad_left(ids, self.tokenizer.pad_token_id),
            pad_left([[1] * len(x) for x in ids], 0),
            [e.prompt for e in examples],
            {k: [e.columns.get(k) for e in examples] for k in names},
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        skip = batches_done_in_epoch(self.trainer)
        return sharded_loader(
            self.train_examples, hp.batch_size, self.collate, hp.shuffle, hp.seed, drop_last=True, skip_batches=skip
        )

    def val_dataloader(self) -> DataLoader:
        return sharded_loader(self.val_examples, self.hparams.val_batch_size, self.collate, False, 0, drop_last=False)

    def refill_batches(self, rank: int, world_size: int) -> Iterator[PromptBatch]:
        """An endless stream of training-prompt batches for dynamic sampling, separate from the training order
        (its own seed) and disjoint across ranks (rank r takes every world_size-th prompt)."""
        g = torch.Generator().manual_seed(self.hparams.seed + 1000 + rank)
        shard = self.train_examples[rank::world_size]
        size = min(self.hparams.batch_size, len(shard))
        for _ in itertools.count():
            order = torch.randperm(len(shard), generator=g).tolist()
            for i in range(0, len(order) - size + 1, size):
                yield self.collate([shard[j] for j in order[i : i + size]])
