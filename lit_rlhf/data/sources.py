"""Record sources: local JSON/JSONL/CSV/Parquet files and hub datasets, plus field access with clear errors.

Every error names where the bad record came from (file and line for JSONL, file and record index otherwise) and,
for a missing field, the fields that were found and the config option that maps them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input data; the message names the file/line or record and what to change."""


def read_records(path: str, split: str = "train", max_records: int | None = None) -> list[dict]:
    """Records from a local file (by suffix) or, when ``path`` is not a local file, a hub dataset ``split``.

    Each record gets ``_where``: ``file:line`` (JSONL), ``file#index`` (other files) or ``hub-name[split]#index``.
    """
    suffix = Path(path).suffix.lower()
    if os.path.isfile(path):
        if suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(LOCAL_SUFFIXES)}")
        records = _read_jsonl(path, max_records) if suffix == ".jsonl" else _read_with_datasets(path, suffix)
    elif suffix in LOCAL_SUFFIXES or path.startswith((".", "/")):
        raise DataError(f"data file not found: {path}")
    else:
        records = _read_hub(path, split)
        for i, r in enumerate(records):
            r["_where"] = f"{path}[{split}]#{i}"
    return records[:max_records] if max_records is not None else records


def _read_jsonl(path: str, max_records: int | None) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
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

    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        records = data
    else:
        records = datasets.load_dataset(LOCAL_SUFFIXES[suffix], data_files=path, split="train").to_list()
    for i, r in enumerate(records):
        r["_where"] = f"{path}#{i}"
    return records


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:  # noqa: BLE001 - re-raised with the dataset named
        raise DataError(f"could not load hub dataset {name!r} split {split!r}: {e}") from e


def get_field(record: dict, name: str, option: str) -> Any:
    """``record[name]``, or a DataError listing the fields found and the option that maps the field."""
    if name in record:
        return record[name]
    found = sorted(k for k in record if not k.startswith("_"))
    raise DataError(
        f"{record.get('_where', 'record')}: missing field {name!r}; fields found: {found}. "
        f"Map it with --data.{option}=<field>"
    )
