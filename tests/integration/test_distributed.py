"""Multi-GPU pretraining as it is launched inside a Slurm job: torchrun starts one rank per GPU
(here two CPU ranks on Gloo), each trains its slice of every batch, and the result equals one
process training the whole batch: the same losses, the same weights."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from effllm.distributed import ENV_ALLOW_CPU
from effllm.launch import run_stage
from examples import SPEC


@pytest.fixture(autouse=True)
def cpu_ranks(monkeypatch):
    """The ranks stand in for GPUs on this CPU machine: allow the job's 'GPUs' to be CPUs."""
    monkeypatch.setenv(ENV_ALLOW_CPU, "1")


def pretrain(tmp_path, name, nproc, tokens, spec):
    out = tmp_path / name
    run_stage("pretrain", nproc, spec=spec, data_dir=str(tokens), model_out=str(out / "model"),
              record_out=str(out / "record.json"), checkpoint_dir=str(out / "ckpt"))
    return json.loads((out / "record.json").read_text()), load_file(out / "model/model.safetensors")


def one_and_two_ranks(tmp_path, stage: str, **kwargs) -> dict:
    """Run a job of ``stage`` in one process, then on two ranks: the output folder of each."""
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = out = tmp_path / f"n{nproc}"
        run_stage(stage, nproc, model_out=str(out / "model"),
                  record_out=str(out / "record.json"), **kwargs)
    return outs


@pytest.mark.slow
def test_two_ranks_train_like_one_process(stdlib_tokens, tmp_path):
    spec = copy.deepcopy(SPEC)
    spec["settings"]["train"].update(steps=12, batch_size=4, checkpoint_every=0)
    one, one_weights = pretrain(tmp_path, "one", 1, stdlib_tokens, spec)
    two, two_weights = pretrain(tmp_path, "two", 2, stdlib_tokens, spec)

    assert one["provenance"]["execution"] == {"backend": "single-process", "world_size": 1,
                                              "device": "cpu", "device_name": None,
                                              "precision": "fp32"}
    assert two["provenance"]["execution"]["backend"] == "torchrun DDP (gloo)"
    assert two["provenance"]["execution"]["world_size"] == 2
    # Same losses step by step (the global batch's mean), not half a batch's.
    assert two["series"]["train_loss"] == pytest.approx(one["series"]["train_loss"], rel=1e-5)
    assert set(two_weights) == set(one_weights)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    # Throughput counts every rank's tokens: the whole batch of real tokens per step.
    tokens = spec["settings"]["train"]["batch_size"] * spec["settings"]["train"]["seq_len"]
    for record in (one, two):
        rate = record["metrics"]["tokens_per_s"]["value"]
        al = sum(record["series"]["step_seconds"][2:]) / len(record["series"]["step_seconds"][2:])
        assert rate == pytest.approx(tokens / al, rel=1e-6)
    assert one["metrics"]["perplexity"]["value"] == pytest.approx(
        two["metrics"]["perplexity"]["value"], rel=1e-3)


@pytest.mark.slow
def test_zero3_pretraining_trains_like_one_process(stdlib_tokens, tmp_path):
    """pretrain.sharding fsdp: two ranks holding half the weights, gradients and AdamW state
    each (micro-batches and gradient checkpointing on) train as one process does."""
    spec = copy.deepcopy(SPEC)
    spec["settings"]["train"].update(steps=8, batch_size=4, checkpoint_every=0)
    one, one_weights = pretrain(tmp_path, "one", 1, stdlib_tokens, spec)
    spec["settings"]["train"].update(sharding="fsdp", micro_batch_size=1,
                                     gradient_checkpointing=True)
    two, two_weights = pretrain(tmp_path, "two", 2, stdlib_tokens, spec)
    assert two["provenance"]["execution"]["backend"] == "torchrun FSDP full shard (ZeRO-3) (gloo)"
    assert two["series"]["train_loss"] == pytest.approx(one["series"]["train_loss"], rel=1e-4)
    assert set(two_weights) == set(one_weights)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-3, atol=1e-5, msg=name)


def _fsdp_checkpoint_rank(rank: int, folder: str, port: int) -> None:
    """One of two gloo ranks: train a sharded model two steps, checkpoint it, load the
    checkpoint into a differently initialised sharded model; rank 0 writes both states."""
    import os

    import torch.distributed as dist

    from effllm.models import DecoderConfig, DecoderForCausalLM
    from effllm.training.loop import Checkpoint, StepLog, cosine_schedule
    from effllm.training.sharding import full_state, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def build(seed):
        torch.manual_seed(seed)
        model = shard(DecoderForCausalLM(DecoderConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32)), "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, cosine_schedule(optimizer, 1, 10, 0.1)

    model, optimizer, scheduler = build(0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    log = StepLog()
    checkpoint = Checkpoint(folder, every=2, fingerprint="f")
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        log.losses.append(0.0)
        checkpoint.maybe_save(model, optimizer, scheduler, log, steps=10)
    saved = full_state(model, optimizer)
    fresh, fresh_optimizer, fresh_scheduler = build(1)
    resumed_log = checkpoint.load(fresh, fresh_optimizer, fresh_scheduler)
    loaded = full_state(fresh, fresh_optimizer)
    if rank == 0:
        torch.save({"saved": saved, "loaded": loaded, "starts": resumed_log.starts,
                    "lr": [fresh_scheduler.get_last_lr(), scheduler.get_last_lr()]},
                   f"{folder}/compare.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_checkpoint_round_trips(tmp_path):
    """A ZeRO-3 checkpoint gathers every rank's slices on rank 0 and loads back into each
    rank's slices: model and AdamW state equal the ones saved, and training continues at
    step 2."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_fsdp_checkpoint_rank, args=(str(tmp_path), port), nprocs=2, join=True)
    out = torch.load(tmp_path / "compare.pt", weights_only=False)
    (model, optim), (model2, optim2) = out["saved"], out["loaded"]
    assert set(model) == set(model2) and out["starts"] == [0, 2]
    for name in model:
        assert torch.equal(model[name], model2[name]), name
    moments = [(k, s) for k, s in optim["state"].items()]
    assert moments and all(torch.equal(s["exp_avg"], optim2["state"][k]["exp_avg"])
                           for k, s in moments)
    assert out["lr"][0] == out["lr"][1]


def test_batch_must_split_over_ranks(stdlib_tokens):
    from effllm.training.pretrain import window_batch

    with pytest.raises(ValueError, match="batch_size 6 does not split over 4 ranks"):
        window_batch([0] * 100, 6, 8, rank=0, world=4)
    import numpy as np

    tokens = np.arange(1000)
    full = window_batch(tokens, 4, 8)(np.random.default_rng(1))["input_ids"]
    halves = [window_batch(tokens, 4, 8, r, 2)(np.random.default_rng(1))["input_ids"]
              for r in (0, 1)]
    assert torch.equal(torch.cat([halves[0], halves[1]])[[0, 2, 1, 3]], full)


@pytest.fixture(scope="module")
def finetune_inputs(stdlib_tokens, tmp_path_factory):
    """A small pretrained-shaped base (our decoder and the stdlib tokenizer) and an arithmetic
    set, as the pipeline's upstream jobs leave them."""
    from effllm.data.reasoning import prepare_reasoning
    from effllm.data.tokenizer import load_tokenizer
    from effllm.models import DecoderConfig, DecoderForCausalLM

    root = tmp_path_factory.mktemp("finetune-inputs")
    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id))
    model.save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save_pretrained(root / "base")
    prepare_reasoning({"source": "arithmetic", "arithmetic": {
        "operations": ["add", "sub"], "min_digits": 1, "max_digits": 3, "n_train": 64,
        "n_validation": 9, "n_test": 5}}, 0, root / "reasoning")  # odd: shares padded
    return root / "base", root / "reasoning"


def finetune_spec(method: dict) -> dict:
    return {"run_id": f"finetune/{method['name']}-t-s0", "stage": "finetune",
            "technique": method["name"], "label": method["name"], "size": "tiny", "seed": 0,
            "group": "t", "upstream": "pretrain/t", "dataset": "arithmetic",
            "settings": {"method": method, "dataset": "arithmetic", "served": True,
                         "train": {"epochs": 1, "batch_size": 8, "lr": 2e-3, "warmup_ratio": 0.1,
                                   "max_samples": 64, "max_length": 64, "eval_problems": 4,
                                   "max_new_tokens": 40, "max_steps": 8},
                         "measure": {"sample_interval_s": 0.05, "warmup_steps": 2,
                                     "peak_flops": None, "threads": 1}}}


LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}


@pytest.mark.slow
@pytest.mark.parametrize("method, backend, precision", [
    ({"name": "full"}, "FSDP full shard (ZeRO-3)", "fp32"),
    ({"name": "full", "offload": True}, "FSDP full shard (ZeRO-3) + CPU offload", "fp32"),
    ({"name": "full"}, "FSDP full shard (ZeRO-3)", "bf16"),
    (LORA, "DDP", "fp32"),
    (LORA, "DDP", "bf16"),
    ({"name": "freeze", "layers": 1}, "FSDP full shard (ZeRO-3)", "fp32"),
    ({"name": "freeze", "layers": 1}, "FSDP full shard (ZeRO-3)", "bf16"),
    ({**LORA, "name": "dora"}, "DDP", "bf16"),
    ({**LORA, "name": "pissa", "init": "fast", "niter": 2}, "DDP", "bf16"),
], ids=["full", "full-offload", "full-bf16", "lora", "lora-bf16", "freeze", "freeze-bf16",
        "dora-bf16", "pissa-bf16"])
def test_two_ranks_fine_tune_like_one_process(finetune_inputs, tmp_path, method, backend,
                                              precision):
    """Full and Freeze shard parameters, gradients and optimiser state over the ranks (ZeRO-3,
    FSDP2; Full optionally offloaded to the CPU), Freeze's frozen layers in bf16 beside fp32
    trained ones at bf16; adapters run data-parallel. Padded batches split unevenly
    in completion tokens, so this also checks that each rank's loss is weighed by its share of
    the batch's tokens; the held-out sets are odd-sized, so the ranks' scoring shares are padded.
    """
    base, reasoning = finetune_inputs
    spec = finetune_spec(method)
    spec["settings"]["train"]["precision"] = precision
    loose = 10 if precision == "bf16" else 1  # bf16 rounds differently when the batch is split
    results = {nproc: (json.loads((out / "record.json").read_text()),
                       load_file(out / "model/model.safetensors"))
               for nproc, out in one_and_two_ranks(tmp_path, "finetune", spec=spec,
                                                   base_dir=str(base),
                                                   reasoning_dir=str(reasoning)).items()}
    (one, one_weights), (two, two_weights) = results[1], results[2]
    assert two["provenance"]["execution"]["backend"] == f"torchrun {backend} (gloo)"
    assert two["provenance"]["execution"]["world_size"] == 2
    assert one["provenance"]["execution"]["precision"].startswith(precision)
    assert two["series"]["train_loss"] == pytest.approx(one["series"]["train_loss"],
                                                        rel=1e-4 * loose)
    assert set(two_weights) == set(one_weights)
    changed = 0
    base_weights = load_file(base / "model.safetensors")
    for name, tensor in one_weights.items():
        start = base_weights[name].to(tensor.dtype)
        if precision == "bf16":
            # Sharded bf16 gathers bf16 weights (norms and embeddings included: a norm weight
            # near 1 moves in steps of 2^-7) where one process casts matmul inputs under
            # autocast: they differ by rounding, so compare the difference with how far the
            # weights moved from the base (a norm weight: 6 %), not element by element.
            moved = (tensor - start).norm()
            assert (two_weights[name] - tensor).norm() <= 0.15 * moved + 1e-6, name
        else:
            torch.testing.assert_close(two_weights[name], tensor, rtol=1e-3, atol=5e-5,
                                       msg=lambda m: f"{name}: {m}")
        changed += not torch.equal(tensor, start)
    assert changed > 0  # the runs trained
    for key in ("params_total", "params_trainable", "flops_per_token"):
        # DoRA renormalises each weight once per forward pass whatever the batch, and every
        # DDP rank does so for its half batch: per token, two ranks really count more FLOPs.
        rel = 2e-2 if key == "flops_per_token" and method["name"] == "dora" else 1e-6
        assert two["metrics"][key]["value"] == pytest.approx(one["metrics"][key]["value"],
                                                             rel=rel), key
    for key in ("val_loss", "completion_perplexity", "token_accuracy"):
        assert two["metrics"][key]["value"] == pytest.approx(one["metrics"][key]["value"],
                                                             rel=1e-3 * loose), key
    assert one["metrics"]["val_loss"]["note"] == two["metrics"]["val_loss"]["note"]  # tokens


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sharded_rank(rank, world, port, base, problems, expected):
    """One rank of test_sharded_model_loads_once_and_scores_like_one_process."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm.distributed import rank_share
    from effllm.evaluation.scoring import completion_scores, generate_answers
    from effllm.distributed import place
    from effllm.training import finetune, methods

    placement = place()
    from torch.distributed.fsdp import CPUOffloadPolicy

    policies = finetune.load_sharded(base, placement, offload=True, precision="bf16")
    group = policies._get_fsdp_state()._fsdp_param_group  # what FSDP2 was told, not our record
    assert isinstance(group.offload_policy, CPUOffloadPolicy)
    assert (group.mp_policy.param_dtype, group.mp_policy.reduce_dtype) == (torch.bfloat16,
                                                                           torch.float32)
    del policies
    if rank:  # reading the weights is rank 0's job alone
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} read the model's weights")

        methods.load_base = refuse
        AutoModelForCausalLM.from_pretrained = refuse
    model = finetune.load_sharded(base, placement, offload=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    scores = completion_scores(model, tokenizer, problems, 64, batch_size=2)
    assert scores["tokens"] == expected["scores"]["tokens"]
    assert scores["loss"] == pytest.approx(expected["scores"]["loss"], rel=1e-6)
    assert scores["token_accuracy"] == pytest.approx(expected["scores"]["token_accuracy"])
    share, counted = rank_share([p["prompt"] for p in problems])
    texts = generate_answers(model, tokenizer, share, 6, batch_size=2)
    assert texts[:counted] == expected["texts"][rank::world]
    # Exact match counts each problem once: a stand-in scorer that marks the first problem (the
    # ranks' padding) and every third one as hits gives the one-process rate.
    import effllm.data.reasoning as reasoning
    from effllm.evaluation.scoring import exact_match_rate

    reasoning.exact_match = lambda text, answer: answer in expected["hits"]
    rate, n = exact_match_rate(model, tokenizer, problems, 40, "finetune.max_new_tokens")
    assert (rate, n) == (len([p for p in problems if p["answer"] in expected["hits"]])
                         / len(problems), len(problems))
    whole = finetune.gathered(model, base, placement)
    if rank == 0:
        reference = AutoModelForCausalLM.from_pretrained(base).state_dict()
        state = whole.state_dict()
        assert set(state) == set(reference)
        for name, tensor in reference.items():
            assert torch.equal(state[name], tensor), name
        assert whole.lm_head.weight is whole.model.embed_tokens.weight
    else:
        assert whole is None
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sharded_model_loads_once_and_scores_like_one_process(finetune_inputs, stdlib_tokens,
                                                              tmp_path):
    """ZeRO-3 loading: only rank 0 reads the weights, the others build on the meta device and
    receive them by broadcast (a Llama here: its rotary buffers must survive). The sharded,
    CPU-offloaded model computes the eager model's logits, and the ranks' padded shares of an
    odd-sized set score and generate exactly what one process does."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from effllm.data.splits import read_split
    from effllm.data.tokenizer import load_tokenizer
    from effllm.evaluation.scoring import completion_scores, generate_answers
    from hubcache import llama

    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    llama(len(tokenizer), tokenizer).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    problems = read_split(finetune_inputs[1], "validation")  # 9: shares of 5 and 4 (+1 pad)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {"ids": ids, "logits": model(input_ids=ids).logits,
                    "scores": completion_scores(model, tokenizer, problems, 64, batch_size=2),
                    "texts": generate_answers(model, tokenizer, [p["prompt"] for p in problems],
                                              6, batch_size=2),
                    "hits": {p["answer"] for p in problems[::3]}}
    mp.spawn(_sharded_rank, args=(2, _free_port(), str(tmp_path), problems, expected), nprocs=2)


def _loading_rank(rank, world, port, base, stored):
    """One rank of test_every_method_loads_once_per_node."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from transformers import AutoModelForCausalLM

    from effllm.distributed import place
    from effllm.measure.tensors import track
    from effllm.training import loading, methods
    from test_methods import METHODS, assert_loaded_for, loading_bound, wide_spec

    place()
    if rank:  # reading the checkpoint is rank 0's job alone
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} read the model's weights")

        loading.read_tensors = refuse
        AutoModelForCausalLM.from_pretrained = refuse
    for name in METHODS:
        torch.manual_seed(0)  # as run_job seeds every rank
        with track(device="cpu") as tracked:
            model, _ = methods.load_base(base, wide_spec(name), "bf16")
            model, _ = methods.prepare(model, wide_spec(name), lr=1e-3, precision="bf16")
        assert tracked.account.peak <= loading_bound(model, stored), name
        assert_loaded_for(model, stored, name, "bf16")
        # the ranks start from the same model, adapters included (PiSSA's SVD, DoRA's norms)
        for key, p in model.state_dict().items():
            first = p.clone()
            torch.distributed.broadcast(first, src=0)
            assert torch.equal(first, p), (name, key)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_method_loads_once_per_node(tmp_path):
    """Under torchrun every method's base is read by rank 0 alone, tensor by tensor, and
    broadcast: rank 1 never opens the checkpoint, and on both ranks the tensors made while
    loading and preparing peak at the model as loaded plus a few fp32 copies of one tensor
    (no host copy of the checkpoint per rank, no fp32 copy of a frozen weight), every frozen
    weight the checkpoint's bf16 cast and every trained one its fp32."""
    import torch.multiprocessing as mp

    from test_methods import saved_base

    _, stored = saved_base(tmp_path)
    mp.spawn(_loading_rank, args=(2, _free_port(), str(tmp_path), stored), nprocs=2)


def _freeze_sharded_rank(rank, world, port, base, stored):
    """One rank of test_sharded_freeze_keeps_each_weight_in_its_dtype."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from effllm.distributed import place
    from effllm.specs import MethodSpec
    from effllm.training import finetune, methods

    placement = place()
    method = MethodSpec("freeze", layers=1)
    model = finetune.load_sharded(base, placement, precision="bf16", method=method)
    model, _ = methods.prepare(model, method, lr=1e-3, precision="bf16")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(list(model.parameters()))
    for name, p in model.named_parameters():
        local = p.to_local()  # this rank's shard, in the dtype FSDP2 keeps
        if name in frozen:
            assert local.dtype == torch.bfloat16, name
            # the checkpoint's weight cast once to bf16, this rank's rows of it
            whole = stored[name].to(torch.bfloat16)
            rows = whole.chunk(world)[rank] if whole.dim() else whole
            assert torch.equal(local, rows[: local.shape[0]]), name
        else:
            assert local.dtype == torch.float32, name
    assert all(name.startswith(("model.layers.0.", "model.embed_tokens", "lm_head"))
               for name in frozen), sorted(frozen)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sharded_freeze_keeps_each_weight_in_its_dtype(finetune_inputs):
    """Freeze on two ranks (ZeRO-3): each rank's shards of the frozen layer and embeddings are
    the checkpoint's weights cast once to bf16, the trained layers' shards fp32 (FSDP2 takes one
    dtype among a unit's trained weights only), as methods.load_base gives one process."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    base, _ = finetune_inputs
    stored = load_file(base / "model.safetensors")
    mp.spawn(_freeze_sharded_rank, args=(2, _free_port(), str(base), stored), nprocs=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["continuous", "oneshot"])
def test_two_ranks_prune_like_one_process(stdlib_tokens, tmp_path, mode):
    """A pruning route on two ranks picks the masks one process picks (one-shot gradients are
    averaged over the ranks before the saliency's absolute value; compensation sums the ranks'
    Gram matrices) and trains the same small model."""
    from effllm.data.tokenizer import load_tokenizer, save_tokenizer
    from effllm.specs import ModelShape
    from effllm.training.pretrain import build_model

    torch.manual_seed(0)
    source = tmp_path / "source"
    build_model(ModelShape.from_json(SPEC["settings"]["model"]),
                load_tokenizer(stdlib_tokens / "tokenizer")).save_pretrained(
        source, safe_serialization=True)
    save_tokenizer(load_tokenizer(stdlib_tokens / "tokenizer"), source)
    spec = copy.deepcopy(SPEC)
    spec.update(run_id=f"pretrain/{mode}-x-s0", technique="pruning_aware", label="x", size="x",
                group="pruning-x", upstream="pretrain/gqa-tiny-s0")
    spec["settings"]["train"].update(steps=10, batch_size=4, checkpoint_every=0,
                                     eval_tokens=256)
    spec["settings"]["pruning"] = {"mode": mode, "compensation": True, "every": 2,
                                   "prune_steps": 4 if mode == "continuous" else 0,
                                   "groups": ["heads", "ffn", "hidden"], "saliency": "taylor",
                                   "calib_batches": 2, "damp": 0.01, "target_params": 24_000}
    one, two = (json.loads((out / "record.json").read_text()) for out in one_and_two_ranks(
        tmp_path, "prune_pretrain", spec=spec, data_dir=str(stdlib_tokens),
        source_dir=str(source)).values())
    assert two["provenance"]["execution"]["world_size"] == 2
    for key in ("prune_params", "prune_heads", "prune_ffn_channels", "prune_hidden",
                "layer_heads", "layer_kv_heads", "layer_ffn"):
        assert two["series"][key] == one["series"][key], key
    assert two["series"]["train_loss"] == pytest.approx(one["series"]["train_loss"], rel=1e-4)
