"""Pretraining a decoder from scratch on the prepared token stream, measured."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from effllm.data.tokenizer import save_tokenizer
from effllm.io import atomic_dir
from effllm.launch import place
from effllm.measure import Timer, Window
from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.records import Metric, RunRecord, now_iso
from effllm.training.loop import (
    PRECISION_NOTES, Checkpoint, StepLog, adamw, autocast, cosine_schedule, count_params,
    mfu_metric, note_rank0, note_window, seed_everything, step_batches, step_flops_per_token,
    step_metrics, train,
)


def window_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rank: int = 0,
                 world: int = 1):
    """A sampler of random contiguous windows (labels = inputs; the model shifts).

    Every rank draws the same global batch and keeps rows ``rank::world``: together the ranks
    train on exactly the batch one process would (all windows are full, so slices weigh the same).
    """
    if batch_size % world:
        raise ValueError(f"pretrain.batch_size {batch_size} does not split over {world} ranks")

    def make(rng: np.random.Generator) -> dict:
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)[rank::world]
        ids = torch.from_numpy(np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    return make


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 8,
               precision: str = "fp32") -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of held-out tokens, forward passes at
    ``precision``; returns (ppl, scored)."""
    model.eval()
    n_windows = max(1, min(len(tokens), max_tokens) // seq_len)
    windows = [tokens[i * seq_len:(i + 1) * seq_len] for i in range(n_windows)]
    windows = [w for w in windows if len(w) == seq_len]
    if not windows:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than seq_len {seq_len}")
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.int64))
        ids = ids.to(model.device)
        with autocast(model.device, precision):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return safe_exp(nll / count), count


def safe_exp(x: float) -> float:
    """exp that gives inf instead of raising for a huge (or NaN stays NaN) mean NLL."""
    return math.exp(x) if x < 709 or math.isnan(x) else math.inf


def build_model(model_settings: dict, tokenizer):
    """Our decoder (any attention, position encoding, MoE), or a transformers baseline family."""
    settings = dict(model_settings)
    family = settings.pop("family", "decoder")
    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if family != "decoder":
        from effllm.models.baselines import build_baseline

        return build_baseline(family, settings, vocab_size=len(tokenizer), **ids)
    return DecoderForCausalLM(DecoderConfig(vocab_size=len(tokenizer), **ids, **settings))


def run_pretrain(spec: dict, data_dir: str | os.PathLike, model_out: str | os.PathLike,
                 record_out: str | os.PathLike,
                 checkpoint_dir: str | os.PathLike | None = None) -> RunRecord | None:
    """Train one model of the sweep from scratch, measure it, save model and record.

    With ``checkpoint_dir`` (outside the declared outputs) the run saves its state every
    ``train.checkpoint_every`` steps and a restarted job resumes from there. The model trains on
    a GPU when torch sees one; under torchrun (``effllm.launch.run_stage``) every rank trains
    its slice of each batch (DDP) and rank 0 measures, saves and returns the record (the other
    ranks return None).
    """
    from effllm.data.tokenizer import load_tokenizer
    from effllm.measure.cache import cache_bytes_per_token

    start = now_iso()
    settings, train_cfg = spec["settings"], spec["settings"]["train"]
    measure = settings["measure"]
    seed_everything(spec["seed"], measure["threads"])
    placement = place()
    data_dir = Path(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    train_tokens = np.load(data_dir / "train.npy")
    val_tokens = np.load(data_dir / "validation.npy")

    model = build_model(settings["model"], tokenizer)
    check_variant(model, settings["model"])
    params_total, _ = count_params(model)
    params_active = params_total
    if settings["model"].get("num_experts"):
        from effllm.models.moe import moe_param_counts

        _, params_active = moe_param_counts(model)
    local_batch = window_batch(train_tokens, train_cfg["batch_size"], train_cfg["seq_len"],
                               placement.rank, placement.world)
    model.to(placement.device)

    probe = local_batch(np.random.default_rng([spec["seed"], 2**31]))  # not a training step
    probe = {key: value.to(placement.device) for key, value in probe.items()}
    precision = train_cfg.get("precision", "fp32")
    flops_per_token = step_flops_per_token(model, probe, precision)

    optimizer = adamw(model, train_cfg["lr"], train_cfg["weight_decay"])
    scheduler = cosine_schedule(optimizer, train_cfg["warmup_steps"], train_cfg["steps"],
                                train_cfg["min_lr_ratio"])
    checkpoint = None
    if checkpoint_dir and train_cfg.get("checkpoint_every"):
        fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        checkpoint = Checkpoint(checkpoint_dir, train_cfg["checkpoint_every"], fingerprint)
    log = checkpoint.load(model, optimizer, scheduler) if checkpoint else StepLog()
    window = Window(measure["sample_interval_s"])
    trained = model
    if placement.world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if placement.device == "cpu" else [placement.device])
    log = train(trained, step_batches(local_batch, spec["seed"], len(log.losses)),
                train_cfg["steps"], optimizer, scheduler, train_cfg["grad_clip"], window,
                desc=f"pretrain {spec['run_id']}", log=log, checkpoint=checkpoint,
                precision=precision)
    if placement.world > 1:
        torch.distributed.destroy_process_group()
    if not placement.main:
        return None

    ppl, scored = perplexity(model, val_tokens, train_cfg["seq_len"], train_cfg["eval_tokens"],
                             precision=precision)
    metrics = step_metrics(log, measure["warmup_steps"], params_total, Timer.method)
    metrics.update(window.metrics())
    note_rank0(metrics, placement.world)
    if len(log.starts) > 1:
        note_window(metrics, f"window covers the steps after the resume at step "
                             f"{log.starts[-1]}")
    metrics["perplexity"] = Metric.measured(ppl, "1", "exp_mean_nll_validation",
                                            f"{scored} scored tokens, seq_len "
                                            f"{train_cfg['seq_len']}")
    metrics["flops_per_token"] = Metric.measured(flops_per_token, "FLOP/token",
                                                 "flop_counter_fwd_bwd", flop_note(settings))
    n_active = params_active - embedding_params(model)
    metrics["flops_per_token_6n"] = Metric.estimated(
        6 * n_active, "FLOP/token", "analytic_6N",
        "6 x active non-embedding parameters, attention FLOPs not included")
    metrics["params_total"] = Metric.measured(params_total, "params", "count_unique_parameters")
    metrics["params_active"] = Metric.measured(
        params_active, "params", "total - unrouted experts" if params_active != params_total
        else "dense: all parameters")
    metrics["mfu"] = mfu_metric(flops_per_token, metrics["tokens_per_s"].value,
                                measure.get("peak_flops"), placement.world)
    metrics["kv_cache_bytes_per_token"] = Metric.measured(
        cache_bytes_per_token(model, probe["input_ids"][:1]), "B/token",
        "cache_tensor_bytes_growth", f"model dtype {model.dtype}; growth of every tensor the "
        "decoding cache holds, per token (0 = constant-size state)")
    metrics["decode_latency_long"] = long_context_decode(model, val_tokens,
                                                         settings.get("long_context"))

    with atomic_dir(model_out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
    record = RunRecord.for_run(
        spec, start, metrics,
        series={"train_loss": log.losses, "step_seconds": log.seconds},
        execution={**placement.execution(), "precision": PRECISION_NOTES[precision]},
    )
    record.save(record_out)
    if checkpoint:
        checkpoint.clear()
    return record


def check_variant(model, model_settings: dict) -> None:
    """Assert the requested variant is really in the model (the paper's toolkit trained plain
    attention under every label and a dense model as 'MoE': protocol §9.1, §9.5)."""
    family = model_settings.get("family", "decoder")
    if family != "decoder":
        from effllm.models.baselines import FAMILIES

        expected = {"mamba": "Mamba", "rwkv": "Rwkv", "gpt_neox": "GPTNeoX"}[family]
        if family not in FAMILIES or not type(model).__name__.startswith(expected):
            raise AssertionError(f"built {type(model).__name__} for family {family!r}")
        return
    attn = model.model.layers[0].self_attn
    expected = {"mla": "MultiHeadLatentAttention", "nsa": "NativeSparseAttention"}.get(
        model_settings["attention"], "Attention")
    if type(attn).__name__ != expected:
        raise AssertionError(f"attention {model_settings['attention']!r} built "
                             f"{type(attn).__name__}")
    if expected == "Attention" and attn.n_kv != model_settings["num_key_value_heads"]:
        raise AssertionError(f"{attn.n_kv} KV heads, expected "
                             f"{model_settings['num_key_value_heads']}")
    experts = model_settings.get("num_experts", 0)
    mlp = model.model.layers[0].mlp
    if experts and len(getattr(mlp, "experts", ())) != experts:
        raise AssertionError(f"expected an MoE layer with {experts} experts, got "
                             f"{type(mlp).__name__}")


def flop_note(settings: dict) -> str:
    family = settings["model"].get("family", "decoder")
    if family in ("mamba", "rwkv"):
        return ("matmul and convolution FLOPs of one fwd+bwd step; the recurrent scan's "
                "elementwise work is not counted")
    return "one fwd+bwd step, counted per non-padding token"


def embedding_params(model) -> int:
    return model.get_input_embeddings().weight.numel()


@torch.no_grad()
def long_context_decode(model, tokens: np.ndarray, cfg: dict | None) -> Metric:
    """Time per generated token after a long prefilled context (beyond the paper): where
    sparse attention and small caches pay off. Fixed length, greedy, EOS disabled."""
    if not cfg or not cfg.get("tokens"):
        return Metric.unavailable("s/token", "none", "pretrain.long_context.tokens not set")
    context, new = cfg["tokens"], cfg["new_tokens"]
    limit = getattr(model.config, "max_position_embeddings", None)
    if getattr(model.config, "position_encoding", None) == "learned" and context + new > limit:
        return Metric.unavailable("s/token", "none", f"learned positions end at {limit}; a "
                                  f"{context}-token context cannot be encoded")
    model.eval()
    ids = torch.from_numpy(np.resize(tokens, context).astype(np.int64))[None].to(model.device)

    def generate(prompt, n):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=model.config.pad_token_id)

    try:
        generate(ids[:, :64], 2)  # warm-up
        per_token = []
        for _ in range(cfg["repeats"]):
            with Timer() as prefill:
                generate(ids, 1)
            with Timer() as full:
                generate(ids, new + 1)
            if full.seconds > prefill.seconds:  # otherwise noise swamped the decode: drop it
                per_token.append((full.seconds - prefill.seconds) / new)
    except (RuntimeError, ValueError) as err:  # e.g. a kernel's length limit: keep the run
        return Metric.unavailable("s/token", "none", f"long-context decoding failed: {err}")
    if not per_token:
        return Metric.unavailable("s/token", "none", f"decode time not above prefill time in "
                                  f"any of {cfg['repeats']} repeats (timing noise)")
    per_token.sort()
    return Metric.measured(per_token[len(per_token) // 2], "s/token", Timer.method + "_generate",
                           f"median of {len(per_token)}/{cfg['repeats']} repeats: (generate "
                           f"{new + 1} - generate 1) / {new} after a {context}-token context")
