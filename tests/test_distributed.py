"""Multi-GPU pretraining as it is launched inside a Slurm job: torchrun starts one rank per GPU
(here two CPU ranks on Gloo), each trains its slice of every batch, and the result equals one
process training the whole batch: the same losses, the same weights."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from effllm.launch import ENV_ALLOW_CPU, run_stage
from test_resume import SPEC


@pytest.fixture(autouse=True)
def cpu_ranks(monkeypatch):
    """The ranks stand in for GPUs on this CPU machine: allow the job's 'GPUs' to be CPUs."""
    monkeypatch.setenv(ENV_ALLOW_CPU, "1")


def pretrain(tmp_path, name, nproc, tokens, spec):
    out = tmp_path / name
    run_stage("pretrain", nproc, spec=spec, data_dir=str(tokens), model_out=str(out / "model"),
              record_out=str(out / "record.json"), checkpoint_dir=str(out / "ckpt"))
    return json.loads((out / "record.json").read_text()), load_file(out / "model/model.safetensors")


@pytest.mark.slow
def test_two_ranks_train_like_one_process(stdlib_tokens, tmp_path):
    spec = copy.deepcopy(SPEC)
    spec["settings"]["train"].update(steps=12, batch_size=4, checkpoint_every=0)
    one, one_weights = pretrain(tmp_path, "one", 1, stdlib_tokens, spec)
    two, two_weights = pretrain(tmp_path, "two", 2, stdlib_tokens, spec)

    assert one["provenance"]["execution"] == {"backend": "single-process", "world_size": 1,
                                              "device": "cpu", "device_name": None}
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
        "n_validation": 8, "n_test": 4}}, 0, root / "reasoning")
    return root / "base", root / "reasoning"


def finetune_spec(method: dict) -> dict:
    return {"run_id": f"finetune/{method['name']}-t-s0", "stage": "finetune",
            "technique": method["name"], "label": method["name"], "size": "tiny", "seed": 0,
            "group": "t", "upstream": "pretrain/t", "dataset": "arithmetic",
            "settings": {"method": method, "dataset": "arithmetic",
                         "train": {"epochs": 1, "batch_size": 8, "lr": 2e-3, "warmup_ratio": 0.1,
                                   "max_samples": 64, "max_length": 64, "eval_problems": 4,
                                   "max_new_tokens": 40, "max_steps": 8},
                         "measure": {"sample_interval_s": 0.05, "warmup_steps": 2,
                                     "peak_flops": None, "threads": 1}}}


LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}


@pytest.mark.slow
@pytest.mark.parametrize("method, backend", [({"name": "full"}, "FSDP full shard (ZeRO-3)"),
                                             (LORA, "DDP")])
def test_two_ranks_fine_tune_like_one_process(finetune_inputs, tmp_path, method, backend):
    """Full shards parameters, gradients and optimiser state over the ranks (ZeRO-3, FSDP2);
    adapters run data-parallel. Padded batches split unevenly in completion tokens, so this also
    checks that each rank's loss is weighed by its share of the batch's tokens."""
    base, reasoning = finetune_inputs
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        run_stage("finetune", nproc, spec=finetune_spec(method), base_dir=str(base),
                  reasoning_dir=str(reasoning), model_out=str(out / "model"),
                  record_out=str(out / "record.json"))
        results[nproc] = (json.loads((out / "record.json").read_text()),
                          load_file(out / "model/model.safetensors"))
    (one, one_weights), (two, two_weights) = results[1], results[2]
    assert two["provenance"]["execution"]["backend"] == f"torchrun {backend} (gloo)"
    assert two["provenance"]["execution"]["world_size"] == 2
    assert two["series"]["train_loss"] == pytest.approx(one["series"]["train_loss"], rel=1e-4)
    assert set(two_weights) == set(one_weights)
    changed = 0
    base_weights = load_file(base / "model.safetensors")
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
        changed += not torch.equal(tensor, base_weights[name])
    assert changed > 0  # the runs trained
    for key in ("params_total", "params_trainable", "flops_per_token"):
        assert two["metrics"][key]["value"] == pytest.approx(one["metrics"][key]["value"]), key
    assert two["metrics"]["val_loss"]["value"] == pytest.approx(one["metrics"]["val_loss"]["value"],
                                                                rel=1e-3)
