"""Preference pairs (prompt, chosen, rejected) for DPO and pairwise reward models.

Sources: the built-in ``arithmetic`` task (chosen correct, rejected wrong; deterministic by seed), a local
JSON/JSONL/CSV/Parquet file or a hub dataset (``path``), with explicit field mapping (``fields``). Supported
shapes: ``{prompt|question, chosen, rejected}`` strings or chat messages (seed 000 JSONL, ultrafeedback with a
prompt), and implicit-prompt pairs (Anthropic/hh-rlhf strings, trl-lib/ultrafeedback_binarized message lists).
Pairs with an empty or identical chosen/rejected are skipped and counted; over-long pairs follow the truncation
policy of :mod:`lit_rlhf.data.render`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_rlhf.data import render
from lit_rlhf.data.collate import pad_left, pad_right
from lit_rlhf.data.loaders import batches_done_in_epoch, sharded_loader
from lit_rlhf.data.sources import DataError, get_field, read_records
from lit_rlhf.data.tasks import arithmetic_preferences
from lit_rlhf.types import PreferenceBatch


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


def builtin_preferences(task: str, num_train: int, num_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) records of a built-in task; questions in val never appear in train."""
    if task != "arithmetic":
        raise ValueError(f"unknown built-in task {task!r}; available: 'arithmetic'")
    val = arithmetic_preferences(num_val, seed + 1)
    held_out = {r["prompt"][0]["content"] for r in val}
    train = [r for r in arithmetic_preferences(num_train + num_val * 2, seed) if r["prompt"][0]["content"] not in held_out]
    return train[:num_train], val


class PreferenceDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        path: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        fields: PreferenceFields = PreferenceFields(),
        task: str = "arithmetic",
        num_train: int = 1000,
        num_val: int = 64,
        seed: int = 0,
        max_length: int = 512,
        max_prompt_length: int = 256,
        chat_template: bool = True,
        batch_size: int = 8,
        val_batch_size: int = 16,
        shuffle: bool = True,
        max_records: int | None = None,
    ) -> None:
        """
        Args:
            tokenizer: model name whose tokenizer renders the data (linked to the policy's name by the CLI).
            path: local .json/.jsonl/.csv/.parquet file or hub dataset name; ``null`` uses the built-in ``task``.
            split: split read from a hub dataset.
            val_split: hub split used for validation; ``null`` holds out ``val_fraction`` of the records.
            val_fraction: fraction of records held out for validation when there is no ``val_split``.
            fields: column names of prompt/chosen/rejected.
            task: built-in task used when ``path`` is null (``arithmetic``).
            num_train: built-in task: training pairs.
            num_val: built-in task: validation pairs (questions disjoint from training).
            seed: data seed (built-in generation, hold-out split, shuffling).
            max_length: max tokens of prompt + response (see the truncation policy).
            max_prompt_length: prompt tokens kept (from the end) when a pair is too long.
            chat_template: wrap plain-string prompts in the tokenizer's chat template (message lists always are).
            batch_size: pairs per training step (per device).
            val_batch_size: pairs per validation step.
            shuffle: shuffle training pairs each epoch (seeded); off gives the file order (equivalence tests).
            max_records: read at most this many records from ``path`` (quick experiments).
        """
        super().__init__()
        self.save_hyperparameters()
        self.fields = fields
        self.train_examples: list[PreferenceExample] = []
        self.val_examples: list[PreferenceExample] = []
        self.stats: dict[str, int] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lit_rlhf.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        train_records, val_records = self._records()
        self.stats = {"skipped_empty": 0, "skipped_identical": 0, "truncated": 0}
        self.train_examples = [e for r in train_records if (e := self._example(r)) is not None]
        self.val_examples = [e for r in val_records if (e := self._example(r)) is not None]
        if not self.train_examples:
            raise DataError(f"no usable preference pairs after filtering ({self.stats})")
        skipped = self.stats["skipped_empty"] + self.stats["skipped_identical"]
        if skipped or self.stats["truncated"]:
            print(f"[lit_rlhf] preference data: skipped {skipped} pairs {self.stats}; truncated {self.stats['truncated']}")

    def _records(self) -> tuple[list[dict], list[dict]]:
        hp = self.hparams
        if hp.path is None:
            return builtin_preferences(hp.task, hp.num_train, hp.num_val, hp.seed)
        records = read_records(hp.path, hp.split, hp.max_records)
        if hp.val_split is not None:
            return records, read_records(hp.path, hp.val_split, hp.max_records)
        n_val = max(1, int(len(records) * hp.val_fraction)) if hp.val_fraction > 0 and len(records) > 1 else 0
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]

    def _example(self, record: dict) -> PreferenceExample | None:
        f, tok, hp = self.fields, self.tokenizer, self.hparams
        chosen = _as_text(get_field(record, f.chosen, "fields.chosen"))
        rejected = _as_text(get_field(record, f.rejected, "fields.rejected"))
        prompt_field = f.prompt if (f.prompt in record or f.prompt != "prompt") else "question"
        if prompt_field in record or f.prompt != "prompt":
            prompt = _as_text(get_field(record, prompt_field, "fields.prompt"))
        else:
            try:
                prompt, chosen, rejected = render.split_implicit_prompt(chosen, rejected)
            except ValueError as e:
                raise DataError(
                    f"{record.get('_where', 'record')}: no 'prompt' or 'question' field and {e}; fields found: "
                    f"{sorted(k for k in record if not k.startswith('_'))}. Map it with --data.fields.prompt=<field>"
                ) from None
        if _is_empty(chosen) or _is_empty(rejected):
            self.stats["skipped_empty"] += 1
            return None
        if chosen == rejected:
            self.stats["skipped_identical"] += 1
            return None
        prompt_text = render.render_prompt(tok, prompt, hp.chat_template)
        chosen_text = render.render_completion(tok, prompt, prompt_text, chosen, hp.chat_template)
        rejected_text = render.render_completion(tok, prompt, prompt_text, rejected, hp.chat_template)
        prompt_ids = render.encode(tok, prompt_text)
        p_c, chosen_ids, cut_c = render.truncate_pair(prompt_ids, render.encode(tok, chosen_text), hp.max_length, hp.max_prompt_length)
        p_r, rejected_ids, cut_r = render.truncate_pair(prompt_ids, render.encode(tok, rejected_text), hp.max_length, hp.max_prompt_length)
        prompt_ids = p_c if len(p_c) <= len(p_r) else p_r  # one prompt for both rows of the pair
        chosen_ids = chosen_ids[: hp.max_length - len(prompt_ids)]
        rejected_ids = rejected_ids[: hp.max_length - len(prompt_ids)]
        self.stats["truncated"] += int(cut_c or cut_r)
        if not chosen_ids or not rejected_ids:
            self.stats["skipped_empty"] += 1
            return None
        return PreferenceExample(
            prompt_ids, chosen_ids, rejected_ids, prompt_text, chosen_text, rejected_text,
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
            prompt_ids, prompt_mask, response_ids, response_mask, prompt_index,
            keys=[e.key for e in examples], prompts=[e.prompt for e in examples],
            chosen=[e.chosen for e in examples], rejected=[e.rejected for e in examples],
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        skip = batches_done_in_epoch(self.trainer)
        return sharded_loader(self.train_examples, hp.batch_size, self.collate, hp.shuffle, hp.seed, drop_last=True, skip_batches=skip)

    def val_dataloader(self) -> DataLoader:
        return sharded_loader(self.val_examples, self.hparams.val_batch_size, self.collate, False, 0, drop_last=False)

def _is_empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if render.is_messages(value):
        return not value or all(not str(m["content"]).strip() for m in value)
    return value is None


def _as_text(value):
    """Numbers read from CSV/Parquet columns become strings; text and message lists pass through."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
