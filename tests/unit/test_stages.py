"""Training and inference maths: step metrics, perplexity, completion scoring, KV-cache bytes,
fixed-length decoding timing, quantised loading, and exact-match budgets."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from effllm.data.tokenizer import load_tokenizer
from effllm.evaluation.scoring import completion_scores, exact_match_rate, reasoning_metrics
from effllm.measure import Window
from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.training.loop import StepLog, step_metrics
from effllm.measure.cache import cache_bytes_per_token
from effllm.evaluation.perplexity import perplexity
from effllm.specs import QuantSpec

PROBLEMS = [
    {"prompt": "Q: 12+7=?\nA:", "completion": " 2+7=9; 1+0=1\n#### 19", "answer": "19"},
    {"prompt": "Q: 5+5=?\nA:", "completion": " 5+5=10\n#### 10", "answer": "10"},
    {"prompt": "Q: 31-4=?\nA:", "completion": " 11-4=7; 3-0-1=2\n#### 27", "answer": "27"},
]


@pytest.fixture(scope="module")
def tokenizer(stdlib_tokens):
    return load_tokenizer(stdlib_tokens / "tokenizer")


def model_for(tokenizer, hidden=64, kv=2, ffn=128):
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=kv, intermediate_size=ffn,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, max_position_embeddings=256)
    return DecoderForCausalLM(config).eval()


def test_step_metrics_by_hand():
    log = StepLog()
    log.losses = [5.0, 4.0, 3.0, 2.0]
    log.seconds = [9.0, 0.5, 1.0, 0.5]  # the first step is warm-up and must not count
    log.tokens = [100, 200, 300, 100]
    log.samples = [2, 4, 6, 2]
    m = step_metrics(log, warmup=1, params_total=1000, timer_method="perf_counter")
    assert m["al"].value == pytest.approx(2.0 / 3)
    assert m["tokens_per_s"].value == pytest.approx(600 / 2.0)
    assert m["samples_per_s"].value == pytest.approx(12 / 2.0)
    assert m["tt"].value == pytest.approx(600 / 1000 / 2.0)
    assert m["st"].value == pytest.approx(12 / 1000 / 2.0)
    assert m["loss"].value == pytest.approx(2.0)  # mean of the last 10 % (one step)


def test_perplexity_matches_explicit_nll(tokenizer):
    model = model_for(tokenizer)
    tokens = np.random.default_rng(0).integers(2, len(tokenizer), 70)
    ppl, scored = perplexity(model, tokens, seq_len=16, max_tokens=64, batch_size=3)
    nll, count = 0.0, 0
    for i in range(4):  # 64 // 16 non-overlapping windows
        ids = torch.tensor(tokens[i * 16:(i + 1) * 16])[None]
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += 15
    assert scored == count
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_completion_scores_ignore_padding_and_prompts(tokenizer):
    model = model_for(tokenizer)
    together = completion_scores(model, tokenizer, PROBLEMS, max_length=64, batch_size=3)
    alone = [completion_scores(model, tokenizer, [p], max_length=64, batch_size=1)
             for p in PROBLEMS]
    expected_tokens = sum(len(tokenizer(p["completion"], add_special_tokens=False)["input_ids"])
                          + 1 for p in PROBLEMS)  # completion + end-of-text
    assert together["tokens"] == expected_tokens == sum(a["tokens"] for a in alone)
    weighted = sum(a["loss"] * a["tokens"] for a in alone) / expected_tokens
    assert together["loss"] == pytest.approx(weighted, rel=1e-5)


def test_exact_match_refuses_a_budget_shorter_than_the_answers(tokenizer):
    model = model_for(tokenizer)
    with pytest.raises(ValueError, match="inference.eval_max_new_tokens"):
        exact_match_rate(model, tokenizer, PROBLEMS, 4, "inference.eval_max_new_tokens")
    rate, n = exact_match_rate(model, tokenizer, PROBLEMS, 40, "x")
    assert n == 3 and 0.0 <= rate <= 1.0


def test_exact_match_is_unavailable_without_reference_answers(tokenizer):
    model = model_for(tokenizer)
    unanswered = [{**p, "answer": None} for p in PROBLEMS]
    metrics = reasoning_metrics(model, tokenizer, unanswered, 64, 40, "k", "em")
    assert metrics["exact_match"].status == "unavailable" and metrics["exact_match"].value is None
    assert metrics["performance"].value == metrics["token_accuracy"].value


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_kv_cache_bytes_per_token_is_the_formula(tokenizer, kv):
    model = model_for(tokenizer, kv=kv)
    ids = torch.randint(2, len(tokenizer), (1, 10))
    # K and V, 2 layers, kv heads x head dim 16, fp32
    assert cache_bytes_per_token(model, ids) == 2 * 2 * kv * 16 * 4


def test_fixed_length_generation_timing(tokenizer):
    from effllm.inference.run import time_generation

    model = model_for(tokenizer)
    prompt = torch.randint(2, len(tokenizer), (2, 8))
    window = Window(0.01)
    times = time_generation(model, prompt, new_tokens=24, pad_id=tokenizer.pad_token_id,
                            warmup=1, min_runs=3, min_seconds=0.0, window=window)
    assert len(times["e2e"]) == len(times["prefill"]) == len(times["decode"]) >= 3
    for prefill, decode, e2e in zip(times["prefill"], times["decode"], times["e2e"]):
        assert 0 < prefill < e2e and 0 < decode and prefill + 23 * decode <= e2e
    assert window.metrics()["amu"].status == "measured"


def test_generation_timing_under_a_noisy_machine_never_fails(tokenizer):
    """Two busy threads compete with the timed generations for the cores. Timing noise widens
    the spread (a non-zero IQR, the median inside it) and never raises (issue 20)."""
    import threading

    from effllm.inference.run import time_generation
    from effllm.measure import latency_summary

    model = model_for(tokenizer)
    prompt = torch.randint(2, len(tokenizer), (1, 8))
    stop = threading.Event()

    def busy():
        x = torch.randn(256, 256)
        while not stop.is_set():
            x = (x @ x).tanh()

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            times = time_generation(model, prompt, new_tokens=3, pad_id=tokenizer.pad_token_id,
                                    warmup=0, min_runs=5, min_seconds=0.0, window=Window(0.05))
            for key in ("prefill", "decode", "e2e"):
                s = latency_summary(times[key])
                assert s["iqr"] > 0 and s["p25"] <= s["p50"] <= s["p75"], key
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_quantised_loading_holds_quantised_weights(tokenizer, tmp_path):
    import bitsandbytes as bnb

    from effllm.inference.run import load_model, weight_bytes

    model = model_for(tokenizer, hidden=64, kv=1, ffn=128)  # k/v_proj are 16 wide: not int4-able
    model.save_pretrained(tmp_path)
    ids = torch.randint(2, len(tokenizer), (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    bf16, _ = load_model(tmp_path, "bf16", QuantSpec())
    int4, note = load_model(tmp_path, "int4", QuantSpec("nf4", compute_dtype="bf16"))
    int8, _ = load_model(tmp_path, "int8", QuantSpec())
    attn = int4.model.layers[0].self_attn
    assert isinstance(attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(int4.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(attn.k_proj, bnb.nn.Linear4bit) and "k_proj" in note
    assert isinstance(int8.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert int4.lm_head.weight.dtype == torch.bfloat16  # unquantised parts as the bf16 run
    assert weight_bytes(int4) < weight_bytes(bf16)
    q4 = int4.model.layers[0].mlp.up_proj.weight
    assert q4.numel() * q4.element_size() <= 0.30 * 128 * 64 * 2  # packed 4-bit vs bf16 bytes
    for quantised, tol in ((bf16, 0.05), (int8, 0.1), (int4, 0.3)):
        with torch.no_grad():
            out = quantised(input_ids=ids).logits.float()
        rel = (out - ref).norm() / ref.norm()
        assert rel < tol, (quantised.dtype, rel)


def test_overflowed_results_are_unavailable_not_numbers():
    from effllm.evaluation.perplexity import finite_metric
    from effllm.evaluation.perplexity import safe_exp

    assert safe_exp(800.0) == math.inf and math.isnan(safe_exp(float("nan")))
    for bad in (float("nan"), math.inf):
        metric = finite_metric(bad, "1", "exp_mean_nll_corpus_test", "100 tokens")
        assert metric.status == "unavailable" and metric.value is None
        assert "overflow" in metric.note
    assert finite_metric(3.0, "1", "m").status == "measured"


def test_bf16_pretraining_runs_in_bf16_and_lands_near_fp32(stdlib_tokens, tmp_path):
    """pretrain.precision bf16: the record says so, the loss curve starts where fp32's does
    (same weights, same first batch) and the trained model is still fp32 (master weights)."""
    import copy
    import json

    from safetensors.torch import load_file

    from effllm.training.pretrain import run_pretrain
    from examples import SPEC

    records = {}
    for precision in ("fp32", "bf16"):
        spec = copy.deepcopy(SPEC)
        spec["settings"]["train"].update(steps=8, checkpoint_every=0, precision=precision)
        out = tmp_path / precision
        run_pretrain(spec, stdlib_tokens, out / "model", out / "record.json")
        records[precision] = json.loads((out / "record.json").read_text())
        weights = load_file(out / "model/model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}
    fp32, bf16 = records["fp32"], records["bf16"]
    assert fp32["provenance"]["execution"]["precision"] == "fp32"
    assert bf16["provenance"]["execution"]["precision"].startswith("bf16 autocast")
    assert bf16["series"]["train_loss"][0] == pytest.approx(fp32["series"]["train_loss"][0],
                                                            rel=2e-2)
    assert bf16["series"]["train_loss"] != fp32["series"]["train_loss"]  # it did round
    assert bf16["metrics"]["perplexity"]["value"] == pytest.approx(
        fp32["metrics"]["perplexity"]["value"], rel=5e-2)


def _variants_at_their_smallest(config):
    """One pretraining run per technique of the default grid (checked), at its smallest size."""
    from effllm.sweep import expand_runs

    order = list(config["sizes"])
    runs = {}
    for run in expand_runs(config)["pretrain"].values():
        key = run.technique
        if key not in runs or order.index(run.size) < order.index(runs[key].size):
            runs[key] = run
    return runs


@pytest.mark.parametrize("technique", ["mha", "mqa", "gqa", "mla", "nsa", "sinusoidal", "learned",
                                       "relative", "alibi", "none", "moe-8x-third", "mamba",
                                       "rwkv", "pythia"])
def test_every_pretraining_variant_trains_in_bf16(config, tokenizer, technique):
    """paper.yaml pretrains every variant in bf16: each one's loss under bf16 autocast is finite,
    near its fp32 loss, with finite gradients for every trainable weight."""
    from effllm.precision import autocast
    from effllm.training.pretrain import build_model

    runs = _variants_at_their_smallest(config)
    assert technique in runs, sorted(runs)
    shape = dataclasses.replace(runs[technique].spec.model, num_hidden_layers=2)
    torch.manual_seed(0)
    model = build_model(shape, tokenizer).train()
    ids = torch.randint(3, len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(0))
    losses = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with autocast("cpu", precision):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[precision] = loss.item()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), precision
    assert math.isfinite(losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
