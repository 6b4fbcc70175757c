"""Multi-process training through Lightning's strategies: FSDP2 sharding and full-state gathering.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is applied in each stage's ``configure_model`` when the trainer runs
``ModelParallelStrategy`` (``self.device_mesh`` is set): every decoder layer is its own shard group, then the
whole network (embeddings, final norm, head). Works with gloo on CPU processes (tests) and NCCL on GPUs. DDP needs
nothing here: Lightning wraps the module. Frozen and trainable parameters can share a group (FSDP2 shards per
parameter), so LoRA adapters and their frozen base shard together.

Sampling across processes (GRPO, PPO rollouts): :class:`GlobalBatchNoise` draws every decode step's uniforms for the
whole global batch from a generator seeded the same on every rank, and each rank keeps the rows of its own prompts,
so a completion is the same whether its prompt was sampled by 1 process or by rank r of W.
:func:`all_ranks_done` keeps the ranks' decode loops in lockstep under FSDP2 (every forward is collective).

Losses over a global batch (SFT's token mean, GRPO's sequence/token normalisers, PPO's minibatch token means) divide
each rank's sum by :func:`global_normalizer`, so the gradient the strategy averages over ranks is the global mean's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def data_parallel_mesh(device_mesh):
    """The data-parallel sub-mesh of Lightning's ModelParallelStrategy mesh (FSDP shards over it)."""
    names = device_mesh.mesh_dim_names or ()
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    if not hasattr(decoder, "layers"):
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} to shard with FSDP2")
    return decoder.layers


def fully_shard_lm(
    model: nn.Module, device_mesh, reshard_after_forward: bool = True, called_directly: Iterable[nn.Module] = ()
) -> nn.Module:
    """Apply FSDP2 to a (possibly peft-wrapped) HF transformer: each decoder layer, then the submodules a stage calls
    directly rather than through the root's forward (e.g. a reward model's body and score head: each must be its own
    FSDP unit so its parameters are gathered when it runs), then the root."""
    from torch.distributed.fsdp import fully_shard

    mesh = data_parallel_mesh(device_mesh)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for module in called_directly:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU. Collective under FSDP2: every rank must call it (rank 0 gets the tensors)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised default process group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class GlobalBatchNoise:
    """The uniforms [n, 1] of one decode step for this rank's rows, drawn for the global batch.

    The data loaders (:mod:`lit_rlhf.data.loaders`) give rank r of W the prompts at positions r, r + W, r + 2W, ... of
    the step's global batch; the completions of a prompt are consecutive rows. Each call draws
    ``[prompts per rank, W, rows per prompt]`` uniforms (the single-process layout, row-major, when W = 1) and keeps
    ``[:, r]``, so the noise of a completion depends on its position in the global batch only. Every rank must hold
    a generator in the same state and the same number of prompts (the sharded loaders pad to equal shares).
    """

    def __init__(self, generator: torch.Generator, num_prompts: int, rows_per_prompt: int) -> None:
        self.generator, self.num_prompts, self.rows_per_prompt = generator, num_prompts, rows_per_prompt
        self.world_size, self.rank = world()

    def __call__(self) -> torch.Tensor:
        shape = (self.num_prompts, self.world_size, self.rows_per_prompt)
        u = torch.rand(shape, generator=self.generator, device=self.generator.device)
        return u[:, self.rank].reshape(-1, 1)


def all_ranks_done(done: torch.Tensor) -> bool:
    """True when every row of every rank is done (an all-reduce: every rank must call it at the same decode step)."""
    import torch.distributed as dist

    live = (~done).any().to(torch.int32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(live, op=dist.ReduceOp.MAX)
    return not bool(live.item())


def lockstep_done(model: nn.Module):
    """The ``all_done`` of :func:`lit_rlhf.rollout.sample` for ``model``: :func:`all_ranks_done` when it is sharded
    (FSDP2: every forward is collective), else None (each rank stops when its own rows are done)."""
    return all_ranks_done if is_sharded(model) else None


def fully_shard_root(module: nn.Module, device_mesh) -> nn.Module:
    """FSDP2 on ``module`` as one group (what its already sharded children leave, e.g. a value head)."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, mesh=data_parallel_mesh(device_mesh))


def row_chunks(n: int, size: int | None, device, same_count_on_all_ranks: bool = False) -> list[torch.Tensor]:
    """Row indices 0..n-1 in consecutive chunks of ``size`` (None: one chunk). With ``same_count_on_all_ranks``,
    trailing empty chunks give every rank the largest count, so data-parallel ranks run the same number of backward
    passes (an all-reduce: every rank must call it)."""
    import torch.distributed as dist

    size = size or max(n, 1)
    count = -(-n // size)
    if same_count_on_all_ranks and world()[0] > 1:
        counts = torch.tensor([count], device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        count = int(counts)
    return [torch.arange(min(n, i * size), min(n, (i + 1) * size), device=device) for i in range(count)]


def global_normalizer(local: torch.Tensor) -> torch.Tensor:
    """The normaliser of a global mean under data parallelism: the mean over ranks of each rank's ``local`` count
    (its tokens, sequences or summed weights), at least 1e-8. A rank's loss SUM divided by it, averaged over the ranks
    (as DDP all-reduces and FSDP2 reduce-scatters gradients), is the sum over all ranks divided by the global count:
    the global mean, whatever the split. One process: ``local`` itself. An all-reduce: every rank must call it."""
    import torch.distributed as dist

    total = torch.as_tensor(local, dtype=torch.float32).detach().clone()
    world_size, _ = world()
    if world_size > 1:
        dist.all_reduce(total)
        total = total / world_size
    return total.clamp(min=1e-8)


def rank_mean(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over the ranks, the same number on every rank (e.g. for early stopping); the value
    itself with one process. An all-reduce: every rank must call it."""
    import torch.distributed as dist

    world_size, _ = world()
    if world_size == 1:
        return float(value)
    total = value.detach().to(torch.float32).clone().reshape(1)
    dist.all_reduce(total)
    return float(total) / world_size


def global_masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """:func:`lit_rlhf.logprobs.masked_whiten` with the mean and (Bessel-corrected) variance over the masked entries
    of all ranks (two all-reduces; every rank must call it); with one process, ``masked_whiten`` itself."""
    import torch.distributed as dist

    if world()[0] == 1:
        from lit_rlhf.logprobs import masked_whiten

        return masked_whiten(x, mask, eps=eps)
    mask = mask.to(x.dtype)
    sums = torch.stack([(x * mask).sum(), mask.sum()])
    dist.all_reduce(sums)
    mean, n = sums[0] / sums[1], sums[1]
    sq = ((x - mean) ** 2 * mask).sum()
    dist.all_reduce(sq)
    if n < 2:
        raise ValueError("whitening needs at least two unmasked entries over all ranks")
    var = sq / (n - 1)
    return (x - mean) * torch.rsqrt(var + eps) * mask
