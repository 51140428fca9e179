"""The fine-tuning stage beyond the methods' own maths: Hugging Face bases read from a local
cache (with clear errors), the sweep's per-method settings, QLoRA on a 4-bit base, the FLOPs an
adapter method really spends, and one whole run on a hub model.

The "hub" is a cache folder built by ``hubcache`` (a tiny Llama and the stdlib tokenizer).
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from effllm.config import ConfigError, check_config
from effllm.data import DataSourceError
from effllm.data.hub import cached_model, prepare_hub_model
from effllm.measure import count_flops
from effllm.specs import MethodSpec
from effllm.sweep import expand_runs
from effllm.training import methods
from effllm.models.params import count_params
import invariants
from hubcache import COMMIT, REPO, fake_cache, llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "fp32"}


# ------------------------------------------------------------------------------- the local cache

def test_cached_model_finds_the_snapshot(hub):
    snapshot = cached_model(REPO, cache_dir=hub)
    assert snapshot.name == COMMIT and (snapshot / "config.json").is_file()
    assert cached_model(REPO, revision=COMMIT, cache_dir=hub) == snapshot


def test_missing_model_error_says_how_to_fetch_it(tmp_path):
    with pytest.raises(DataSourceError, match=r"not in the local Hugging Face cache.*hf download "
                                              r"other/model"):
        cached_model("other/model", cache_dir=tmp_path)


def test_model_without_safetensors_is_refused(tmp_path, stdlib_tokens):
    fake_cache(tmp_path, stdlib_tokens, weights=False)
    with pytest.raises(DataSourceError, match="no .safetensors weights"):
        cached_model(REPO, cache_dir=tmp_path)


def test_model_needing_remote_code_is_refused(tmp_path, stdlib_tokens):
    fake_cache(tmp_path, stdlib_tokens, config_extra={"auto_map": {"AutoModel": "x.Y"},
                                                      "model_type": "my_own_llama"})
    with pytest.raises(DataSourceError, match="remote code.*my_own_llama"):
        cached_model(REPO, cache_dir=tmp_path)


def test_leftover_auto_map_of_a_native_family_is_accepted(tmp_path, stdlib_tokens):
    """Phi-3.5-mini's config still names remote code, but transformers has the class."""
    fake_cache(tmp_path, stdlib_tokens, config_extra={"auto_map": {"AutoModel": "x.Y"}})
    snapshot = cached_model(REPO, cache_dir=tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(snapshot)) is LlamaForCausalLM


def test_prepared_hub_model_links_the_snapshot_and_loads(hub, use_cache, tmp_path):
    use_cache(hub)
    card = prepare_hub_model(REPO, None, tmp_path / "model")
    out = tmp_path / "model"
    assert card["revision"] == COMMIT
    assert {f["path"] for f in card["files"]} >= {"config.json", "model.safetensors",
                                                  "tokenizer.json"}
    assert (out / "model.safetensors").is_symlink()  # the weights are not copied
    assert json.loads((out / "hub_card.json").read_text())["repo_id"] == REPO
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is LlamaForCausalLM


# ------------------------------------------------------------------------ config and the sweep

def with_hub(config: dict, bases=("gqa-small", "tiny-llama")) -> dict:
    config = copy.deepcopy(config)
    config["hub_models"] = {"tiny-llama": {"repo_id": REPO}}
    config["finetune"]["bases"] = list(bases)
    return config


def test_hub_base_becomes_a_hub_upstream(config, schema, hub, use_cache):
    use_cache(hub)
    runs = expand_runs(check_config(with_hub(config), schema))["finetune"]
    lora = runs["lora-tiny-llama-s0"]
    assert lora.upstream == "hub/tiny-llama" and lora.size == "tiny-llama"
    assert runs["lora-gqa-small-s0"].upstream == "pretrain/gqa-small-s0"


def test_uncached_hub_base_is_refused_up_front(config, schema, use_cache, tmp_path):
    use_cache(tmp_path)  # an empty cache
    with pytest.raises(ConfigError, match=r"'hub_models.tiny-llama.repo_id'.*hf download"):
        check_config(with_hub(config), schema)
    check_config(with_hub(config, bases=["gqa-small"]), schema)  # listed but unused: fine


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["finetune"].__setitem__("bases", ["llama-7b"]), "finetune.bases.0"),
    (lambda c: c["hub_models"].__setitem__("gqa-small", {"repo_id": "a/b"}),
     "hub_models.gqa-small"),
    (lambda c: c["finetune"].__setitem__("quantized_base", True), "finetune.base_quant"),
    (lambda c: c["finetune"].update(quantized_base=True, base_quant=NF4),
     "finetune.quantized_base': PiSSA"),  # PiSSA is among the methods
    (lambda c: c["finetune"].__setitem__("lr_by_method", {"qlora": 1e-3}),
     "finetune.lr_by_method': 'qlora"),
    (lambda c: c["finetune"].update(methods=["lora"], lr_by_method={"full": 1e-3}),
     "finetune.lr_by_method': .*full.* not in finetune.methods"),
    (lambda c: c["finetune"].update(base_quant={**NF4, "quant_type": "int3"}),
     "finetune.base_quant.quant_type"),
])
def test_bad_finetune_config_names_the_key(config, schema, hub, use_cache, mutate, key):
    use_cache(hub)
    bad = with_hub(config)
    mutate(bad)
    with pytest.raises(ConfigError, match=f"'{key}"):
        check_config(bad, schema)


def test_lr_by_method_and_quantized_base_touch_only_their_methods(config, schema):
    plain = expand_runs(check_config(copy.deepcopy(config), schema))["finetune"]
    changed = copy.deepcopy(config)
    changed["finetune"]["methods"] = [m for m in config["finetune"]["methods"] if m != "pissa"]
    changed["finetune"].update(quantized_base=True, base_quant=NF4,
                               lr_by_method={"lora_plus": 1e-4})
    qlora = expand_runs(check_config(changed, schema))["finetune"]
    for name, run in qlora.items():
        method = run.technique
        assert run.spec.train.lr == (1e-4 if method == "lora_plus"
                                               else config["finetune"]["lr"])
        if method in ("freeze", "full"):  # untouched: same settings, so no retraining
            assert run.spec == plain[name].spec
            assert "quantized_base" not in run.spec.method.to_json()
        else:
            assert run.spec.method.quantized_base.to_json() == NF4
            assert plain[name].spec.method.quantized_base is None


# ----------------------------------------------------------------------------------- QLoRA

@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    llama(256).save_pretrained(path, safe_serialization=True)
    return path


def lora_spec(**kw):
    return MethodSpec.from_json({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                                 "target_modules": TARGETS, "quantized_base": NF4, **kw})


def train_steps(model, optimizer, steps=3):
    invariants.train_steps(model, optimizer, vocab=256, length=16, steps=steps)


def linears4bit(model):
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_qlora_base_is_4bit_frozen_and_bit_identical_after_training(saved_llama):
    pytest.importorskip("bitsandbytes")
    base, note = methods.load_base(saved_llama, lora_spec())
    assert note is None  # every width suits the kernels
    quantised = linears4bit(base)
    assert len(quantised) == 2 * len(TARGETS)  # every targeted linear of both layers
    assert all(m.weight.dtype == torch.uint8 for m in quantised.values())
    fp32_total, _ = count_params(AutoModelForCausalLM.from_pretrained(saved_llama))
    model, optimizer = methods.prepare(base, lora_spec(), lr=1e-2)
    total, trainable = count_params(model)
    adapters = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == sum(p.numel() for p in adapters.values())
    assert total == fp32_total + trainable  # 4-bit weights counted as the weights they stand for
    before = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
              for n, m in linears4bit(model).items()}
    train_steps(model, optimizer)
    for name, module in linears4bit(model).items():
        assert torch.equal(module.weight.data, before[name][0]), name
        assert torch.equal(module.weight.quant_state.absmax, before[name][1]), name
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters()
               if "lora_B" in n)


def test_qlora_trains_under_bf16_autocast_with_its_4bit_base_untouched(saved_llama):
    """finetune.precision bf16 with a 4-bit base: the base keeps its own dtypes (prepare stores
    nothing in bf16), the adapters stay fp32 and train, the loss stays finite."""
    pytest.importorskip("bitsandbytes")
    from effllm.precision import autocast

    base, _ = methods.load_base(saved_llama, lora_spec(), precision="bf16")
    model, optimizer = methods.prepare(base, lora_spec(), lr=1e-2, precision="bf16")
    dtypes = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert torch.uint8 in dtypes.values() and torch.bfloat16 not in dtypes.values()
    adapters = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    packed = {n: m.weight.data.clone() for n, m in linears4bit(model).items()}
    ids = torch.randint(2, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(3):
        with autocast("cpu", "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(m.weight.data, packed[n]) for n, m in linears4bit(model).items())
    assert any(not torch.equal(p, adapters[n]) for n, p in model.named_parameters()
               if "lora_B" in n)


def test_qlora_merges_into_the_fp32_base_exactly(saved_llama):
    pytest.importorskip("bitsandbytes")
    base, _ = methods.load_base(saved_llama, lora_spec())
    model, optimizer = methods.prepare(base, lora_spec(), lr=1e-2)
    train_steps(model, optimizer)
    plain = methods.merged(model, saved_llama)
    assert type(plain) is LlamaForCausalLM and not linears4bit(plain)
    fp32 = AutoModelForCausalLM.from_pretrained(saved_llama)
    scaling = 8 / 4
    for layer in range(2):
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{proj}"
            wrapped = model.get_submodule(f"base_model.model.{name}")
            delta = wrapped.lora_B["default"].weight @ wrapped.lora_A["default"].weight
            expected = fp32.get_submodule(name).weight + scaling * delta
            torch.testing.assert_close(plain.get_submodule(name).weight, expected)
    with pytest.raises(ValueError, match="base model's directory"):
        methods.merged(model)


# ----------------------------------------------------------------------------------- FLOPs

def test_adapter_backward_skips_frozen_weight_gradients(saved_llama):
    """Full fine-tuning costs ≈ 6N FLOPs per token (forward 2N, backward 4N); LoRA's backward
    computes input gradients but no frozen weight gradients, ≈ 4N. With r ≪ width the measured
    ratio is close to 2/3 (attention scores and the head add a little to both)."""
    ids = torch.randint(2, 256, (2, 32))

    def step_flops(spec):
        model = AutoModelForCausalLM.from_pretrained(saved_llama)
        model, _ = methods.prepare(model, spec, lr=1e-3)
        model.train()
        return count_flops(lambda: model(input_ids=ids, labels=ids).loss.backward())

    full = step_flops(MethodSpec("full"))
    lora = step_flops(lora_spec(quantized_base=None, r=1))
    assert 0.6 < lora / full < 0.75, lora / full


def test_qlora_flops_count_the_4bit_matmuls(saved_llama):
    """bitsandbytes' 4-bit forward is a custom op the FLOP counter would count as 0: QLoRA does
    the arithmetic of LoRA on a dense base, so the counts must be equal."""
    pytest.importorskip("bitsandbytes")
    ids = torch.randint(2, 256, (2, 32))
    counts = []
    for spec in (lora_spec(), lora_spec(quantized_base=None)):
        base, _ = methods.load_base(saved_llama, spec)
        model, _ = methods.prepare(base, spec, lr=1e-3)
        model.train()
        counts.append(count_flops(lambda: model(input_ids=ids, labels=ids).loss.backward()))
    assert counts[0] == counts[1]
