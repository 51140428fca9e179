"""Attention-free baselines: the named class is really built, size-matched to our decoder, trains,
decodes with its own state exactly as without it, round-trips through safetensors, and its
decoding state grows per token as its architecture says (KV bytes or nothing)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.measure.cache import (
    cache_bytes_per_token,
    cache_state_bytes,
    decoding_state,
    tensor_bytes,
)
from effllm.models.baselines import FAMILIES, PARAM_TOLERANCE, build_baseline
from effllm.models.params import count_params

VOCAB = 97
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
CLASS_NAMES = {"mamba": "MambaForCausalLM", "rwkv": "RwkvForCausalLM",
               "gpt_neox": "GPTNeoXForCausalLM"}
# fp32 on CPU: the recurrent scans and the cached attention sum in a different order.
CACHE_ATOL = 1e-4


def tiny(family, **shape):
    torch.manual_seed(0)
    return build_baseline(family, {**TINY, **shape}, VOCAB, eos_token_id=2, bos_token_id=1,
                          pad_token_id=0)


def tiny_decoder():
    torch.manual_seed(0)
    return DecoderForCausalLM(DecoderConfig(vocab_size=VOCAB, num_key_value_heads=2, **TINY))


def ids(batch=2, length=12, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_named_variant_is_built(family):
    model = tiny(family)
    assert type(model).__name__ == CLASS_NAMES[family]
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied
    names = {type(m).__name__ for m in model.modules()}
    if family == "mamba":
        assert "MambaMixer" in names and not any("Attention" in n for n in names)
        assert model.config.use_mambapy is False
    elif family == "rwkv":
        assert {"RwkvSelfAttention", "RwkvFeedForward"} <= names  # time mix, channel mix
        assert model.config.num_hidden_layers == TINY["num_hidden_layers"]
    else:
        layer = model.gpt_neox.layers[0]
        head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
        assert layer.use_parallel_residual
        assert layer.attention.rotary_ndims == head_dim // 4
        assert type(layer.mlp.act).__name__ == "GELUActivation"
        assert model.config.num_attention_heads == TINY["num_attention_heads"]


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_our_gqa_decoder(family):
    ours = count_params(tiny_decoder())[0]
    theirs = count_params(tiny(family))[0]
    assert abs(theirs / ours - 1) <= PARAM_TOLERANCE[family], (theirs, ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_at_init(family):
    model = tiny(family).train()
    batch = ids()
    out = model(input_ids=batch, labels=batch)
    assert out.logits.shape == (*batch.shape, VOCAB)
    assert math.isfinite(out.loss.item())
    assert abs(out.loss.item() - math.log(VOCAB)) < 0.5  # near-uniform predictions at init
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_stepwise_cached_decoding_equals_uncached(family):
    model = tiny(family).eval()
    batch, prefill = ids(length=10), 4
    full = model(input_ids=batch, use_cache=False).logits
    out = model(input_ids=batch[:, :prefill], use_cache=True)
    steps = [out.logits]
    for t in range(prefill, batch.shape[1]):
        name, state = decoding_state(out)
        out = model(input_ids=batch[:, t:t + 1], use_cache=True, **{name: state})
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=CACHE_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_generate_scores_equal_uncached_logits(family):
    model = tiny(family).eval()
    prompt = ids(length=5)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == (2, 9)
    full = model(input_ids=out.sequences, use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 4:8], atol=CACHE_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_safetensors_round_trip_gives_identical_logits(family, tmp_path):
    model = tiny(family).eval()
    batch = ids()
    before = model(input_ids=batch, use_cache=False).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert count_params(loaded) == count_params(model)  # tying survived
    torch.testing.assert_close(loaded(input_ids=batch, use_cache=False).logits, before,
                               atol=0, rtol=0)


def test_rwkv_eval_mode_leaves_weights_alone():
    """RWKV's default rescale_every=6 halves weights in place in eval mode; ours is off."""
    model = tiny("rwkv", num_hidden_layers=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.eval()(input_ids=ids())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("family, expected", [
    ("mamba", 0.0),
    ("rwkv", 0.0),
    # layers x (K, V) x heads x head_dim x fp32
    ("gpt_neox", 2 * 2 * 4 * 8 * 4),
])
def test_cache_bytes_per_token(family, expected):
    model = tiny(family).train()
    assert cache_bytes_per_token(model, ids(batch=1, length=16)) == expected
    assert model.training  # mode restored
    # The state is really there and counted: constant-size for the recurrent families.
    short, long = (cache_state_bytes(model, ids(batch=1, length=n)) for n in (8, 16))
    assert short > 0
    assert long - short == 8 * expected


def test_cache_bytes_per_token_of_our_gqa_decoder():
    model = tiny_decoder()
    per_token = 2 * 2 * 2 * 8 * 4  # layers x (K, V) x 2 KV heads x head_dim 8 x fp32 = 256 B
    assert cache_bytes_per_token(model, ids(batch=1, length=16)) == per_token
    assert cache_bytes_per_token(model, ids(batch=3, length=16)) == per_token  # per sequence
    assert cache_state_bytes(model, ids(batch=1, length=10)) == 10 * per_token


def test_tensor_bytes_counts_each_storage_once():
    base = torch.zeros(10, dtype=torch.float32)
    nested = {"a": [base, base[2:5]], "b": (base.view(2, 5),), "c": torch.zeros(3)}
    assert tensor_bytes(nested) == 40 + 12
    assert tensor_bytes(torch.nn.Linear(4, 4)) == 0  # weights are not decoding state


def test_upstream_rwkv_one_token_step_is_broken_for_batches():
    """Why baselines patches RWKV: upstream mixes a [B, d] state into a [B, 1, d] step."""
    from effllm.models.baselines import UPSTREAM_RWKV_METHODS

    model = tiny("rwkv").eval()
    state = decoding_state(model(input_ids=ids(batch=2, length=4), use_cache=True))[1]
    attention = model.rwkv.blocks[0].attention
    hidden = torch.randn(2, 1, TINY["hidden_size"])
    with torch.no_grad():
        upstream = UPSTREAM_RWKV_METHODS[0](attention, hidden, [s.clone() for s in state])[1]
        ours = attention.extract_key_value(hidden, [s.clone() for s in state])[1]
    assert upstream.shape == (2, 2, TINY["hidden_size"])  # broadcast across the batch
    assert ours.shape == (2, 1, TINY["hidden_size"])


def test_mamba_reload_keeps_depth_scaled_out_proj(tmp_path):
    """The 1/sqrt(depth) out_proj init must be applied once, not again by from_pretrained."""
    model = tiny("mamba")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.rescale_prenorm_residual is False
    for a, b in zip(model.backbone.layers, loaded.backbone.layers):
        assert torch.equal(a.mixer.out_proj.weight, b.mixer.out_proj.weight)


def test_mamba_scan_equals_upstream_with_gradients():
    """Our O(T) backward scan computes what transformers' sequential fallback computes."""
    from transformers.models.mamba import modeling_mamba

    from effllm.models.baselines import UPSTREAM_MAMBA_SCAN, _mamba_selective_scan

    assert modeling_mamba.mamba_selective_scan is _mamba_selective_scan  # what the mixer calls
    g = torch.Generator().manual_seed(0)
    b, e, t, n = 2, 6, 9, 4

    def randn(*size):
        return torch.randn(*size, generator=g)

    inputs = dict(hidden_states=randn(b, e, t), dt=randn(b, e, t), A=-randn(e, n).abs(),
                  B=randn(b, n, t), C=randn(b, n, t), D=randn(e), z=randn(b, e, t),
                  delta_bias=randn(e))
    results = []
    for scan in (UPSTREAM_MAMBA_SCAN, _mamba_selective_scan):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        out, last = scan(**leaves, delta_softplus=True, return_last_state=True)
        (out.square().sum() + last.sum()).backward()
        results.append([out, last, *(leaves[k].grad for k in sorted(leaves))])
    for ours, upstream in zip(results[1], results[0]):
        torch.testing.assert_close(ours, upstream)
