"""The decoder family: one Qwen2.5/Llama-style decoder with switchable parts.

* attention: ``mha`` / ``mqa`` / ``gqa`` (one module, ``num_key_value_heads`` = heads / 1 / n),
  ``mla`` (multi-head latent attention, :mod:`effllm.models.mla`) or ``nsa`` (native sparse
  attention, :mod:`effllm.models.nsa`);
* position encoding: ``rope``, ``sinusoidal`` (fixed absolute), ``learned`` (learnable absolute),
  ``relative`` (T5-style bucketed learned bias, shared by all layers), ``alibi`` or ``none``;
* feed-forward: SwiGLU, or a top-k routed mixture of SwiGLU experts (:mod:`effllm.models.moe`)
  when ``num_experts > 0``.

A Hugging Face ``PreTrainedModel`` with its own config class, registered with the Auto classes,
so ``save_pretrained`` (safetensors), ``from_pretrained``, ``generate``, peft and bitsandbytes all
work on it. Module names follow Llama (``q_proj`` … ``down_proj``) so that peft's and
bitsandbytes' defaults apply unchanged.

Imports point one way, down: the config (:mod:`~effllm.models.config`), position encodings
(:mod:`~effllm.models.positions`) and shared layers (:mod:`~effllm.models.layers`) sit below this
module and the variants. The variant modules are imported only when a config asks for them, so a
model that uses none never loads them, and the pipeline does not rerun it when they change
(:data:`effllm.sweep.VARIANT_MODULES`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from effllm.models.config import BIAS_ENCODINGS, DecoderConfig
from effllm.models.layers import MLP, AttentionInputs, RMSNorm, causal_mask
from effllm.models.positions import (
    alibi_slopes,
    apply_rope,
    relative_bucket,
    rope_cos_sin,
    sinusoidal_table,
)


class Attention(nn.Module):
    """Grouped-query attention: ``num_key_value_heads`` K/V heads shared by groups of Q heads."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.heads_at(layer_idx)
        self.n_kv = config.kv_heads_at(layer_idx)
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if inputs.rope is not None:
            q, k = apply_rope(q, *inputs.rope), apply_rope(k, *inputs.rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attn_mask, is_causal = inputs.sdpa_mask(t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def make_attention(config: DecoderConfig, layer_idx: int) -> nn.Module:
    if config.attention == "mla":
        from effllm.models.mla import MultiHeadLatentAttention

        return MultiHeadLatentAttention(config, layer_idx)
    if config.attention == "nsa":
        from effllm.models.nsa import NativeSparseAttention

        return NativeSparseAttention(config, layer_idx)
    return Attention(config, layer_idx)


def make_ffn(config: DecoderConfig, layer_idx: int) -> nn.Module:
    if config.num_experts:
        from effllm.models.moe import MoE

        return MoE(config)
    return MLP(config.hidden_size, config.ffn_at(layer_idx))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = make_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_ffn(config, layer_idx)

    def forward(self, x, inputs: AttentionInputs, cache):
        """Returns (hidden, router auxiliary loss or None)."""
        x = x + self.self_attn(self.input_layernorm(x), inputs, cache)
        h = self.mlp(self.post_attention_layernorm(x))
        aux = None
        if isinstance(h, tuple):  # MoE: (output, load-balancing loss)
            h, aux = h
        return x + h, aux


class DecoderPreTrainedModel(PreTrainedModel):
    config_class = DecoderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # DecoderModel recomputes each layer in backward
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2 style: residual output projections scaled down with depth.
            scale = 1.0
            if getattr(module, "_is_residual_out", False):
                scale = 1.0 / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif hasattr(module, "reset_parameters_") and callable(module.reset_parameters_):
            module.reset_parameters_(std)  # variant-specific parameters (e.g. NSA gates)


class DecoderModel(DecoderPreTrainedModel):
    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_encoding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.position_encoding == "relative":
            self.relative_bias = nn.Embedding(config.relative_num_buckets,
                                              config.num_attention_heads)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._sinusoids = None  # the fixed table, built once per device and dtype (not saved)
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable()
        for name, module in self.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module._is_residual_out = True
        self.post_init()

    def _sinusoid_table(self, n_positions: int, like: torch.Tensor) -> torch.Tensor:
        """The sinusoidal table on ``like``'s device and dtype, rebuilt only when it must grow or
        move: rebuilding it on the CPU at every forward would charge that PE's latency for it."""
        table = self._sinusoids
        if (table is None or table.shape[0] < n_positions or table.device != like.device
                or table.dtype != like.dtype):
            n = max(n_positions, self.config.max_position_embeddings)
            table = sinusoidal_table(n, self.config.hidden_size).to(like.device, like.dtype)
            self._sinusoids = table
        return table

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None):
        b, t = input_ids.shape
        config = self.config
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: positions count real tokens only.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device)[None]
            position_ids = position_ids.expand(b, t)
        x = self.embed_tokens(input_ids)
        pe = config.position_encoding
        if pe == "learned":
            if int(position_ids.max()) >= config.max_position_embeddings:
                raise ValueError(f"position {int(position_ids.max())} is beyond the "
                                 f"{config.max_position_embeddings} learned positions")
            x = x + self.embed_positions(position_ids)
        elif pe == "sinusoidal":
            # Vaswani et al. (2017, §3.4) scale the embeddings by sqrt(d) before adding the
            # unit-amplitude table; unscaled (std 0.02) they would drown in it.
            table = self._sinusoid_table(int(position_ids.max()) + 1, x)
            x = x * math.sqrt(config.hidden_size) + table[position_ids]
        padded = attention_mask is not None and not bool(attention_mask.all())
        inputs = AttentionInputs(
            position_ids=position_ids, past=past,
            # One cos/sin table per forward, shared by every layer.
            rope=rope_cos_sin(position_ids, config.rope_dim, config.rope_theta, x.dtype)
            if pe == "rope" else None,
            # NSA gathers its own keys and never reads a dense [B, 1, T, S] mask.
            mask=None if config.attention == "nsa"
            else self._build_mask(attention_mask, b, t, past, input_ids.device),
            bias=self._score_bias(t, past, x.dtype, input_ids.device),
            attention_mask=attention_mask[:, -(past + t):] if padded else None,
        )
        aux_losses = []
        recompute = self.gradient_checkpointing and self.training and past_key_values is None
        for layer in self.layers:
            if recompute:  # keep only each layer's input; its inside is recomputed in backward
                x, aux = self._gradient_checkpointing_func(layer, x, inputs, None)
            else:
                x, aux = layer(x, inputs, past_key_values)
            if aux is not None:
                aux_losses.append(aux)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        return self.norm(x), past_key_values, aux_loss

    def _score_bias(self, t, past, dtype, device):
        """[1, H, T, S] additive bias of the relative encodings, from index differences.

        Left padding shifts query and key indices alike, so distances need no padding correction.
        """
        pe = self.config.position_encoding
        if pe not in BIAS_ENCODINGS:
            return None
        q_idx = torch.arange(past, past + t, device=device)[:, None]
        distance = q_idx - torch.arange(past + t, device=device)[None, :]  # [T, S]
        if pe == "alibi":
            slopes = alibi_slopes(self.config.num_attention_heads).to(device)
            bias = -slopes[:, None, None] * distance.clamp(min=0)
        else:
            buckets = relative_bucket(distance, self.config.relative_num_buckets,
                                      self.config.relative_max_distance)
            bias = self.relative_bias(buckets).permute(2, 0, 1)
        return bias[None].to(dtype)

    @staticmethod
    def _build_mask(attention_mask, b, t, past, device):
        """Boolean [B, 1, T, S] mask, or None when plain causal attention is exact."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and (past == 0 or t == 1):
            return None  # no padding: causal (or a single query that sees everything)
        mask = causal_mask(t, past, device).expand(b, 1, t, past + t)
        if padded:
            mask = mask & attention_mask[:, None, None, -(past + t):].bool()
            # A fully padded query row would give NaN; let it see everything (its output is unused).
            empty = ~mask.any(-1, keepdim=True)
            mask = mask | empty
        return mask


class DecoderForCausalLM(DecoderPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training:
            use_cache = False
        hidden, cache, aux_loss = self.model(input_ids, attention_mask, position_ids,
                                             past_key_values, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Shift the labels, not the logits: slicing logits would copy the largest tensor.
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                   shifted.reshape(-1), ignore_index=-100)
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits,
                                         past_key_values=cache)


AutoConfig.register(DecoderConfig.model_type, DecoderConfig)
AutoModelForCausalLM.register(DecoderConfig, DecoderForCausalLM)
