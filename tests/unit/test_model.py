"""The decoder: attention against an explicit reference, causality, KV cache, save/load, peft."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from effllm.models import DecoderConfig, DecoderForCausalLM
from invariants import (
    assert_cached_equals_uncached,
    assert_causal,
    assert_left_padding_is_invisible,
)


def tiny(kv_heads=2, **kw):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=kv_heads, intermediate_size=64, eos_token_id=0,
                        bos_token_id=0, pad_token_id=1, **kw)
    return DecoderForCausalLM(cfg).eval()


VARIANTS = {"mha": 4, "gqa": 2, "mqa": 1}


def test_forward_backward_shapes():
    model = tiny().train()
    ids = torch.randint(2, 97, (3, 11))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 11, 97)
    assert math.isfinite(out.loss.item())
    assert out.loss.item() == pytest.approx(math.log(97), rel=0.1)  # near-uniform at init
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_is_next_token_cross_entropy_ignoring_masked_labels():
    model = tiny()
    ids = torch.randint(2, 97, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # e.g. a prompt
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        logits = out.logits[:, :-1].reshape(-1, 97)
        ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1),
                                                ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_equals_explicit_softmax_reference(variant):
    from effllm.models.layers import AttentionInputs
    from effllm.models.positions import apply_rope, rope_cos_sin

    model = tiny(VARIANTS[variant])
    attn = model.model.layers[0].self_attn
    b, t, h, kv, d = 2, 9, 4, VARIANTS[variant], 8
    x = torch.randn(b, t, 32)
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = rope_cos_sin(pos, d, 10000.0, x.dtype)
    inputs = AttentionInputs(position_ids=pos, past=0, rope=(cos, sin), mask=None, bias=None,
                             attention_mask=None)
    got = attn(x, inputs, None)

    q = attn.q_proj(x).view(b, t, h, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, kv, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, kv, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(h // kv, dim=1)  # query head i uses KV head i // (h / kv)
    v = v.repeat_interleave(h // kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * d))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert attn.k_proj.out_features == kv * d  # the variant is really wired in


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_position_attends_to_the_future(variant):
    assert_causal(tiny(VARIANTS[variant]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_uncached_logits(variant):
    assert_cached_equals_uncached(tiny(VARIANTS[variant]), torch.randint(2, 97, (2, 14)))


@pytest.mark.parametrize("pe", ["rope", "alibi", "relative", "learned", "sinusoidal"])
def test_generate_left_padded_batch_matches_single_prompts(pe):
    assert_left_padding_is_invisible(tiny(position_encoding=pe))


def test_save_load_round_trip_safetensors(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is DecoderForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(2, 97, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="not divisible"):
        DecoderConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        DecoderConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)


def test_lora_leaves_base_weights_bit_identical():
    from peft import LoraConfig, get_peft_model

    model = tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 97, (4, 10))
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    base = peft_model.get_base_model().state_dict()
    changed_adapters = 0
    for key, value in base.items():
        if "lora_" in key:
            changed_adapters += 1
            continue
        clean = key.replace(".base_layer", "")
        assert torch.equal(value, before[clean]), key
    assert changed_adapters > 0
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; training moved it


PES = ["rope", "sinusoidal", "learned", "relative", "alibi", "none"]


@pytest.mark.parametrize("pe", PES)
def test_cached_decoding_equals_uncached_for_every_position_encoding(pe):
    model = tiny(position_encoding=pe)
    if pe == "relative":  # T5 bias starts random; make sure it is not ~0
        torch.nn.init.normal_(model.model.relative_bias.weight, std=1.0)
    assert_cached_equals_uncached(model, torch.randint(2, 97, (2, 14)))


@pytest.mark.parametrize("pe", PES)
def test_each_position_encoding_is_wired_in(pe):
    """The toolkit's PE module was never called (docs/protocol.md §8, defect 4): here each one changes the output,
    and only 'none' leaves a model blind to order beyond causality."""
    base = tiny(position_encoding="none")
    model = tiny(position_encoding=pe)
    model.load_state_dict(base.state_dict(), strict=False)  # same weights, different PE
    if pe == "relative":
        torch.nn.init.normal_(model.model.relative_bias.weight, std=1.0)
    if pe == "learned":
        torch.nn.init.normal_(model.model.embed_positions.weight, std=1.0)
    ids = torch.randint(2, 97, (1, 10))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.allclose(a, b) == (pe == "none")


def test_alibi_bias_matches_explicit_reference():
    from effllm.models.positions import alibi_slopes

    slopes = alibi_slopes(8)
    torch.testing.assert_close(slopes, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert len(alibi_slopes(6)) == 6 and alibi_slopes(6)[0] == 2 ** -2  # interleaved form
    model = tiny(position_encoding="alibi")
    bias = model.model._score_bias(5, 0, torch.float32, "cpu")
    heads = alibi_slopes(4)
    for i in range(5):
        for j in range(i + 1):
            torch.testing.assert_close(bias[0, :, i, j], -heads * (i - j))


def test_relative_buckets_are_exact_then_logarithmic():
    from effllm.models.positions import relative_bucket

    d = torch.arange(0, 200)
    b = relative_bucket(d, 32, 128)
    assert torch.equal(b[:16], torch.arange(16))  # exact for small distances
    assert bool((b[1:] >= b[:-1]).all()) and int(b.max()) == 31  # monotone, capped
    assert int(b[100]) == 30 and bool((b[128:] == 31).all())  # log-spaced, then saturated


def test_learned_positions_refuse_beyond_their_table():
    model = tiny(position_encoding="learned", max_position_embeddings=8)
    with pytest.raises(ValueError, match="learned positions"):
        model(input_ids=torch.randint(2, 97, (1, 9)))


def test_sinusoidal_encoding_is_the_transformer_papers():
    """Embeddings scaled by sqrt(d), plus sin on even and cos on odd channels (Vaswani et al.)."""
    from effllm.models.positions import sinusoidal_table

    table = sinusoidal_table(5, 8)
    pos, i = 3, 1  # channel pair 1: frequency 10000^(-2/8)
    torch.testing.assert_close(table[pos, 2 * i], torch.tensor(math.sin(pos / 10000 ** (2 / 8))))
    torch.testing.assert_close(table[pos, 2 * i + 1],
                               torch.tensor(math.cos(pos / 10000 ** (2 / 8))))
    model = tiny(position_encoding="sinusoidal")
    ids = torch.randint(2, 97, (1, 5))
    captured = {}
    hook = model.model.layers[0].input_layernorm.register_forward_hook(
        lambda mod, args, out: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    expected = model.model.embed_tokens(ids) * math.sqrt(32) + sinusoidal_table(5, 32)[None]
    torch.testing.assert_close(captured["x"], expected)


def test_sinusoidal_table_is_built_once_not_per_forward(monkeypatch):
    """Rebuilding the table on the CPU at every forward would charge that PE's latency for it
    (issue 19, item 7): one build serves every forward, and decoding past its end grows it."""
    import effllm.models.decoder as decoder

    built = []
    real = decoder.sinusoidal_table
    monkeypatch.setattr(decoder, "sinusoidal_table", lambda n, d: built.append(n) or real(n, d))
    model = tiny(position_encoding="sinusoidal").eval()
    ids = torch.randint(2, 97, (2, 7))
    with torch.no_grad():
        first = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    torch.testing.assert_close(first, again)
    assert built == [model.config.max_position_embeddings]
    longer = torch.randint(2, 97, (1, model.config.max_position_embeddings + 3))
    with torch.no_grad():
        model(input_ids=longer)
    assert built[1:] == [model.config.max_position_embeddings + 3]
