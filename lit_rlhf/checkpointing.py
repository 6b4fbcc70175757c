"""Checkpoints that survive preemption and are found again: atomic finite writes, the resume target, the RNG state.

- ``AtomicCheckpointIO``: every checkpoint file is written to a temporary name, fsynced and renamed, so a kill during
  a write leaves the previous checkpoint intact and never a torn file that a resume would load; weights holding NaN
  or inf are refused (a diverged run keeps its last good checkpoint). ``AtomicModelParallelStrategy`` does the same
  for FSDP2's sharded checkpoint directories.
- :func:`newest_checkpoint`: what ``--ckpt_path last`` means, for the CLI, sweeps and pipelines alike: the newest
  checkpoint of the run directory that loads (highest global step, then newest file) among
  ``checkpoints/last*.ckpt``, ``checkpoints/step=*.ckpt`` and ``hpc_ckpt_*.ckpt`` (SLURM requeue, in the directory or
  retired to ``checkpoints/``). A torn or corrupt file is skipped with a warning naming it.
- ``capture_rng`` / ``restore_rng``: Python, NumPy and torch generator states, stored by every stage in its
  checkpoint (sampling in RL, dropout, shuffling) so a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_rlhf.io import atomic_file, replace_path

CHECKPOINT_GLOBS = (
    "checkpoints/last*.ckpt",
    "checkpoints/step=*.ckpt",
    "checkpoints/hpc_ckpt_*.ckpt",
    "hpc_ckpt_*.ckpt",
)
_STEP_FILE = re.compile(r"^step=(\d+)(-v\d+)?\.ckpt$")
SHARDED_METADATA = "meta.pt"
"""The non-tensor part of a sharded checkpoint directory (Lightning's ``ModelParallelStrategy``, i.e. FSDP2)."""


class NonFiniteWeightsError(RuntimeError):
    """A checkpoint or export would hold NaN or inf weights."""


def first_non_finite(named_tensors) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf among ``(name, tensor)`` pairs, or None."""
    for name, t in named_tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard
            if not bool(torch.isfinite(local).all()):
                return name
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with temp-file + fsync + rename writes that refuses non-finite weights."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        if (bad := first_non_finite(checkpoint.get("state_dict", {}).items())) is not None:
            raise NonFiniteWeightsError(
                f"not writing checkpoint {path}: weight {bad!r} holds NaN or inf at global step "
                f"{checkpoint.get('global_step')} (the run diverged; earlier checkpoints are kept)"
            )
        with atomic_file(path) as f:
            torch.save(checkpoint, f)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) whose checkpoints, sharded directories written by every rank,
    are atomic too: written under a temporary name beside the target and moved into place by rank zero once every
    rank has written its shard; non-finite weights (any rank's shard) are refused as by ``AtomicCheckpointIO``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        bad = first_non_finite(checkpoint.get("state_dict", {}).items())
        if not self.reduce_boolean_decision(bad is None, all=True):
            raise NonFiniteWeightsError(
                f"not writing checkpoint {filepath}: weight {bad or '(on another rank)'!r} holds NaN or inf at global "
                f"step {checkpoint.get('global_step')} (the run diverged; earlier checkpoints are kept)"
            )
        path = Path(self.broadcast(str(filepath)))
        tmp = path.parent / self.broadcast(f".{path.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("atomic_checkpoint_written")
        if self.global_rank == 0:
            replace_path(tmp, path)
        self.barrier("atomic_checkpoint_in_place")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Restore a sharded checkpoint that holds only the trainable weights (the stages drop frozen ones in
        ``on_save_checkpoint``): the model's state is read for the keys the checkpoint has, the rest keep their
        loaded values (Lightning's own loader asks for every key and fails on the first frozen one). Optimizer states
        and the non-tensor metadata are restored as Lightning does; a single-file checkpoint goes to Lightning."""
        from torch.distributed import checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        model = {k: v for k, v in get_model_state_dict(self.model).items() if f"state_dict.{k}" in saved}
        dcp.load({"state_dict": model}, checkpoint_id=path)
        set_model_state_dict(self.model, model, options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{idx}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model, optimizer, state[f"optimizer_{idx}"], options=StateDictOptions(cpu_offload=True)
            )
        return torch.load(path / SHARDED_METADATA, weights_only=weights_only)


# ------------------------------------------------------------------------------------------------ resume target
def checkpoint_global_step(path: str | os.PathLike) -> int:
    """The ``global_step`` stored in a Lightning checkpoint; raises if it does not load (torn, corrupt). A file is
    memory-mapped, so its tensors are not read; of a sharded (FSDP2) checkpoint directory only ``meta.pt`` is read,
    once the distributed checkpoint's ``.metadata`` (written last) is there."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} is a sharded checkpoint without its .metadata (an incomplete write)")
        path = path / SHARDED_METADATA
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err).lower() and "weights only" not in str(err).lower():
            raise
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # our own run's file
    return int(ckpt["global_step"])


def run_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint file of the run directory that ``last`` considers (see the module docstring)."""
    out = Path(output_dir)
    return sorted({p for pattern in CHECKPOINT_GLOBS for p in out.glob(pattern) if p.is_file() or p.is_dir()})


def newest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of the run in ``output_dir`` that loads: highest global step, then modification time;
    a file that does not load is skipped with a warning naming it. None when there is none.

    ``step=N.ckpt`` files are ordered by the N of their name and opened only when they are the best candidate, so
    a run with many periodic checkpoints resolves quickly."""
    candidates = []
    for path in run_checkpoints(output_dir):
        named = _STEP_FILE.match(path.name)
        step = int(named.group(1)) if named else _loaded_step(path)
        if step is not None:
            candidates.append((step, path.stat().st_mtime, path, named is None))
    for _, _, path, checked in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        if checked or _loaded_step(path) is not None:
            return path
    return None


def _loaded_step(path: Path) -> int | None:
    try:
        return checkpoint_global_step(path)
    except Exception as err:  # noqa: BLE001 - any failure to load means: not a checkpoint to resume from
        rank_zero_warn(f"skipping checkpoint {path}: it does not load ({type(err).__name__}: {str(err)[:200]})")
        return None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """``--ckpt_path`` as given, with ``last`` meaning :func:`newest_checkpoint` of ``output_dir`` (None when the
    run has none yet: it starts from step 0)."""
    if ckpt_path == "last":
        found = newest_checkpoint(output_dir)
        return None if found is None else str(found)
    return ckpt_path


# ------------------------------------------------------------------------------------------------------ RNG state
def capture_rng() -> dict[str, Any]:
    """Generator states as tensors and plain Python values (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }
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
