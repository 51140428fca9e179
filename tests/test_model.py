"""The decoder: attention against an explicit reference, causality, KV cache, save/load, peft."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from effllm.models import DecoderConfig, DecoderForCausalLM


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
    from effllm.models.decoder import apply_rope, rope_cos_sin

    model = tiny(VARIANTS[variant])
    attn = model.model.layers[0].self_attn
    b, t, h, kv, d = 2, 9, 4, VARIANTS[variant], 8
    x = torch.randn(b, t, 32)
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = rope_cos_sin(pos, d, 10000.0, x.dtype)
    got = attn(x, (cos, sin), None, None)

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
    model = tiny(VARIANTS[variant])
    ids = torch.randint(2, 97, (1, 12))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 5) % 95 + 2
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_uncached_logits(variant):
    model = tiny(VARIANTS[variant])
    ids = torch.randint(2, 97, (2, 14))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :5], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for i in range(5, 14):
            out = model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_generate_left_padded_batch_matches_single_prompts():
    model = tiny()
    a, b = torch.randint(2, 97, (1, 7)), torch.randint(2, 97, (1, 4))
    batch = torch.cat([a, torch.cat([torch.ones(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=None)
    together = model.generate(input_ids=batch, attention_mask=mask, **kw)
    alone_a = model.generate(input_ids=a, **kw)
    alone_b = model.generate(input_ids=b, **kw)
    assert torch.equal(together[0, 7:], alone_a[0, 7:])
    assert torch.equal(together[1, 7:], alone_b[0, 4:])


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
