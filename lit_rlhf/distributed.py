"""Multi-process training through Lightning's strategies: FSDP2 sharding and full-state gathering.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is applied in each stage's ``configure_model`` when the trainer runs
``ModelParallelStrategy`` (``self.device_mesh`` is set): every decoder layer is its own shard group, then the
whole network (embeddings, final norm, head). Works with gloo on CPU processes (tests) and NCCL on GPUs. DDP needs
nothing here: Lightning wraps the module. Frozen and trainable parameters can share a group (FSDP2 shards per
parameter), so LoRA adapters and their frozen base shard together.
"""

from __future__ import annotations

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


def fully_shard_lm(model: nn.Module, device_mesh, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to a (possibly peft-wrapped) HF transformer: each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    mesh = data_parallel_mesh(device_mesh)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
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
