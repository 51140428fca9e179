"""Pretraining a decoder from scratch on the prepared token stream, measured."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from effllm.io import atomic_dir
from effllm.measure import Timer, Window, count_flops
from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.records import Metric, RunRecord, now_iso
from effllm.training.loop import (
    adamw, batch_iterator, cosine_schedule, count_params, mfu_metric, seed_everything,
    step_metrics, train,
)


def window_batch(tokens: np.ndarray, batch_size: int, seq_len: int):
    """A sampler of random contiguous windows (labels = inputs; the model shifts)."""

    def make(rng: np.random.Generator) -> dict:
        starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
        ids = torch.from_numpy(np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    return make


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 8
               ) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of held-out tokens; returns (ppl, scored)."""
    model.eval()
    n_windows = max(1, min(len(tokens), max_tokens) // seq_len)
    windows = [tokens[i * seq_len:(i + 1) * seq_len] for i in range(n_windows)]
    windows = [w for w in windows if len(w) == seq_len]
    if not windows:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than seq_len {seq_len}")
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.int64))
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return safe_exp(nll / count), count


def safe_exp(x: float) -> float:
    """exp that gives inf instead of raising for a huge (or NaN stays NaN) mean NLL."""
    return math.exp(x) if x < 709 or math.isnan(x) else math.inf


def build_model(model_settings: dict, tokenizer) -> DecoderForCausalLM:
    config = DecoderConfig(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **model_settings,
    )
    return DecoderForCausalLM(config)


def run_pretrain(spec: dict, data_dir: str | os.PathLike, model_out: str | os.PathLike,
                 record_out: str | os.PathLike) -> RunRecord:
    from effllm.data.tokenizer import load_tokenizer

    start = now_iso()
    settings, train_cfg = spec["settings"], spec["settings"]["train"]
    measure = settings["measure"]
    seed_everything(spec["seed"], measure["threads"])
    data_dir = Path(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    train_tokens = np.load(data_dir / "train.npy")
    val_tokens = np.load(data_dir / "validation.npy")

    model = build_model(settings["model"], tokenizer)
    params_total, _ = count_params(model)
    make_batch = window_batch(train_tokens, train_cfg["batch_size"], train_cfg["seq_len"])

    # FLOPs of one training step, counted in a separate pass (the counter is slow).
    probe = make_batch(np.random.default_rng(spec["seed"] + 1))
    flops = count_flops(lambda: model(**probe).loss.backward())
    model.zero_grad(set_to_none=True)
    flops_per_token = flops / int(probe["attention_mask"].sum())

    optimizer = adamw(model, train_cfg["lr"], train_cfg["weight_decay"])
    scheduler = cosine_schedule(optimizer, train_cfg["warmup_steps"], train_cfg["steps"],
                                train_cfg["min_lr_ratio"])
    window = Window(measure["sample_interval_s"])
    log = train(model, batch_iterator(make_batch, spec["seed"]), train_cfg["steps"], optimizer,
                scheduler, train_cfg["grad_clip"], window, desc=f"pretrain {spec['run_id']}")

    ppl, scored = perplexity(model, val_tokens, train_cfg["seq_len"], train_cfg["eval_tokens"])
    metrics = step_metrics(log, measure["warmup_steps"], params_total, Timer.method)
    metrics.update(window.metrics())
    metrics["perplexity"] = Metric.measured(ppl, "1", "exp_mean_nll_validation",
                                            f"{scored} scored tokens, seq_len "
                                            f"{train_cfg['seq_len']}")
    metrics["flops_per_token"] = Metric.measured(flops_per_token, "FLOP/token",
                                                 "flop_counter_fwd_bwd")
    metrics["flops_per_token_6n"] = Metric.estimated(
        6 * non_embedding_params(model), "FLOP/token", "analytic_6N",
        "6 x non-embedding parameters, attention FLOPs not included")
    metrics["params_total"] = Metric.measured(params_total, "params", "count_unique_parameters")
    metrics["params_active"] = Metric.measured(params_total, "params", "dense: all parameters")
    metrics["mfu"] = mfu_metric(flops_per_token, metrics["tokens_per_s"].value,
                                measure.get("peak_flops"))
    metrics["kv_cache_bytes_per_token"] = Metric.measured(
        kv_cache_bytes_per_token(model, probe["input_ids"][:1]), "B/token",
        "dynamic_cache_tensor_bytes", f"model dtype {model.dtype}")

    with atomic_dir(model_out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    record = RunRecord.for_run(
        spec, start, metrics,
        series={"train_loss": log.losses, "step_seconds": log.seconds},
    )
    record.save(record_out)
    return record


def non_embedding_params(model) -> int:
    embed = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embed)


@torch.no_grad()
def kv_cache_bytes_per_token(model, input_ids: torch.Tensor) -> float:
    """Bytes the KV cache actually holds per token after a cached forward pass."""
    model.eval()
    cache = model(input_ids=input_ids, use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size()
                for layer in cache.layers for t in (layer.keys, layer.values))
    return total / input_ids.shape[1]
