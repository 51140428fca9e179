"""The inference stage as the pipeline runs it: hub models served by name, perplexity in the served
model's own tokens, and lm-evaluation-harness scores of the quantised in-memory model becoming the
run's ``performance``."""

import copy
import json
import math

import numpy as np
import pytest

from effllm.config import ConfigError, check_config
from effllm.data.reasoning import prepare_reasoning
from transformers import AutoTokenizer

from effllm.data.tokenizer import load_tokenizer, save_tokenizer, with_pad_token
from effllm.data.hub import prepare_hub_model
from effllm.inference.run import run_inference
from invariants import assert_served_tokens_are_the_pipelines
from effllm.records import load_record
from effllm.sweep import expand_runs
from hubcache import REPO

MC = [("The number after one is", ["two", "ten", "nine hundred"], 0),
      ("A cat is an", ["animal", "aeroplane", "idea"], 0),
      ("The sun rises in the", ["west", "east", "sea"], 1),
      ("Two plus two is", ["4", "five", "22"], 0)]


def hub_config(config: dict, **inference) -> dict:
    config = copy.deepcopy(config)
    config["hub_models"] = {"tiny-llama": {"repo_id": REPO}}
    config["inference"].update(hub_models=["tiny-llama"], **inference)
    return config


def test_hub_models_are_served_at_every_precision(config, schema, hub, use_cache):
    use_cache(hub)
    runs = expand_runs(check_config(hub_config(config), schema))["inference"]
    served = {name: run for name, run in runs.items() if run.upstream == "hub/tiny-llama"}
    assert sorted(r.technique for r in served.values()) == sorted(config["inference"]["precisions"])
    assert {r.group for r in served.values()} == {"hub/tiny-llama"}
    assert "bf16-tiny-llama-s0" in served
    # the pipeline's own models are still served beside it
    assert any(r.upstream.startswith("finetune/") for r in runs.values())


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["inference"].__setitem__("hub_models", ["nope"]), "inference.hub_models.0"),
    (lambda c: c["inference"].update(sources=[], hub_models=[]), "inference.sources"),
    (lambda c: c["inference"].__setitem__("harness", {"tasks": ["MMLU"]}),
     "inference.harness.tasks"),
    (lambda c: c["inference"].__setitem__("harness", {"tasks": {"x": {"task": "t",
                                                                       "metric": "acc"}}}),
     "inference.harness.tasks"),
    (lambda c: c["inference"].__setitem__("harness", {"tasks": ["BBH"],
                                                      "include_path": "/no/such/dir"}),
     "inference.harness.include_path"),
])
def test_bad_inference_config_names_the_key(config, schema, hub, use_cache, mutate, key):
    use_cache(hub)
    bad = hub_config(config)
    mutate(bad)
    with pytest.raises(ConfigError, match=f"'{key}"):
        check_config(bad, schema)


def test_uncached_served_hub_model_is_refused_up_front(config, schema, use_cache, tmp_path):
    use_cache(tmp_path)
    with pytest.raises(ConfigError, match=r"'hub_models.tiny-llama.repo_id'.*hf download"):
        check_config(hub_config(config), schema)


def test_corpus_tokens_of_our_tokenizer_are_the_pipelines(stdlib_tokens):
    """Encoding the test documents with the served model's tokenizer gives, for the pipeline's
    own tokenizer, exactly the ids the tokenizer stage wrote."""
    assert_served_tokens_are_the_pipelines(load_tokenizer(stdlib_tokens / "tokenizer"),
                                           stdlib_tokens)


def test_hub_model_tokenizer_encodes_the_corpus_unpadded(hub, use_cache, stdlib_tokens, tmp_path):
    use_cache(hub)
    prepare_hub_model(REPO, None, tmp_path / "model")
    assert_served_tokens_are_the_pipelines(AutoTokenizer.from_pretrained(tmp_path / "model"),
                                            stdlib_tokens)


@pytest.mark.parametrize("save", ["save_tokenizer", "save_pretrained"])
def test_tokenizer_saved_after_a_padded_batch_call_encodes_documents_unpadded(
        save, stdlib_tokens, tmp_path):
    """Evaluation pads batches (left, longest), which leaves padding on in the backend. Saved
    with ``save_tokenizer`` the state is gone; a folder saved by an older run with
    ``save_pretrained`` keeps it, and documents are still encoded unpadded."""
    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    tokenizer.padding_side = "left"
    tokenizer(["a", "a much longer prompt than the first"], padding=True)
    assert tokenizer.backend_tokenizer.padding is not None  # the state that caused the bug
    if save == "save_tokenizer":
        save_tokenizer(tokenizer, tmp_path)
    else:
        tokenizer.save_pretrained(tmp_path)
    padding = json.loads((tmp_path / "tokenizer.json").read_text())["padding"]
    assert (padding is None) == (save == "save_tokenizer")
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert_served_tokens_are_the_pipelines(reloaded, stdlib_tokens)
    batch = reloaded(["a", "a much longer prompt"], padding=True)  # padding per call still works
    assert len(set(map(len, batch["input_ids"]))) == 1


def test_hub_tokenizer_without_a_pad_token_gets_its_eos(stdlib_tokens):
    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    tokenizer.pad_token = None
    assert with_pad_token(tokenizer, "x").pad_token_id == tokenizer.eos_token_id
    tokenizer.pad_token = tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        with_pad_token(tokenizer, "x")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local multiple-choice lm-eval task (no download)."""
    root = tmp_path_factory.mktemp("tasks")
    rows = [{"q": q, "choices": c, "label": y} for q, c, y in MC]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mc.yaml").write_text(
        f"task: tiny_serving_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return root


@pytest.mark.parametrize("precision", ["bf16", "int4"])
def test_hub_model_run_scores_harness_tasks_on_the_served_model(
        precision, config, schema, hub, use_cache, task_dir, stdlib_tokens, tmp_path):
    """One inference job on a cached hub model with lm-eval configured: task scores become
    ``task_*`` metrics and ``performance`` is their mean; perplexity is in the model's tokens."""
    pytest.importorskip("bitsandbytes")
    use_cache(hub)
    prepare_hub_model(REPO, None, tmp_path / "model")
    prepare_reasoning({"source": "arithmetic", "arithmetic": {
        "operations": ["add"], "min_digits": 1, "max_digits": 2, "n_train": 16,
        "n_validation": 4, "n_test": 8}}, 0, tmp_path / "reasoning")
    harness = {"tasks": {"MC": {"task": "tiny_serving_mc", "metric": "acc,none"},
                         "MC norm": {"task": "tiny_serving_mc", "metric": "acc_norm,none"}},
               "include_path": str(task_dir), "batch_size": 2}
    config = hub_config(config, sources=["finetune"], precisions=[precision], harness=harness,
                        prompt_tokens=16, new_tokens=4, warmup_runs=1, min_runs=2,
                        min_seconds=0.0, eval_problems=4, ppl_tokens=256)
    spec = expand_runs(check_config(config, schema))["inference"][
        f"{precision}-tiny-llama-s0"].spec
    run_inference(spec, tmp_path / "model", stdlib_tokens.parent / "corpus",
                  tmp_path / "reasoning", tmp_path / "record.json")
    record = load_record(tmp_path / "record.json")
    m = record.metrics
    layers = record.provenance["execution"]["linear_weight_bytes"]
    assert len(layers) == 2 * 7 + 1  # seven projections per layer and the head
    assert m["linear_weight_bytes"].value == sum(layers.values()) < m["weight_bytes"].value
    q = layers["model.layers.0.self_attn.q_proj"]
    # a 64 x 64 weight: 2 bytes each in bf16; in NF4 half a byte plus its block scales and
    # codebooks (under 1 byte a weight here: 64 blocks carry a 1 KiB nested code unless the
    # AVX512-BF16 CPU kernels repacked them)
    assert q == 64 * 64 * 2 if precision == "bf16" else 64 * 64 // 2 < q < 64 * 64
    tasks = [m["task_mc"], m["task_mc_norm"]]
    assert [t.method for t in tasks] == ["lm_eval:tiny_serving_mc:acc,none",
                                         "lm_eval:tiny_serving_mc:acc_norm,none"]
    assert all(t.status == "measured" and 0 <= t.value <= 1 for t in tasks)
    assert all(f"{len(MC)} documents" in t.note for t in tasks)
    assert m["performance"].method == "mean_of_lm_eval_tasks"
    assert m["performance"].value == pytest.approx((tasks[0].value + tasks[1].value) / 2)
    assert m["perplexity"].status == "measured" and math.isfinite(m["perplexity"].value)
    assert "model's tokenizer" in m["perplexity"].note
    test_tokens = np.load(stdlib_tokens / "test.npy").size
    assert record.provenance["execution"]["corpus_test_tokens"] == {"count": test_tokens,
                                                                     "pad_ids": 0}
    for key in ("al", "prefill_latency", "decode_latency"):
        assert m[key].status == "measured" and m[key].value > 0 and "IQR" in m[key].note
    assert m["exact_match"].status == "measured"  # the offline score is kept beside
    assert m["bits_nominal"].value == {"bf16": 16, "int4": 4}[precision]
    assert m["bits_nominal"].status == "configured"  # a setting, not a measurement
