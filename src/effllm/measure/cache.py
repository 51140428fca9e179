"""How much decoding state a model keeps: the KV cache of attention models, the constant-size
recurrent state of Mamba and RWKV, MLA's latent, NSA's compressed keys, whatever the cache holds.

Measured from the tensors the returned cache object reaches, so it needs no knowledge of a cache
class and holds for every model family the pipeline trains.
"""

from __future__ import annotations

import types

import torch
from torch import nn

# What each family calls its decoding state, in forward outputs and as a forward argument.
CACHE_FIELDS = ("past_key_values", "cache_params", "state")


def decoding_state(output) -> tuple[str, object]:
    """(field name, state) of a cached forward's output, whatever the family calls it.

    The field name is also the forward argument that takes the state back.
    """
    for name in CACHE_FIELDS:
        state = getattr(output, name, None)
        if state is not None:
            return name, state
    raise ValueError(f"the output has none of {CACHE_FIELDS}; was use_cache=True honoured?")


# Not decoding state: weights, and objects whose attributes lead everywhere.
SKIPPED = (nn.Module, types.ModuleType, type, str, bytes)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor storage reachable from ``obj``, each storage counted once.

    Walks lists, tuples, dicts and object attributes, so it needs no knowledge of a cache class
    (DynamicCache layers, Mamba's conv/recurrent states, RWKV's list). Modules are skipped: their
    parameters are weights, not decoding state.
    """
    seen_objects, storages = set(), {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen_objects or isinstance(item, SKIPPED):
            continue
        seen_objects.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            # keyed by the storage itself (not its data pointer, which fake tensors share)
            storages[(storage._cdata, item.device)] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return sum(storages.values())


@torch.no_grad()
def cache_state_bytes(model, input_ids: torch.Tensor) -> int:
    """Total bytes of the decoding state after a cached forward over ``input_ids`` (whole batch)."""
    was_training = model.training
    model.eval()
    try:
        output = model(input_ids=input_ids, use_cache=True)
    finally:
        model.train(was_training)
    return tensor_bytes(decoding_state(output)[1])


def cache_bytes_per_token(model, input_ids: torch.Tensor) -> float:
    """Bytes by which the decoding state grows per token of one sequence.

    Measured as a difference between two lengths (half and all of ``input_ids``), so constant
    parts (recurrent states, fixed buffers) cancel: KV bytes per token for attention models,
    0 for Mamba and RWKV. Divided by the batch size.
    """
    batch, t2 = input_ids.shape
    t1 = t2 // 2
    if t1 < 1:
        raise ValueError(f"need at least 2 tokens to measure growth, got {t2}")
    grown = cache_state_bytes(model, input_ids) - cache_state_bytes(model, input_ids[:, :t1])
    return grown / (batch * (t2 - t1))
