"""Fine-tuning methods: what each may change, and the numbers that define it."""

import copy
import math

import pytest
import torch

from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.specs import MethodSpec
from invariants import train_steps
from effllm.training.methods import ADAPTER_METHODS, METHODS, merged, prepare

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model():
    torch.manual_seed(0)
    return DecoderForCausalLM(DecoderConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, eos_token_id=0, pad_token_id=1))


def spec(name, **kw):
    return MethodSpec.from_json({"name": name, "r": 4, "alpha": 8, "dropout": 0.0,
                                 "target_modules": TARGETS, "lr_ratio": 16, "init": "fast",
                                 "niter": 2, "layers": 1, **kw})


def train(m, optimizer, steps=3):
    train_steps(m, optimizer, vocab=64, length=12, steps=steps)


def base_state(m):
    """Base-model tensors by their plain name (peft adds .base_layer; adapters dropped)."""
    sd = m.get_base_model().state_dict() if hasattr(m, "get_base_model") else m.state_dict()
    return {k.replace(".base_layer", ""): v.clone() for k, v in sd.items() if "lora_" not in k}


@pytest.mark.parametrize("name", ADAPTER_METHODS)
def test_adapter_methods_leave_base_weights_bit_identical(name):
    m, optimizer = prepare(model(), spec(name), lr=1e-2)
    before = base_state(m)  # after init: PiSSA's base is the SVD residual, fixed from then on
    adapters = {n: p.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    train(m, optimizer)
    after = base_state(m)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    changed = [n for n, p in m.named_parameters() if p.requires_grad
               and not torch.equal(p, adapters[n])]
    assert any("lora_B" in n for n in changed)
    if name == "dora":
        assert any("lora_magnitude_vector" in n for n in changed)


def test_freeze_keeps_the_first_layers_and_embeddings_and_trains_the_rest():
    m, optimizer = prepare(model(), spec("freeze", layers=2), lr=1e-2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, optimizer)
    for key, value in m.state_dict().items():
        frozen = key.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens",
                                 "lm_head"))
        assert torch.equal(value, before[key]) == frozen, key


def test_full_changes_every_weight():
    m, optimizer = prepare(model(), spec("full"), lr=1e-2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, optimizer)
    for key, value in m.state_dict().items():
        assert not torch.equal(value, before[key]), key


def test_freeze_refuses_to_freeze_every_layer():
    with pytest.raises(ValueError, match="finetune.freeze.layers"):
        prepare(model(), spec("freeze", layers=3), lr=1e-3)


def test_rslora_scales_by_alpha_over_sqrt_r_and_lora_by_alpha_over_r():
    rs, _ = prepare(model(), spec("rslora", r=16, alpha=8), lr=1e-3)
    plain, _ = prepare(model(), spec("lora", r=16, alpha=8), lr=1e-3)
    q_rs = rs.base_model.model.model.layers[0].self_attn.q_proj
    q_plain = plain.base_model.model.model.layers[0].self_attn.q_proj
    assert q_rs.scaling["default"] == pytest.approx(8 / math.sqrt(16))
    assert q_plain.scaling["default"] == pytest.approx(8 / 16)


def test_lora_plus_gives_b_ratio_times_the_learning_rate_of_a():
    m, optimizer = prepare(model(), spec("lora_plus", lr_ratio=16), lr=1e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for n, p in m.named_parameters():
        if "lora_A" in n:
            assert lr_of[id(p)] == pytest.approx(1e-3), n
        elif "lora_B" in n:
            assert lr_of[id(p)] == pytest.approx(16e-3), n


@pytest.mark.parametrize("init", ["exact", "fast"])
def test_pissa_leaves_the_output_unchanged_at_step_0(init):
    reference = model().eval()
    ids = torch.randint(2, 64, (2, 10))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    m, _ = prepare(model(), spec("pissa", init=init), lr=1e-3)
    m.eval()
    with torch.no_grad():
        got = m(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the base was really changed to the residual (PiSSA is not plain LoRA)
    assert not torch.equal(base_state(m)["model.layers.0.self_attn.q_proj.weight"],
                           reference.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("name", METHODS)
def test_merged_model_reproduces_the_trained_model(name):
    m, optimizer = prepare(model(), spec(name), lr=1e-2)
    train(m, optimizer)
    m.eval()
    ids = torch.randint(2, 64, (2, 10))
    with torch.no_grad():
        expected = m(input_ids=ids).logits
        plain = merged(m)
        assert type(plain) is DecoderForCausalLM
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_keeps_trainable_weights_fp32_stores_frozen_ones_bf16_and_computes_in_bf16(name):
    """bf16 mixed precision: the optimiser updates fp32 weights; frozen weights (an adapter's
    base, Freeze's layers) sit in bf16 and never change; the linears compute in bf16."""
    from effllm.precision import autocast

    m, optimizer = prepare(model(), spec(name), lr=1e-2, precision="bf16")
    params = dict(m.named_parameters())
    frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert bool(frozen) == (name != "full")
    trainable = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}

    seen = []
    handles = [mod.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
               for mod in m.modules() if isinstance(mod, torch.nn.Linear)]  # peft's too
    assert handles
    torch.manual_seed(1)
    ids = torch.randint(2, 64, (4, 12))
    m.train()
    for _ in range(3):
        with autocast("cpu", "bf16"):
            loss = m(input_ids=ids, labels=ids).loss
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}
    after = dict(m.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(after[n], p), n
    assert any(not torch.equal(after[n], p) for n, p in trainable.items())
    assert all(after[n].dtype == torch.float32 for n in trainable)
    # The saved model is fp32, the update folded into the widened base (not rounded into bf16).
    with torch.no_grad():  # the trained model in fp32 math: bf16 base values, fp32 adapter
        expected = copy.deepcopy(m).float()(input_ids=ids).logits
    plain = merged(m)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
