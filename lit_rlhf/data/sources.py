"""Record sources: local JSON/JSONL/CSV/Parquet files, hub datasets and built-in tasks, split into train/validation
records one way for every data module; plus field access with clear errors.

Every error names where the bad record came from (file and line for JSONL, file and row or record number otherwise)
and the field: a missing field with the fields that were found and the config option that maps them; a null, a
number, a dict where text belongs (:func:`get_text`); bytes that are not UTF-8 (with the byte offset); an empty
file; a directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

Records = list[dict]
Task = Callable[[int, int], Records]
"""A built-in task: ``(n, seed) -> n records``, deterministic by seed (:mod:`lit_rlhf.data.tasks`)."""

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input data; the message names the file/line or record and what to change."""


def builtin_split(
    tasks: Mapping[str, Task], task: str, num_train: int, num_val: int, seed: int
) -> tuple[Records, Records]:
    """(train, val) records of the built-in ``task``: val drawn with ``seed + 1``, train with ``seed`` minus every
    question that is in val (the first message of ``prompt``), so held-out questions never appear in training."""
    if task not in tasks:
        raise ValueError(f"unknown built-in task {task!r}; available: {sorted(tasks)}")
    make = tasks[task]
    val = make(num_val, seed + 1)
    held_out = {r["prompt"][0]["content"] for r in val}
    train = [r for r in make(num_train + num_val * 2, seed) if r["prompt"][0]["content"] not in held_out]
    return train[:num_train], val


def holdout_split(records: Records, val_fraction: float, seed: int) -> tuple[Records, Records]:
    """(train, val) in one seeded random order: ``val_fraction`` of the records held out, at least one when
    ``val_fraction > 0`` and there are two or more records, none when ``val_fraction == 0``."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, int(len(records) * val_fraction)) if val_fraction > 0 and len(records) > 1 else 0
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def train_val_records(
    path: str,
    split: str,
    val_split: str | None,
    val_fraction: float,
    seed: int,
    max_records: int | None = None,
    max_val_records: int | None = None,
    subset: str | None = None,
) -> tuple[Records, Records]:
    """(train, val) records of a file or hub dataset: ``val_split`` read as validation (at most ``max_val_records``,
    default ``max_records``) when given, else :func:`holdout_split` of the ``split`` records."""
    records = read_records(path, split, max_records, subset)
    if val_split is None:
        return holdout_split(records, val_fraction, seed)
    return records, read_records(path, val_split, max_records if max_val_records is None else max_val_records, subset)


def read_records(path: str, split: str = "train", max_records: int | None = None, subset: str | None = None) -> Records:
    """Records from a local file (by suffix) or, when ``path`` is not a local file, the ``split`` of a hub dataset
    (its configuration ``subset``, e.g. ``main`` for ``openai/gsm8k``).

    Each record gets ``_where``: ``file:line`` (JSONL), ``file row N`` (CSV, Parquet), ``file record N`` (JSON) or
    ``hub-name[split]#index``. A directory, an empty file and bytes that are not UTF-8 (named by line and byte
    offset) are errors.
    """
    suffix = Path(path).suffix.lower()
    if os.path.isdir(path):
        raise DataError(
            f"{path}: is a directory; --data.path takes a data file ({', '.join(sorted(LOCAL_SUFFIXES))}) "
            "or a hub dataset name"
        )
    if os.path.isfile(path):
        if suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(LOCAL_SUFFIXES)}")
        if suffix in (".json", ".csv"):
            _check_utf8(path)
        records = _read_jsonl(path, max_records) if suffix == ".jsonl" else _read_with_datasets(path, suffix)
        if not records:
            raise DataError(f"{path}: file is empty (no records)")
    elif suffix in LOCAL_SUFFIXES or path.startswith((".", "/")):
        raise DataError(f"data file not found: {path}")
    else:
        records = _read_hub(path, split, subset)
        name = path if subset is None else f"{path}/{subset}"
        if not records:
            raise DataError(f"hub dataset {name!r} split {split!r} has no records")
        for i, r in enumerate(records):
            r["_where"] = f"{name}[{split}]#{i}"
    return records[:max_records] if max_records is not None else records


def _check_utf8(path: str) -> None:
    """A DataError naming the line and byte offset of the first bytes that are not UTF-8 (JSON, CSV files)."""
    with open(path, "rb") as f:
        for _ in _utf8_lines(path, f):
            pass


def _utf8_lines(path: str, f) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file's lines, or a DataError at the first line that is not UTF-8."""
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        try:
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: not UTF-8: byte(s) {raw[e.start : e.end].hex(' ')} at byte offset "
                f"{offset + e.start} (column {e.start + 1} of the line); save the file as UTF-8"
            ) from None
        offset += len(raw)


def _read_jsonl(path: str, max_records: int | None) -> list[dict]:
    records = []
    with open(path, "rb") as f:
        for lineno, line in _utf8_lines(path, f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
            record["_where"] = f"{path}:{lineno}"
            records.append(record)
            if max_records is not None and len(records) >= max_records:
                break
    return records


def _read_with_datasets(path: str, suffix: str) -> list[dict]:
    import datasets

    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty (no records)")
    if suffix == ".json":
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        if not text.strip():
            raise DataError(f"{path}: file is empty (no records)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        records, unit = data, "record"
    else:
        try:
            records = datasets.load_dataset(LOCAL_SUFFIXES[suffix], data_files=path, split="train").to_list()
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            if "corresponds to no data" in str(e):  # a CSV header without rows
                raise DataError(f"{path}: file is empty (no records)") from None
            raise DataError(f"{path}: could not read it as {suffix[1:].upper()}: {e}") from e
        unit = "row"
    for i, r in enumerate(records):
        r["_where"] = f"{path} {unit} {i + 1}"
    return records


def _read_hub(name: str, split: str, subset: str | None) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split).to_list()
    except Exception as e:  # noqa: BLE001 - re-raised with the dataset named
        which = f"{name!r}" if subset is None else f"{name!r} subset {subset!r}"
        raise DataError(f"could not load hub dataset {which} split {split!r}: {e}") from e


def where(record: dict) -> str:
    """Where ``record`` came from (``file:line``, ``file row N``, ...; see :func:`read_records`)."""
    return record.get("_where", "record")


def get_field(record: dict, name: str, option: str) -> Any:
    """``record[name]``, or a DataError listing the fields found and the option that maps the field."""
    if name in record:
        return record[name]
    found = sorted(k for k in record if not k.startswith("_"))
    raise DataError(
        f"{where(record)}: missing field {name!r}; fields found: {found}. Map it with --data.{option}=<field>"
    )


def get_text(record: dict, name: str, option: str, numbers_as_text: bool = False) -> str | list[dict]:
    """``record[name]`` as text: a string or a list of ``{role, content}`` chat messages with string contents.

    A null, a dict, a bool or another list is a DataError naming the record, the field and what was found; an int or
    a float is one too unless ``numbers_as_text`` (``--data.numbers_as_text``), which converts it with ``str``."""
    return as_text(get_field(record, name, option), f"{where(record)}: field {name!r}", numbers_as_text)


def as_text(value: Any, what: str, numbers_as_text: bool = False) -> str | list[dict]:
    """``value`` checked as text (see :func:`get_text`); ``what`` names it in errors (``file:3: field 'chosen'``)."""
    if isinstance(value, str):
        return value
    if value is None:
        raise DataError(f"{what} is null; expected a string or a list of chat messages")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if numbers_as_text:
            return str(value)
        raise DataError(
            f"{what} is a number ({value!r}), not text; pass --data.numbers_as_text=true to read numbers as text "
            "(a CSV column of digits is read as numbers)"
        )
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        for i, m in enumerate(value):
            missing = [k for k in ("role", "content") if k not in m]
            if missing:
                raise DataError(f"{what} message {i} lacks {missing}; a chat message is {{role, content}}")
            for key in ("role", "content"):
                if not isinstance(m[key], str):
                    raise DataError(f"{what} message {i}: {key!r} must be a string, got {_describe(m[key])}")
        return value
    raise DataError(f"{what} must be a string or a list of {{role, content}} chat messages, got {_describe(value)}")


def _describe(value: Any) -> str:
    """``null``, or the type and a short repr of ``value`` for error messages."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
