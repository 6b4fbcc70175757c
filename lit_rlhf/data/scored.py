"""Reward-model data: preference pairs, scored records and ranked lists (seed 001 "reward-model losses").

``format`` picks the record kind (field names mapped with ``fields``):

- ``pairs``: ``{prompt|question, chosen, rejected}`` and the implicit-prompt shapes -- read, rendered and truncated by
  :class:`lit_rlhf.data.preference.PreferenceDataModule` (the DPO data module, reused as is) ->
  :class:`~lit_rlhf.types.PreferenceBatch`. Built-in tasks: ``arithmetic`` (right vs wrong answer, the DPO task)
  and ``arithmetic_worked`` / ``arithmetic_worked_final`` (the same pairs as worked digit-by-digit answers; the
  wrong one has a false one-digit step / a final line that does not follow from correct steps) -> a
  :class:`~lit_rlhf.types.RankedBatch` with K = 2.
- ``scored``: ``{prompt, response, score}`` -> :class:`~lit_rlhf.types.ScoredBatch` (pointwise regression). Built-in:
  a right (score 1) or wrong (score -1) answer per question.
- ``ranked``: ``{prompt, responses: [best, ..., worst]}`` (K >= 2, K may vary) -> :class:`~lit_rlhf.types.RankedBatch`
  (K-wise ranking loss). Built-in: the right answer, then answers further and further off.

Prompts and responses are rendered like preference pairs (:mod:`lit_rlhf.data.render`). The tokenizer comes from
:func:`lit_rlhf.reward_models.load_tokenizer`: encoders render ``[CLS] prompt [SEP] response [SEP]``, decoders pad
with a token other than EOS. Truncation: when prompt + longest response exceed ``max_length`` the prompt is cut from
the left to ``max_prompt_length`` and responses from the right; counted and reported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_rlhf.data import render
from lit_rlhf.data.loaders import batches_done_in_epoch, sharded_loader
from lit_rlhf.data.collate import pad_left, pad_right
from lit_rlhf.data.preference import PreferenceDataModule, PreferenceFields
from lit_rlhf.data.sources import DataError, get_field, read_records
from lit_rlhf.data.tasks import arithmetic_ranked, arithmetic_scored, worked_preferences
from lit_rlhf.types import RankedBatch, ScoredBatch


@dataclass
class RewardFields:
    """Column names of every record kind (``prompt`` falls back to ``question`` when absent)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    response: str = "response"
    score: str = "score"
    responses: str = "responses"


@dataclass
class ResponsesExample:
    """One prompt with one (scored) or several (ranked, best first) responses."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    prompt: str
    responses: list[str]
    score: float = 0.0


BUILTIN = {
    ("pairs", "arithmetic_worked"): functools.partial(worked_preferences, wrong="step"),
    ("pairs", "arithmetic_worked_final"): functools.partial(worked_preferences, wrong="final"),
    ("scored", "arithmetic"): arithmetic_scored,
    ("ranked", "arithmetic"): arithmetic_ranked,
}  # ("pairs", "arithmetic") is the DPO task, read through PreferenceDataModule


def builtin_records(format: str, task: str, num_train: int, num_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) records of a built-in task; questions in val never appear in train."""
    if (format, task) not in BUILTIN:
        available = sorted({t for f, t in BUILTIN if f == format} | ({"arithmetic"} if format == "pairs" else set()))
        raise ValueError(f"unknown built-in task {task!r} for format {format!r}; available: {available}")
    make = BUILTIN[(format, task)]
    val = make(num_val, seed + 1)
    held_out = {r["prompt"][0]["content"] for r in val}
    train = [r for r in make(num_train + num_val * 2, seed) if r["prompt"][0]["content"] not in held_out]
    return train[:num_train], val


class RewardDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        format: Literal["pairs", "scored", "ranked"] = "pairs",
        path: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        fields: RewardFields = RewardFields(),
        task: str | None = None,
        num_train: int = 2000,
        num_val: int = 64,
        seed: int = 0,
        max_length: int = 512,
        max_prompt_length: int = 256,
        chat_template: bool = True,
        batch_size: int = 8,
        val_batch_size: int = 64,
        max_records: int | None = None,
    ) -> None:
        """
        Args:
            tokenizer: backbone name whose tokenizer renders the data (linked to the backbone's name by the CLI).
            format: record kind: ``pairs`` (chosen/rejected), ``scored`` (response + score) or ``ranked`` (responses
                best -> worst).
            path: local .json/.jsonl/.csv/.parquet file or hub dataset name; ``null`` uses the built-in ``task``.
            split: split read from a hub dataset.
            val_split: hub split used for validation; ``null`` holds out ``val_fraction`` of the records.
            val_fraction: fraction of records held out for validation when there is no ``val_split``.
            fields: column names.
            task: built-in task used when ``path`` is null (``null``: ``arithmetic_worked_final`` for pairs,
                ``arithmetic`` for the other formats): ``arithmetic`` (answers "The answer is X.", the DPO task; every
                format), ``arithmetic_worked`` (pairs of worked digit-by-digit answers; the wrong one has a false
                one-digit step) or ``arithmetic_worked_final`` (the wrong one states the wrong result after correct
                steps); the worked tasks use the same questions and wrong results as ``arithmetic``.
            num_train: built-in task: training records.
            num_val: built-in task: validation records (questions disjoint from training).
            seed: data seed (built-in generation, hold-out split, shuffling).
            max_length: max tokens of prompt + response.
            max_prompt_length: prompt tokens kept (from the end) when a record is too long.
            chat_template: wrap plain-string prompts in the tokenizer's chat template (message lists always are).
            batch_size: pairs / ranked lists / scored rows per training step (per device).
            val_batch_size: the same per validation step.
            max_records: read at most this many records from ``path`` (quick experiments).
        """
        super().__init__()
        self.save_hyperparameters()
        self.fields = fields
        self.task = task or ("arithmetic_worked_final" if format == "pairs" else "arithmetic")
        self.pairs: PreferenceDataModule | None = None
        self.train_examples: list = []
        self.val_examples: list = []
        self.stats: dict[str, int] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lit_rlhf.reward_models import load_tokenizer

            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        hp, f = self.hparams, self.fields
        if hp.format == "pairs" and (hp.path is not None or self.task == "arithmetic"):
            self.pairs = PreferenceDataModule(
                tokenizer=hp.tokenizer, path=hp.path, split=hp.split, val_split=hp.val_split, val_fraction=hp.val_fraction,
                fields=PreferenceFields(f.prompt, f.chosen, f.rejected), task=self.task, num_train=hp.num_train,
                num_val=hp.num_val, seed=hp.seed, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length,
                chat_template=hp.chat_template, batch_size=hp.batch_size, val_batch_size=hp.val_batch_size,
                max_records=hp.max_records,
            )
            self.pairs._tokenizer = self.tokenizer  # the reward model's tokenizer (encoder template, pad != EOS)
            self.pairs.setup(stage)
            self.train_examples, self.val_examples = self.pairs.train_examples, self.pairs.val_examples
            return
        train_records, val_records = self._records()
        self.stats = {"truncated": 0}
        self.train_examples = [self.example(r) for r in train_records]
        self.val_examples = [self.example(r) for r in val_records]
        if not self.train_examples:
            raise DataError("no reward-model records")
        if self.stats["truncated"]:
            print(f"[lit_rlhf] reward data: truncated {self.stats['truncated']} records")

    def _records(self) -> tuple[list[dict], list[dict]]:
        hp = self.hparams
        if hp.path is None:
            return builtin_records(hp.format, self.task, hp.num_train, hp.num_val, hp.seed)
        records = read_records(hp.path, hp.split, hp.max_records)
        if hp.val_split is not None:
            return records, read_records(hp.path, hp.val_split, hp.max_records)
        n_val = max(1, int(len(records) * hp.val_fraction)) if len(records) > 1 else 0
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]

    def example(self, record: dict) -> ResponsesExample:
        """Tokenise a scored or ranked record (or a built-in pair, as a ranked list of two)."""
        f, tok, hp = self.fields, self.tokenizer, self.hparams
        where = record.get("_where", "record")
        prompt = get_field(record, f.prompt if (f.prompt in record or f.prompt != "prompt") else "question", "fields.prompt")
        if hp.format == "pairs":  # built-in pairs that PreferenceDataModule does not generate: a ranked list of 2
            responses, score = [get_field(record, f.chosen, "fields.chosen"), get_field(record, f.rejected, "fields.rejected")], 0.0
        elif hp.format == "scored":
            responses = [get_field(record, f.response, "fields.response")]
            try:
                score = float(get_field(record, f.score, "fields.score"))
            except (TypeError, ValueError):
                raise DataError(f"{where}: field {f.score!r} must be a number, got {record[f.score]!r}") from None
        else:
            responses, score = get_field(record, f.responses, "fields.responses"), 0.0
            if not isinstance(responses, list) or len(responses) < 2 or render.is_messages(responses):
                raise DataError(f"{where}: field {f.responses!r} must be a list of at least 2 responses, best first")
        prompt_text = render.render_prompt(tok, prompt, hp.chat_template)
        texts = [render.render_completion(tok, prompt, prompt_text, r, hp.chat_template) for r in responses]
        prompt_ids, response_ids = render.encode(tok, prompt_text), [render.encode(tok, t) for t in texts]
        if any(not r for r in response_ids):
            raise DataError(f"{where}: empty response")
        if len(prompt_ids) + max(len(r) for r in response_ids) > hp.max_length:
            self.stats["truncated"] += 1
            prompt_ids = prompt_ids[-hp.max_prompt_length :] if len(prompt_ids) > hp.max_prompt_length else prompt_ids
            response_ids = [r[: max(1, hp.max_length - len(prompt_ids))] for r in response_ids]
        return ResponsesExample(prompt_ids, response_ids, prompt_text, texts, score)

    # -- batches ----------------------------------------------------------------------------------------------------
    def collate(self, examples: list) -> RankedBatch | ScoredBatch:
        if self.pairs is not None:
            return self.pairs.collate(examples)
        pad = self.tokenizer.pad_token_id
        prompt_ids = pad_left([e.prompt_ids for e in examples], pad)
        prompt_mask = pad_left([[1] * len(e.prompt_ids) for e in examples], 0)
        prompts = [e.prompt for e in examples]
        if self.hparams.format == "scored":
            rows = [e.response_ids[0] for e in examples]
            response_ids, response_mask = pad_right(rows, pad), pad_right([[1] * len(r) for r in rows], 0)
            scores = torch.tensor([e.score for e in examples], dtype=torch.float32)
            index = torch.arange(len(examples))
            return ScoredBatch(prompt_ids, prompt_mask, response_ids, response_mask, index, scores, prompts, [e.responses[0] for e in examples])
        k = max(len(e.response_ids) for e in examples)
        rows = [e.response_ids[j] if j < len(e.response_ids) else [pad] for j in range(k) for e in examples]
        real = [j < len(e.response_ids) for j in range(k) for e in examples]
        response_ids = pad_right(rows, pad)
        response_mask = pad_right([[int(ok)] * len(r) for r, ok in zip(rows, real)], 0)
        rank_mask = torch.tensor(real).view(k, len(examples)).T.contiguous()
        index = torch.arange(len(examples)).repeat(k)
        return RankedBatch(prompt_ids, prompt_mask, response_ids, response_mask, index, rank_mask, prompts, [e.responses for e in examples])

    def train_dataloader(self) -> DataLoader:
        hp, skip = self.hparams, batches_done_in_epoch(self.trainer)
        return sharded_loader(self.train_examples, hp.batch_size, self.collate, True, hp.seed, drop_last=True, skip_batches=skip)

    def val_dataloader(self) -> DataLoader:
        return sharded_loader(self.val_examples, self.hparams.val_batch_size, self.collate, False, 0, drop_last=False)
