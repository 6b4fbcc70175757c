"""What the CLI decides from the hardware: ``--trainer.strategy=fsdp2`` as Lightning's ``ModelParallelStrategy``
(pure FSDP2) and deterministic algorithms by default on the CPU."""

from __future__ import annotations

import torch


def runs_on_cpu(accelerator) -> bool:
    """Whether the Trainer will run on the CPU. There ``trainer.deterministic`` defaults to True: with more than one
    thread, CPU ``index_put_(accumulate=True)`` (the backward of advanced indexing with repeated indices, e.g. a
    prompt's KV cache gathered to its G completions) adds in a varying order, so two processes given the same
    inputs differ in the last bits and, a few sampled tokens later, visibly. Set it explicitly to override."""
    if isinstance(accelerator, str):
        if accelerator == "auto":
            return not torch.cuda.is_available() and not torch.backends.mps.is_available()
        return accelerator == "cpu"
    from lightning.pytorch.accelerators import CPUAccelerator

    return isinstance(accelerator, CPUAccelerator)


def fsdp2_strategy(devices, num_nodes: int):
    """Lightning's ModelParallelStrategy as pure FSDP2: all processes on the data-parallel mesh dimension.

    (Its default puts the processes of a node on the tensor-parallel dimension, which would leave FSDP2 a 1-rank
    mesh and every process training on its own.)
    """
    from lit_rlhf.checkpointing import AtomicModelParallelStrategy  # its sharded checkpoints are written atomically

    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    elif isinstance(devices, str) and devices.isdigit():
        per_node = int(devices)
    else:  # "auto" / -1
        per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return AtomicModelParallelStrategy(data_parallel_size=per_node * int(num_nodes), tensor_parallel_size=1)
