"""Supervised fine-tuning data: prompt/response pairs and multi-turn chat conversations, loss on response tokens only.

Record shapes (field names mapped with ``fields``):

- ``{prompt, response}``: strings or chat messages, rendered like preference pairs (:mod:`lit_rlhf.data.render`):
  the prompt through the chat template with the generation prompt, the response as the template's assistant turn
  (or verbatim + EOS with ``chat_template=false``, e.g. NL2SQL ``context: ... question: ... answer:``
  prompts). Only response tokens are scored; ``question`` is accepted for ``prompt`` and ``chosen`` for
  ``response`` (preference JSONL reused for SFT) when the default names are absent.
- ``{messages: [...]}``: a conversation rendered with the chat template; every assistant turn (its content and the
  template's end-of-turn tokens) is scored, everything else (system, user, tool, role headers) is not.

Text fields are strings or chat-message lists: a null, a dict or (unless ``numbers_as_text``) a number is an error
naming the record and the field. Records whose response (every assistant turn of a conversation) is blank are skipped
(``skipped_empty``): after templating they would teach only the end-of-turn tokens.

Truncation: prompt/response pairs follow :func:`lit_rlhf.data.render.truncate_pair` (``max_prompt_length <
max_length``, so a truncated response keeps at least one token); conversations are cut from the right to
``max_length``. Examples left with no scored token are skipped (``skipped_unscored``); all are counted and reported.

Packing (``packing=true``): training examples are packed, in a seeded shuffled order, into rows of at most
``max_length`` tokens; ``position_ids`` restart at 0 for every example, which is how transformers keeps packed
examples apart (a block-diagonal causal mask built from the restarts, for sdpa/eager/flash/flex attention). The
stage verifies once per model that packed logps equal unpacked ones and refuses packing otherwise. Validation rows
are never packed.

Held-out generation: validation records with an ``answer`` column (the built-in task) also give up to
``eval_prompts`` left-padded prompts (a second validation loader of :class:`~lit_rlhf.types.PromptBatch`) on which
the stage measures greedy exact-match accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from lit_rlhf.data import render
from lit_rlhf.data.base import DataModule, prompt_budget
from lit_rlhf.data.collate import pad_left, pad_right
from lit_rlhf.data.loaders import batches_done_in_epoch, sharded_loader
from lit_rlhf.data.sources import DataError, get_text, where
from lit_rlhf.data.tasks import arithmetic_worked_sft
from lit_rlhf.types import PromptBatch, SFTBatch

TASKS = {"arithmetic": arithmetic_worked_sft}
"""Built-in tasks (``--data.task``) -> record generator (:mod:`lit_rlhf.data.tasks`)."""


@dataclass
class SFTFields:
    """Column names: ``messages`` (a conversation) is used when present, else ``prompt`` + ``response``."""

    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    answer: str = "answer"


@dataclass
class SFTExample:
    """input_ids / loss_mask of one example (loss_mask 1 on scored tokens); the prompt for generation, if any."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_ids: list[int] | None = None
    prompt: str = ""
    answer: object = None


def conversation_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, scored) pieces of a rendered conversation, in order; assistant turns are the scored pieces.

    An assistant turn i spans from the end of ``template(messages[:i], add_generation_prompt=True)`` to the end of
    ``template(messages[:i + 1])``, which requires a template that renders prefixes stably (checked).
    """
    if tokenizer.chat_template is None:
        raise DataError("chat-message records need a tokenizer with a chat template")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    pieces, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False))
        end_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(end_text) or start > len(end_text) or start < cursor:
            raise DataError(
                "the chat template does not render conversation prefixes stably; use prompt/response records"
            )
        pieces += [(full[cursor:start], False), (full[start : len(end_text)], True)]
        cursor = len(end_text)
    pieces.append((full[cursor:], False))
    return [(text, scored) for text, scored in pieces if text]


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of text pieces tokenised one by one (special tokens from the template only)."""
    ids, mask = [], []
    for text, scored in segments:
        piece = render.encode(tokenizer, text)
        ids += piece
        mask += [int(scored)] * len(piece)
    return ids, mask


def pack_examples(examples: list[SFTExample], max_length: int) -> list[list[SFTExample]]:
    """Greedy sequential packing: consecutive examples share a row while the row stays within ``max_length``."""
    rows: list[list[SFTExample]] = []
    used = max_length + 1
    for e in examples:
        if used + len(e.input_ids) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e.input_ids)
    return rows


class SFTDataModule(DataModule):
    def __init__(
        self,
        path: str | None = None,
        subset: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        fields: SFTFields = SFTFields(),
        task: str = "arithmetic",
        num_train: int = 2000,
        num_val: int = 64,
        seed: int = 0,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        chat_template: bool = True,
        packing: bool = False,
        batch_size: int = 8,
        val_batch_size: int = 64,
        eval_prompts: int = 64,
        max_records: int | None = None,
        numbers_as_text: bool = False,
    ) -> None:
        """The tokenizer is the stage's, given by :meth:`connect` (:mod:`lit_rlhf.data.base`).

        Args:
            path: local .json/.jsonl/.csv/.parquet file or hub dataset name; ``null`` uses the built-in ``task``.
            subset: hub dataset configuration (``main`` for ``openai/gsm8k``); ``null`` for datasets with one.
            split: split read from a hub dataset.
            val_split: hub split used for validation; ``null`` holds out ``val_fraction`` of the records.
            val_fraction: fraction of records held out for validation when there is no ``val_split``.
            fields: column names of prompt/response/messages/answer.
            task: built-in task used when ``path`` is null (``arithmetic``: worked digit-by-digit answers).
            num_train: built-in task: training examples.
            num_val: built-in task: validation examples (questions disjoint from training).
            seed: data seed (built-in generation, hold-out split, shuffling, packing order).
            max_length: max tokens of an example (and of a packed row).
            max_prompt_length: prompt tokens kept (from the end) when a prompt/response pair is too long; below
                ``max_length`` (``null``: half of it).
            chat_template: wrap plain-string prompts in the tokenizer's chat template (message lists always are).
            packing: pack training examples into rows of ``max_length`` tokens (see the module doc).
            batch_size: training rows per step (per device); packed rows hold several examples.
            val_batch_size: rows per validation step (also prompts per generation batch).
            eval_prompts: held-out prompts with an ``answer`` used for greedy accuracy (0 disables).
            max_records: read at most this many records from ``path`` (quick experiments).
            numbers_as_text: accept numbers in text fields (e.g. a CSV column of digits) as their ``str``; off, a
                number where text belongs is an error naming the record and the field.
        """
        super().__init__()
        self.save_hyperparameters()
        self.max_prompt_length = prompt_budget(max_length, max_prompt_length)
        self.fields = fields
        self.train_examples: list[SFTExample] = []
        self.val_examples: list[SFTExample] = []
        self.train_rows: list[list[SFTExample]] = []
        self.stats: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.train_examples:
            self._load()
        unit = "rows (packed examples)" if self.hparams.packing else "examples"
        self.require_batches(len(self.train_rows), len(self.val_examples), unit)

    def _load(self) -> None:
        hp = self.hparams
        train_records, val_records = self.records(TASKS, hp.task)
        self.stats = {"truncated": 0, "skipped_empty": 0, "skipped_unscored": 0}
        self.train_examples, self.val_examples = self.make_examples(self.example, train_records, val_records)
        if not self.train_examples:
            source = hp.path or f"built-in task {hp.task!r}"
            raise DataError(f"{source}: no usable SFT examples ({self.stats})")
        if hp.packing:
            order = torch.randperm(len(self.train_examples), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            self.train_rows = pack_examples([self.train_examples[i] for i in order], hp.max_length)
        else:
            self.train_rows = [[e] for e in self.train_examples]
        if any(self.stats.values()):
            print(f"[lit_rlhf] SFT data: {self.stats}")

    def example(self, record: dict) -> SFTExample | None:
        """Tokenise one record (see the module doc); None when nothing is left to score."""
        f, tok, hp = self.fields, self.tokenizer, self.hparams
        if f.messages in record:
            messages = get_text(record, f.messages, "fields.messages", hp.numbers_as_text)
            if not isinstance(messages, list):
                raise DataError(f"{where(record)}: field {f.messages!r} must be a list of {{role, content}} messages")
            if render.is_blank([m for m in messages if m["role"] == "assistant"]):
                self.stats["skipped_empty"] += 1
                return None
            ids, mask = encode_segments(tok, conversation_segments(tok, messages))
            truncated = len(ids) > hp.max_length
            ids, mask, prompt_ids, prompt_text = ids[: hp.max_length], mask[: hp.max_length], None, ""
        else:
            prompt_key = f.prompt if (f.prompt in record or f.prompt != "prompt") else "question"
            response_key = f.response if (f.response in record or f.response != "response") else "chosen"
            if prompt_key not in record and response_key not in record:
                found = sorted(k for k in record if not k.startswith("_"))
                raise DataError(
                    f"{where(record)}: neither {f.messages!r} nor {f.prompt!r}/{f.response!r} found; fields found: "
                    f"{found}. Map them with --data.fields.messages=<field> or "
                    "--data.fields.prompt=<field> --data.fields.response=<field>"
                )
            prompt = get_text(record, prompt_key, "fields.prompt", hp.numbers_as_text)
            response = get_text(record, response_key, "fields.response", hp.numbers_as_text)
            if render.is_blank(response):
                self.stats["skipped_empty"] += 1
                return None
            prompt_text = render.render_prompt(tok, prompt, hp.chat_template)
            response_text = render.render_completion(tok, prompt, prompt_text, response, hp.chat_template)
            prompt_ids, response_ids, truncated = render.truncate_pair(
                render.encode(tok, prompt_text),
                render.encode(tok, response_text),
                hp.max_length,
                self.max_prompt_length,
            )
            ids, mask = prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)
        self.stats["truncated"] += int(truncated)
        if not any(mask[1:]):  # position 0 is never scored: nothing precedes it
            self.stats["skipped_unscored"] += 1
            return None
        mask[0] = 0
        return SFTExample(ids, mask, prompt_ids, prompt_text, record.get(f.answer))

    # -- batches ----------------------------------------------------------------------------------------------------
    def collate(self, rows: list[list[SFTExample]]) -> SFTBatch:
        """Right-padded rows; a row of several examples gets restarting ``position_ids`` (packed)."""
        pad = self.tokenizer.pad_token_id
        ids = [sum((e.input_ids for e in row), []) for row in rows]
        input_ids = pad_right(ids, pad)
        attention_mask = pad_right([[1] * len(x) for x in ids], 0)
        loss_mask = pad_right([sum((e.loss_mask for e in row), []) for row in rows], 0)
        position_ids = None
        if self.hparams.packing:
            width = input_ids.shape[1]
            positions = [sum((list(range(len(e.input_ids))) for e in row), []) for row in rows]
            position_ids = torch.tensor([p + list(range(width - len(p))) for p in positions], dtype=torch.long)
        return SFTBatch(input_ids, attention_mask, loss_mask, position_ids)

    def collate_prompts(self, examples: list[SFTExample]) -> PromptBatch:
        pad = self.tokenizer.pad_token_id
        input_ids = pad_left([e.prompt_ids for e in examples], pad)
        attention_mask = pad_left([[1] * len(e.prompt_ids) for e in examples], 0)
        return PromptBatch(
            input_ids, attention_mask, [e.prompt for e in examples], {"answer": [e.answer for e in examples]}
        )

    def eval_examples(self) -> list[SFTExample]:
        usable = [e for e in self.val_examples if e.answer is not None and e.prompt_ids]
        return usable[: self.hparams.eval_prompts]

    def train_dataloader(self) -> DataLoader:
        hp, skip = self.hparams, batches_done_in_epoch(self.trainer)
        return sharded_loader(
            self.train_rows, hp.batch_size, self.collate, True, hp.seed, drop_last=True, skip_batches=skip
        )

    def val_dataloader(self) -> list[DataLoader]:
        bs = self.hparams.val_batch_size
        rows = sharded_loader([[e] for e in self.val_examples], bs, self._collate_unpacked, False, 0, drop_last=False)
        prompts = self.eval_examples()
        if not prompts:
            return [rows]
        return [rows, sharded_loader(prompts, bs, self.collate_prompts, False, 0, drop_last=False)]

    def _collate_unpacked(self, rows: list[list[SFTExample]]) -> SFTBatch:
        batch = self.collate(rows)
        batch.position_ids = None  # one example per row: an ordinary causal mask
        return batch
