"""FLOP counting with torch's FlopCounterMode, with two silent gaps closed.

On CPU, ``F.scaled_dot_product_attention`` dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which FlopCounterMode does
not know and silently counts as 0 (docs/metrics.md §7). We map those ops to torch's own SDPA
formulas. bitsandbytes' 4-bit matmuls (QLoRA's forward) and LLM.int8 matmuls are custom ops,
also counted as 0; we count them as the dense matmul they compute. Counting runs Python per op:
do it in a separate pass, never inside a timed loop.
"""

from __future__ import annotations

import math
import sys
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


def _matmul_4bit(a_shape, b_shape, shape_b, *args, **kwargs) -> int:
    # A [..., K] times the dequantised weight [N, K] (shape_b) transposed.
    return 2 * math.prod(a_shape[:-1]) * shape_b[0] * shape_b[1]


def _matmul_int8(a_shape, b_shape, *args, **kwargs) -> int:
    # LLM.int8: A [..., K] times the int8 weight B [N, K] transposed (outliers included).
    return 2 * math.prod(a_shape[:-1]) * b_shape[0] * b_shape[1]


def _mixed_int8(a_shape, ca_shape, cb_shape, *args, **kwargs) -> int:
    # int8_mixed_scaled_mm(A, CA, CB, ...): the int8 part and the fp outlier columns together
    # make one dense A [..., K] x CB [N, K]^T.
    return 2 * math.prod(a_shape[:-1]) * cb_shape[0] * cb_shape[1]


CPU_MAPPING = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def _mapping() -> dict:
    """CPU_MAPPING plus bitsandbytes' 4-bit ops once bitsandbytes is loaded (its ops exist only
    after import, and importing it here would slow every count)."""
    if "bitsandbytes" not in sys.modules:
        return CPU_MAPPING
    ops = torch.ops.bitsandbytes
    int8 = {name: fn for name, fn in (("int8_linear_matmul", _matmul_int8),
                                       ("int8_scaled_mm", _matmul_int8),
                                       ("int8_mixed_scaled_mm", _mixed_int8))
            if hasattr(ops, name)}  # bitsandbytes >= 0.45's op names
    return {**CPU_MAPPING, ops.gemm_4bit: _matmul_4bit, ops.gemv_4bit: _matmul_4bit,
            **{getattr(ops, name): fn for name, fn in int8.items()}}


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of running ``fn()`` once (forward and whatever backward it calls)."""
    with FlopCounterMode(display=False, custom_mapping=_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())
