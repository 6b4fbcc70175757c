"""DataLoaders that give the same global batches whatever the number of processes.

Every data module builds its loaders here, with Lightning's automatic sampler off (``use_distributed_sampler=False``
in the CLI's trainer defaults). One seeded permutation of the dataset per epoch (``DistributedSampler``, also with a
single process); rank r of W takes every W-th element. So step k's global batch is the same set of examples for
1, 2 or 8 processes at the same global batch size — what makes multi-process runs comparable to single-process ones.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def sharded_loader(dataset: Sequence, batch_size: int, collate_fn: Callable, shuffle: bool, seed: int, drop_last: bool) -> DataLoader:
    """A per-rank DataLoader over this rank's share of one seeded permutation (see module doc)."""
    size, rank = world()
    sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last)
