"""The tensor account (effllm.measure.tensors): memory of the technique, checked against the
tensors themselves, and the memory options it judges (gradient checkpointing, micro-batches)."""

import copy
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from effllm.measure.tensors import track, weight_bytes
from effllm.models import DecoderConfig, DecoderForCausalLM

VOCAB = 256


def decoder(kv: int = 4, layers: int = 2, hidden: int = 64) -> DecoderForCausalLM:
    torch.manual_seed(0)
    return DecoderForCausalLM(DecoderConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv, intermediate_size=2 * hidden, max_position_embeddings=128))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_step(model, opt, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def tracked_step(fake: bool):
    """The account of a training step (the second: optimiser state exists), real or fake."""
    with FakeTensorMode() if fake else torch.device("cpu"):
        model = decoder()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, VOCAB, (4, 64))
        one_step(model, opt, ids)
        with track(model, opt) as t:
            one_step(model, opt, ids)
    return model, t.account


def test_training_step_parts_are_the_tensors_bytes():
    model, account = tracked_step(fake=False)
    params = nbytes(model.parameters())
    assert account.at_peak["params"] == params
    assert account.part_peaks["grads"] == params  # every parameter trains, fp32
    # AdamW: two moments per parameter (plus the step counts), booked as optimiser state
    assert account.part_peaks["optimizer"] >= 2 * params
    assert account.activation_peak > 0
    assert account.peak >= params + 2 * params
    assert 0 < account.mean <= account.peak
    metrics = account.metrics("a step")
    assert metrics["memory_weights"].value == pytest.approx(params / 1e9)
    assert all(m.status == "measured" and m.method == "tensor_account" for m in metrics.values())


def test_fake_tensors_give_the_real_account():
    """The plan simulates on fake tensors: every part equals the real run's, byte for byte."""
    _, real = tracked_step(fake=False)
    _, fake = tracked_step(fake=True)
    assert fake.peak == real.peak
    assert fake.at_peak == real.at_peak and fake.part_peaks == real.part_peaks
    assert fake.activation_peak == real.activation_peak


def test_adapters_book_only_their_own_gradients_and_state():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(decoder(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, VOCAB, (2, 32))
    one_step(model, opt, ids)
    with track(model, opt) as t:
        one_step(model, opt, ids)
    account = t.account
    assert account.part_peaks["grads"] == nbytes(trainable)
    assert 2 * nbytes(trainable) <= account.part_peaks["optimizer"] < nbytes(model.parameters())
    assert account.at_peak["params"] == nbytes(model.parameters())


@pytest.mark.parametrize("option", ["gradient_checkpointing", "micro_batch_size"])
def test_memory_options_keep_the_gradient_and_cut_activations(option):
    """Checkpointing and micro-batches change memory, not the step: the same gradient (up to
    float rounding) with a smaller activation peak."""
    from effllm.training.loop import _accumulate, use_checkpointing

    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    predicted = (ids[:, 1:] != -100).sum().double()
    results = []
    for on in (False, True):
        model = decoder(layers=4).train()
        micro = None
        if on and option == "gradient_checkpointing":
            use_checkpointing(model, type("T", (), {"gradient_checkpointing": True})())
        elif on:
            micro = 1
        with track(model) as t:
            _accumulate(model, batch, micro, predicted, predicted, "fp32", "cpu")
        results.append(([p.grad.clone() for p in model.parameters()], t.account))
    (plain, plain_acc), (opt, opt_acc) = results
    for a, b in zip(plain, opt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert opt_acc.activation_peak < 0.6 * plain_acc.activation_peak


@pytest.mark.parametrize("kvs", [(4, 2, 1)])
def test_kv_cache_part_orders_mha_gqa_mqa(kvs):
    """The decoding state booked by a generate(): MHA > GQA > MQA, each the formula's bytes."""
    from effllm.measure.cache import tensor_bytes

    prompt, new = 24, 8
    seen = []
    for kv in kvs:
        model = decoder(kv=kv).eval()
        ids = torch.randint(0, VOCAB, (2, prompt))
        with torch.no_grad(), track(model) as t:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
        kv_bytes = tensor_bytes(out.past_key_values)
        head_dim = 64 // 4
        # K and V, 2 layers, the batch, every position but the last token's, fp32
        assert kv_bytes == 2 * 2 * 2 * kv * (prompt + new - 1) * head_dim * 4
        assert t.account.activation_peak >= kv_bytes
        seen.append(kv_bytes)
    assert seen[0] > seen[1] > seen[2]


def test_int4_weights_hold_less_than_bf16_in_the_account(tmp_path):
    """What a served model holds, from its tensors plus bitsandbytes' state: int4 < bf16."""
    from effllm.inference.run import load_model
    from effllm.measure.tensors import quant_state_bytes
    from effllm.specs import QuantSpec

    model = decoder(kv=4, hidden=128)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 16))
    weights = {}
    for precision, quant in (("bf16", QuantSpec()),
                             ("int4", QuantSpec("nf4", compute_dtype="bf16"))):
        served, _ = load_model(tmp_path, precision, quant)
        with torch.no_grad():
            served(input_ids=ids)  # bitsandbytes repacks on CPU at the first forward
            with track(served, extra_bytes=quant_state_bytes(served)) as t:
                served(input_ids=ids)
        parts = t.account.at_peak
        weights[precision] = parts["params"] + parts["buffers"] + parts["quant_state"]
        assert weights[precision] == weight_bytes(served)  # booked = held, state included
    assert weights["int4"] < 0.7 * weights["bf16"]


def test_a_training_record_reports_the_tensor_account(stdlib_tokens, tmp_path):
    """On a CPU, AMU and peak come from the tensors (RSS beside them, labelled), the parts are
    recorded, and the tracked step is left out of the timing."""
    from effllm.training.pretrain import run_pretrain
    from examples import SPEC

    spec = copy.deepcopy(SPEC)
    spec["settings"]["train"].update(steps=6, checkpoint_every=0)
    spec["settings"]["measure"]["warmup_steps"] = 0
    record = run_pretrain(spec, stdlib_tokens, tmp_path / "model", tmp_path / "record.json")
    metrics = json.loads((tmp_path / "record.json").read_text())["metrics"]
    assert metrics["amu"]["method"] == "tensor_account_time_weighted"
    assert metrics["memory_peak"]["method"] == "tensor_account_peak"
    assert metrics["amu_rss"]["status"] == "measured"
    assert metrics["memory_peak"]["value"] < metrics["memory_peak_rss"]["value"]
    params = record.metrics["params_total"].value * 4 / 1e9
    assert metrics["memory_weights"]["value"] == pytest.approx(params, rel=0.01)
    assert metrics["memory_optimizer"]["value"] >= 2 * params * 0.99
    # no warm-up asked, but the tracked step (the second) runs slower: 5 of 6 timed
    assert "5 timed steps" in metrics["al"]["note"]


@pytest.mark.parametrize("technique", ["gqa", "mla", "nsa", "moe-8x-third", "mamba", "rwkv",
                                       "pythia"])
def test_gradient_checkpointing_in_every_family(config, stdlib_tokens, technique):
    """pretrain.gradient_checkpointing works for every trainable family: the same gradients,
    fewer activation bytes."""
    import dataclasses

    from effllm.data.tokenizer import load_tokenizer
    from effllm.sweep import expand_runs
    from effllm.training.loop import use_checkpointing
    from effllm.training.pretrain import build_model

    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    run = next(r for r in expand_runs(config)["pretrain"].values() if r.technique == technique)
    shape = dataclasses.replace(run.spec.model, num_hidden_layers=3)
    ids = torch.randint(3, len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(0))
    grads, peaks = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_model(shape, tokenizer).train()
        use_checkpointing(model, type("T", (), {"gradient_checkpointing": on})())
        with track(model) as t:
            model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
        peaks.append(t.account.activation_peak)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert peaks[1] < peaks[0]


def test_records_say_which_implementation_ran_the_recurrence(monkeypatch):
    """Mamba and RWKV name their recurrence's implementation; the reference loop says that its
    latency and memory are the loop's (the CUDA path is the GPU suite's to run)."""
    from effllm.models import baselines

    kwargs = dict(vocab_size=64, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64, num_key_value_heads=4)
    mamba = baselines.build_baseline("mamba", shape, **kwargs)
    rwkv = baselines.build_baseline("rwkv", shape, **kwargs)
    for model in (mamba, rwkv):
        note = baselines.sequence_kernel(model, "cpu")["sequence_kernel"]
        assert note.startswith("reference implementation") and "not on a GPU" in note
    assert baselines.sequence_kernel(decoder(), "cuda:0") == {}
    monkeypatch.setattr(baselines, "MAMBA_KERNELS", True)
    assert "CUDA" in baselines.sequence_kernel(mamba, "cuda:0")["sequence_kernel"]
    called = []
    monkeypatch.setattr(baselines, "UPSTREAM_MAMBA_SCAN", lambda *a, **k: called.append(1))
    x = torch.zeros(1, 4, 3)  # on the CPU the reference scan runs, kernels or not
    baselines._mamba_selective_scan(x, x, torch.zeros(4, 2), torch.zeros(1, 2, 3),
                                    torch.zeros(1, 2, 3))
    assert not called
