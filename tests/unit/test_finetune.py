"""The fine-tuning stage beyond the methods' own maths: Hugging Face bases read from a local
cache (with clear errors), the sweep's per-method settings, QLoRA on a 4-bit base, the FLOPs an
adapter method really spends, and one whole run on a hub model.

The "hub" is a cache folder built by ``hubcache`` (a tiny Llama and the stdlib tokenizer).
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
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
from test_specs import configs  # noqa: F401 - fixture: paper.yaml checked

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
    config["finetune"]["lr_file"] = None  # rates from finetune.lr and lr_by_method only
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


def test_qlora_merges_into_a_fresh_base_in_the_training_precision(saved_llama):
    """At bf16 the adapter trained on the 4-bit base is folded, in fp32, into a fresh copy of
    the base read in bf16, and stored in bf16: W = bf16(bf16(W0) + s·BA)."""
    pytest.importorskip("bitsandbytes")
    base, _ = methods.load_base(saved_llama, lora_spec(), precision="bf16")
    model, optimizer = methods.prepare(base, lora_spec(), lr=1e-2, precision="bf16")
    train_steps(model, optimizer)
    plain = methods.merged(model, saved_llama, "bf16")
    assert type(plain) is LlamaForCausalLM and not linears4bit(plain)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    fp32 = AutoModelForCausalLM.from_pretrained(saved_llama)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        wrapped = model.get_submodule(f"base_model.model.{name}")
        delta = wrapped.lora_B["default"].weight @ wrapped.lora_A["default"].weight
        expected = fp32.get_submodule(name).weight.to(torch.bfloat16).float() + 2.0 * delta
        torch.testing.assert_close(plain.get_submodule(name).weight.float(),
                                   expected.to(torch.bfloat16).float(), rtol=2 ** -8, atol=0)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(plain.state_dict()[norm], fp32.state_dict()[norm].to(torch.bfloat16))


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


# ------------------------------------------------- learning rates per method, tuning, divergence

def rates_file(path: Path, rates: dict) -> Path:
    path.write_text(yaml.safe_dump({"lr_by_method": rates, "provenance": {"rule": "test"}}))
    return path


def test_tuned_rates_reach_the_runs_with_their_source(config, schema, tmp_path):
    """The rates file sets a method's rate below lr_by_method; lr_by_base scales it; a method
    the file leaves out runs at finetune.lr; every run's spec says where its rate came from."""
    path = rates_file(tmp_path / "tuned.yaml", {"lora": 1e-3, "lora_plus": 2e-4, "full": 5e-4})
    config = copy.deepcopy(config)
    ft = config["finetune"]
    ft.update(lr_file=str(path), lr_by_method={"full": 4e-3},
              bases=["gqa-small", "gqa-medium"], lr_by_base={"gqa-medium": 1e-3})
    config["pretrain"]["blocks"]["attention"]["sizes"] = ["small", "medium"]
    config["inference"]["techniques"] = None  # its draft, gqa-tiny, is gone
    runs = expand_runs(check_config(config, schema))["finetune"]
    train = {name: run.spec.train for name, run in runs.items()}
    assert (train["lora-gqa-small-s0"].lr, train["lora-gqa-small-s0"].lr_source) == (
        1e-3, f"finetune.lr_file ({path})")
    assert train["lora_plus-gqa-small+word_problems-s0"].lr == 2e-4
    assert (train["full-gqa-small-s0"].lr, train["full-gqa-small-s0"].lr_source) == (
        4e-3, "finetune.lr_by_method.full")  # set by hand: above the file
    assert (train["dora-gqa-small-s0"].lr, train["dora-gqa-small-s0"].lr_source) == (
        ft["lr"], None)  # not in the file: finetune.lr, the spec's default source
    medium = train["lora-gqa-medium-s0"]
    assert medium.lr == pytest.approx(1e-3 * 1e-3 / ft["lr"])
    assert medium.lr_source.startswith("finetune.lr_by_base.gqa-medium x finetune.lr_file")
    assert train["dora-gqa-medium-s0"].lr_source == "finetune.lr_by_base.gqa-medium"


@pytest.mark.parametrize("content, error", [
    (None, "does not exist"),
    ({"lr_by_method": {"qlora": 1e-3}}, "qlora is not a method"),
    ({"lr_by_method": {"lora": -1.0}}, "not a positive rate"),
    ({"provenance": {}}, "no lr_by_method"),
])
def test_bad_rates_file_names_the_key(config, schema, tmp_path, content, error):
    path = tmp_path / "tuned.yaml"
    if content is not None:
        path.write_text(yaml.safe_dump(content))
    config = copy.deepcopy(config)
    config["finetune"]["lr_file"] = str(path)
    with pytest.raises(ConfigError, match=f"'finetune.lr_file'.*{error}"):
        check_config(config, schema)


def test_method_rate_reaches_the_optimiser_with_lora_plus_ratio_on_top(config, schema,
                                                                       tmp_path):
    """The rate a run's spec resolves is the optimiser's: LoRA's A and B at the tuned rate,
    LoRA+'s B at lr_ratio times its own tuned rate."""
    from effllm.models import DecoderConfig, DecoderForCausalLM

    config = copy.deepcopy(config)
    config["finetune"]["lr_file"] = str(rates_file(tmp_path / "t.yaml",
                                                   {"lora": 7e-4, "lora_plus": 1e-4}))
    runs = expand_runs(check_config(config, schema))["finetune"]
    for method, a_rate, b_rate in (("lora", 7e-4, 7e-4), ("lora_plus", 1e-4, 16e-4)):
        spec = runs[f"{method}-gqa-small-s0"].spec
        torch.manual_seed(0)
        model = DecoderForCausalLM(DecoderConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64))
        model, optimizer = methods.prepare(model, spec.method, spec.train.lr)
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        named = dict(model.named_parameters())
        for part, rate in (("lora_A", a_rate), ("lora_B", b_rate)):
            rates = [lr_of[id(p)] for n, p in named.items() if part in n]
            assert rates and rates == pytest.approx([rate] * len(rates)), (method, part)


def test_tune_runs_are_the_methods_runs_at_scaled_rates_on_one_base(config, schema):
    from effllm.sweep import tune_runs

    config = copy.deepcopy(config)
    config["pretrain"]["blocks"]["attention"]["sizes"] = ["small", "medium"]
    config["inference"]["techniques"] = None  # its draft, gqa-tiny, is gone
    config["finetune"].update(bases=["gqa-medium", "gqa-small"],
                              tune={"factors": [0.5, 2], "steps": 40, "eval_problems": 7,
                                    "centre": {"rslora": 1e-4}})
    runs = expand_runs(check_config(config, schema))
    tune = tune_runs(config, runs)
    assert len(tune) == 2 * len(config["finetune"]["methods"])
    lora = tune["lora-gqa-small-x2-s0"].spec  # gqa-small: the size that comes first
    plain = runs["finetune"]["lora-gqa-small-s0"].spec
    assert lora.run_id == "tune/lora-gqa-small-x2-s0" and lora.dataset == "arithmetic"
    assert (lora.train.lr, lora.train.max_steps, lora.train.eval_problems) == (
        2 * config["finetune"]["lr"], 40, 7)
    assert lora.train.lr_source == "tune: 2 x finetune.lr"
    assert lora.method == plain.method and lora.upstream == plain.upstream
    rslora = tune["rslora-gqa-small-x0.5-s0"].spec.train
    assert (rslora.lr, rslora.lr_source) == (5e-5, "tune: 0.5 x finetune.tune.centre.rslora")


def tune_record(method: str, lr: float, val_loss: float | None, diverged: str | None = None):
    from effllm.records import Metric, RunRecord

    metrics = {"diverged": Metric.measured(float(diverged is not None), "1", "test", diverged),
               "val_loss": Metric.measured(val_loss, "nats/token", "test") if val_loss is not None
               else Metric.unavailable("nats/token", "test", f"run diverged: {diverged}")}
    return RunRecord(f"finetune/{method}-{lr}", "finetune", method, "small", 0, "0" * 16,
                     {"settings": {"train": {"lr": lr}}, "upstream": "pretrain/b"}, {}, metrics)


def test_pick_takes_the_lowest_validation_loss_that_did_not_diverge(tmp_path):
    from effllm.training.tune import choose, read_rates, write_rates

    records = [tune_record("lora", 1e-3, 1.5), tune_record("lora", 2e-3, 1.2),
               tune_record("lora", 4e-3, None, "the training loss became non-finite at step 9"),
               tune_record("full", 1e-3, 0.9), tune_record("full", 2e-3, 0.95),
               tune_record("rslora", 1e-3, None, "val loss up"),
               tune_record("rslora", 2e-3, None, "val loss up")]
    chosen = choose(records)
    assert list(chosen) == ["lora", "rslora", "full"]  # the methods' order
    assert chosen["lora"]["chosen"] == {"lr": 2e-3, "val_loss": 1.2}
    assert chosen["lora"]["grid"][2]["diverged"].startswith("the training loss")
    assert chosen["full"]["chosen"] == {"lr": 1e-3, "val_loss": 0.9,
                                        "edge": "lowest rate of the grid"}
    assert chosen["rslora"]["chosen"]["lr"] is None  # every rate diverged: no rate
    written = write_rates(tmp_path / "rates.yaml", chosen, {"steps": 10})
    assert read_rates(tmp_path / "rates.yaml") == {"lora": 2e-3, "full": 1e-3}
    assert written["provenance"]["methods"]["lora"]["grid"][0] == {"lr": 1e-3, "val_loss": 1.5}


def test_divergence_rules():
    from effllm.training.loop import divergence

    falling = [3.0] * 5 + [2.0] * 45
    assert divergence(falling, [], 3.1, 2.5) is None
    assert "non-finite at step 7" in divergence(falling[:7], [7], 3.1, None)
    assert "above its start" in divergence(falling[::-1], [], 3.1, 2.5)  # rising training loss
    assert "validation loss 3.2 above" in divergence(falling, [], 3.1, 3.2)
    assert "not finite" in divergence(falling, [], 3.1, None)
    assert divergence(falling, [], None, 2.5) is None  # no start measured: that test skipped


def test_train_stops_at_a_nonfinite_loss_when_asked():
    """By default a NaN loss raises; with stop_on_nonfinite training ends there and says so."""
    from effllm.measure import Window
    from effllm.models import DecoderConfig, DecoderForCausalLM
    from effllm.training.loop import StepLog, adamw, cosine_schedule, step_metrics, train

    def batches(model):
        ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        for step in range(100):
            if step == 6:  # the weights turn to NaN before the seventh step
                with torch.no_grad():
                    model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    for stop in (False, True):
        torch.manual_seed(0)
        model = DecoderForCausalLM(DecoderConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64))
        optimizer = adamw(model, 1e-3, 0.0)
        args = (model, batches(model), 20, optimizer, cosine_schedule(optimizer, 2, 20, 0.0), 1.0,
                Window(0.05), "nan test")
        if not stop:
            with pytest.raises(FloatingPointError, match="at step 6"):
                train(*args)
            continue
        log = train(*args, stop_on_nonfinite=True)
        assert (len(log.losses), log.nonfinite) == (6, [6])
        assert StepLog.from_state(log.state()).nonfinite == [6]  # survives a checkpoint
        assert "stopped at step 6" in step_metrics(log, 2, 1000, "t")["al"].note


@pytest.fixture(scope="module")
def tiny_finetune(stdlib_tokens, tmp_path_factory):
    """A tiny decoder and an arithmetic set, the inputs of a fine-tuning job."""
    from effllm.data.reasoning import prepare_reasoning
    from effllm.data.tokenizer import load_tokenizer
    from effllm.models import DecoderConfig, DecoderForCausalLM

    root = tmp_path_factory.mktemp("tiny_finetune")
    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    torch.manual_seed(0)
    DecoderForCausalLM(DecoderConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    prepare_reasoning({"source": "arithmetic", "arithmetic": {
        "operations": ["add"], "min_digits": 1, "max_digits": 2, "n_train": 64,
        "n_validation": 8, "n_test": 4}}, 0, root / "reasoning")
    return root


def tiny_spec(method: dict, lr: float, source: str | None = None, **settings) -> dict:
    train = {"epochs": 1, "batch_size": 8, "lr": lr, "warmup_ratio": 0.1, "max_samples": 64,
             "max_length": 64, "eval_problems": 4, "max_new_tokens": 40, "max_steps": 12}
    return {"run_id": f"finetune/{method['name']}-t-s0", "stage": "finetune",
            "technique": method["name"], "label": method["name"], "size": "tiny", "seed": 0,
            "group": "t", "upstream": "pretrain/t",
            "settings": {"method": method, "dataset": "arithmetic", **settings,
                         "train": {**train, **({"lr_source": source} if source else {})},
                         "measure": {"sample_interval_s": 0.05, "warmup_steps": 2,
                                     "peak_flops": None, "threads": 1}}}


@pytest.mark.parametrize("method, lr, reason", [
    ({"name": "full"}, 3e-3, None),
    ({"name": "full"}, 30.0, "the training loss became non-finite"),
    ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}, 1e3,
     "final training loss"),
])
def test_diverged_run_is_marked_and_its_quality_unavailable(tiny_finetune, tmp_path, method,
                                                            lr, reason):
    """A run at a sane rate learns (validation loss below its start, not diverged); at a huge
    rate it diverges (a NaN loss ends it, or its loss climbs), the record says why, and its
    quality metrics are unavailable, never reported; the record names the rate and source."""
    from effllm.records import load_record
    from effllm.training.finetune import QUALITY, run_finetune

    run_finetune(tiny_spec(method, lr, "finetune.lr_file (t.yaml)"), tiny_finetune / "base",
                 tiny_finetune / "reasoning", None, tmp_path / "record.json")
    record = load_record(tmp_path / "record.json")
    m, execution = record.metrics, record.provenance["execution"]
    assert (execution["lr"], execution["lr_source"]) == (lr, "finetune.lr_file (t.yaml)")
    assert record.params["settings"]["train"]["lr_source"] == "finetune.lr_file (t.yaml)"
    assert m["val_loss_start"].status == "measured"
    assert m["diverged"].status == "measured" and m["loss_start"].status == "measured"
    if reason is None:
        assert m["diverged"].value == 0 and m["diverged"].note is None
        assert m["val_loss"].value < m["val_loss_start"].value
        assert all(m[name].status == "measured" for name in QUALITY)
        return
    assert m["diverged"].value == 1 and m["diverged"].note.startswith(reason)
    for name in QUALITY:
        assert m[name].status == "unavailable" and m[name].value is None, name
        assert m[name].note.startswith(f"run diverged: {reason}"), name
    assert m["al"].status == "measured"  # what it cost is still measured
    assert not (tmp_path / "model").exists()


def test_models_served_from_a_diverged_run_report_no_quality(tmp_path):
    """The runs table: a fine-tuning run's own record already hides its quality; a model
    served from it has its quality metrics unavailable too, naming the diverged run."""
    from effllm.analysis.aggregate import runs_table
    from effllm.records import Metric, RunRecord, now_iso, provenance

    def record(run_id, stage, upstream, metrics):
        params = {"group": "g", "label": "l", "upstream": upstream}
        path = tmp_path / f"{run_id.replace('/', '_')}.json"
        RunRecord(run_id, stage, "t", "small", 0, "0" * 16, params, provenance(now_iso()),
                  metrics).save(path)
        return path

    em = Metric.measured(0.5, "fraction", "greedy_final_answer_match")
    al = Metric.measured(0.1, "s", "timer")
    paths = [record("finetune/bad", "finetune", "pretrain/b",
                    {"diverged": Metric.measured(1, "1", "t", "loss rose"), "al": al}),
             record("finetune/good", "finetune", "pretrain/b",
                    {"diverged": Metric.measured(0, "1", "t"), "al": al}),
             record("inference/int4-bad", "inference", "finetune/bad",
                    {"exact_match": em, "task_bbh": em, "al": al}),
             record("inference/int4-good", "inference", "finetune/good",
                    {"exact_match": em, "task_bbh": em, "al": al})]
    df = runs_table(paths).set_index("run_id")
    assert df.loc["inference/int4-good", "exact_match"] == 0.5
    for name in ("exact_match", "task_bbh"):
        assert np.isnan(df.loc["inference/int4-bad", name])
        assert df.loc["inference/int4-bad", f"{name}__status"] == "unavailable"
        assert df.loc["inference/int4-bad", f"{name}__note"] == "finetune/bad diverged: loss rose"
    assert df.loc["inference/int4-bad", "al"] == 0.1  # its cost is still measured


# --------------------------------------------------------- what a run saves: served or not

def test_only_runs_an_inference_run_serves_are_marked_served(config, schema,
                                                             configs):  # noqa: F811
    """``served`` is set exactly on the fine-tuning runs some inference run loads: the
    default serves the primary set's runs (``inference.finetune_datasets`` null) at the
    inference seeds; the second set's runs, tune runs and every run of paper.yaml (which
    serves no fine-tuned model) save no merged weights."""
    from effllm.sweep import tune_runs

    runs = expand_runs(check_config(config, schema))
    upstreams = {run.upstream for run in runs["inference"].values()}
    served = {name for name, run in runs["finetune"].items() if run.spec.served}
    assert served == {name for name, run in runs["finetune"].items()
                      if run.run_id in upstreams}
    assert served and all("+" not in name for name in served)  # the primary set only
    assert any("+" in name for name in runs["finetune"])  # the other set's runs exist
    assert "served" not in runs["finetune"]["lora-gqa-small+word_problems-s0"].spec.to_json()[
        "settings"]
    assert not any(run.spec.served for run in tune_runs(config, runs).values())
    config = copy.deepcopy(config)
    config["inference"]["finetune_datasets"] = ["word_problems"]  # now the other set's runs
    runs = expand_runs(check_config(config, schema))["finetune"]
    assert {name for name, run in runs.items() if run.spec.served} == {
        "+word_problems-s".join(name.rsplit("-s", 1)) for name in served}
    paper = expand_runs(configs["paper"])
    assert paper["finetune"] and not any(run.spec.served for run in paper["finetune"].values())


@pytest.mark.parametrize("method, served", [
    ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS}, True),
    ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS}, False),
    ({"name": "freeze", "layers": 1}, False),
])
def test_a_run_saves_merged_weights_in_its_precision_only_when_served(tiny_finetune, tmp_path,
                                                                      method, served):
    """A served run's folder holds the merged model in the training precision's dtype (bf16
    here), which loads; a run nobody serves writes no model weights: its adapter, if it has
    one, the tokenizer and a README saying why."""
    from safetensors import safe_open

    spec = tiny_spec(method, 1e-3, served=served)
    spec["settings"]["train"]["precision"] = "bf16"
    from effllm.training.finetune import run_finetune

    out = tmp_path / "model"
    run_finetune(spec, tiny_finetune / "base", tiny_finetune / "reasoning", out,
                 tmp_path / "record.json")
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    adapter = method["name"] == "lora"
    assert (out / "adapter/adapter_model.safetensors").is_file() == adapter
    assert (out / "tokenizer.json").is_file()
    readme = (out / "README.md").read_text()
    if not served:
        assert weights == [] and "no merged weights are saved" in readme
        return
    assert weights == ["model.safetensors"] and "bfloat16" in readme
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_finetune / "base")
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name].to(torch.bfloat16)
                           .float())  # the adapter is in it
