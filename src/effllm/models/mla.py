"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, §2.1).

Keys and values are rebuilt from one small latent per token, ``c_kv = RMSNorm(W_dkv x)``
(``kv_lora_rank`` wide), by the up-projection ``kv_b_proj``. RoPE cannot pass through that
up-projection, so position goes through a separate ("decoupled") ``qk_rope_head_dim``-wide key,
one for all heads, concatenated to every head's latent-derived key. The cache holds only
``c_kv`` and the rotated rope key: ``kv_lora_rank + qk_rope_head_dim`` numbers per token and
layer, instead of ``2 × hidden`` for multi-head attention.

Two ways to compute the same attention:

* naive: decompress K and V for every cached position, then ordinary SDPA. Cheap when there are
  many queries per key (training, prefill);
* absorbed: fold ``kv_b_proj``'s key half into the query and its value half into the output, and
  attend over the latent directly (DeepSeek-V3 ``inference/model.py``, "absorb"). Nothing is
  decompressed, so one decoding step costs O(cache length × kv_lora_rank) per head instead of
  re-expanding the whole cache.

Module names follow DeepSeek (and transformers' ``DeepseekV3Attention``): weights load either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effllm.models.config import DecoderConfig
from effllm.models.layers import AttentionInputs, RMSNorm, causal_mask
from effllm.models.positions import apply_rope


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.rope_dim = config.qk_rope_head_dim
        self.nope_dim = config.qk_nope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = self.qk_dim ** -0.5
        # None: absorbed for decoding steps (one query against a cache), naive otherwise.
        self.absorb: bool | None = None
        d, h = config.hidden_size, self.n_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_dim, bias=False)
        else:  # DeepSeek-V2 also compresses the query (saves activations, not cache)
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache) -> torch.Tensor:
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.qk_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)[:, None]  # [B, 1, T, kv_lora_rank]: one "head"
        k_pe = k_pe[:, None]  # [B, 1, T, rope_dim]: one rope key shared by all heads
        if inputs.rope is not None:
            q_pe, k_pe = apply_rope(q_pe, *inputs.rope), apply_rope(k_pe, *inputs.rope)
        if cache is not None:  # the cache sees only the latent and the rotated rope key
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)

        absorb = self.absorb if self.absorb is not None else (cache is not None and t == 1)
        attend = self._absorbed if absorb else self._naive
        y = attend(q_nope, q_pe, c_kv, k_pe, inputs)  # [B, H, T, v_dim]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, inputs: AttentionInputs) -> torch.Tensor:
        """Decompress per-head K/V for all S positions, then SDPA."""
        b, h, t, _ = q_nope.shape
        s = c_kv.shape[-2]
        kv = self.kv_b_proj(c_kv[:, 0]).view(b, s, h, self.nope_dim + self.v_dim)
        k_nope, v = kv.transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(b, h, s, self.rope_dim)], dim=-1)
        attn_mask, is_causal = inputs.sdpa_mask(t)
        # SDPA's flash kernels (CUDA and CPU) need one head width for q, k and v; MLA's values
        # are narrower (128 vs 192 at the paper's shapes), which would send every call to a
        # slower kernel. Zero columns appended to v give zero output columns, sliced away.
        pad = q.shape[-1] - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           scale=self.scale)
        return y[..., : self.v_dim] if pad > 0 else y

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, inputs: AttentionInputs) -> torch.Tensor:
        """Attend over the latent: q·(W_uk c) = (W_ukᵀ q)·c and Σ p (W_uv c) = W_uv (Σ p c)."""
        t = q_nope.shape[-2]
        w = self._kv_b_weight(c_kv.dtype)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # [H, nope, r], [H, v, r]
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        # c_kv and k_pe have one head: einsum over [B, S, ·] avoids materialising H copies.
        scores = (torch.einsum("bhtr,bsr->bhts", q_lat, c_kv[:, 0])
                  + torch.einsum("bhtd,bsd->bhts", q_pe, k_pe[:, 0])) * self.scale
        attn_mask, is_causal = inputs.sdpa_mask(t)
        if is_causal:  # SDPA's is_causal; say it explicitly, aligned to the end of the cache
            attn_mask = causal_mask(t, inputs.past, scores.device)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:  # additive bias (ALiBi, T5), already -inf where masked
            scores = scores + attn_mask
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)
        o_lat = torch.einsum("bhts,bsr->bhtr", probs, c_kv[:, 0])
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)

    def _kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``kv_b_proj``'s effective weight as ``[H, nope + v, kv_lora_rank]``.

        A plain Linear's weight is used as is. A wrapped one (peft LoRA, bitsandbytes 8/4-bit) is
        read by applying it to the identity, so adapters and dequantisation are honoured and the
        absorbed path computes what the naive path does.
        """
        proj = self.kv_b_proj
        if type(proj) is nn.Linear:
            w = proj.weight.to(dtype)
        else:
            device = self.kv_a_layernorm.weight.device
            eye = torch.eye(self.kv_lora_rank, dtype=dtype, device=device)
            w = proj(eye).T
        return w.reshape(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
