"""Preference pairs (prompt, chosen, rejected) for DPO and pairwise reward models.

Sources: the built-in ``arithmetic`` task (chosen correct, rejected wrong; deterministic by seed), a local
JSON/JSONL/CSV/Parquet file or a hub dataset (``path``), with explicit field mapping (``fields``). Supported
shapes: ``{prompt|question, chosen, rejected}`` strings or chat messages (e.g. question/chosen/rejected JSONL,
ultrafeedback with a prompt), and implicit-prompt pairs (Anthropic/hh-rlhf strings, trl-lib/ultrafeedback_binarized
message lists). Text fields must be strings or chat-message lists: a null, a dict or (unless ``numbers_as_text``) a
number is an error naming the record and the field. Pairs with an empty or identical chosen/rejected are skipped and
counted; over-long pairs follow the truncation policy of :mod:`lit_rlhf.data.render` (``max_prompt_length <
max_length``, so a truncated response keeps at least one token) and are counted as truncated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from lit_rlhf.data import render
from lit_rlhf.data.base import DataModule, prompt_budget
from lit_rlhf.data.collate import pad_left, pad_right
from lit_rlhf.data.loaders import batches_done_in_epoch, sharded_loader
from lit_rlhf.data.sources import DataError, get_text, where
from lit_rlhf.data.tasks import arithmetic_preferences
from lit_rlhf.types import PreferenceBatch

TASKS = {"arithmetic": arithmetic_preferences}
"""Built-in tasks (``--data.task``) -> record generator (:mod:`lit_rlhf.data.tasks`)."""


@dataclass
class PreferenceFields:
    """Column names. ``prompt`` falls back to ``question`` when absent; with neither, the prompt is split off
    chosen/rejected as their shared prefix (hh-rlhf, ultrafeedback_binarized)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt: str
    chosen: str
    rejected: str
    key: str


def pair_key(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> str:
    payload = json.dumps([prompt_ids, chosen_ids, rejected_ids]).encode()
    return hashlib.sha256(payload).hexdigest()[:20]


class PreferenceDataModule(DataModule):
    def __init__(
        self,
        path: str | None = None,
        subset: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        fields: PreferenceFields = PreferenceFields(),
        task: str = "arithmetic",
        num_train: int = 1000,
        num_val: int = 64,
        seed: int = 0,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        chat_template: bool = True,
        batch_size: int = 8,
        val_batch_size: int = 16,
        shuffle: bool = True,
        max_records: int | None = None,
        numbers_as_text: bool = False,
    ) -> None:
        """The tokenizer is the stage's, given by :meth:`connect` (:mod:`lit_rlhf.data.base`).

        Args:
            path: local .json/.jsonl/.csv/.parquet file or hub dataset name; ``null`` uses the built-in ``task``.
            subset: hub dataset configuration; ``null`` for datasets with one.
            split: split read from a hub dataset.
            val_split: hub split used for validation; ``null`` holds out ``val_fraction`` of the records.
            val_fraction: fraction of records held out for validation when there is no ``val_split``.
            fields: column names of prompt/chosen/rejected.
            task: built-in task used when ``path`` is null (``arithmetic``).
            num_train: built-in task: training pairs.
            num_val: built-in task: validation pairs (questions disjoint from training).
            seed: data seed (built-in generation, hold-out split, shuffling).
            max_length: max tokens of prompt + response (see the truncation policy).
            max_prompt_length: prompt tokens kept (from the end) when a pair is too long; below ``max_length``
                (``null``: half of it).
            chat_template: wrap plain-string prompts in the tokenizer's chat template (message lists always are).
            batch_size: pairs per training step (per device).
            val_batch_size: pairs per validation step.
            shuffle: shuffle training pairs each epoch (seeded); off gives the file order (equivalence tests).
            max_records: read at most this many records from ``path`` (quick experiments).
            numbers_as_text: accept numbers in text fields (e.g. a CSV column of digits) as their ``str``; off, a
                number where text belongs is an error naming the record and the field.
        """
        super().__init__()
        self.save_hyperparameters()
        self.max_prompt_length = prompt_budget(max_length, max_prompt_length)
        self.fields = fields
        self.train_examples: list[PreferenceExample] = []
        self.val_examples: list[PreferenceExample] = []
        self.stats: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.train_examples:
            self._load()
        self.require_batches(len(self.train_examples), len(self.val_examples), "pairs")

    def _load(self) -> None:
        train_records, val_records = self.records(TASKS, self.hparams.task)
        self.stats = {"skipped_empty": 0, "skipped_identical": 0, "truncated": 0}
        self.train_examples, self.val_examples = self.make_examples(self._example, train_records, val_records)
        if not self.train_examples:
            source = self.hparams.path or f"built-in task {self.hparams.task!r}"
            raise DataError(f"{source}: no usable preference pairs after filtering ({self.stats})")
        skipped = self.stats["skipped_empty"] + self.stats["skipped_identical"]
        if skipped or self.stats["truncated"]:
            truncated = self.stats["truncated"]
            print(f"[lit_rlhf] preference data: skipped {skipped} pairs {self.stats}; truncated {truncated}")

    def _example(self, record: dict) -> PreferenceExample | None:
        f, tok, hp = self.fields, self.tokenizer, self.hparams
        chosen = get_text(record, f.chosen, "fields.chosen", hp.numbers_as_text)
        rejected = get_text(record, f.rejected, "fields.rejected", hp.numbers_as_text)
        prompt_field = f.prompt if (f.prompt in record or f.prompt != "prompt") else "question"
        if prompt_field in record or f.prompt != "prompt":
            prompt = get_text(record, prompt_field, "fields.prompt", hp.numbers_as_text)
        else:
            try:
                prompt, chosen, rejected = render.split_implicit_prompt(chosen, rejected)
            except ValueError as e:
                raise DataError(
                    f"{where(record)}: no 'prompt' or 'question' field and {e}; fields found: "
                    f"{sorted(k for k in record if not k.startswith('_'))}. Map it with --data.fields.prompt=<field>"
                ) from None
        if render.is_blank(chosen) or render.is_blank(rejected):
            self.stats["skipped_empty"] += 1
            return None
        if chosen == rejected:
            self.stats["skipped_identical"] += 1
            return None
        prompt_text = render.render_prompt(tok, prompt, hp.chat_template)
        chosen_text = render.render_completion(tok, prompt, prompt_text, chosen, hp.chat_template)
        rejected_text = render.render_completion(tok, prompt, prompt_text, rejected, hp.chat_template)
        prompt_ids = render.encode(tok, prompt_text)
        budget = hp.max_length, self.max_prompt_length
        p_c, chosen_ids, cut_c = render.truncate_pair(prompt_ids, render.encode(tok, chosen_text), *budget)
        p_r, rejected_ids, cut_r = render.truncate_pair(prompt_ids, render.encode(tok, rejected_text), *budget)
        prompt_ids = p_c if len(p_c) <= len(p_r) else p_r  # one prompt for both rows of the pair
        chosen_ids = chosen_ids[: hp.max_length - len(prompt_ids)]
        rejected_ids = rejected_ids[: hp.max_length - len(prompt_ids)]
        self.stats["truncated"] += int(cut_c or cut_r)
        if not chosen_ids or not rejected_ids:
            self.stats["skipped_empty"] += 1
            return None
        return PreferenceExample(
            prompt_ids,
            chosen_ids,
            rejected_ids,
            prompt_text,
            chosen_text,
            rejected_text,
            pair_key(prompt_ids, chosen_ids, rejected_ids),
        )

    def collate(self, examples: list[PreferenceExample]) -> PreferenceBatch:
        pad = self.tokenizer.pad_token_id
        prompt_ids = pad_left([e.prompt_ids for e in examples], pad)
        prompt_mask = pad_left([[1] * len(e.prompt_ids) for e in examples], 0)
        responses = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
        response_ids = pad_right(responses, pad)
        response_mask = pad_right([[1] * len(r) for r in responses], 0)
        prompt_index = torch.arange(len(examples)).repeat(2)
        return PreferenceBatch(
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            prompt_index,
            keys=[e.key for e in examples],
            prompts=[e.prompt for e in examples],
            chosen=[e.chosen for e in examples],
            rejected=[e.rejected for e in examples],
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        skip = batches_done_in_epoch(self.trainer)
        return sharded_loader(
            self.train_examples, hp.batch_size, self.collate, hp.shuffle, hp.seed, drop_last=True, skip_batches=skip
        )

    def val_dataloader(self) -> DataLoader:
        return sharded_loader(self.val_examples, self.hparams.val_batch_size, self.collate, False, 0, drop_last=False)
