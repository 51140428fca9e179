"""The GPU plan (effllm.plan) checked where it can be on a CPU: the bytes it simulates for
parameters, gradients, optimiser state and 4-bit weights are the real tensors' bytes exactly;
its extrapolated activation peak is within 10 % of a real step booked by the same tracker; the
refusal names the job, its parts and what would fit; and the paper's configuration fits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from effllm.plan import simulate as sim
from effllm.plan.fit import GB, rank_peak
from effllm.plan.workload import ModelRef, ServePass, ServeWork, TrainWork
from effllm.precision import autocast
from effllm.specs import MethodSpec, ModelShape, QuantSpec

VOCAB = 512
LORA = dict(r=4, alpha=8, dropout=0.1, quantized_base=None,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"))
METHODS = {
    "full": MethodSpec("full"),
    "lora": MethodSpec("lora", **LORA),
    "dora": MethodSpec("dora", **LORA),
    "freeze": MethodSpec("freeze", layers=1),
    "qlora": MethodSpec("lora", **{**LORA, "quantized_base": QuantSpec("nf4", True, "bf16")}),
}
# Our families at a small shape (hidden 64: the CPU 4-bit kernels take multiples of 64).
BASE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=256)
DECODER = dict(family="decoder", num_key_value_heads=2, rope_theta=10000.0,
               position_encoding="rope")
SHAPES = {
    "mha": {**DECODER, "attention": "mha", "num_key_value_heads": 4},
    "gqa": {**DECODER, "attention": "gqa"},
    "mqa": {**DECODER, "attention": "mqa", "num_key_value_heads": 1},
    "mla": {**DECODER, "attention": "mla", "num_key_value_heads": 4},
    "nsa": {**DECODER, "attention": "nsa", "nsa_compress_block": 8, "nsa_compress_stride": 4,
            "nsa_select_block": 8, "nsa_num_selected": 2, "nsa_window": 16},
    "moe": {**DECODER, "attention": "gqa", "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 64, "router_aux_loss_coef": 0.01},
    "alibi": {**DECODER, "attention": "gqa", "position_encoding": "alibi"},
    "mamba": {"family": "mamba"},
    "rwkv": {"family": "rwkv"},
    "gpt_neox": {"family": "gpt_neox"},
}
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": VOCAB, "tie_word_embeddings": True, "max_position_embeddings": 256}


def ref(name: str) -> ModelRef:
    if name == "llama":
        return ModelRef("llama", config=LLAMA)
    return ModelRef(name, shape=ModelShape.from_json({**BASE, **SHAPES[name]}),
                    vocab_size=VOCAB)


def work(model: ModelRef, method=None, rows=2, seq_len=64, **kw) -> TrainWork:
    settings = dict(precision="fp32", rows=rows, passes=1, seq_len=seq_len,
                    checkpointing=False, strategy="single", world=1)
    return TrainWork(model, method, **{**settings, **kw})


def real_bytes(w: TrainWork) -> dict[str, int]:
    """Parameters, gradients and optimiser state of the job's model after one real step,
    counted from the tensors themselves."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, optimizer = sim.trainable_model(w, sim.depth(w.model))
        ids = torch.randint(3, VOCAB, (w.rows, w.seq_len))
        with autocast("cpu", w.precision):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    unique = list({id(p): p for p in model.parameters()}.values())
    trained = [p for p in unique if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": nbytes(unique), "grads": nbytes(p.grad for p in trained),
            "optimizer": nbytes(state), "buffers": nbytes(model.buffers())}


SLOW = pytest.mark.slow  # a Python loop over time (Mamba, RWKV) or DoRA's norms: 10-15 s each


@pytest.mark.parametrize("family", [pytest.param(f, marks=SLOW) if f in ("mamba", "rwkv")
                                    else f for f in [*SHAPES, "llama"]])
def test_pretraining_bytes_are_the_real_tensors(family):
    """Parameters, gradients and AdamW's state of every family, as simulated on fake tensors
    at two depths and extrapolated, equal the real model's tensors byte for byte."""
    w = work(ref(family), seq_len=16 if family in sim.RECURRENT else 64)
    simulated = sim.simulate(w, use_cache=False).static
    real = real_bytes(w)
    for part in ("params", "grads", "optimizer", "buffers"):
        assert simulated[part] == real[part], part


@pytest.mark.parametrize("method", ["full", "lora", "dora", "freeze"])
@pytest.mark.parametrize("base", ["llama", "gqa"])
def test_fine_tuning_bytes_are_the_real_tensors(base, method):
    """Full, LoRA, DoRA and Freeze at bf16 precision: frozen weights in bf16, trained ones and
    their state in fp32, adapters only, as the real tensors hold."""
    w = work(ref(base), METHODS[method], precision="bf16")
    simulated = sim.simulate(w, use_cache=False).static
    real = real_bytes(w)
    for part in ("params", "grads", "optimizer"):
        assert simulated[part] == real[part], part


def test_qlora_bytes_are_the_real_bitsandbytes_job(tmp_path):
    """QLoRA as the job runs it (``methods.load_base``: bitsandbytes NF4 base with double
    quantisation, prepared for k-bit training; ``methods.prepare``: the adapters and AdamW)
    after one real CPU step: the plan's weights (packed 4-bit, quantisation state, fp32 norms
    and head), adapter gradients and optimiser state are its bytes."""
    pytest.importorskip("bitsandbytes")
    from effllm.measure.tensors import weight_bytes
    from effllm.training import methods

    model = ref("llama")
    torch.manual_seed(0)
    sim.build(model).save_pretrained(tmp_path, safe_serialization=True)
    method = METHODS["qlora"]
    real, _ = methods.load_base(tmp_path, method, "bf16")
    real, optimizer = methods.prepare(real, method, 1e-3, precision="bf16")
    ids = torch.randint(3, VOCAB, (2, 32))
    with autocast("cpu", "bf16"):
        loss = real(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    trained = [p for p in real.parameters() if p.requires_grad]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    simulated = sim.simulate(work(model, method, precision="bf16"), use_cache=False).static
    assert simulated["params"] + simulated["buffers"] + simulated["quant_state"] \
        == weight_bytes(real)
    assert simulated["grads"] == nbytes(p.grad for p in trained)
    assert simulated["optimizer"] == nbytes(state)


@pytest.mark.parametrize("double_quant", [True, False])
def test_four_bit_bytes_are_bitsandbytes_bytes(tmp_path, double_quant):
    """A 4-bit base as the plan books it (packed weight, absmax per 64-block, double
    quantisation's statistics) holds exactly the bytes bitsandbytes holds after loading."""
    pytest.importorskip("bitsandbytes")
    from effllm.measure.tensors import linear_weight_bytes, weight_bytes
    from effllm.models.quantize import load_quantised

    model = ref("llama")
    torch.manual_seed(0)
    sim.build(model).save_pretrained(tmp_path, safe_serialization=True)
    quant = QuantSpec("nf4", double_quant, "bf16")
    real, _ = load_quantised(tmp_path, "int4", quant, dtype=torch.bfloat16)
    served = ServeWork(model, "int4", quant, (ServePass("p", 1, 8, 0, "last"),))
    with sim.fake_runtime(1):
        fake = sim.serving_model(served, 4)
        layers = {name: m for name, m in fake.named_modules()
                  if type(m).__name__ == "QuantisedLinear"}
        held = {name: m.weight.numel() + m.quant_state.numel() for name, m in layers.items()}
    real_layers = linear_weight_bytes(real)
    assert layers and held == {name: real_layers[name] for name in held}
    static = sim.simulate(served, use_cache=False).static
    assert static["params"] + static["buffers"] + static["quant_state"] == weight_bytes(real)


@pytest.mark.parametrize("method, bits", [("hqq", 1), ("hqq", 2), ("hqq", 3), ("hqq", 4),
                                          ("hqq", 8), ("torchao", 8)])
def test_weight_only_bytes_are_the_quantisers_bytes(method, bits):
    """A techniques-block variant's linears as the plan books them hold exactly the bytes the
    quantiser's layers hold (HQQ's packed codes and per-group scales and zero points;
    torchao's int8 data, scale and zero point per row), and the head stays in bf16."""
    from effllm.inference.techniques import quantize_weights
    from effllm.measure.tensors import linear_weight_bytes, weight_bytes
    from effllm.specs import WeightQuant

    model, weights = ref("llama"), WeightQuant(method, bits, 64)
    torch.manual_seed(0)
    real = sim.build(model, dtype=torch.bfloat16)
    quantize_weights(real, weights, ["lm_head"])
    served = ServeWork(model, "bf16", QuantSpec(), (ServePass("p", 1, 8, 0, "last"),),
                       weights=weights)
    with sim.fake_runtime(1):
        fake = sim.serving_model(served, 4)
        held = {name: m.weight.numel() + m.quant_state.numel()
                for name, m in fake.named_modules() if type(m).__name__ == "QuantisedLinear"}
    real_layers = linear_weight_bytes(real)
    assert len(held) == 4 * 7 and held == {name: real_layers[name] for name in held}
    assert "lm_head" not in held
    static = sim.simulate(served, use_cache=False).static
    assert static["params"] + static["buffers"] + static["quant_state"] == weight_bytes(real)


def test_a_draft_models_weights_are_on_the_device_too():
    """Speculative decoding holds the draft beside the served model: its bf16 weights are
    added to every phase and to the state, as the weights part of the peak."""
    served = ServeWork(ref("llama"), "bf16", QuantSpec(), (ServePass("p", 1, 8, 4, "last"),))
    draft = ref("gqa")
    alone = sim.simulate(served, use_cache=False)
    both = sim.simulate(dataclasses.replace(served, draft=draft), use_cache=False)
    weights = sum(p.numel() * 2 for p in {id(p): p for p in sim.build(draft).parameters()
                                          }.values())
    assert both.static["draft"] == weights
    assert both.phases["p"]["total"] == alone.phases["p"]["total"] + weights
    assert rank_peak(both, served).parts["weights"] == rank_peak(alone, served).parts[
        "weights"] + weights
    state = sim.state(dataclasses.replace(served, draft=draft))
    assert state.phases["state"]["total"] == sim.state(served).phases["state"]["total"] + weights


def test_a_distillation_teacher_is_booked_beside_the_students_step():
    """A student's step holds its teacher: fp32 weights (as the job loads them; the real
    model's bytes) and one pass's logits at the compute dtype plus the KL's three fp32 tensors
    of that size, on every phase and on the state."""
    student, teacher = ref("gqa"), ref("llama")
    work = TrainWork(student, None, "bf16", 2, 1, 16, False, "single", 1)
    alone = sim.simulate(work, use_cache=False)
    both = sim.simulate(dataclasses.replace(work, teacher=teacher), use_cache=False)
    real = sim.build(teacher, dtype=torch.float32)
    weights = sum(p.numel() * 4 for p in {id(p): p for p in real.parameters()}.values()) + sum(
        b.numel() * b.element_size() for b in real.buffers())
    logits = 2 * 16 * real.get_input_embeddings().num_embeddings
    assert both.static["teacher"] == weights + logits * (2 + 12)
    for name, parts in both.phases.items():
        assert parts["total"] == alone.phases[name]["total"] + both.static["teacher"]
    assert rank_peak(both, work).parts["weights"] > rank_peak(alone, work).parts["weights"]


@pytest.mark.parametrize("family, method, checkpointing", [
    ("gqa", None, False), ("gqa", None, True), ("mla", None, False),
    pytest.param("nsa", None, False, marks=SLOW), ("moe", None, False), ("alibi", None, False),
    ("gpt_neox", None, False), pytest.param("mamba", None, False, marks=SLOW),
    pytest.param("rwkv", None, False, marks=SLOW), ("llama", "lora", False),
    pytest.param("llama", "dora", True, marks=SLOW), ("llama", "freeze", False),
])
def test_simulated_peak_is_within_10_percent_of_a_real_step(family, method, checkpointing):
    """The plan's peak (fake tensors, two depths extrapolated to the model's, recurrent
    families at two lengths too) against one real CPU step of the whole model, booked by the
    same tracker with the same code."""
    model = ref(family)
    seq = 64
    w = work(model, METHODS.get(method), rows=2, seq_len=seq, checkpointing=checkpointing,
             precision="bf16" if method else "fp32")
    simulated = sim.simulate(w, use_cache=False)
    real = sim.train_account(w, sim.depth(model), seq, fake=False)
    peak = max(p["total"] for p in simulated.phases.values())
    truth = max(p["total"] for p in real["phases"].values())
    assert peak == pytest.approx(truth, rel=0.10)
    assert simulated.flops["step"] == pytest.approx(real["flops"]["step"], rel=0.10)


def test_serving_peak_and_cache_are_within_10_percent_of_real_passes():
    model = ref("llama")
    served = ServeWork(model, "bf16", QuantSpec(),
                       (ServePass("score", 2, 96, 0, "all"), ServePass("gen", 4, 64, 32, "last")))
    simulated = sim.simulate(served, use_cache=False)
    real = sim.serve_account(served, 4, None, fake=False)
    for name in ("score", "gen"):
        assert simulated.phases[name]["total"] == pytest.approx(
            real["phases"][name]["total"], rel=0.10)
        assert simulated.kv_cache[name] == real["kv_cache"][name]
    # K and V of 4 layers, 2 KV heads of 16, every position, bf16
    assert real["kv_cache"]["gen"] == 2 * 4 * 4 * 2 * 64 * 16 * 2


def test_ranks_share_what_the_strategy_splits():
    """FSDP over 4 fake ranks holds a quarter of the parameter, gradient and optimiser bytes
    (each rank its shards); DDP holds everything plus its gradient buckets."""
    model = ref("gqa")
    one = sim.simulate(work(model), use_cache=False)
    fsdp = sim.simulate(work(model, strategy="fsdp", world=4), use_cache=False)
    ddp_work = work(model, strategy="ddp", world=4)
    ddp = sim.simulate(ddp_work, use_cache=False)
    for part in ("params", "grads", "optimizer"):
        assert fsdp.static[part] == pytest.approx(one.static[part] / 4, rel=0.05)
    peak = rank_peak(ddp, ddp_work)
    assert peak.parts["ddp_buckets"] == ddp.static["grads"] == one.static["grads"]


def test_a_job_that_does_not_fit_is_refused_with_what_would_fit():
    """The refusal names the job, its peak by part and the device, and offers config keys
    that were checked to fit."""
    from effllm.plan.check import fit_job, refusal, remedies
    from effllm.specs import FinetuneSpec

    spec = FinetuneSpec.from_json({
        "run_id": "finetune/full-big-s0", "stage": "finetune", "technique": "full",
        "label": "Full", "size": "big", "seed": 0, "group": "big", "upstream": "hub/big",
        "settings": {"method": {"name": "full"}, "dataset": "d",
                     "train": {"epochs": 1, "batch_size": 8, "lr": 1e-4, "warmup_ratio": 0.1,
                               "max_samples": 64, "max_length": 256, "eval_problems": 4,
                               "max_new_tokens": 8},
                     "measure": {"sample_interval_s": 0.05, "warmup_steps": 1,
                                 "peak_flops": None, "threads": 1}}})
    model = ModelRef("big", config={**LLAMA, "hidden_size": 512, "intermediate_size": 1024,
                                    "num_attention_heads": 8, "num_key_value_heads": 8})
    job = fit_job(spec, model, 1, use_cache=False)
    device = job.peak.total / GB * 0.6  # a device this job overflows on one GPU
    fixes = remedies(spec, model, 1, device)
    text = refusal(job, round(device, 3), "resources.finetune.gpu_memory_gb", fixes)
    assert "finetune/full-big-s0" in text and "does not fit" in text
    assert "weights" in text and "optimizer" in text and "resources.finetune.gpu_memory_gb" in text
    assert any(f.startswith("resources.finetune.gpus:") for f in fixes), fixes
    n = int(next(f for f in fixes if f.startswith("resources.finetune.gpus:")).split()[1])
    assert rank_peak(*_sim(spec, model, n)).total <= device * GB


def _sim(spec, model, gpus):
    from effllm.plan.grid import job_work

    w = job_work(spec, model, gpus)
    return sim.simulate(w, use_cache=False), w


def test_enforcement_costs_nothing_without_a_device_size(config):
    """No gpu_memory_gb: nothing is checked (and nothing imported: the DAG build stays light,
    tests/unit/test_outputs.py)."""
    from effllm.plan.check import enforced

    assert not enforced(config)
    config["resources"]["finetune"]["jobs"] = {"x*": {"gpu_memory_gb": 80}}
    assert enforced(config)


def test_per_job_resources_apply_in_order(config):
    from effllm.cluster import job_resources, stage_settings

    config["resources"]["finetune"].update(gpus=2, gpu_memory_gb=80, jobs={
        "full-*": {"gpus": 4}, "full-big*": {"gpu_memory_gb": 141, "gpu_model": "h200"}})
    assert stage_settings(config, "finetune", "lora-a-s0").gpus == 2
    big = stage_settings(config, "finetune", "full-big-s0")
    assert (big.gpus, big.gpu_memory_gb, big.gpu_model) == (4, 141, "h200")
    res = job_resources(config, "finetune", 2, environ={}, run="full-big-s0")
    assert res["gpu"] == 4 and res["gpu_memory_gb"] == 141


def test_per_job_resources_that_cannot_run_are_refused(config, schema):
    """Per-job overrides for data jobs (no run name to match) and one GPU for Full with CPU
    offload (part of ZeRO-3 on 2 or more) are config errors naming the key."""
    import copy

    from effllm.config import ConfigError, check_config

    data = copy.deepcopy(config)
    data["resources"]["data"]["jobs"] = {"*": {"mem_mb": 8000}}
    with pytest.raises(ConfigError, match="resources.data.jobs"):
        check_config(data, schema)
    config["finetune"]["full"] = {"offload": True}
    config["resources"]["finetune"].update(gpus=2, jobs={"full-*": {"gpus": 1}})
    with pytest.raises(ConfigError, match=r"resources.finetune.jobs.full-\*.gpus.*offload"):
        check_config(config, schema)


def test_workloads_share_shapes_not_seeds_or_sets(config):
    """Seeds, data sets and LoRA's variants that hold the same tensors make one workload."""
    from effllm.plan.grid import job_work
    from effllm.plan.workload import digest
    from effllm.sweep import expand_runs

    runs = expand_runs(config)["finetune"]
    model = ref("gqa")
    keys = {name: digest(job_work(run.spec, model, 2)) for name, run in runs.items()}
    lora = [k for name, k in keys.items() if name.startswith(("lora-", "rslora-"))]
    assert len(set(lora)) == 1
    assert len(set(keys.values())) < len(keys)


def test_a_job_refuses_itself_before_it_starts(stdlib_tokens, tmp_path):
    """A GPU job's first act (run_stage, before torchrun or any weight): its own plan against
    the device size; too small a device stops it with the refusal, nothing written."""
    import copy

    from effllm.launch import run_stage
    from effllm.plan.check import PlanRefusal
    from examples import SPEC

    spec = copy.deepcopy(SPEC)
    kwargs = dict(spec=spec, data_dir=str(stdlib_tokens), model_out=str(tmp_path / "model"),
                  record_out=str(tmp_path / "record.json"))
    with pytest.raises(PlanRefusal, match=r"job pretrain/gqa-tiny-s0 does not fit: .* GB over "
                                          r"the 0.0001 GB of each device"):
        run_stage("pretrain", 1, gpu_memory_gb=0.0001, **kwargs)
    assert not any(tmp_path.iterdir())


def test_freeze_shards_like_full_with_its_frozen_layers_in_bf16():
    """Freeze on several ranks runs ZeRO-3 as Full does (methods.SHARDED_METHODS): each of 4
    fake ranks holds a quarter of one process's bytes, frozen layers still in bf16 beside fp32
    trained ones (FSDP2 accepts mixed dtypes among frozen weights, one among trained ones)."""
    from types import SimpleNamespace

    from effllm.plan.grid import strategy

    assert [strategy(SimpleNamespace(method=METHODS[m]), 8) for m in METHODS] == [
        "fsdp", "ddp", "ddp", "fsdp", "ddp"]  # full, lora, dora, freeze, qlora
    model = ref("llama")
    one = sim.simulate(work(model, METHODS["freeze"], precision="bf16"), use_cache=False)
    fsdp = sim.simulate(work(model, METHODS["freeze"], precision="bf16", strategy="fsdp",
                             world=4), use_cache=False)
    full = sim.simulate(work(model, METHODS["full"], precision="bf16"), use_cache=False)
    assert one.static["params"] < full.static["params"]  # the frozen layer and embeddings: bf16
    for part in ("params", "grads", "optimizer"):
        assert fsdp.static[part] == pytest.approx(one.static[part] / 4, rel=0.05), part


def test_a_workload_keeps_its_key_after_its_model_is_built():
    """Building a hub model must not change its workload's key (transformers rewrites a Llama
    3 config's rope_scaling in place): the DAG check and the plan must find the same cached
    simulation whatever ran before in the process."""
    from effllm.plan.workload import digest

    config = {**LLAMA, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                                        "low_freq_factor": 1.0, "rope_type": "llama3",
                                        "original_max_position_embeddings": 8192}}
    w = work(ModelRef("llama3", config=config))
    before = digest(w)
    sim.model_config(w.model)
    with torch.device("meta"):
        sim.build(w.model, 2)
    assert digest(w) == before


@pytest.mark.parametrize("case", ["gqa", "freeze-fsdp", "lora", "qlora"])
def test_the_state_is_a_floor_under_the_simulated_peak(case):
    """The DAG check's cheap state (weights, gradients, optimiser state; no step) never exceeds
    the full simulation's peak, and equals its static bytes: a job it refuses cannot fit."""
    w = {"gqa": work(ref("gqa")),
         "freeze-fsdp": work(ref("llama"), METHODS["freeze"], precision="bf16",
                             strategy="fsdp", world=2),
         "lora": work(ref("llama"), METHODS["lora"], precision="bf16"),
         "qlora": work(ref("llama"), METHODS["qlora"], precision="bf16")}[case]
    floor = sim.state(w)  # cached under its own key; the simulation below is not
    full = sim.simulate(w, use_cache=False, flops=False)
    assert rank_peak(floor, w).total <= rank_peak(full, w).total
    assert floor.static == full.static


def test_auto_resources_apply_last_under_each_runs_name(config):
    """What `resources.<stage>.auto` chose becomes per-job resources that win over the
    config's own globs (and replace a same-named entry), read back by stage_settings."""
    from effllm.cluster import stage_settings
    from effllm.plan.check import auto_stages, with_auto_resources

    config["resources"]["finetune"].update(gpus=8, gpu_memory_gb=80, auto=True,
                                           jobs={"lora-*": {"gpus": 4}})
    assert auto_stages(config) == ["finetune"]
    with_auto_resources(config, {"finetune": {"lora-a-s0": {"gpus": 1, "mem_mb": 9000}}})
    assert list(config["resources"]["finetune"]["jobs"]) == ["lora-*", "lora-a-s0"]
    mine = stage_settings(config, "finetune", "lora-a-s0")
    assert (mine.gpus, mine.mem_mb) == (1, 9000)
    assert stage_settings(config, "finetune", "lora-b-s0").gpus == 4


def test_auto_needs_a_device_size(config, schema):
    from effllm.config import ConfigError, check_config

    config["resources"]["finetune"].update(gpus=2, auto=True)
    with pytest.raises(ConfigError, match="resources.finetune.auto"):
        check_config(config, schema)
