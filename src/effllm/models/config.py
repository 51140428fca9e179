"""The decoder's configuration: every switch of the decoder family, checked when it is built.

Its own module so that the model (:mod:`effllm.models.decoder`) and the variant layers it builds
(:mod:`~effllm.models.mla`, :mod:`~effllm.models.nsa`, :mod:`~effllm.models.moe`) all read it
without importing one another. ``model_type`` is what a saved ``config.json`` names; the class is
registered with the Auto classes in :mod:`effllm.models.decoder`, next to the model.
"""

from __future__ import annotations

from transformers import PretrainedConfig

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
        # MLA (DeepSeek-V2): None = derived from the head dim, below
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
        # Per-layer widths of a structurally pruned model (effllm.models.pruning): None =
        # uniform. With them the head dimension is explicit, since hidden_size shrinks too.
        head_dim: int | None = None,
        layer_num_attention_heads: list[int] | None = None,
        layer_num_key_value_heads: list[int] | None = None,
        layer_intermediate_sizes: list[int] | None = None,
        **kwargs,
    ):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention {attention!r} is not one of {ATTENTIONS}")
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding {position_encoding!r} is not one of "
                             f"{POSITION_ENCODINGS}")
        if head_dim is None and hidden_size % num_attention_heads:
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
        head_dim = head_dim or hidden_size // num_attention_heads
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
        self.head_dim = head_dim  # saved explicitly: a pruned model's hidden size shrinks
        self.layer_num_attention_heads = layer_num_attention_heads
        self.layer_num_key_value_heads = layer_num_key_value_heads
        self.layer_intermediate_sizes = layer_intermediate_sizes
        self._check_layer_widths()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check_layer_widths(self) -> None:
        lists = {"layer_num_attention_heads": self.layer_num_attention_heads,
                 "layer_num_key_value_heads": self.layer_num_key_value_heads,
                 "layer_intermediate_sizes": self.layer_intermediate_sizes}
        for key, widths in lists.items():
            if widths is None:
                continue
            if len(widths) != self.num_hidden_layers or min(widths) < 1:
                raise ValueError(f"{key} {widths} must hold one width >= 1 per layer "
                                 f"({self.num_hidden_layers})")
            if self.attention not in ("mha", "mqa", "gqa") or self.num_experts:
                raise ValueError(f"{key}: per-layer widths need mha/mqa/gqa attention and a "
                                 f"dense FFN (attention {self.attention!r}, "
                                 f"{self.num_experts} experts)")
        if self.position_encoding in BIAS_ENCODINGS and self.layer_num_attention_heads:
            raise ValueError("per-layer head counts do not take the per-head score bias of "
                             f"position_encoding {self.position_encoding!r}")
        per_layer = self.layer_num_attention_heads or self.layer_num_key_value_heads
        for i in range(self.num_hidden_layers if per_layer else 0):
            if self.heads_at(i) % self.kv_heads_at(i):
                raise ValueError(f"layer {i}: {self.heads_at(i)} heads are not divisible by "
                                 f"{self.kv_heads_at(i)} KV heads")

    def heads_at(self, layer: int) -> int:
        """Query heads of ``layer`` (a pruned model's differ per layer)."""
        widths = self.layer_num_attention_heads
        return widths[layer] if widths else self.num_attention_heads

    def kv_heads_at(self, layer: int) -> int:
        widths = self.layer_num_key_value_heads
        return widths[layer] if widths else self.num_key_value_heads

    def ffn_at(self, layer: int) -> int:
        widths = self.layer_intermediate_sizes
        return widths[layer] if widths else self.intermediate_size

    @property
    def rope_dim(self) -> int:
        """Width of the rotary tables: MLA rotates only its decoupled key/query part."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim
