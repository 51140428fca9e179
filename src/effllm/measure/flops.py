"""FLOP counting with torch's FlopCounterMode, with the CPU attention gap closed.

On CPU, ``F.scaled_dot_product_attention`` dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which FlopCounterMode does
not know and silently counts as 0 (measurement.md §7). We map those ops to torch's own SDPA
formulas. Counting runs Python per op: do it in a separate pass, never inside a timed loop.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, **kwargs) -> int:
    # Math in [B, H, T, D] layout; GQA (fewer KV heads) is handled by the formula.
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_MAPPING = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of running ``fn()`` once (forward and whatever backward it calls)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_MAPPING) as counter:
        fn()
    return int(counter.get_total_flops())
