"""The training loop shared by pretraining and fine-tuning, and what it measures.

One loop, so that AL, TT/ST and memory mean the same thing in every stage: per optimiser step,
wall time with a device sync (warm-up steps excluded), real tokens counted from the attention
mask (never seq_len × batch guessed), samples counted from the batch.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from effllm.measure import Timer, Window, latency_summary
from effllm.records import Metric


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up, then cosine decay to ``min_ratio`` × the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not norms or biases), over trainable parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


class StepLog:
    """Per-step loss, time and counts of one training run."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.samples: list[int] = []


def train(model, batches: Iterator[dict], steps: int, optimizer, scheduler, grad_clip: float,
          window: Window, desc: str) -> StepLog:
    """Run ``steps`` optimiser steps inside ``window``; return the step log."""
    log = StepLog()
    model.train()
    with window:
        for _ in tqdm(range(steps), desc=desc, mininterval=2.0):
            batch = next(batches)
            with Timer() as timer:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"])
                out.loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss = out.loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss} at step {len(log.losses)}")
            log.losses.append(loss)
            log.seconds.append(timer.seconds)
            log.tokens.append(int(batch["attention_mask"].sum()))
            log.samples.append(int(batch["input_ids"].shape[0]))
    return log


def step_metrics(log: StepLog, warmup: int, params_total: int, timer_method: str
                 ) -> dict[str, Metric]:
    """AL, throughput (TT/ST and plain rates) and final loss from the timed steps."""
    timed = slice(warmup, None)
    seconds, tokens, samples = log.seconds[timed], log.tokens[timed], log.samples[timed]
    stats = latency_summary(seconds)
    total = sum(seconds)
    note = f"{stats['count']} timed steps after {warmup} warm-up; cv {stats['cv']:.3f}"
    tail = log.losses[-max(1, len(log.losses) // 10):]
    return {
        "al": Metric.measured(stats["mean"], "s", timer_method, note),
        "al_p90": Metric.measured(stats["p90"], "s", timer_method, note),
        "tokens_per_s": Metric.measured(sum(tokens) / total, "tokens/s", "attention_mask_sum",
                                        note),
        "samples_per_s": Metric.measured(sum(samples) / total, "samples/s", "batch_count", note),
        "tt": Metric.measured(sum(tokens) / params_total / total, "tokens/param/s",
                              "attention_mask_sum / params_total", note),
        "st": Metric.measured(sum(samples) / params_total / total, "samples/param/s",
                              "batch_count / params_total", note),
        "loss": Metric.measured(sum(tail) / len(tail), "nats/token", "mean_last_10pct_steps"),
    }


def mfu_metric(flops_per_token: float | None, tokens_per_s: float, peak: float | None) -> Metric:
    if peak is None or flops_per_token is None:
        return Metric.unavailable("fraction", "none",
                                  "no device peak FLOP/s configured (measure.peak_flops)")
    return Metric.estimated(flops_per_token * tokens_per_s / peak, "fraction",
                            "flop_counter x tokens/s / measure.peak_flops",
                            "peak from config, not measured")


def count_params(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights counted once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def batch_iterator(make_batch: Callable[[np.random.Generator], dict], seed: int
                   ) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    while True:
        yield make_batch(rng)
