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
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from effllm.models.layers import (
    AttentionInputs,
    RMSNorm,
    apply_rope,
    causal_mask,
    rope_cos_sin,
    sinusoidal_table,
)

ATTENTIONS = ("mha", "mqa", "gqa", "mla", "nsa")
POSITION_ENCODINGS = ("rope", "sinusoidal", "learned", "relative", "alibi", "none")
BIAS_ENCODINGS = ("relative", "alibi")  # added to the attention scores


class DecoderConfig(PretrainedConfig):
    model_type = "effllm_decoder"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 2048,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        intermediate_size: int = 192,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        attention: str = "gqa",
        position_encoding: str = "rope",
        # relative (T5) bias
        relative_num_buckets: int = 32,
        relative_max_distance: int = 128,
        # MLA (DeepSeek-V2): None = derived from the head dim, see mla_dims
        kv_lora_rank: int | None = None,
        q_lora_rank: int | None = None,
        qk_rope_head_dim: int | None = None,
        qk_nope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        # NSA (Yuan et al. 2025, arXiv 2502.11089)
        nsa_compress_block: int = 32,
        nsa_compress_stride: int = 16,
        nsa_select_block: int = 32,
        nsa_num_selected: int = 4,
        nsa_window: int = 64,
        # MoE: 0 experts = dense SwiGLU
        num_experts: int = 0,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int | None = None,
        router_aux_loss_coef: float = 0.01,
        **kwargs,
    ):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention {attention!r} is not one of {ATTENTIONS}")
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding {position_encoding!r} is not one of "
                             f"{POSITION_ENCODINGS}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not divisible by num_attention_heads "
                f"{num_attention_heads}"
            )
        if attention != "mla" and num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {num_attention_heads} is not divisible by "
                f"num_key_value_heads {num_key_value_heads}"
            )
        if attention == "nsa" and position_encoding in BIAS_ENCODINGS:
            raise ValueError(f"attention 'nsa' does not take the score bias of position_encoding "
                             f"{position_encoding!r}; use rope, sinusoidal, learned or none")
        if position_encoding == "relative" and relative_max_distance <= relative_num_buckets // 2:
            raise ValueError(f"relative_max_distance {relative_max_distance} must exceed half of "
                             f"relative_num_buckets {relative_num_buckets}")
        if num_experts and not 0 < num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok {num_experts_per_tok} must be in 1 … "
                             f"num_experts {num_experts}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.attention = attention
        self.position_encoding = position_encoding
        self.relative_num_buckets = relative_num_buckets
        self.relative_max_distance = relative_max_distance
        head_dim = hidden_size // num_attention_heads
        # DeepSeek-V2's proportions: nope = v = head dim, rope = head dim / 2; latent = hidden / 8
        # (the EfficientLLM toolkit's stated intention).
        self.kv_lora_rank = kv_lora_rank or max(8, hidden_size // 8)
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim or max(2, head_dim // 4 * 2)  # even for RoPE
        if attention == "mla" and position_encoding == "rope" and self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even for RoPE")
        self.qk_nope_head_dim = qk_nope_head_dim or head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.nsa_compress_block = nsa_compress_block
        self.nsa_compress_stride = nsa_compress_stride
        self.nsa_select_block = nsa_select_block
        self.nsa_num_selected = nsa_num_selected
        self.nsa_window = nsa_window
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.router_aux_loss_coef = router_aux_loss_coef
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Width of the rotary tables: MLA rotates only its decoupled key/query part."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim


class Attention(nn.Module):
    """Grouped-query attention: ``num_key_value_heads`` K/V heads shared by groups of Q heads."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
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


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_attention(config: DecoderConfig, layer_idx: int) -> nn.Module:
    if config.attention == "mla":
        from effllm.models.mla import MultiHeadLatentAttention

        return MultiHeadLatentAttention(config, layer_idx)
    if config.attention == "nsa":
        from effllm.models.nsa import NativeSparseAttention

        return NativeSparseAttention(config, layer_idx)
    return Attention(config, layer_idx)


def make_ffn(config: DecoderConfig) -> nn.Module:
    if config.num_experts:
        from effllm.models.moe import MoE

        return MoE(config)
    return MLP(config.hidden_size, config.intermediate_size)


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = make_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_ffn(config)

    def forward(self, x, inputs: AttentionInputs, cache):
        """Returns (hidden, router auxiliary loss or None)."""
        x = x + self.self_attn(self.input_layernorm(x), inputs, cache)
        h = self.mlp(self.post_attention_layernorm(x))
        aux = None
        if isinstance(h, tuple):  # MoE: (output, load-balancing loss)
            h, aux = h
        return x + h, aux


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): a geometric sequence, interleaved for non-powers of 2."""

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


class DecoderPreTrainedModel(PreTrainedModel):
    config_class = DecoderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
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
        for name, module in self.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module._is_residual_out = True
        self.post_init()

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
            table = sinusoidal_table(int(position_ids.max()) + 1, config.hidden_size)
            x = x * math.sqrt(config.hidden_size) + table.to(x.device, x.dtype)[position_ids]
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
        for layer in self.layers:
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
