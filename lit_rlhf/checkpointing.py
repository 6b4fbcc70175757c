"""Checkpoints that survive preemption: atomic writes and the random state needed to continue identically.

- ``AtomicCheckpointIO``: every checkpoint file is written to a temporary name, fsynced and renamed, so a kill during
  a write leaves the previous checkpoint intact and never a torn file that a resume would load.
- ``capture_rng`` / ``restore_rng``: Python, NumPy and torch generator states, stored by every stage in its
  checkpoint (sampling in RL, dropout, shuffling) so a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_rlhf.io import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with temp-file + fsync + rename writes."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        with atomic_file(path) as f:
            torch.save(checkpoint, f)


def capture_rng() -> dict[str, Any]:
    """Generator states as tensors and plain Python values (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
