"""Whole stage runs on a cached Hugging Face model: fine-tuning (QLoRA) through to its saved
model and record."""

import json
import math

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from effllm.config import check_config
from effllm.data.hub import prepare_hub_model
from effllm.sweep import expand_runs
from hubcache import REPO
from invariants import assert_served_tokens_are_the_pipelines
from test_finetune import NF4, with_hub


def test_qlora_run_on_a_hub_model_end_to_end(tmp_path, hub, use_cache, config, schema,
                                              stdlib_tokens):
    """Link the cached Llama, fine-tune it with LoRA on a 4-bit base, and read the record."""
    from effllm.data.reasoning import prepare_reasoning
    from effllm.records import load_record
    from effllm.training.finetune import run_finetune

    use_cache(hub)
    prepare_hub_model(REPO, None, tmp_path / "base")
    reasoning = {"source": "arithmetic", "arithmetic": {
        "operations": ["add"], "min_digits": 1, "max_digits": 2, "n_train": 64,
        "n_validation": 8, "n_test": 8}}
    prepare_reasoning(reasoning, 0, tmp_path / "reasoning")
    config = with_hub(config, bases=["tiny-llama"])
    config["finetune"].update(methods=["lora"], quantized_base=True, base_quant=NF4,
                              batch_size=4, max_steps=8, eval_problems=4, max_new_tokens=40,
                              max_length=64)
    config["measure"]["warmup_steps"] = 2
    spec = expand_runs(check_config(config, schema))["finetune"]["lora-tiny-llama-s0"].spec
    run_finetune(spec, tmp_path / "base", tmp_path / "reasoning", tmp_path / "out",
                 tmp_path / "record.json")
    record = load_record(tmp_path / "record.json")
    execution = record.provenance["execution"]
    assert execution["base_precision"].startswith("nf4 (bitsandbytes 4-bit")
    assert execution["backend"] == "single-process"
    m = record.metrics
    assert 0 < m["params_trainable"].value < m["params_total"].value
    assert len(record.series["train_loss"]) == 8
    assert all(math.isfinite(x) for x in record.series["train_loss"])
    assert m["exact_match"].status == "measured" and math.isfinite(m["val_loss"].value)
    assert (tmp_path / "out/adapter/adapter_model.safetensors").is_file()
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) is LlamaForCausalLM
    # The saved tokenizer carries no padding state from the evaluation's padded batches, so the
    # served model's corpus tokens are the pipeline's (issue 16).
    assert json.loads((tmp_path / "out/tokenizer.json").read_text())["padding"] is None
    assert_served_tokens_are_the_pipelines(AutoTokenizer.from_pretrained(tmp_path / "out"),
                                           stdlib_tokens)
