"""What every data module shares: the tokenizer it is given and where its train/validation records come from.

A data module loads no model: the stage that trains on it hands over its tokenizer (``datamodule.connect(
model.tokenizer)``, as litgpt's ``data.connect(tokenizer=...)``; the CLI does it once both exist), so the data is
rendered by the very tokenizer of the network that reads it (a reward model's pads with a token other than EOS).

Record-source arguments, the same name and meaning in every data module (``--data.path``, ``--data.task``, ...):
``path`` (a file or hub dataset; ``null``: the built-in ``task``), ``subset``, ``split``, ``val_split``,
``val_fraction``, ``task``, ``num_train``, ``num_val``, ``seed``, ``max_records``, ``numbers_as_text``; see
:mod:`lit_rlhf.data.sources`.

Runs that cannot learn are refused in ``setup``, before a model is trained (:meth:`DataModule.require_batches`): a
training set without one full batch per process, a validation set whose every record was skipped. Length settings
are checked when the module is built (:func:`prompt_budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L

from lit_rlhf.data.loaders import world
from lit_rlhf.data.sources import DataError, Records, Task, builtin_split, train_val_records

SOURCE_ARGS = (
    "path",
    "subset",
    "split",
    "val_split",
    "val_fraction",
    "task",
    "num_train",
    "num_val",
    "seed",
    "max_records",
    "numbers_as_text",
)
"""The record-source ``__init__`` arguments every data module declares (read by :meth:`DataModule.records`)."""


def prompt_budget(max_length: int, max_prompt_length: int | None) -> int:
    """``max_prompt_length`` (``None``: half of ``max_length``), checked to be positive and below ``max_length``: a
    pair truncated by :func:`lit_rlhf.data.render.truncate_pair` then keeps at least one response token."""
    budget = max_length // 2 if max_prompt_length is None else max_prompt_length
    if max_length < 2 or not 0 < budget < max_length:
        raise ValueError(
            f"--data.max_prompt_length={budget} must be positive and smaller than --data.max_length={max_length}: "
            "a truncated example keeps max_length - max_prompt_length response tokens "
            f"(e.g. --data.max_prompt_length={max(max_length // 2, 1)})"
        )
    return budget


class DataModule(L.LightningDataModule):
    """A LightningDataModule that is given its tokenizer (:meth:`connect`) and reads its records (:meth:`records`)."""

    _tokenizer = None
    stats: dict[str, int] = {}
    split_stats: dict = {}

    def connect(self, tokenizer) -> None:
        """Give the module the tokenizer that renders its records (the stage's ``tokenizer``)."""
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__} has no tokenizer: call connect(tokenizer) before setup() "
                "(the CLI connects the stage's tokenizer; in Python: dm.connect(module.tokenizer))"
            )
        return self._tokenizer

    def records(
        self, tasks: Mapping[str, Task], task: str, max_val_records: int | None = None
    ) -> tuple[Records, Records]:
        """(train, val) records: the built-in ``task`` (one of ``tasks``) when ``path`` is null, else the file or hub
        dataset's (``val_split`` or a held-out ``val_fraction``; validation capped at ``max_val_records``)."""
        hp = self.hparams
        if hp.path is None:
            return builtin_split(tasks, task, hp.num_train, hp.num_val, hp.seed)
        return train_val_records(
            hp.path, hp.split, hp.val_split, hp.val_fraction, hp.seed, hp.max_records, max_val_records, hp.subset
        )

    def make_examples(self, make: Callable[[dict], Any], train: Records, val: Records) -> tuple[list, list]:
        """(train, val) examples made by ``make`` (``None``: a record skipped, counted by ``make`` in ``self.stats``);
        each split's share of the counts goes to ``self.split_stats`` for :meth:`require_batches`."""
        train_examples = [e for r in train if (e := make(r)) is not None]
        at_train = dict(self.stats)
        val_examples = [e for r in val if (e := make(r)) is not None]
        val_stats = {k: v - at_train.get(k, 0) for k, v in self.stats.items()}
        self.split_stats = {"train": at_train, "val": val_stats, "val_records": len(val)}
        return train_examples, val_examples

    def require_batches(self, num_train: int, num_val: int, unit: str = "examples") -> None:
        """Refuse a run that cannot learn: fewer than ``batch_size`` training ``unit`` per process (loaders drop the
        last partial batch: no training step at all), or validation records of which none is left. ``setup`` calls
        it every time, so the per-process check runs again once the process group exists (:func:`world`)."""
        hp, (size, _), split = self.hparams, world(), self.split_stats
        per_process = num_train // size
        if per_process < hp.batch_size:
            share = f" over {size} processes: {per_process} per process" if size > 1 else ""
            hint = f"use --data.batch_size={per_process} or less, or" if per_process else "use"
            raise DataError(
                f"--data.batch_size={hp.batch_size} is larger than the training set ({num_train} training {unit}"
                f"{share}; counts: {split.get('train', {})}): no full batch, so no training step; {hint} more data"
            )
        if split.get("val_records") and not num_val:
            if hp.path is None:
                source, off = f"--data.num_val={hp.num_val}", "--data.num_val=0"
            elif hp.val_split is not None:
                source, off = f"--data.val_split={hp.val_split}", "--data.val_split=null --data.val_fraction=0"
            else:
                source, off = f"--data.val_fraction={hp.val_fraction}", "--data.val_fraction=0"
            raise DataError(
                f"the validation set is empty: all {split['val_records']} validation records ({source}) were "
                f"skipped ({split['val']}); fix the data, or set {off} to train without validation"
            )
