"""ZeRO-3 over the ranks with torch's FSDP2, applied to a plain model as a function.

Parameters, gradients and optimiser state are split over the ranks, one unit per repeated layer
plus the rest (embeddings, head, final norm), and each layer's weights are gathered only while
it runs: DeepSpeed's ZeRO-3, which the paper uses for Full fine-tuning, and what a model too big
for DDP's full replica per rank needs (MoE pretraining at paper scale). Fine-tuning's Full and
pretraining with ``pretrain.sharding: fsdp`` share these functions.
"""

from __future__ import annotations

import torch
from torch import nn


def repeated_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of repeated blocks (decoder layers, Mamba/RWKV blocks): the largest
    ModuleList, whatever the family calls it."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of layers to shard")
    return max(lists, key=len)


def shard(model: nn.Module, device: str, precision: str = "fp32", offload: bool = False,
          mesh=None) -> nn.Module:
    """Shard ``model`` in place over the process group: one FSDP unit per repeated layer, then
    the root. ``offload`` keeps shards, gradients and the optimiser step on the CPU; at bf16
    the gathered weights are bf16 and gradients are reduced in fp32 (autocast would otherwise
    keep a bf16 copy of every layer's weights for the backward pass). ``mesh``: the device mesh
    (default: one over the whole process group; the plan passes the mesh of its fake group)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    policy = {} if mesh is None else {"mesh": mesh}
    if offload:
        policy["offload_policy"] = CPUOffloadPolicy(pin_memory=device != "cpu")
    if precision == "bf16":
        policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    for layer in repeated_layers(model):
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """The whole model's (and optimiser's) state on every rank's CPU, from a sharded model or a
    plain one (a collective when sharded: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    """Put a whole state (from :func:`full_state`) into a sharded model and its optimiser: each
    rank keeps its slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
