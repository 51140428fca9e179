"""Pieces every attention variant shares: norms, rotary tables, and what an attention layer is given.

Every attention module has the signature ``forward(x, inputs: AttentionInputs, cache) -> Tensor``:
``x`` is ``[B, T, hidden]``, ``cache`` a ``transformers.DynamicCache`` (or None) that the module
updates for its own ``layer_idx``. What the module stores in the cache is its own business; the
KV-cache size is measured from whatever tensors the cache layers hold.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability at low precision, as Llama does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


@dataclasses.dataclass
class AttentionInputs:
    """What the model computes once per forward and hands to every attention layer.

    ``mask`` and ``bias`` cover all ``S = past + T`` key positions. ``mask is None`` means plain
    causal attention with no padding (the fast SDPA path is exact).
    """

    position_ids: torch.Tensor  # [B, T] position of each query (padding-aware)
    past: int  # tokens already in the cache before this call
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [B, 1, T, rope_dim]; None if no RoPE
    mask: torch.Tensor | None  # bool [B, 1, T, S], True = may attend; None = causal, unpadded
    bias: torch.Tensor | None  # float [1 or B, H, T, S] additive score bias (ALiBi, T5 relative)
    attention_mask: torch.Tensor | None  # [B, S] raw key-padding mask (1 = real token), or None

    def sdpa_mask(self, t: int) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for ``F.scaled_dot_product_attention`` with ``t`` queries."""
        if self.bias is None:
            return self.mask, self.mask is None and t > 1
        keep = self.mask if self.mask is not None else causal_mask(t, self.past, self.bias.device)
        return self.bias.masked_fill(~keep, float("-inf")), False


def causal_mask(t: int, past: int, device) -> torch.Tensor:
    """Bool ``[1, 1, T, past + T]``: query i (at position past + i) sees keys 0 … past + i."""
    q_pos = torch.arange(past, past + t, device=device)[:, None]
    k_pos = torch.arange(past + t, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed absolute encoding of Vaswani et al. (2017): sin on even, cos on odd channels."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table
