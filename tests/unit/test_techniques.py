"""The serving techniques (issue 22), each against its invariant: speculative decoding and
prompt lookup return plain greedy decoding's tokens; a quantised KV cache's attention stays
within its format's error of the full cache's; weight-only quantisers dequantise within their
bits' error of the bf16 weights and are counted by the bytes they really hold; one-shot pruning
keeps exactly its pattern's weights, by the score its method names, and structured pruning's
slice computes what the masked model does; and one inference job of each technique writes the
metrics the techniques table reads."""

import copy

import numpy as np
import pytest
import torch

from effllm.data.reasoning import prepare_reasoning
from effllm.data.tokenizer import load_tokenizer, save_tokenizer
from effllm.inference.run import run_inference
from effllm.inference.techniques import (PassCounter, cache_factory, cached_perplexity,
                                         check_draft_tokenizer, generate_options,
                                         linear_sparsity, prune_weights, quantize_weights,
                                         sparsity_mask)
from effllm.measure.cache import tensor_bytes
from effllm.measure.tensors import linear_weight_bytes, quant_state_bytes, track, weight_bytes
from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.records import load_record
from effllm.models.params import count_params
from effllm.models.pruning import oneshot_prune
from effllm.specs import InferenceSpec, KVCacheSpec, PruneSpec, SpeculativeSpec, WeightQuant


def decoder(hidden: int, layers: int, seed: int, vocab: int = 97) -> DecoderForCausalLM:
    torch.manual_seed(seed)
    return DecoderForCausalLM(DecoderConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=256)).eval()


def greedy(model, ids, n=24, **options):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0, **options)


@pytest.fixture(scope="module")
def pair():
    return decoder(64, 3, 0), decoder(32, 1, 1)


@torch.no_grad()
def test_speculative_decoding_returns_plain_greedy_tokens(pair):
    target, draft = pair
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([ids, ids], 1)  # a repeat, so that prompt lookup finds candidates
    plain = greedy(target, ids)
    for spec in (SpeculativeSpec(draft="pretrain/draft", tokens=4), SpeculativeSpec(lookup=3)):
        options = generate_options(target, spec, draft)
        with PassCounter(target, draft) as passes:
            fast = greedy(target, ids, **options)
        assert torch.equal(fast, plain), spec
        # fewer served-model passes than tokens: several tokens verified per pass
        assert passes.calls["target"] < 24
        assert (passes.calls["draft"] > 0) == (spec.draft is not None)
    # a model drafting for itself has every proposal accepted: new tokens = accepted + passes,
    # proposed = the draft's passes (one token each)
    options = generate_options(target, SpeculativeSpec(draft="self", tokens=3),
                               copy.deepcopy(target))
    with PassCounter(target, options["assistant_model"]) as passes:
        assert torch.equal(greedy(target, ids, **options), plain)
    accepted = 24 - passes.calls["target"]
    # 3 proposed and accepted a round, plus the served model's own token: 6 rounds
    assert passes.calls["target"] == 24 // 4 and accepted == passes.calls["draft"] == 18


def test_a_draft_with_another_tokenizer_is_refused(stdlib_tokens):
    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    check_draft_tokenizer(tokenizer, load_tokenizer(stdlib_tokens / "tokenizer"), "run")
    other = load_tokenizer(stdlib_tokens / "tokenizer")
    other.add_tokens(["<a-token-the-served-model-lacks>"])
    with pytest.raises(ValueError, match="run: the draft's tokenizer differs .* 1 entries"):
        check_draft_tokenizer(tokenizer, other, "run")


@torch.no_grad()
@pytest.mark.parametrize("kv, bound", [(KVCacheSpec(backend="fp8"), 0.08),
                                       (KVCacheSpec(backend="hqq", bits=4, group_size=16,
                                                    residual=4), 0.2)])
def test_quantised_cache_attention_is_within_its_formats_error(pair, kv, bound):
    """Logits of a continuation read through the quantised cache against the full cache's:
    e4m3 keeps 3 mantissa bits (relative error ~2^-4 per value), 4-bit groups ~1/15 of their
    range; through two layers of attention, within ``bound`` relative and far from random."""
    target, _ = pair
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    make = cache_factory(target, kv)

    def continuation(cache):
        kwargs = {} if cache is None else {"past_key_values": cache}
        out = target(input_ids=ids[:, :32], use_cache=True, **kwargs)
        return target(input_ids=ids[:, 32:], past_key_values=out.past_key_values,
                      attention_mask=torch.ones_like(ids), use_cache=True).logits

    full, quant = continuation(None), continuation(make())
    error = ((quant - full).norm() / full.norm()).item()
    assert 0 < error < bound
    # and the cache really holds fewer bytes than the full one (fp32 here: a quarter in fp8)
    caches = []
    for cache in (None, make()):
        kwargs = {} if cache is None else {"past_key_values": cache}
        caches.append(tensor_bytes(target(input_ids=ids, use_cache=True, **kwargs)
                                   .past_key_values))
    assert caches[1] < caches[0] * (0.3 if kv.backend == "fp8" else 0.5)


def test_cached_perplexity_equals_uncached_with_the_full_cache(pair):
    """With the model's own cache, reading the first half from the cache changes nothing: the
    same NLL as scoring the second half of each window in one uncached pass."""
    target, _ = pair
    tokens = np.random.default_rng(0).integers(0, 97, 400)
    ppl, scored = cached_perplexity(target, tokens, 40, 400, lambda: None)
    with torch.no_grad():
        ids = torch.from_numpy(tokens[:400].reshape(10, 40))
        logits = target(input_ids=ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, 19:-1].reshape(-1, 97),
                                            ids[:, 20:].reshape(-1))
    assert scored == 10 * 20
    assert ppl == pytest.approx(float(torch.exp(nll)), rel=1e-4)


@pytest.mark.parametrize("method, bits, rel", [("hqq", 4, 0.15), ("hqq", 8, 0.01),
                                              ("torchao", 8, 0.01)])
def test_weight_only_quantisers_stay_within_their_bits_error(method, bits, rel):
    """Each quantised linear's output against the bf16 layer's: a 4-bit grid has 16 levels per
    group (HQQ's optimised zero point keeps the relative error near 1/16 for Gaussian weights),
    8 bits 256; the head stays exact; the bytes counted are the packed weights and their
    scales, not the logical bf16 size."""
    model = decoder(128, 2, 0).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    before = linear_weight_bytes(model)
    note, _ = quantize_weights(model, WeightQuant(method, bits, 64), ["lm_head"])
    assert "lm_head" in note
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    layer = "model.layers.0.mlp.up_proj"
    ours, exact = model.get_submodule(layer)(x), reference.get_submodule(layer)(x)
    error = ((ours.float() - exact.float()).norm() / exact.float().norm()).item()
    assert 0 < error < rel
    after = linear_weight_bytes(model)
    assert after["lm_head"] == before["lm_head"]
    weights = 128 * 256
    assert before[layer] == 2 * weights
    # packed codes plus per-group (HQQ) or per-row (torchao) scales and zero points
    assert weights * bits / 8 < after[layer] < weights * bits / 8 * 1.2
    assert weight_bytes(model) < weight_bytes(reference)
    # the tensor account of a forward books the quantised weights once: packed codes as
    # parameters, HQQ's scales and zero points as quantisation state (torchao's inside its
    # weight tensors)
    with torch.no_grad(), track(model, extra_bytes=quant_state_bytes(model)) as tracked:
        model(input_ids=torch.randint(0, 97, (1, 8)))
    parts = tracked.account.at_peak
    assert parts["params"] + parts["buffers"] + parts["quant_state"] == weight_bytes(model)
    assert (parts["quant_state"] > 0) == (method == "hqq")


def test_sparsity_masks_keep_exactly_the_highest_scores():
    score = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    keep = sparsity_mask(score, pattern="2:4")
    groups, kept = score.reshape(6, 4, 4), keep.reshape(6, 4, 4)
    assert (kept.sum(-1) == 2).all()
    # every kept weight outscores every dropped one of its group of four
    low_kept = torch.where(kept, groups, torch.inf).amin(-1)
    high_dropped = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (low_kept > high_dropped).all()
    keep = sparsity_mask(score, sparsity=0.25)
    assert (keep.sum(1) == 12).all()  # per row: Wanda's comparison group
    assert (torch.where(keep, score, torch.inf).amin(1)
            > torch.where(keep, -torch.inf, score).amax(1)).all()
    with pytest.raises(ValueError, match="groups of 4"):
        sparsity_mask(torch.rand(2, 6), pattern="2:4")
    with pytest.raises(ValueError, match="0 < n < m"):
        sparsity_mask(score, pattern="4:2")


@torch.no_grad()
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pruning_zeros_by_its_methods_score_and_touches_nothing_else(pair, method):
    model = copy.deepcopy(pair[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{"input_ids": torch.randint(0, 97, (2, 24), generator=torch.Generator()
                                           .manual_seed(i))} for i in range(2)]
    # Wanda's input norms, recorded independently of the code under test
    norms = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: norms.__setitem__(
        name, norms.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0)))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for batch in batches:
        model(**batch)
    for hook in hooks:
        hook.remove()
    prune_weights(model, PruneSpec(method=method, pattern="2:4"), ["lm_head"], batches)
    after = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = before[f"{name}.weight"]
        score = w.abs() * (norms[name].sqrt() if method == "wanda" else 1)
        expected = w * sparsity_mask(score, pattern="2:4")
        assert torch.equal(after[f"{name}.weight"], expected), name
    untouched = [k for k in before if "proj" not in k]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
    zeros, total = linear_sparsity(model, ["lm_head"])
    assert zeros == total // 2


def test_structured_pruning_slices_to_what_the_masked_model_computes(pair):
    model = copy.deepcopy(pair[0])
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(5))
    source = count_params(model)[0]
    small, removed = oneshot_prune(model, [{"input_ids": ids, "labels": ids}],
                                   int(source * 0.8))
    assert count_params(small)[0] <= int(source * 0.8) and removed["ffn"] > 0
    assert removed["hidden"] == 0 and small.config.hidden_size == 64
    with torch.no_grad():  # ``model`` is left masked and compensated: the same function
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert small.dtype == pair[0].dtype and not small.training


@pytest.fixture(scope="module")
def served(tmp_path_factory, stdlib_tokens):
    """A target and a draft of ours saved as the pipeline saves models, with its tokenizer,
    and a small reasoning set."""
    root = tmp_path_factory.mktemp("served")
    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    for name, (hidden, layers, seed) in {"target": (64, 2, 0), "draft": (32, 1, 1)}.items():
        model = decoder(hidden, layers, seed, vocab=len(tokenizer))
        model.save_pretrained(root / name, safe_serialization=True)
        save_tokenizer(tokenizer, root / name)
    prepare_reasoning({"source": "arithmetic", "arithmetic": {
        "operations": ["add"], "min_digits": 1, "max_digits": 1, "n_train": 8,
        "n_validation": 2, "n_test": 4}}, 0, root / "reasoning")
    return root


def job(root, tmp_path, corpus, **technique):
    spec = InferenceSpec.from_json({
        "run_id": "inference/t", "stage": "inference", "technique": "t", "label": "t",
        "size": "small", "seed": 0, "group": "g", "upstream": "finetune/x",
        "precision": "bf16", "bits": 16, "quant": {}, "dataset": "arithmetic",
        "eval": {"batch_size": 1, "prompt_tokens": 16, "new_tokens": 8, "warmup_runs": 1,
                 "min_runs": 2, "min_seconds": 0.0, "eval_problems": 2,
                 "eval_max_new_tokens": 20, "eval_max_length": 48, "ppl_tokens": 256},
        "harness": None, "measure": {"sample_interval_s": 0.05, "warmup_steps": 1,
                                     "peak_flops": 1e11, "threads": 1},
        **technique})
    run_inference(spec, root / "target", corpus, root / "reasoning", tmp_path / "record.json",
                  draft_dir=root / "draft")
    return load_record(tmp_path / "record.json").metrics


@pytest.mark.parametrize("technique", [
    {}, {"weights": {"method": "hqq", "bits": 4, "group_size": 32}},
    {"weights": {"method": "torchao", "bits": 8}}, {"kv_cache": {"backend": "fp8"}},
    {"speculative": {"draft": "pretrain/draft", "tokens": 3}},
    {"speculative": {"lookup": 2}},
    {"prune": {"method": "wanda", "pattern": "2:4", "calib_windows": 3}},
    {"prune": {"method": "structured", "sparsity": 0.25, "calib_windows": 2}}],
    ids=["plain", "hqq4", "ao8", "kv-fp8", "draft", "lookup", "wanda", "structured"])
def test_an_inference_job_of_each_technique_records_what_it_changes(
        technique, served, stdlib_tokens, tmp_path):
    m = job(served, tmp_path, stdlib_tokens.parent / "corpus", **technique)
    for key in ("al", "perplexity", "kv_perplexity", "kv_cache_bytes_per_token"):
        assert m[key].status == "measured" and m[key].value > 0, key
    # bf16 keys and values: 2 layers x 2 (K, V) x 2 KV heads x 16 dims x 2 bytes per token
    plain_kv = 2 * 2 * 2 * 16 * 2
    kv = m["kv_cache_bytes_per_token"].value
    prune = technique.get("prune", {})
    assert ("weight_sparsity" in m) == bool(prune) == ("prune_seconds" in m)
    if prune.get("method") == "structured":  # sliced KV heads hold fewer bytes
        assert m["weight_sparsity"].value >= 0.2 and kv <= plain_kv
        assert m["calibration_tokens"].value == 2 * 48
    elif prune:
        assert m["weight_sparsity"].value == 0.5 and kv == pytest.approx(plain_kv)
        assert m["calibration_tokens"].value == 3 * 48
    elif "kv_cache" in technique:
        assert kv < plain_kv * 0.6
    elif "speculative" in technique:  # a cropped cache's views keep the rejected tokens' storage
        assert plain_kv <= kv < plain_kv * 1.2
    else:
        assert kv == pytest.approx(plain_kv)
    assert ("quantize_seconds" in m) == ("weights" in technique)
    speculative = "speculative" in technique
    assert ("tokens_per_pass" in m) == speculative == ("identical_output" in m)
    assert ("draft_acceptance" in m) == ("draft" in technique.get("speculative", {}))
    if speculative:
        assert m["tokens_per_pass"].value >= 1
        assert 0 <= m["identical_output"].value <= 1
