"""Counting parameters, one way for every model: the records, the size matching of baselines
and MoE's active parameters all use this count, so "params" means one thing everywhere."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters as counted, never nominal: tied weights once, and a
    bitsandbytes 4-bit weight (two values a byte) by the shape it stands for."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        state = getattr(p, "quant_state", None)
        n = state.shape.numel() if state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
