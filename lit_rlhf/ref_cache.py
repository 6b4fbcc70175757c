"""On-disk cache of reference sequence logps for offline preference training.

Keyed by a hash of the reference model's identity, the tokenised data (pair keys) and the loss-relevant settings,
so a second epoch or a second run on the same data and reference reuses it; any change gives a new file. Files are
written atomically (temp + rename), so a crash never leaves a truncated cache that a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lit_rlhf.io import atomic_file


def model_identity(name: str, dtype: str, seed: int, revision: str | None) -> dict:
    """What determines a reference model's weights: the name, and for local directories their config and files."""
    ident: dict = {"name": name, "dtype": dtype, "revision": revision}
    if name == "tiny":
        ident["seed"] = seed
    path = Path(name)
    if path.is_dir():
        ident["files"] = sorted(
            (p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file()
        )
    return ident


def cache_path(root: str | os.PathLike, identity: dict, keys: list[str]) -> Path:
    digest = hashlib.sha256(json.dumps([identity, sorted(keys)], sort_keys=True).encode()).hexdigest()[:24]
    return Path(root) / f"ref_logps-{digest}.pt"


def load(path: Path) -> dict[str, tuple[float, float]] | None:
    if not path.exists():
        return None
    return torch.load(path, weights_only=True)


def save(path: Path, table: dict[str, tuple[float, float]]) -> None:
    with atomic_file(path) as f:
        torch.save(table, f)
