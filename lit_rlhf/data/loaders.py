"""DataLoaders that give the same global batches whatever the number of processes.

Every data module builds its loaders here, with Lightning's automatic sampler off (``use_distributed_sampler=False``
in the CLI's trainer defaults). One seeded permutation of the dataset per epoch (``DistributedSampler``, also with a
single process); rank r of W takes every W-th element. So step k's global batch is the same set of examples for
1, 2 or 8 processes at the same global batch size — what makes multi-process runs comparable to single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """DistributedSampler that, once, skips the samples of the batches already consumed in the current epoch.

    A run resumed from a mid-epoch checkpoint then continues with exactly the batches an uninterrupted run would see.
    """

    def __init__(self, *args, skip_samples: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip_samples = skip_samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip_samples = self.skip_samples, 0
        return iter(indices[skip:])


def batches_done_in_epoch(trainer) -> int:
    """Batches of the current epoch already trained (non-zero only when resuming from a mid-epoch checkpoint)."""
    if trainer is None:
        return 0
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    # a checkpoint is written in the batch-end hooks: its batch is "processed" (optimizer stepped), not yet "completed"
    return int(max(progress.processed, progress.completed))


def sharded_loader(
    dataset: Sequence,
    batch_size: int,
    collate_fn: Callable,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    skip_batches: int = 0,
) -> DataLoader:
    """A per-rank DataLoader over this rank's share of one seeded permutation (see module doc), skipping
    ``skip_batches`` batches of the first epoch it serves (resume)."""
    size, rank = world()
    sampler = ResumableSampler(
        dataset,
        num_replicas=size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        skip_samples=skip_batches * batch_size,
    )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last)
