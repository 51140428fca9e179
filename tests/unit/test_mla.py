"""Multi-head latent attention: against transformers' DeepSeek-V3 MLA, absorbed = naive, the cache
holds only the latent, and the decoder's usual guarantees (causality, cached = uncached, padded
generate, save/load)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.models.mla import MultiHeadLatentAttention
from invariants import assert_causal, assert_left_padding_is_invisible

# Unequal head dims, so a swapped split (nope/rope/v) cannot go unnoticed.
DIMS = dict(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=10)


def tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("attention", "mla")
    cfg = DecoderConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=kw.pop("num_key_value_heads", 4),
                        intermediate_size=64, eos_token_id=0, bos_token_id=0, pad_token_id=1, **kw)
    return DecoderForCausalLM(cfg).eval()


def set_absorb(model, absorb):
    for layer in model.model.layers:
        layer.self_attn.absorb = absorb


def jiggle_norms(model):
    """RMSNorm weights start at 1; make them differ so a missing or swapped norm shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm.weight")):
                p.uniform_(0.5, 1.5)


def deepseek_config(q_lora_rank, **kw):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,  # its default is 128, not "= heads"
        q_lora_rank=q_lora_rank, first_k_dense_replace=2,  # dense MLPs throughout
        rope_interleave=False,  # half-split RoPE, as apply_rope
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attn_implementation="eager", **DIMS, **kw)


def cached_logits(model, ids, mask=None, prefill=5, chunk_from=None):
    """Prefill ``prefill`` tokens, then one token per step (a multi-token chunk from
    ``chunk_from`` on, if given)."""
    n = ids.shape[1]

    def kw(end):
        return {} if mask is None else {"attention_mask": mask[:, :end]}

    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], use_cache=True, **kw(prefill))
        steps, cache = [out.logits], out.past_key_values
        i = prefill
        while i < n:
            j = n if chunk_from is not None and i >= chunk_from else i + 1
            out = model(input_ids=ids[:, i:j], past_key_values=cache, use_cache=True, **kw(j))
            steps.append(out.logits)
            i = j
    return torch.cat(steps, 1), cache


# 1. Against transformers' DeepSeek-V3 MLA -------------------------------------------------------

@pytest.mark.parametrize("absorb", [None, True, False])
@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_attention_matches_transformers_deepseek_v3(q_lora_rank, absorb):
    """Same weights in transformers' DeepseekV3Attention (eager softmax, its own rotary table, its
    own latent cache): equal outputs for a left-padded prefill and three decoding steps, and the
    two caches hold the same tensors."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    from effllm.models.decoder import DecoderModel
    from effllm.models.layers import AttentionInputs
    from effllm.models.positions import rope_cos_sin

    hf_cfg = deepseek_config(q_lora_rank)
    torch.manual_seed(0)
    ref = DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    jiggle_norms(ref)
    cfg = DecoderConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                        attention="mla", q_lora_rank=q_lora_rank, **DIMS)
    ours = MultiHeadLatentAttention(cfg, layer_idx=0).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same shapes
    ours.absorb = absorb
    rotary = DeepseekV3RotaryEmbedding(hf_cfg)

    b, t, steps = 2, 7, 3
    x = torch.randn(b, t + steps, 32)
    attention_mask = torch.ones(b, t + steps, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    cache, ref_cache = DynamicCache(), DynamicCache()
    got, want = [], []
    for start, end in [(0, t)] + [(i, i + 1) for i in range(t, t + steps)]:
        chunk, am = x[:, start:end], attention_mask[:, :end]
        pos = ((am.cumsum(-1) - 1).clamp(min=0))[:, start:end]
        mask = DecoderModel._build_mask(am, b, end - start, start, x.device)
        inputs = AttentionInputs(position_ids=pos, past=start, mask=mask, bias=None,
                                 rope=rope_cos_sin(pos, cfg.rope_dim, 10000.0, x.dtype),
                                 attention_mask=am)
        with torch.no_grad():
            got.append(ours(chunk, inputs, cache))
            additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(x.dtype).min)
            want.append(ref(chunk, rotary(chunk, pos), additive, past_key_values=ref_cache)[0])
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.layers[0].keys, ref_cache.layers[0].keys)
    torch.testing.assert_close(cache.layers[0].values, ref_cache.layers[0].values)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_model_matches_transformers_deepseek_v3_model(q_lora_rank):
    """A whole DeepseekV3ForCausalLM (dense MLPs) loads into our decoder strictly, and gives the
    same logits, uncached and through greedy cached generation."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(deepseek_config(q_lora_rank, pad_token_id=1, eos_token_id=0)).eval()
    jiggle_norms(ref)
    model = tiny(q_lora_rank=q_lora_rank, **DIMS)
    model.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(2, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits,
                                   ref(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
    assert torch.equal(model.generate(input_ids=ids, **kw), ref.generate(input_ids=ids, **kw))


# 2. Absorbed = naive ------------------------------------------------------------------------------

@pytest.mark.parametrize("pe", ["rope", "alibi"])
@pytest.mark.parametrize("padded", [False, True])
def test_absorbed_and_naive_paths_agree(pe, padded):
    """Prefill, single-token decoding and a multi-token chunk over a cache, both paths forced."""
    model = tiny(position_encoding=pe, q_lora_rank=16, **DIMS)
    jiggle_norms(model)
    ids = torch.randint(2, 97, (2, 13))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4], ids[1, :4] = 0, 1
    runs = {}
    for absorb in (False, True):
        set_absorb(model, absorb)
        runs[absorb], _ = cached_logits(model, ids, mask, prefill=6, chunk_from=9)
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-5)


def test_narrow_values_reach_sdpa_at_the_query_width(monkeypatch):
    """The paper's MLA has v narrower than q·k (128 vs 192): SDPA must still get one width, or
    its flash kernels are skipped; the padded result equals the explicit (absorbed) attention."""
    import torch.nn.functional as F

    widths, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        widths.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    jiggle_norms(model)
    ids = torch.randint(2, 97, (2, 11))
    with torch.no_grad():
        set_absorb(model, False)
        naive = model(input_ids=ids).logits
        set_absorb(model, True)
        absorbed = model(input_ids=ids).logits
    assert widths and all(w == (12, 12, 12) for w in widths)
    torch.testing.assert_close(naive, absorbed, rtol=1e-5, atol=1e-5)


def test_default_uses_absorbed_only_for_decoding_steps(monkeypatch):
    calls = []
    for name in ("_naive", "_absorbed"):
        original = getattr(MultiHeadLatentAttention, name)

        def spy(self, *args, _name=name, _original=original):
            calls.append((_name, args[0].shape[-2]))  # (path, number of queries)
            return _original(self, *args)

        monkeypatch.setattr(MultiHeadLatentAttention, name, spy)
    model = tiny()
    ids = torch.randint(2, 97, (1, 8))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        assert set(calls) == {("_naive", 8)}
        calls.clear()
        cached_logits(model, ids, prefill=5, chunk_from=6)  # 5-prefill, 1 step, 2-chunk
    per_layer = calls[::2]  # layer 0 of 2
    assert per_layer == [("_naive", 5), ("_absorbed", 1), ("_naive", 2)]


def test_absorbed_path_sees_lora_adapters_on_kv_b_proj():
    """The absorbed path reads kv_b_proj's weight; wrapped in LoRA it must include the adapter."""
    from peft import LoraConfig, get_peft_model

    model = tiny(**DIMS)
    ids = torch.randint(2, 97, (2, 10))
    set_absorb(model, False)
    base, _ = cached_logits(model, ids)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft_model.eval()
    runs = {}
    for absorb in (False, True):
        set_absorb(model, absorb)
        runs[absorb], _ = cached_logits(peft_model, ids)
    assert not torch.allclose(runs[False], base, atol=1e-3)  # the adapters do change the output
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-5)


# 3. Cached = uncached -----------------------------------------------------------------------------

@pytest.mark.parametrize("pe", ["rope", "none", "alibi", "relative", "sinusoidal", "learned"])
def test_cached_decoding_equals_uncached_logits(pe):
    model = tiny(position_encoding=pe)
    if pe == "relative":  # T5 bias starts near 0; make it matter
        torch.nn.init.normal_(model.model.relative_bias.weight, std=1.0)
    jiggle_norms(model)
    ids = torch.randint(2, 97, (2, 14))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    steps, _ = cached_logits(model, ids)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


# 4. The cache holds the latent --------------------------------------------------------------------

def cache_bytes_per_token(model, ids):
    _, cache = cached_logits(model, ids, prefill=ids.shape[1] - 1)  # prefill + one decoding step
    total = sum(layer.keys.numel() * layer.keys.element_size()
                + layer.values.numel() * layer.values.element_size() for layer in cache.layers)
    return total / ids.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_only_latent_and_rope_key(dtype):
    model = tiny().to(dtype)
    cfg = model.config
    ids = torch.randint(2, 97, (2, 10))
    size = torch.tensor([], dtype=dtype).element_size()
    per_token = cache_bytes_per_token(model, ids)
    assert per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    mha = cache_bytes_per_token(tiny(attention="mha").to(dtype), ids)
    assert mha == cfg.num_hidden_layers * 2 * cfg.hidden_size * size
    assert per_token < mha  # here 12 vs 64 numbers per token and layer


# 5. Causality, padded generate, save/load, training -----------------------------------------------

@pytest.mark.parametrize("absorb", [False, True])
def test_no_position_attends_to_the_future(absorb):
    model = tiny(**DIMS)
    set_absorb(model, absorb)
    assert_causal(model)


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_generate_left_padded_batch_matches_single_prompts(pe):
    assert_left_padding_is_invisible(tiny(position_encoding=pe))


def test_save_load_round_trip_safetensors(tmp_path):
    model = tiny(q_lora_rank=16, **DIMS)
    jiggle_norms(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is DecoderForCausalLM
    assert isinstance(loaded.model.layers[0].self_attn, MultiHeadLatentAttention)
    for key in ("q_lora_rank", *DIMS):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    ids = torch.randint(2, 97, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_forward_backward_reaches_every_parameter(q_lora_rank):
    model = tiny(q_lora_rank=q_lora_rank).train()
    ids = torch.randint(2, 97, (3, 11))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 11, 97)
    assert out.loss.item() == pytest.approx(math.log(97), rel=0.1)  # near-uniform at init
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    attn = model.model.layers[0].self_attn
    assert hasattr(attn, "q_proj") == (q_lora_rank is None)
    assert hasattr(attn, "q_b_proj") == (q_lora_rank is not None)
