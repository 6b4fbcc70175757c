"""Reward-model data: preference pairs, scored records and ranked lists, for the losses of
:mod:`lit_rlhf.losses.reward` (Bradley–Terry pairs and K-wise rankings, InstructGPT, Ouyang et al. 2022, Eq. 1).

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
- ``steps``: ``{prompt, steps: [...], labels: [...]}`` (PRM800K's shape: a 0/1 label per step) ->
  :class:`~lit_rlhf.types.StepBatch` (process reward model, per-step binary cross-entropy; read and tokenised by
  :mod:`lit_rlhf.data.step_labels`). Built-in: worked answers with one step corrupted in half of them.

Prompts and responses are strings or chat-message lists, a score a finite number: anything else (a null, a dict, a
NaN score, a number where text belongs unless ``numbers_as_text``) is an error naming the record and the field.
Prompts and responses are rendered like preference pairs (:mod:`lit_rlhf.data.render`) by the tokenizer the reward
model stage gives (:meth:`connect`): encoders render ``[CLS] prompt [SEP] response [SEP]``, decoders pad with a token
other than EOS. Truncation: when prompt + longest response exceed ``max_length`` the prompt is cut from
the left to ``max_prompt_length`` and responses from the right; counted and reported.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import DataLoader

from lit_rlhf.data import render
from lit_rlhf.data.base import SOURCE_ARGS, DataModule, prompt_budget
from lit_rlhf.data.collate import pad_left, pad_right
from lit_rlhf.data.loaders import batches_done_in_epoch, sharded_loader
from lit_rlhf.data.preference import PreferenceDataModule, PreferenceFields
from lit_rlhf.data.sources import DataError, as_text, get_field, get_text, where
from lit_rlhf.data.step_labels import arithmetic_step_labels, collate_steps, step_example
from lit_rlhf.data.tasks import arithmetic_preferences, arithmetic_ranked, arithmetic_scored, worked_preferences
from lit_rlhf.types import RankedBatch, ScoredBatch, StepBatch


@dataclass
class RewardFields:
    """Column names of every record kind (``prompt`` falls back to ``question`` when absent)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    response: str = "response"
    score: str = "score"
    responses: str = "responses"
    steps: str = "steps"
    labels: str = "labels"


@dataclass
class ResponsesExample:
    """One prompt with one (scored) or several (ranked, best first) responses."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    prompt: str
    responses: list[str]
    score: float = 0.0


TASKS = {
    "pairs": {
        "arithmetic": arithmetic_preferences,  # the DPO task: read through PreferenceDataModule (a PreferenceBatch)
        "arithmetic_worked": functools.partial(worked_preferences, wrong="step"),
        "arithmetic_worked_final": functools.partial(worked_preferences, wrong="final"),
    },
    "scored": {"arithmetic": arithmetic_scored},
    "ranked": {"arithmetic": arithmetic_ranked},
    "steps": {"arithmetic": arithmetic_step_labels},
}
"""Built-in tasks (``--data.task``) of each ``format`` -> record generator (:mod:`lit_rlhf.data.tasks`)."""


class RewardDataModule(DataModule):
    def __init__(
        self,
        format: Literal["pairs", "scored", "ranked", "steps"] = "pairs",
        path: str | None = None,
        subset: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        fields: RewardFields = RewardFields(),
        task: str | None = None,
        num_train: int = 2000,
        num_val: int = 64,
        seed: int = 0,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        chat_template: bool = True,
        batch_size: int = 8,
        val_batch_size: int = 64,
        max_records: int | None = None,
        numbers_as_text: bool = False,
        step_separator: str = " ",
    ) -> None:
        """The tokenizer is the reward model's, given by :meth:`connect` (:mod:`lit_rlhf.data.base`).

        Args:
            format: record kind: ``pairs`` (chosen/rejected), ``scored`` (response + score), ``ranked`` (responses
                best -> worst) or ``steps`` (a solution's steps with a 0/1 label each: a process reward model).
            path: local .json/.jsonl/.csv/.parquet file or hub dataset name; ``null`` uses the built-in ``task``.
            subset: hub dataset configuration; ``null`` for datasets with one.
            split: split read from a hub dataset.
            val_split: hub split used for validation; ``null`` holds out ``val_fraction`` of the records.
            val_fraction: fraction of records held out for validation when there is no ``val_split``.
            fields: column names.
            task: built-in task used when ``path`` is null (``null``: ``arithmetic_worked_final`` for pairs,
                ``arithmetic`` for the other formats): ``arithmetic`` (answers "The answer is X.", the DPO task; every
                format; ``steps``: worked answers with one step corrupted in half of them), ``arithmetic_worked``
                (pairs of worked digit-by-digit answers; the wrong one has a false one-digit step) or
                ``arithmetic_worked_final`` (the wrong one states the wrong result after correct steps); the worked
                tasks use the same questions and wrong results as ``arithmetic``.
            num_train: built-in task: training records.
            num_val: built-in task: validation records (questions disjoint from training).
            seed: data seed (built-in generation, hold-out split, shuffling).
            max_length: max tokens of prompt + response.
            max_prompt_length: prompt tokens kept (from the end) when a record is too long; below ``max_length``
                (``null``: half of it).
            chat_template: wrap plain-string prompts in the tokenizer's chat template (message lists always are).
            batch_size: pairs / ranked lists / scored rows per training step (per device).
            val_batch_size: the same per validation step.
            max_records: read at most this many records from ``path`` (quick experiments).
            numbers_as_text: accept numbers in text fields (e.g. a CSV column of digits) as their ``str``; off, a
                number where text belongs is an error naming the record and the field.
            step_separator: ``steps`` records: the text between steps in the completion the model reads (" ": the
                worked arithmetic format's sentences; "\\n" for PRM800K-style lines).
        """
        super().__init__()
        self.save_hyperparameters()
        self.max_prompt_length = prompt_budget(max_length, max_prompt_length)
        self.fields = fields
        self.task = task or ("arithmetic_worked_final" if format == "pairs" else "arithmetic")
        self.pairs: PreferenceDataModule | None = None
        self.train_examples: list = []
        self.val_examples: list = []
        self.stats: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        hp, f = self.hparams, self.fields
        if hp.format == "pairs" and (hp.path is not None or self.task == "arithmetic"):
            if self.pairs is None:
                shared = ("max_length", "max_prompt_length", "chat_template", "batch_size", "val_batch_size")
                same = SOURCE_ARGS + shared
                args = {**{k: hp[k] for k in same}, "task": self.task}
                self.pairs = PreferenceDataModule(**args, fields=PreferenceFields(f.prompt, f.chosen, f.rejected))
                self.pairs.connect(self.tokenizer)  # the reward model's (encoder template, pad != EOS)
            self.pairs.setup(stage)  # its checks (batches per process) run on every call
            self.train_examples, self.val_examples = self.pairs.train_examples, self.pairs.val_examples
            return
        if not self.train_examples:
            self._load()
        self.require_batches(len(self.train_examples), len(self.val_examples), "records")

    def _load(self) -> None:
        hp = self.hparams
        train_records, val_records = self.records(TASKS[hp.format], self.task)
        self.stats = {"truncated": 0, "skipped_truncated": 0}
        self.train_examples, self.val_examples = self.make_examples(self.example, train_records, val_records)
        if not self.train_examples:
            raise DataError(f"{hp.path or 'built-in task ' + repr(self.task)}: no reward-model records")
        if self.stats["truncated"] or self.stats["skipped_truncated"]:
            print(f"[lit_rlhf] reward data: truncated {self.stats['truncated']} records; skipped {self.stats}")

    def example(self, record: dict) -> ResponsesExample:
        """Tokenise a scored, ranked or step-labelled record (or a built-in pair, as a ranked list of two)."""
        f, tok, hp = self.fields, self.tokenizer, self.hparams
        prompt_field = f.prompt if (f.prompt in record or f.prompt != "prompt") else "question"
        prompt = get_text(record, prompt_field, "fields.prompt", hp.numbers_as_text)
        if hp.format == "steps":  # a step whose last token is cut away is dropped; None: no step left
            budget = (hp.max_length, self.max_prompt_length)
            args = ((f.steps, f.labels), hp.step_separator, hp.chat_template, budget, hp.numbers_as_text)
            example = step_example(tok, record, prompt, *args)
            self.stats["truncated" if example is not None else "skipped_truncated"] += int(
                example is None or example.truncated
            )
            return example
        if hp.format == "pairs":  # built-in pairs that PreferenceDataModule does not generate: a ranked list of 2
            responses = [
                get_text(record, f.chosen, "fields.chosen", hp.numbers_as_text),
                get_text(record, f.rejected, "fields.rejected", hp.numbers_as_text),
            ]
            score = 0.0
        elif hp.format == "scored":
            responses = [get_text(record, f.response, "fields.response", hp.numbers_as_text)]
            score = get_field(record, f.score, "fields.score")
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                got = "null" if score is None else f"{type(score).__name__} {score!r}"
                raise DataError(f"{where(record)}: field {f.score!r} must be a finite number, got {got}")
            score = float(score)
        else:
            responses, score = get_field(record, f.responses, "fields.responses"), 0.0
            if not isinstance(responses, list) or len(responses) < 2 or render.is_messages(responses):
                raise DataError(
                    f"{where(record)}: field {f.responses!r} must be a list of at least 2 responses, best first"
                )
            what = f"{where(record)}: field {f.responses!r} item"
            responses = [as_text(r, f"{what} {i}", hp.numbers_as_text) for i, r in enumerate(responses)]
        prompt_text = render.render_prompt(tok, prompt, hp.chat_template)
        texts = [render.render_completion(tok, prompt, prompt_text, r, hp.chat_template) for r in responses]
        prompt_ids, response_ids = render.encode(tok, prompt_text), [render.encode(tok, t) for t in texts]
        if any(not r for r in response_ids):
            raise DataError(f"{where(record)}: empty response")
        if len(prompt_ids) + max(len(r) for r in response_ids) > hp.max_length:
            self.stats["truncated"] += 1
            prompt_ids = prompt_ids[-self.max_prompt_length :]
            response_ids = [r[: max(1, hp.max_length - len(prompt_ids))] for r in response_ids]
        return ResponsesExample(prompt_ids, response_ids, prompt_text, texts, score)

    # -- batches ----------------------------------------------------------------------------------------------------
    def collate(self, examples: list) -> RankedBatch | ScoredBatch | StepBatch:
        if self.pairs is not None:
            return self.pairs.collate(examples)
        pad = self.tokenizer.pad_token_id
        if self.hparams.format == "steps":
            return collate_steps(examples, pad)
        prompt_ids = pad_left([e.prompt_ids for e in examples], pad)
        prompt_mask = pad_left([[1] * len(e.prompt_ids) for e in examples], 0)
        prompts = [e.prompt for e in examples]
        if self.hparams.format == "scored":
            rows = [e.response_ids[0] for e in examples]
            response_ids, response_mask = pad_right(rows, pad), pad_right([[1] * len(r) for r in rows], 0)
            scores = torch.tensor([e.score for e in examples], dtype=torch.float32)
            index = torch.arange(len(examples))
            return ScoredBatch(
                prompt_ids,
                prompt_mask,
                response_ids,
                response_mask,
                index,
                scores,
                prompts,
                [e.responses[0] for e in examples],
            )
        k = max(len(e.response_ids) for e in examples)
        rows = [e.response_ids[j] if j < len(e.response_ids) else [pad] for j in range(k) for e in examples]
        real = [j < len(e.response_ids) for j in range(k) for e in examples]
        response_ids = pad_right(rows, pad)
        response_mask = pad_right([[int(ok)] * len(r) for r, ok in zip(rows, real)], 0)
        rank_mask = torch.tensor(real).view(k, len(examples)).T.contiguous()
        index = torch.arange(len(examples)).repeat(k)
        return RankedBatch(
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            index,
            rank_mask,
            prompts,
            [e.responses for e in examples],
        )

    def train_dataloader(self) -> DataLoader:
        hp, skip = self.hparams, batches_done_in_epoch(self.trainer)
        return sharded_loader(
            self.train_examples, hp.batch_size, self.collate, True, hp.seed, drop_last=True, skip_batches=skip
        )

    def val_dataloader(self) -> DataLoader:
        return sharded_loader(self.val_examples, self.hparams.val_batch_size, self.collate, False, 0, drop_last=False)
