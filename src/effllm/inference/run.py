"""Serving a model at one precision: load, evaluate quality, time fixed-length decoding.

Each precision is loaded fresh from the saved safetensors (never converted in place: bitsandbytes
on CPU repacks 4-bit weights on the first eval forward, measurement.md §10). Timing follows
measurement.md §2: fixed output length (end-of-sequence disabled), warm-up runs, then repeats until
both a minimum count and a minimum time are reached; prefill = generate of one token.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import effllm.models  # noqa: F401 - registers our config with the Auto classes
from effllm.inference.evaluate import finite_metric, reasoning_metrics
from effllm.launch import place
from effllm.measure import Timer, Window, latency_summary
from effllm.models.quantize import DTYPES, load_quantised, model_config
from effllm.records import Metric, RunRecord, now_iso
from effllm.training.loop import seed_everything
from effllm.training.pretrain import perplexity
from effllm.data.splits import read_split


def load_model(model_dir: str | os.PathLike, precision: str, quant: dict):
    """The model at ``precision``; returns (model, notes about what was kept unquantised)."""
    model_config(model_dir)  # imports our Mamba/RWKV fixes before the weights load
    if precision in DTYPES:  # on the job's device (load_quantised places int8/int4 there)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[precision])
        return model.to(place().device), None
    # Unquantised parts (embeddings, head, norms) in the compute dtype, as the bf16 run holds them.
    dtype = DTYPES[quant.get("compute_dtype", "bf16")] if precision == "int4" else torch.bfloat16
    return load_quantised(model_dir, precision, quant, dtype)


def _quantisation_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors bitsandbytes keeps beside a layer's weight: the 4-bit ``quant_state`` (absmax,
    codebook, offset, and double quant's nested ``state2``) and LLM.int8's ``CB``/``SCB``, which
    sit on the weight after loading and move to ``module.state`` on the first forward."""
    weight = getattr(module, "weight", None)
    holders, state = [weight], getattr(weight, "quant_state", None)
    while state is not None:
        holders.append(state)
        state = getattr(state, "state2", None)
    if hasattr(getattr(module, "state", None), "SCB"):  # bitsandbytes' MatmulLtState
        holders.append(module.state)
    return [v for h in holders if h is not None for v in vars(h).values()
            if isinstance(v, torch.Tensor)]


def _distinct_bytes(tensors, seen: set) -> int:
    """Bytes of the tensors not in ``seen`` (then added): shared or tied memory counts once."""
    total = 0
    for t in tensors:
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def linear_weight_bytes(model) -> dict[str, int]:
    """Bytes each linear layer's weight holds now (bias excluded): packed 4-bit or int8 data plus
    its quantisation state, or a plain weight's nbytes."""
    return {name: _distinct_bytes([mod.weight, *_quantisation_state(mod)], set())
            for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def weight_bytes(model) -> int:
    """Bytes held by all parameters and buffers plus bitsandbytes' quantisation state; tied once."""
    seen: set = set()
    return sum(_distinct_bytes([*mod.parameters(recurse=False), *mod.buffers(recurse=False),
                                *_quantisation_state(mod)], seen) for mod in model.modules())


def time_generation(model, prompt_ids: torch.Tensor, new_tokens: int, pad_id: int,
                    warmup: int, min_runs: int, min_seconds: float, window: Window) -> dict:
    """Prefill and end-to-end latency of fixed-length greedy generation, repeated.

    Warm-up runs (which on CPU also trigger bitsandbytes' one-off 4-bit weight repack) happen
    before ``window`` opens, so memory and energy cover only the timed repeats.
    """
    def gen(n: int) -> torch.Tensor:
        # min_new_tokens = max_new_tokens suppresses end-of-sequence: the length is fixed.
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=pad_id)
        return model.generate(input_ids=prompt_ids,
                              attention_mask=torch.ones_like(prompt_ids), generation_config=cfg)

    with torch.no_grad():
        for _ in range(warmup):
            gen(new_tokens)
            gen(1)
        prefill, e2e = [], []
        with window:
            begin = time.perf_counter()
            while len(e2e) < min_runs or time.perf_counter() - begin < min_seconds:
                with Timer() as t:
                    gen(1)
                prefill.append(t.seconds)
                with Timer() as t:
                    out = gen(new_tokens)
                e2e.append(t.seconds)
                produced = out.shape[1] - prompt_ids.shape[1]
                if produced != new_tokens:
                    raise RuntimeError(f"generated {produced} tokens, expected {new_tokens}")
    decode = [(a - b) / (new_tokens - 1) for a, b in zip(e2e, prefill)]
    if min(decode) < 0:
        raise RuntimeError("a generate() was faster than its own prefill: timings are noise; "
                           "raise inference.new_tokens or inference.warmup_runs")
    return {"prefill": prefill, "e2e": e2e, "decode": decode}


def corpus_test_tokens(tokenizer, corpus_dir: str | os.PathLike) -> np.ndarray:
    """The corpus test documents in the served model's own token ids (for the pipeline's models
    the ids of ``results/data/tokens/test.npy``; a hub model brings its own tokenizer, whose
    perplexities are not comparable with ours)."""
    from effllm.data.tokenizer import encode_documents

    texts = [doc["text"] for doc in read_split(corpus_dir, "test")]
    return encode_documents(tokenizer, texts, np.int64)


def harness_metrics(model, tokenizer, harness: dict, seed: int) -> dict[str, Metric]:
    """lm-evaluation-harness scores of the in-memory model, one ``task_*`` metric per task, and
    ``performance`` as their mean (the paper's "Avg performance")."""
    from effllm.inference.harness import TaskSpec, average_performance, evaluate_tasks
    from effllm.records import task_metric

    tasks = harness["tasks"]
    if isinstance(tasks, dict):
        tasks = {name: TaskSpec(t["task"], t["metric"]) for name, t in tasks.items()}
    limit = harness.get("limit")
    scores = evaluate_tasks(
        model, tokenizer, tasks, limit=limit, batch_size=harness.get("batch_size", 1),
        include_path=harness.get("include_path"), num_fewshot=harness.get("num_fewshot"),
        seed=seed, apply_chat_template=harness.get("apply_chat_template", False))
    capped = f"; limit {limit} documents per task (not comparable with the paper)" if limit else ""
    metrics = {}
    for name, s in scores.items():
        stderr = f", stderr {s['stderr']:.4f}" if s["stderr"] is not None else ""
        metrics[task_metric(name)] = Metric.measured(
            s["score"], "fraction", f"lm_eval:{s['task']}:{s['metric_key']}",
            f"{s['n']} documents{stderr}{capped}")
    metrics["performance"] = Metric.measured(
        average_performance(scores), "fraction", "mean_of_lm_eval_tasks",
        f"mean of {', '.join(scores)}{capped}")
    return metrics


def run_inference(spec: dict, model_dir: str | os.PathLike, corpus_dir: str | os.PathLike,
                  reasoning_dir: str | os.PathLike, record_out: str | os.PathLike) -> RunRecord:
    start = now_iso()
    settings, ev = spec["settings"], spec["settings"]["eval"]
    measure = settings["measure"]
    seed_everything(spec["seed"], measure["threads"])
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with Window(measure["sample_interval_s"]) as load_window:
        model, quant_note = load_model(model_dir, settings["precision"], settings["quant"])
    model.eval()
    tokens = corpus_test_tokens(tokenizer, corpus_dir)
    problems = read_split(reasoning_dir, "test")[: ev["eval_problems"]]

    # Timing first, in its own window; quality passes afterwards (never time under evaluation).
    rng = np.random.default_rng(spec["seed"])
    starts = rng.integers(0, len(tokens) - ev["prompt_tokens"], size=ev["batch_size"])
    prompt_ids = torch.from_numpy(np.stack([tokens[s:s + ev["prompt_tokens"]]
                                            for s in starts]).astype(np.int64))
    prompt_ids = prompt_ids.to(model.device)
    window = Window(measure["sample_interval_s"])
    times = time_generation(model, prompt_ids, ev["new_tokens"], tokenizer.pad_token_id,
                            ev["warmup_runs"], ev["min_runs"], ev["min_seconds"], window)
    e2e, prefill = latency_summary(times["e2e"]), latency_summary(times["prefill"])
    generated = ev["batch_size"] * ev["new_tokens"]
    note = (f"{e2e['count']} runs after {ev['warmup_runs']} warm-up; batch {ev['batch_size']}, "
            f"prompt {ev['prompt_tokens']}, exactly {ev['new_tokens']} new tokens "
            f"(min_new_tokens = max_new_tokens); cv {e2e['cv']:.3f}")
    metrics = window.metrics()
    if metrics["energy"].status != "unavailable":
        metrics["energy_per_token"] = Metric.measured(
            metrics["energy"].value / (generated * e2e["count"]), "J/token",
            metrics["energy"].method, "window energy includes the prefill-only runs")
    metrics.update({
        "al": Metric.measured(e2e["mean"], "s", Timer.method, note),
        "al_cv": Metric.measured(e2e["cv"], "1", "std/mean of repeats", note),
        "prefill_latency": Metric.measured(prefill["mean"], "s", Timer.method,
                                           "generate(max_new_tokens=1)"),
        "decode_latency": Metric.measured(sum(times["decode"]) / len(times["decode"]), "s/token",
                                          Timer.method, "(e2e - prefill) / (new_tokens - 1)"),
        "it": Metric.measured(generated * e2e["count"] / e2e["total"], "tokens/s", Timer.method,
                              note),
        "weight_bytes": Metric.measured(weight_bytes(model), "B", "tensor_bytes_with_quant_state",
                                        quant_note),
        "bits_nominal": Metric.measured(settings["bits"], "bits", "nominal_bits"),
        "load_memory_peak": load_window.metrics()["memory_peak"],
    })

    ppl, scored = perplexity(model, tokens, ev["eval_max_length"], ev["ppl_tokens"])
    metrics["perplexity"] = finite_metric(ppl, "1", "exp_mean_nll_corpus_test",
                                          f"{scored} scored tokens, the model's tokenizer")
    metrics.update(reasoning_metrics(model, tokenizer, problems, ev["eval_max_length"],
                                     ev["eval_max_new_tokens"], "inference.eval_max_new_tokens",
                                     desc=f"exact match {spec['run_id']}"))
    if settings.get("harness"):
        metrics.update(harness_metrics(model, tokenizer, settings["harness"], spec["seed"]))
    layers = linear_weight_bytes(model)  # as served: after the CPU 4-bit repack
    metrics["linear_weight_bytes"] = Metric.measured(
        sum(layers.values()), "B", "tensor_bytes_with_quant_state",
        f"{len(layers)} linear layers, weights and quantisation state (biases excluded); "
        "per layer in provenance.execution")
    record = RunRecord.for_run(
        spec, start, metrics,
        series={"e2e_seconds": times["e2e"], "prefill_seconds": times["prefill"],
                "decode_seconds_per_token": times["decode"]},
        execution={**place().execution(), "precision": settings["precision"],
                   "notes": [quant_note] if quant_note else [], "linear_weight_bytes": layers},
    )
    record.save(record_out)
    return record
