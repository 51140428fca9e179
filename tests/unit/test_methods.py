"""Fine-tuning methods: what each may change, and the numbers that define it."""

import copy
import math

import pytest
import torch

from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.specs import MethodSpec
from invariants import train_steps
from effllm.training.methods import ADAPTER_METHODS, METHODS, load_base, merged, prepare

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
    # Merging folds the update into the widened base in fp32 (not into bf16, where it would
    # mostly round away), then stores it in bf16: test_merging_folds_in_fp32_layer_by_layer.


# ------------------------------------------------------- loading and merging at paper scale's ways

def saved_base(path, vocab=128, hidden=64, heads=4, intermediate=128):
    """A saved fp32 base of 8 layers (its largest tensor a small part of the whole, as in a
    real model), and its tensors as stored."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    DecoderForCausalLM(DecoderConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=8, num_attention_heads=heads,
        num_key_value_heads=2, intermediate_size=intermediate, eos_token_id=0,
        pad_token_id=1)).save_pretrained(path)
    return path, load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_base(tmp_path_factory.mktemp("base"))


def wide_spec(name):
    return spec(name, r=2, alpha=4, layers=4)


def loading_bound(model, stored: dict) -> int:
    """Bytes a load may peak at: the loaded model's own parameters plus a few fp32 copies of
    its largest tensor (one tensor read and cast at a time; PiSSA's and DoRA's per-layer fp32
    work). Loading the base in fp32 first would hold every frozen weight twice over."""
    own = sum(p.numel() * p.element_size() for p in model.parameters())
    return own + 6 * max(t.numel() * 4 for t in stored.values())


def assert_loaded_for(model, stored: dict, name: str, precision: str) -> None:
    """Every base weight as ``name`` trains it: a frozen one is the checkpoint's tensor cast to
    the precision's dtype, bit for bit (PiSSA's targets hold the residual instead); a trained
    one the checkpoint's fp32; every adapter tensor fp32."""
    frozen_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    checked = set()
    for key, p in model.named_parameters():
        if "lora_" in key:
            assert p.dtype == torch.float32 and p.requires_grad, key
            continue
        plain = key.replace("base_model.model.", "").replace(".base_layer", "")
        checked.add(plain)
        if name == "pissa" and any(f".{t}." in plain for t in TARGETS):
            assert p.dtype == frozen_dtype and not p.requires_grad, key
            continue
        dtype = torch.float32 if p.requires_grad else frozen_dtype
        assert p.dtype == dtype, key
        assert torch.equal(p.detach().cpu(), stored[plain].to(dtype)), key
    assert checked >= set(stored)


@pytest.mark.parametrize("name", METHODS)
def test_load_reads_frozen_weights_straight_into_bf16(checkpoint, name):
    """At bf16, every frozen weight is read into bf16 (never an fp32 copy of it: the tensors
    created while loading and preparing peak at the loaded model plus a few fp32 copies of one
    tensor), bit-identical to the checkpoint's bf16 cast; every trained weight is the
    checkpoint's fp32."""
    from effllm.measure.tensors import track

    path, stored = checkpoint
    with track(device="cpu") as tracked:
        model, _ = load_base(path, wide_spec(name), "bf16")
        loaded = {key: p.dtype for key, p in model.named_parameters()}
        model, _ = prepare(model, wide_spec(name), lr=1e-3, precision="bf16")
    assert tracked.account.peak <= loading_bound(model, stored)
    assert_loaded_for(model, stored, name, "bf16")
    for key, p in model.named_parameters():  # read in these dtypes, not cast by prepare()
        if "lora_" not in key:
            assert loaded[key.replace("base_model.model.", "").replace(".base_layer", "")] \
                == p.dtype, key
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert bool(frozen) == (name != "full")


def test_load_at_fp32_is_the_checkpoint():
    """fp32 precision: every weight as stored, the same as from_pretrained reads it."""
    from transformers import AutoModelForCausalLM

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model().save_pretrained(tmp)
        ours, _ = load_base(tmp, spec("freeze"), "fp32")
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied
        assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dora_magnitude_is_the_fp32_norm_of_the_stored_base(checkpoint):
    """DoRA's m = ||W||_c, in fp32, of the bf16 weights the layer computes with: at step 0
    the model (in fp32 math) is exactly the bf16 base. peft alone computes m in bf16 there,
    off by up to 2^-9 of each norm."""
    path, _ = checkpoint
    base, _ = load_base(path, wide_spec("lora"), "bf16")
    reference = copy.deepcopy(base).float()
    dora, _ = prepare(base, wide_spec("dora"), lr=1e-3, precision="bf16")
    layer = dora.base_model.model.model.layers[3].mlp.down_proj
    weight = layer.get_base_layer().weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(layer.lora_magnitude_vector["default"].weight,
                       torch.linalg.norm(weight.float(), dim=1))
    ids = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(dora).float().eval()(input_ids=ids).logits,
                                   reference.eval()(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", ["exact", "fast"])
def test_pissa_keeps_fp32_factors_and_a_residual_rounded_once(checkpoint, init):
    """PiSSA at bf16: A and B are the fp32 SVD factors of the bf16 weight, and the stored
    residual is W - s·BA rounded once to bf16: W - residual - s·BA is within half a bf16 step
    of the residual everywhere. (Inside get_peft_model A and B would be rounded to bf16 after
    the residual was taken: thousands of steps off where the residual is small.)"""
    path, stored = checkpoint
    base, _ = load_base(path, wide_spec("lora"), "bf16")
    pissa, _ = prepare(base, spec("pissa", r=2, alpha=4, init=init), lr=1e-3, precision="bf16")
    from peft.tuners.lora import LoraLayer

    worst = 0.0
    for key, layer in pissa.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.dtype == b.dtype == torch.float32
        residual = layer.get_base_layer().weight
        assert residual.dtype == torch.bfloat16
        weight = stored[key.replace("base_model.model.", "") + ".weight"].to(torch.bfloat16)
        error = weight.float() - residual.float() - layer.scaling["default"] * (b @ a)
        step = torch.finfo(torch.bfloat16).eps * residual.float().abs().clamp_min(1e-30)
        worst = max(worst, (error.abs() / step).max().item())
    assert 0 < worst <= 0.5 + 1e-3


def bf16_trained(path, name):
    """A method's model loaded and trained at bf16 (autocast), as a run leaves it."""
    from effllm.precision import autocast

    model, optimizer = prepare(load_base(path, wide_spec(name), "bf16")[0], wide_spec(name),
                               lr=1e-2, precision="bf16")
    ids = torch.randint(2, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(3):
        with autocast("cpu", "bf16"):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("name", METHODS)
def test_merging_folds_in_fp32_layer_by_layer(checkpoint, name):
    """The merged model at bf16 is peft's merge_and_unload of the whole model widened to fp32,
    cast to bf16 (to one bf16 step), stored in bf16; no more than one layer is ever in fp32
    (the merge peaks at the model plus a few fp32 copies of one tensor, not at an fp32 copy of
    the model). At fp32 it equals peft's merge to fp32 rounding."""
    from effllm.measure.tensors import track

    path, stored = checkpoint
    trained = bf16_trained(path, name)
    wide = copy.deepcopy(trained)
    for p in wide.parameters():
        p.data = p.data.float()
    with torch.no_grad():
        reference = (wide.merge_and_unload() if hasattr(wide, "merge_and_unload")
                     else wide).state_dict()
        exact = merged(copy.deepcopy(trained), precision="fp32").state_dict()
        bound = loading_bound(trained, stored)
        with track(trained, device="cpu") as tracked:
            plain = merged(trained, precision="bf16")
    assert tracked.account.peak <= bound
    assert type(plain) is DecoderForCausalLM
    state = plain.state_dict()
    assert state.keys() == reference.keys() == exact.keys()
    for key, value in state.items():
        assert value.dtype == torch.bfloat16, key
        torch.testing.assert_close(value.float(), reference[key].to(torch.bfloat16).float(),
                                   rtol=2 ** -8, atol=0, msg=key)
        assert exact[key].dtype == torch.float32, key
        torch.testing.assert_close(exact[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)


def test_pissa_adapter_is_saved_for_the_original_base(tmp_path):
    """PiSSA's residual base exists only inside the run, so its adapter is saved converted
    (peft's conversion, rank 2r): loaded onto the original base it gives the trained model."""
    from peft import PeftModel

    from effllm.training.methods import initial_adapter, save_adapter

    original = model()
    m, optimizer = prepare(copy.deepcopy(original), spec("pissa"), lr=1e-2)
    initial = initial_adapter(m, spec("pissa"))
    train(m, optimizer)
    m.eval()
    ids = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = m(input_ids=ids).logits
        save_adapter(m, tmp_path / "adapter", initial)
        torch.testing.assert_close(m(input_ids=ids).logits, expected, rtol=0, atol=0)
        loaded = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
        assert loaded.peft_config["default"].r == 2 * 4
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    initial[0].cleanup()
