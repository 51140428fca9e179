"""Position encodings: rotary tables, the fixed sinusoidal table, ALiBi slopes and T5 buckets.

The decoder picks one (``position_encoding``); MLA and NSA rotate their own queries and keys with
the tables the decoder computes once per forward, so the helpers live here, below all of them.
"""

from __future__ import annotations

import math

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables ``[B, 1, T, head_dim]`` for the given positions, computed on the fly."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` (half-split convention, as Llama and Qwen2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed absolute encoding of Vaswani et al. (2017): sin on even, cos on odd channels."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence, interleaved for non-powers
    of 2."""

    def powers(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(powers(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(powers(closest) + extra)


def relative_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal bucketing of ``distance`` = query index - key index (≥ 0 where visible):
    exact buckets for small distances, logarithmic ones up to ``max_distance``."""
    n = distance.clamp(min=0)
    exact = num_buckets // 2
    log_bucket = exact + (
        torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
        * (num_buckets - exact)
    ).long()
    return torch.where(n < exact, n, log_bucket.clamp(min=exact, max=num_buckets - 1))
