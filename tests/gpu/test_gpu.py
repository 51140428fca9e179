"""What only a GPU can show, at tiny sizes, in minutes on one device (``pytest -m gpu``).

Each stage runs on CUDA as a job would (``run_stage`` with one GPU): pretraining of every
family with and without gradient checkpointing, ZeRO-3 (FSDP2) on one rank, every fine-tuning
method including QLoRA's 4-bit base, inference at every precision. Beside them: NVML reads
exactly the job's device, blocked scoring equals full logits on the device, and the tensor
account (what the plan simulates) is within 10 % of the CUDA allocator's peak.
"""

import copy
import dataclasses
import json
import os

import pytest
import torch

from effllm.launch import run_stage
from effllm.measure.tensors import track
from examples import SPEC
from test_distributed import LORA, finetune_inputs, finetune_spec  # noqa: F401 - fixture

DEVICE = "cuda:0"


def record(path) -> dict:
    return json.loads(path.read_text())


def smallest_runs(config) -> dict:
    from effllm.sweep import expand_runs

    order = list(config["sizes"])
    runs = {}
    for run in expand_runs(config)["pretrain"].values():
        if run.technique not in runs or order.index(run.size) < order.index(
                runs[run.technique].size):
            runs[run.technique] = run
    return runs


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("technique", ["mha", "mqa", "gqa", "mla", "nsa", "moe-8x-third",
                                       "mamba", "rwkv", "pythia"])
def test_pretraining_every_family_on_cuda(config, stdlib_tokens, tmp_path, technique,
                                          checkpointing):
    run = smallest_runs(config)[technique]
    spec = copy.deepcopy(SPEC)
    spec["technique"] = technique
    spec["settings"]["model"] = {**run.spec.model.to_json(), "num_hidden_layers": 2}
    spec["settings"]["train"].update(steps=6, checkpoint_every=0, precision="bf16",
                                     gradient_checkpointing=checkpointing)
    out = tmp_path / "run"
    run_stage("pretrain", 1, spec=spec, data_dir=str(stdlib_tokens),
              model_out=str(out / "model"), record_out=str(out / "record.json"))
    rec = record(out / "record.json")
    execution, metrics = rec["provenance"]["execution"], rec["metrics"]
    assert execution["device"] == DEVICE
    if technique in ("mamba", "rwkv"):
        assert "sequence_kernel" in execution  # which implementation ran, said
    assert metrics["amu"]["method"] == "nvml_used_poll"
    assert metrics["memory_torch_allocated_peak"]["status"] == "measured"
    # the tensor account of one step sits below what the allocator peaked at over the run
    assert (metrics["memory_tensor_peak"]["value"]
            <= 1.1 * metrics["memory_torch_allocated_peak"]["value"])
    assert all(v == v for v in rec["series"]["train_loss"])  # finite


def test_zero3_on_one_rank_trains_like_a_plain_model():
    """FSDP2 on a one-rank NCCL group: the sharding path itself, on the device."""
    import torch.distributed as dist

    from effllm.models import DecoderConfig, DecoderForCausalLM
    from effllm.training.sharding import full_state, shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        losses = []
        for sharded in (False, True):
            torch.manual_seed(0)
            model = DecoderForCausalLM(DecoderConfig(
                vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64)).to(DEVICE)
            if sharded:
                shard(model, DEVICE, "bf16")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            ids = torch.randint(0, 128, (4, 32), device=DEVICE,
                                generator=torch.Generator(DEVICE).manual_seed(0))
            run = []
            for _ in range(3):
                with torch.autocast("cuda", torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                run.append(loss.item())
            losses.append(run)
        assert losses[1] == pytest.approx(losses[0], rel=2e-2)
        assert set(full_state(model)[0])  # the shards gather to a whole state
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", [
    {"name": "full"}, {"name": "freeze", "layers": 1}, LORA,
    {**LORA, "name": "lora_plus", "lr_ratio": 16}, {**LORA, "name": "rslora"},
    {**LORA, "name": "dora"}, {**LORA, "name": "pissa", "init": "fast", "niter": 4},
    {**LORA, "quantized_base": {"quant_type": "nf4", "double_quant": True,
                                "compute_dtype": "bf16"}},
], ids=["full", "freeze", "lora", "lora_plus", "rslora", "dora", "pissa", "qlora"])
def test_fine_tuning_every_method_on_cuda(finetune_inputs, tmp_path, method):  # noqa: F811
    base, reasoning = finetune_inputs
    spec = finetune_spec(method)
    spec["settings"]["train"]["precision"] = "bf16"
    out = tmp_path / "run"
    run_stage("finetune", 1, spec=spec, base_dir=str(base), reasoning_dir=str(reasoning),
              model_out=str(out / "model"), record_out=str(out / "record.json"))
    rec = record(out / "record.json")
    assert rec["provenance"]["execution"]["device"] == DEVICE
    assert rec["metrics"]["memory_torch_allocated_peak"]["status"] == "measured"
    losses = rec["series"]["train_loss"]
    assert losses[-1] < losses[0]


def inference_spec(precision: str) -> dict:
    quant = ({"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
             if precision == "int4" else {})
    return {"run_id": f"inference/{precision}-t-s0", "stage": "inference",
            "technique": precision, "label": precision, "size": "tiny", "seed": 0,
            "group": "t", "upstream": "pretrain/t",
            "settings": {"precision": precision, "bits": {"int8": 8, "int4": 4}.get(precision, 16),
                         "quant": quant, "dataset": "arithmetic", "harness": None,
                         "eval": {"batch_size": 2, "prompt_tokens": 16, "new_tokens": 8,
                                  "warmup_runs": 1, "min_runs": 3, "min_seconds": 0.0,
                                  "eval_problems": 4, "eval_max_new_tokens": 40,
                                  "eval_max_length": 64, "ppl_tokens": 256},
                         "measure": {"sample_interval_s": 0.05, "warmup_steps": 2,
                                     "peak_flops": None, "threads": 1}}}


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8", "int4"])
def test_inference_every_precision_on_cuda(finetune_inputs, stdlib_tokens, tmp_path,  # noqa: F811
                                           precision):
    base, reasoning = finetune_inputs
    out = tmp_path / precision
    run_stage("inference", 1, spec=inference_spec(precision), model_dir=str(base),
              corpus_dir=str(stdlib_tokens.parent / "corpus"), reasoning_dir=str(reasoning),
              record_out=str(out / "record.json"))
    rec = record(out / "record.json")
    metrics = rec["metrics"]
    assert rec["provenance"]["execution"]["device"] == DEVICE
    assert metrics["memory_kv_cache"]["value"] > 0
    assert metrics["decode_latency"]["status"] == "measured"


@pytest.mark.parametrize("technique", [
    {"weights": {"method": "hqq", "bits": 4, "group_size": 64}},
    {"weights": {"method": "torchao", "bits": 4, "group_size": 64}},  # CUDA only
    {"weights": {"method": "torchao", "bits": 8}},
    {"kv_cache": {"backend": "fp8"}},
    {"kv_cache": {"backend": "hqq", "bits": 4, "group_size": 32, "residual": 8}},
    {"speculative": {"draft": "pretrain/t", "tokens": 3}},
    {"speculative": {"lookup": 3}}],
    ids=["hqq4", "ao-int4", "ao-int8", "kv-fp8", "kv-hqq4", "draft", "lookup"])
def test_inference_techniques_on_cuda(finetune_inputs, stdlib_tokens, tmp_path,  # noqa: F811
                                      technique):
    """The techniques block's variants (issue 22) as jobs on the device: the weight-only
    quantisers' layers, the quantised caches and speculative decoding (the model drafting for
    itself: every draft token accepted) run there and record what they change."""
    base, reasoning = finetune_inputs
    spec = inference_spec("bf16")
    spec["settings"]["eval"]["batch_size"] = 1  # speculative decoding: one sequence
    spec["settings"].update(copy.deepcopy(technique))
    if "weights" in technique:
        spec["settings"]["bits"] = technique["weights"]["bits"]
    out = tmp_path / "record.json"
    run_stage("inference", 1, spec=spec, model_dir=str(base),
              corpus_dir=str(stdlib_tokens.parent / "corpus"), reasoning_dir=str(reasoning),
              record_out=str(out), draft_dir=str(base) if "speculative" in technique else None)
    rec = record(out)
    metrics = rec["metrics"]
    assert rec["provenance"]["execution"]["device"] == DEVICE
    assert metrics["kv_perplexity"]["status"] == "measured"
    if "weights" in technique:
        assert metrics["quantize_seconds"]["status"] == "measured"
    if (technique.get("speculative") or {}).get("draft"):
        assert metrics["draft_acceptance"]["value"] > 0.9  # the model agrees with itself
        assert metrics["identical_output"]["value"] == 1.0


def test_nvml_reads_exactly_the_jobs_device(monkeypatch):
    from effllm.measure import nvml

    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", index)
    nvml._devices.cache_clear()
    devices = nvml.job_devices()
    assert len(devices.handles) == 1, devices.reason
    import pynvml

    uuid = pynvml.nvmlDeviceGetUUID(devices.handles[0])
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    assert uuid.removeprefix("GPU-") == str(torch.cuda.get_device_properties(0).uuid)
    before = nvml.memory_used(devices.handles[0])
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    torch.cuda.synchronize()
    assert nvml.memory_used(devices.handles[0]) >= before + 200 * 2**20  # it sees this job
    del block


def test_blocked_scoring_equals_full_logits_on_cuda():
    import torch.nn.functional as F

    from effllm.evaluation.logprobs import token_scores
    from effllm.models import DecoderConfig, DecoderForCausalLM

    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(
        vocab_size=5000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128)).to(DEVICE).eval()
    ids = torch.randint(2, 5000, (4, 64), device=DEVICE)
    mask = torch.ones_like(ids)
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        nll, correct, count = token_scores(model, ids, mask, targets, rows=16, vocab=512)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    keep = targets != -100
    assert count == int(keep.sum())
    assert nll == pytest.approx(F.cross_entropy(logits[keep], targets[keep],
                                                reduction="sum").item(), rel=1e-4)
    assert correct == int((logits.argmax(-1)[keep] == targets[keep]).sum())


@pytest.mark.parametrize("technique", ["gqa", "mla", "moe-8x-third", "pythia"])
def test_tensor_account_is_within_10_percent_of_the_allocator(config, stdlib_tokens, technique):
    """What the plan simulates (the tensor account of a step) against the CUDA allocator's
    peak over the same step."""
    from effllm.data.tokenizer import load_tokenizer
    from effllm.training.pretrain import build_model

    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    shape = dataclasses.replace(smallest_runs(config)[technique].spec.model,
                                num_hidden_layers=2)
    torch.manual_seed(0)
    model = build_model(shape, tokenizer).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, len(tokenizer), (8, 256), device=DEVICE)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimiser state exists from here on
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with track(model, opt) as t:
        step()
    torch.cuda.synchronize()
    allocator = torch.cuda.max_memory_allocated()
    assert t.account.peak == pytest.approx(allocator, rel=0.10)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A saved fp32 base large enough (about 100 M parameters, 8 layers) that the CUDA
    libraries' workspaces are small beside it, and its tensors as stored."""
    from test_methods import saved_base

    return saved_base(tmp_path_factory.mktemp("wide"), vocab=2048, hidden=1024, heads=8,
                      intermediate=2816)


WORKSPACE = 64 * 2**20  # cuBLAS/cuSOLVER workspaces and allocator rounding, generously


@pytest.mark.parametrize("name", ["lora", "dora", "pissa", "freeze", "full"])
def test_loading_and_merging_on_cuda_hold_no_fp32_copy_of_the_model(wide_checkpoint, name):
    """A base read straight onto the device at bf16: the allocator peaks at the model as loaded
    (frozen weights bf16, trained ones fp32) plus a few fp32 copies of one tensor (PiSSA's SVD
    and DoRA's norms run there per layer); merging at bf16 peaks at the model plus a few fp32
    copies of one layer, never an fp32 copy of the model (``model.float()`` did, 96 GB at
    24B), and stores bf16."""
    from effllm.training import methods
    from test_methods import assert_loaded_for, loading_bound, wide_spec

    path, stored = wide_checkpoint
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model, _ = methods.load_base(path, wide_spec(name), "bf16", DEVICE)
    model, _ = methods.prepare(model, wide_spec(name), lr=1e-3, precision="bf16")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - start <= loading_bound(model, stored) + WORKSPACE
    assert_loaded_for(model, stored, name, "bf16")
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    plain = methods.merged(model, precision="bf16")
    torch.cuda.synchronize()
    largest = max(t.numel() * 4 for t in stored.values())
    assert torch.cuda.max_memory_allocated() - held <= 6 * largest + WORKSPACE
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cuda" for p in plain.parameters())


@pytest.mark.parametrize("family, method", [
    ("gqa", None), ("mla", None), ("moe", None), ("gpt_neox", None), ("llama", "lora"),
    ("llama", "dora"), ("llama", "freeze"), ("llama", "full")])
def test_the_plan_is_within_10_percent_of_the_allocator(family, method):
    """The GPU plan's per-GPU peak (fake tensors on the CPU, two depths extrapolated) against
    torch.cuda.max_memory_allocated over the same training step on the device (the second:
    optimiser state exists), bf16 mixed precision."""
    from effllm.plan import simulate as sim
    from effllm.training.loop import _accumulate
    from test_plan import METHODS, VOCAB, ref, work

    model_ref = ref(family)
    w = work(model_ref, METHODS.get(method), rows=4, seq_len=256, precision="bf16")
    planned = max(p["total"] for p in sim.simulate(w, use_cache=False).phases.values())
    torch.manual_seed(0)
    model, optimizer = sim.trainable_model(w, sim.depth(model_ref))
    model.to(DEVICE)
    ids = torch.randint(3, VOCAB, (w.rows, w.seq_len), device=DEVICE)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    predicted = (ids[:, 1:] != -100).sum().double()

    def step():
        _accumulate(model, batch, w.rows, predicted, predicted, "bf16", DEVICE)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    assert planned == pytest.approx(torch.cuda.max_memory_allocated(), rel=0.10)
