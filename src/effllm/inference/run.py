"""Serving a model at one precision: load, evaluate quality, time fixed-length decoding.

Each precision is loaded fresh from the saved safetensors (never converted in place: bitsandbytes
on CPU repacks 4-bit weights on the first eval forward, docs/metrics.md §8). Timing follows
docs/metrics.md §5: fixed output length (end-of-sequence disabled), warm-up runs, then repeats until
both a minimum count and a minimum time are reached; first-token and per-token times come from
token timestamps inside each generate(), and are reported as medians with their spread.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import effllm.models  # noqa: F401 - registers our config with the Auto classes
from effllm.data.splits import read_split
from effllm.data.tokenizer import with_pad_token
from effllm.distributed import Placement, place
from effllm.evaluation.perplexity import finite_metric, perplexity
from effllm.evaluation.scoring import reasoning_metrics
from effllm.inference.techniques import (
    CALIB_BATCH, CALIB_WINDOWS, NoCache, PassCounter, cache_factory, cached_perplexity,
    check_draft_tokenizer, generate_options, linear_sparsity, prune_weights,
    quantize_weights,
)
from effllm.measure import Timer, Window, count_flops, latency_summary, sync
from effllm.measure.cache import CACHE_FIELDS, tensor_bytes
from effllm.measure.peak import Peak, device_peak, mfu_metric, pcu_from_mfu
from effllm.measure.tensors import linear_weight_bytes, quant_state_bytes, track, weight_bytes
from effllm.models.baselines import sequence_kernel
from effllm.models.quantize import DTYPES, exact_modules, load_quantised, model_config
from effllm.records import Metric
from effllm.specs import HarnessSpec, InferenceSpec, QuantSpec
from effllm.stage import Outcome, run_job


def load_model(model_dir: str | os.PathLike, precision: str, quant: QuantSpec):
    """The model at ``precision``; returns (model, notes about what was kept unquantised)."""
    model_config(model_dir)  # imports our Mamba/RWKV fixes before the weights load
    if precision in DTYPES:  # on the job's device (load_quantised places int8/int4 there)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[precision])
        return model.to(place().device), None
    if precision not in ("int8", "int4"):
        raise ValueError(f"precision {precision!r}: one of {[*DTYPES, 'int8', 'int4']}")
    # Unquantised parts (embeddings, head, norms) in the compute dtype, as the bf16 run holds them.
    dtype = DTYPES[quant.compute_dtype or "bf16"] if precision == "int4" else torch.bfloat16
    return load_quantised(model_dir, precision, quant, dtype)


class _TokenClock:
    """A ``generate`` streamer that stamps the time tokens leave the model: the prompt is put
    first, then the new tokens (one at a time, or a verified run of them under speculative
    decoding), so first-token and per-token decode times are read directly, never as a
    difference of two separate runs that noise can make negative."""

    def __init__(self):
        self.stamps: list[float] = []
        self.counts: list[int] = []

    def put(self, value) -> None:
        sync()
        self.stamps.append(time.perf_counter())
        self.counts.append(int(value.numel()))

    def end(self) -> None:
        pass


def time_generation(model, prompt_ids: torch.Tensor, new_tokens: int, pad_id: int,
                    warmup: int, min_runs: int, min_seconds: float, window: Window,
                    options: dict | None = None, make_cache=lambda: None) -> dict:
    """Per repeat of fixed-length greedy generation: time to first token (prefill), time per
    output token after it (decode, from the token timestamps) and end-to-end latency.

    Warm-up runs (which on CPU also trigger bitsandbytes' one-off 4-bit weight repack) happen
    before ``window`` opens, so memory and energy cover only the timed repeats. Timing noise can
    widen the spread but never fails the job. ``options``: more generate() arguments
    (speculative decoding); ``make_cache``: a fresh decoding cache per call (None: the model's).
    """
    if new_tokens < 2:
        raise ValueError("inference.new_tokens must be at least 2 to time decoding")
    # min_new_tokens = max_new_tokens suppresses end-of-sequence: the length is fixed.
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad_id)

    options = options or {}

    as_dict = GenerationConfig(**{**cfg.to_diff_dict(), "return_dict_in_generate": True})

    def gen(clock=None, dict_out=False):
        cache = make_cache()
        return model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                              generation_config=as_dict if dict_out else cfg, streamer=clock,
                              **options, **({} if cache is None else {"past_key_values": cache}))

    with torch.no_grad():
        for _ in range(warmup):
            gen()
        prefill, e2e, decode = [], [], []
        with window:
            begin = time.perf_counter()
            while len(e2e) < min_runs or time.perf_counter() - begin < min_seconds:
                clock = _TokenClock()
                with Timer() as t:
                    out = gen(clock)
                produced = out.shape[1] - prompt_ids.shape[1]
                streamed = sum(clock.counts[1:]) // prompt_ids.shape[0]
                if produced != new_tokens or streamed != new_tokens:
                    raise RuntimeError(f"generated {produced} tokens, expected {new_tokens}")
                first, last = clock.stamps[1], clock.stamps[-1]
                prefill.append(first - t.start)
                after_first = new_tokens - clock.counts[1] // prompt_ids.shape[0]
                # a speculative first round may yield every token at once: no decode time
                if after_first:
                    decode.append((last - first) / after_first)
                e2e.append(t.seconds)
        # One more, outside the window, with every tensor booked: the memory of the technique.
        draft = options.get("assistant_model")
        with track(model, *([draft] if draft is not None else []),
                   extra_bytes=quant_state_bytes(model)) as tracked:
            out = gen(dict_out=True)
        account = tracked.account
        state = next((getattr(out, f) for f in CACHE_FIELDS if getattr(out, f, None) is not None),
                     None)
        account.kv_cache = tensor_bytes(state) if state is not None else None
        # tokens a transformers Cache holds (the prompt and every new token but the last, never
        # fed back); None for a constant-size state (Mamba, RWKV): no bytes per token
        length = getattr(state, "get_seq_length", None)
        cached = prompt_ids.shape[0] * length() if length else None
        window.account(account, f"one generate() of the timed batch ({prompt_ids.shape[0]} x "
                                f"{prompt_ids.shape[1]} prompt, {new_tokens} new tokens)")
    return {"prefill": prefill, "e2e": e2e, "decode": decode, "cached_tokens": cached}


def corpus_test_tokens(tokenizer, corpus_dir: str | os.PathLike,
                       max_tokens: int | None = None, split: str = "test") -> np.ndarray:
    """The corpus test documents (or another ``split``'s) in the served model's own token ids:
    with the pipeline's tokenizer its ``test.npy`` (beside ``corpus_dir``), memory-mapped; a hub
    model brings its own tokenizer (perplexities not comparable with ours), which encodes test
    documents in order only until ``max_tokens`` (None: all)."""
    from effllm.data.tokenizer import encode_split, pipeline_tokens

    tokens = pipeline_tokens(tokenizer, Path(corpus_dir).parent / "tokens", split)
    return tokens if tokens is not None else encode_split(tokenizer, corpus_dir, split,
                                                          max_tokens)


def timing_prompts(tokens: np.ndarray, length: int, batch: int, seed: int) -> torch.Tensor:
    """``batch`` prompts of ``length`` corpus test tokens from seeded random offsets."""
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, size=batch)
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))


def harness_metrics(model, tokenizer, harness: HarnessSpec, seed: int) -> dict[str, Metric]:
    """lm-evaluation-harness scores of the in-memory model, one ``task_*`` metric per task, and
    ``performance`` as their mean (the paper's "Avg performance")."""
    from effllm.evaluation.harness import TaskSpec, average_performance, evaluate_tasks
    from effllm.records import task_metric

    tasks = harness.tasks
    if isinstance(tasks, dict):
        tasks = {name: TaskSpec(*pair) for name, pair in harness.task_pairs().items()}
    limit = harness.limit
    scores = evaluate_tasks(
        model, tokenizer, tasks, limit=limit, batch_size=harness.batch_size or 1,
        include_path=harness.include_path, num_fewshot=harness.num_fewshot,
        seed=seed, apply_chat_template=bool(harness.apply_chat_template))
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


def run_inference(spec: InferenceSpec | dict, model_dir: str | os.PathLike,
                  corpus_dir: str | os.PathLike, reasoning_dir: str | os.PathLike,
                  record_out: str | os.PathLike, draft_dir: str | os.PathLike | None = None):
    """Serve one model at one precision (and technique): time it, score it, write its
    record. ``draft_dir``: the draft model of speculative decoding."""
    return run_job(spec, lambda s, placement: serve(s, placement, model_dir, corpus_dir,
                                                    reasoning_dir, draft_dir), record_out)


def load_served(spec: InferenceSpec, model_dir, draft_dir=None, calibration=None):
    """(model, note, seconds the weight quantiser took or None, draft model or None, the
    pruning's metrics): the model at the spec's precision, its linear layers then quantised by
    ``spec.weights`` or pruned by ``spec.prune`` (``calibration(windows)``: that many token
    windows of the train split, [windows, length])."""
    model, note = load_model(model_dir, spec.precision, spec.quant)
    seconds, pruned = None, {}
    if spec.weights:
        note, seconds = quantize_weights(model, spec.weights, exact_modules(model_dir))
    if spec.prune:
        model, note, pruned = prune_served(spec, model, exact_modules(model_dir), calibration)
    draft = None
    if spec.speculative and spec.speculative.draft:
        if draft_dir is None:
            raise ValueError(f"{spec.run_id}: speculative decoding with draft "
                             f"{spec.speculative.draft!r} needs its model directory")
        check_draft_tokenizer(AutoTokenizer.from_pretrained(model_dir),
                              AutoTokenizer.from_pretrained(draft_dir), spec.run_id)
        draft, _ = load_model(draft_dir, spec.precision if spec.precision in DTYPES else "bf16",
                              spec.quant)
        draft.eval()
    return model, note or None, seconds, draft, pruned


def prune_served(spec: InferenceSpec, model, keep: list[str], calibration
                 ) -> tuple[torch.nn.Module, str, dict[str, Metric]]:
    """One-shot post-training pruning of the loaded model (``spec.prune``); returns the pruned
    model (structured: a new, sliced one), a note, and its metrics: the share of the linear
    layers' weights removed, the pruning's wall time and its calibration tokens."""
    from effllm.models.params import count_params
    from effllm.models.pruning import oneshot_prune

    p = spec.prune
    # magnitude reads no text
    ids = (calibration(p.calib_windows or CALIB_WINDOWS) if p.method != "magnitude"
           else torch.zeros(0, 0, dtype=torch.long))
    batches = [ids[i:i + CALIB_BATCH].to(model.device)
               for i in range(0, len(ids), CALIB_BATCH)]
    before = linear_sparsity(model, keep)[1]
    start = time.perf_counter()
    if p.method == "structured":
        removed_target = int(p.sparsity * before)
        target = count_params(model)[0] - removed_target
        model, removed = oneshot_prune(model, [{"input_ids": b, "labels": b} for b in batches],
                                       target, p.groups or ("heads", "ffn"))
        after = linear_sparsity(model, keep)[1]
        sparsity, passes = 1 - after / before, 2 * len(batches)
        note = (f"structured: {removed} groups removed, sliced to "
                f"{count_params(model)[0]:,} parameters (target {target:,})")
        how = ("1 - the decoder layers' linear weights after the slice / before (the head and "
               "embeddings untouched)")
    else:
        note, passes = prune_weights(model, p, keep,
                                     [{"input_ids": b, "logits_to_keep": 1} for b in batches])
        zeros, total = linear_sparsity(model, keep)
        sparsity = zeros / total
        how = f"zero weights / weights of the {p.method}-pruned linear layers (dense storage)"
    seconds = time.perf_counter() - start
    what = p.pattern or f"{p.sparsity:.0%}"
    return model, note, {
        "weight_sparsity": Metric.measured(sparsity, "fraction", "count_weights", how),
        "prune_seconds": Metric.measured(seconds, "s", "perf_counter",
                                         f"{p.method} {what}, calibration passes included"),
        "calibration_tokens": Metric.configured(
            int(ids.numel()) if passes else 0, "tokens", "calib_windows x eval_max_length",
            f"{passes} passes over {len(ids)} train-split windows "
            + ("(saliency: forward and backward; compensation: forward)"
               if p.method == "structured" else "(input norms: forward)" if passes
               else "(magnitude: none read)"))}


def serve(spec: InferenceSpec, placement: Placement, model_dir, corpus_dir, reasoning_dir,
          draft_dir=None) -> Outcome:
    """Load at the precision, time decoding in its own window, then the quality passes (never
    time under evaluation)."""
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(model_dir), model_dir)
    ev = spec.eval

    def calibration(windows: int) -> torch.Tensor:
        train = corpus_test_tokens(tokenizer, corpus_dir, 4 * windows * ev.eval_max_length,
                                   "train")
        return timing_prompts(train, ev.eval_max_length, windows, spec.seed)

    with Window(spec.measure.sample_interval_s) as load_window:
        model, quant_note, quantize_seconds, draft, pruned = load_served(
            spec, model_dir, draft_dir, calibration)
    model.eval()
    tokens = corpus_test_tokens(tokenizer, corpus_dir, max(
        spec.eval.ppl_tokens, spec.eval.eval_max_length, spec.eval.prompt_tokens + 1))
    pad_ids = (int((tokens == tokenizer.pad_token_id).sum())
               if tokenizer.pad_token_id != tokenizer.eos_token_id else None)
    prompt_ids = timing_prompts(tokens, ev.prompt_tokens, ev.batch_size, spec.seed)
    window = Window(spec.measure.sample_interval_s, spec.measure.watts_per_core)
    options = generate_options(model, spec.speculative, draft)
    make_cache = cache_factory(model, spec.kv_cache)
    times = time_generation(model, prompt_ids.to(model.device), ev.new_tokens,
                            tokenizer.pad_token_id, ev.warmup_runs, ev.min_runs, ev.min_seconds,
                            window, options, make_cache)
    flops = generation_flops(model, prompt_ids.to(model.device), ev.new_tokens,
                             tokenizer.pad_token_id, options)  # untimed, after the window
    peak = device_peak(spec.measure.peak_flops, model.device, compute_dtype(spec))
    metrics = timing_metrics(ev, times, window, flops, peak)
    metrics.update(technique_metrics(spec, model, prompt_ids.to(model.device),
                                     tokenizer.pad_token_id, options, draft, window,
                                     quantize_seconds, times["cached_tokens"]))
    metrics.update(cached_quality(spec, model, tokens, make_cache))
    metrics.update(pruned)
    metrics.update({
        "weight_bytes": Metric.measured(weight_bytes(model), "B", "tensor_bytes_with_quant_state",
                                        quant_note),
        "bits_nominal": Metric.configured(spec.bits, "bits", "nominal_bits"),
        "load_memory_peak": load_peak(load_window),
    })
    metrics.update(quality_metrics(spec, model, tokenizer, tokens, reasoning_dir))
    layers = linear_weight_bytes(model)  # as served: after the CPU 4-bit repack
    metrics["linear_weight_bytes"] = Metric.measured(
        sum(layers.values()), "B", "tensor_bytes_with_quant_state",
        f"{len(layers)} linear layers, weights and quantisation state (biases excluded); "
        "per layer in provenance.execution")
    return Outcome(
        metrics, {"e2e_seconds": times["e2e"], "prefill_seconds": times["prefill"],
                  "decode_seconds_per_token": times["decode"]},
        {"precision": spec.precision, "notes": [quant_note] if quant_note else [],
         **sequence_kernel(model, str(model.device)),
         "linear_weight_bytes": layers,
         # documents encoded unpadded (issue 16: earlier records lack this field)
         "corpus_test_tokens": {"count": int(tokens.size), "pad_ids": pad_ids}})


def compute_dtype(spec: InferenceSpec) -> str:
    """The float dtype the served model's matmuls run in, whose peak MFU divides by: the
    precision itself, or for bitsandbytes the dtype its layers compute in (int4: the 4-bit
    compute dtype; int8: bf16, the dtype of its unquantised parts)."""
    if spec.precision in ("fp32", "bf16", "fp16"):
        return spec.precision
    return (spec.quant.compute_dtype or "bf16") if spec.precision == "int4" else "bf16"


@torch.no_grad()
def generation_flops(model, prompt_ids: torch.Tensor, new_tokens: int, pad_id: int,
                     options: dict | None = None) -> int:
    """FLOPs of one timed repeat (fixed-length greedy generate; a draft model's included),
    counted in a separate pass: the counter runs Python per op and must never sit inside the
    timing."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad_id)
    return count_flops(lambda: model.generate(
        input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), generation_config=cfg,
        **(options or {})))


@torch.no_grad()
def technique_metrics(spec: InferenceSpec, model, prompt_ids: torch.Tensor, pad_id: int,
                      options: dict, draft, window: Window, quantize_seconds: float | None,
                      cached: int | None) -> dict[str, Metric]:
    """What the techniques change beyond latency: KV bytes per cached token (every run whose
    decoding state is a transformers Cache), the weight quantiser's time, and for speculative
    decoding tokens per pass of the served model, the draft's acceptance rate and whether the
    output is plain greedy decoding's."""
    ev = spec.eval
    metrics = {}
    kv = window.tensors.kv_cache if window.tensors else None
    if kv is not None and cached:
        metrics["kv_cache_bytes_per_token"] = Metric.measured(
            kv / cached, "B/token", "tensor_bytes_of_cache",
            f"bytes of the cache after one generate() of {ev.prompt_tokens} + {ev.new_tokens} "
            f"tokens x batch {ev.batch_size}, over the {cached} tokens it holds"
            + (f"; {spec.kv_cache.backend} cache" if spec.kv_cache else ""))
    if quantize_seconds is not None:
        metrics["quantize_seconds"] = Metric.measured(
            quantize_seconds, "s", "perf_counter",
            f"{spec.weights.method} int{spec.weights.bits} over the loaded model; "
            "no calibration data (weight error only)")
    if not spec.speculative:
        return metrics
    cfg = GenerationConfig(max_new_tokens=ev.new_tokens, min_new_tokens=ev.new_tokens,
                           do_sample=False, pad_token_id=pad_id)
    mask = torch.ones_like(prompt_ids)
    with PassCounter(model, draft) as passes:
        fast = model.generate(input_ids=prompt_ids, attention_mask=mask, generation_config=cfg,
                              **options)
    plain = model.generate(input_ids=prompt_ids, attention_mask=mask, generation_config=cfg)
    new = fast.shape[1] - prompt_ids.shape[1]
    served = passes.calls["target"]
    how = f"one greedy generate() of {new} tokens, forward passes counted"
    metrics["tokens_per_pass"] = Metric.measured(new / served, "tokens/pass", "forward_hooks",
                                                 f"{how}: {served} passes of the served model")
    if draft is not None:
        accepted, proposed = new - served, passes.calls["draft"]
        what = (f"{how}: {accepted} accepted of {proposed} draft tokens (accepted = new tokens "
                "- served-model passes)")
        metrics["draft_acceptance"] = (
            Metric.measured(accepted / proposed, "1", "forward_hooks", what) if proposed
            else Metric.unavailable("1", "forward_hooks", f"{how}: the draft proposed nothing"))
    same = (fast == plain).all(dim=1).float().mean().item()
    metrics["identical_output"] = Metric.measured(
        same, "fraction", "token_equality_vs_plain_greedy",
        f"timed prompts whose {new} tokens equal plain greedy decoding's, at "
        f"{spec.precision}")
    return metrics


def cached_quality(spec: InferenceSpec, model, tokens: np.ndarray, make_cache
                   ) -> dict[str, Metric]:
    """Perplexity of each window's second half read through the decoding cache (the KV cache's
    quality: plain perplexity never reads a cache)."""
    ev = spec.eval
    method = "exp_mean_nll_second_half_from_cache"
    try:
        ppl, scored = cached_perplexity(model, tokens, ev.eval_max_length, ev.ppl_tokens,
                                        make_cache)
    except NoCache as err:  # a recurrent state (Mamba, RWKV): no cache to read text back from
        return {"kv_perplexity": Metric.unavailable("1", method, str(err))}
    what = f"{spec.kv_cache.backend} KV cache" if spec.kv_cache else "the model's own cache"
    return {"kv_perplexity": finite_metric(
        ppl, "1", method,
        f"{scored} tokens: the second half of {ev.eval_max_length}-token windows after the "
        f"first half prefilled into {what}")}


def load_peak(window: Window) -> Metric:
    """Peak memory while loading: the device's on a GPU; on a CPU the process's (RSS, its
    method says so), since loading has no unit of work to account tensor by tensor."""
    metrics = window.metrics()
    peak = metrics["memory_peak"]
    return peak if peak.status != "unavailable" else metrics["memory_peak_rss"]


def timing_metrics(ev, times: dict, window: Window, flops: int | None = None,
                   peak: Peak | None = None) -> dict[str, Metric]:
    """Latency and throughput of the timed repeats (medians with their spread), what the
    window sampled while they ran, and MFU from ``flops`` per repeat over the ``peak`` (PCU =
    MFU where no duty cycle was sampled)."""
    e2e, prefill = (latency_summary(times[k]) for k in ("e2e", "prefill"))
    decode = latency_summary(times["decode"]) if times["decode"] else None
    generated = ev.batch_size * ev.new_tokens
    note = (f"{e2e['count']} runs after {ev.warmup_runs} warm-up; batch {ev.batch_size}, "
            f"prompt {ev.prompt_tokens}, exactly {ev.new_tokens} new tokens "
            f"(min_new_tokens = max_new_tokens)")

    def spread(s: dict) -> str:
        return f"median of {s['count']} repeats, IQR {s['iqr']:.3g} s, cv {s['cv']:.3f}"

    metrics = window.metrics()
    energy = metrics["energy"]
    if energy.status != "unavailable":  # measured or estimated, as the energy is
        what = "window energy over the tokens of the timed repeats"
        metrics["energy_per_token"] = Metric(
            energy.value / (generated * e2e["count"]), "J/token", energy.method, energy.status,
            f"{what}; {energy.note}" if energy.note else what)
    else:
        metrics["energy_per_token"] = Metric.unavailable("J/token", "none", energy.note)
    if flops:
        metrics["mfu"] = mfu_metric(flops * e2e["count"] / e2e["total"], peak, 1,
                                    "flop_counter_generate x repeats / e2e time")
        pcu = pcu_from_mfu(metrics["mfu"], metrics.get("pcu"))
        if pcu is not None:
            metrics["pcu"] = pcu
    metrics.update({
        "al": Metric.measured(e2e["p50"], "s", Timer.method, f"{note}; {spread(e2e)}"),
        "al_cv": Metric.measured(e2e["cv"], "1", "std/mean of repeats", note),
        "prefill_latency": Metric.measured(prefill["p50"], "s", Timer.method + "_streamer",
                                           f"generate() start to first token; {spread(prefill)}"),
        "decode_latency": Metric.measured(
            decode["p50"], "s/token", Timer.method + "_streamer",
            f"(last token - first token) / tokens after the first, timestamps in one "
            f"generate(); {spread(decode)}") if decode else Metric.unavailable(
            "s/token", Timer.method + "_streamer", "every repeat streamed all its tokens at "
            "once (one speculative round): no decode time after the first token"),
        "it": Metric.measured(generated * e2e["count"] / e2e["total"], "tokens/s", Timer.method,
                              note),
    })
    return metrics


def quality_metrics(spec: InferenceSpec, model, tokenizer, tokens: np.ndarray, reasoning_dir
                    ) -> dict[str, Metric]:
    """Corpus perplexity in the model's own tokens, held-out reasoning quality and, when
    configured, lm-evaluation-harness task scores."""
    ev = spec.eval
    ppl, scored = perplexity(model, tokens, ev.eval_max_length, ev.ppl_tokens)
    metrics = {"perplexity": finite_metric(ppl, "1", "exp_mean_nll_corpus_test",
                                           f"{scored} scored tokens, the model's tokenizer")}
    problems = read_split(reasoning_dir, "test")[: ev.eval_problems]
    metrics.update(reasoning_metrics(model, tokenizer, problems, ev.eval_max_length,
                                     ev.eval_max_new_tokens, "inference.eval_max_new_tokens",
                                     desc=f"exact match {spec.run_id}"))
    if spec.harness:
        metrics.update(harness_metrics(model, tokenizer, spec.harness, spec.seed))
    return metrics
