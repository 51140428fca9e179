"""The layers the decoder and its variants share: RMSNorm, the SwiGLU MLP, and what an attention
layer is given (:class:`AttentionInputs`, the causal mask).

Shared by :mod:`~effllm.models.decoder` and the variants it builds (MLA, NSA, MoE experts), so it
sits below all of them and imports none.

Every attention module has the signature ``forward(x, inputs: AttentionInputs, cache) -> Tensor``:
``x`` is ``[B, T, hidden]``, ``cache`` a ``transformers.DynamicCache`` (or None) that the module
updates for its own ``layer_idx``. What the module stores in the cache is its own business; the
KV-cache size is measured from whatever tensors the cache layers hold.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
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


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
