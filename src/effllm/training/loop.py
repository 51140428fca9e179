"""The training loop shared by pretraining and fine-tuning, and what it measures.

One loop, so that AL, TT/ST and memory mean the same thing in every stage: per optimiser step,
wall time with a device sync (warm-up steps excluded), real tokens counted from the attention
mask (never seq_len × batch guessed), samples counted from the batch.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from effllm.distributed import all_reduce_, is_distributed, is_main, world
from effllm.measure import Timer, Window, count_flops, latency_summary
from effllm.precision import autocast
from effllm.records import Metric


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
    """Per-step loss, time and counts of one training run (``starts``: the step each process
    began at; more than one after a resume, and each start's first steps run cold)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.samples: list[int] = []
        self.starts: list[int] = [0]

    def state(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict) -> "StepLog":
        log = cls()
        vars(log).update({k: list(v) for k, v in state.items()})
        return log


class Checkpoint:
    """Resumable training state, kept outside a job's declared outputs (Snakemake deletes those
    before a job starts). A checkpoint whose fingerprint (the run's settings) differs is ignored.
    """

    def __init__(self, directory: str | os.PathLike, every: int, fingerprint: str):
        self.path = Path(directory) / "checkpoint.pt"
        self.every = every
        self.fingerprint = fingerprint

    def load(self, model, optimizer, scheduler) -> StepLog:
        if not self.path.is_file():
            return StepLog()
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            return StepLog()
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        log = StepLog.from_state(state["log"])
        log.starts.append(len(log.losses))
        return log

    def maybe_save(self, model, optimizer, scheduler, log: StepLog, steps: int) -> None:
        done = len(log.losses)
        if not self.every or done % self.every or done >= steps or not is_main():
            return  # every rank holds the same (DDP) state: rank 0 writes it
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):  # its state is spread over the ranks
            raise NotImplementedError("checkpoints of a sharded (FSDP) model are not supported")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"fingerprint": self.fingerprint, "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "log": log.state()}, tmp)
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous checkpoint intact

    def clear(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def step_batches(make_batch: Callable[[np.random.Generator], dict], seed: int, start: int = 0
                 ) -> Iterator[dict]:
    """Batch ``i`` drawn from its own generator seeded by (seed, i): a resumed run sees exactly
    the batches an uninterrupted one would."""
    step = start
    while True:
        yield make_batch(np.random.default_rng([seed, step]))
        step += 1


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (its state has no ``module.`` prefix)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train(model, batches: Iterator[dict], steps: int, optimizer, scheduler, grad_clip: float,
          window: Window, desc: str, log: StepLog | None = None,
          checkpoint: Checkpoint | None = None, precision: str = "fp32",
          device: str | None = None) -> StepLog:
    """Run optimiser steps up to ``steps`` (continuing ``log`` when resuming) inside ``window``,
    forward passes at ``precision`` (:func:`autocast`).

    Batches move to ``device`` (by default the model's; a model whose shards live on the CPU
    while it computes on a GPU needs it said). Under torchrun (``model`` wrapped in DDP or sharded
    by FSDP, each rank fed its slice of the global batch) a rank's loss is weighed by its share of
    the batch's predicted tokens, so the averaged gradient is the whole batch's mean, as in one
    process; the logged loss, tokens and samples are the global batch's.
    """
    log = log or StepLog()
    model.train()
    device = device or next(model.parameters()).device
    distributed = is_distributed()
    with window:
        for _ in tqdm(range(len(log.losses), steps), desc=desc, mininterval=2.0,
                      disable=not is_main()):
            batch = {key: value.to(device) for key, value in next(batches).items()}
            predicted = (batch["labels"][:, 1:] != -100).sum().double()  # tokens with a loss
            with Timer() as timer:
                with autocast(device, precision):
                    out = model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"], labels=batch["labels"])
                loss = out.loss
                if distributed:  # DDP/FSDP average over ranks: weigh by this rank's share
                    total = all_reduce_(predicted.clone())
                    loss = loss * (predicted * world() / total)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            counts = torch.stack([out.loss.detach().double() * predicted, predicted,
                                  batch["attention_mask"].sum().double(),  # float64: exact
                                  torch.tensor(float(batch["input_ids"].shape[0]),
                                               dtype=torch.float64, device=device)])
            all_reduce_(counts)  # the global batch's loss, tokens and samples
            loss = counts[0].item() / counts[1].item() if distributed else out.loss.item()
            tokens, samples = counts[2].item(), counts[3].item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss} at step {len(log.losses)}")
            log.losses.append(loss)
            log.seconds.append(timer.seconds)
            log.tokens.append(int(tokens))
            log.samples.append(int(samples))
            if checkpoint is not None:
                checkpoint.maybe_save(model, optimizer, scheduler, log, steps)
    return log


def step_metrics(log: StepLog, warmup: int, params_total: int, timer_method: str
                 ) -> dict[str, Metric]:
    """AL, throughput (TT/ST and plain rates) and final loss from the timed steps."""
    cold = {i for start in log.starts for i in range(start, start + warmup)}
    timed = [i for i in range(len(log.seconds)) if i not in cold]
    seconds = [log.seconds[i] for i in timed]
    tokens = [log.tokens[i] for i in timed]
    samples = [log.samples[i] for i in timed]
    stats = latency_summary(seconds)
    total = sum(seconds)
    note = f"{stats['count']} timed steps after {warmup} warm-up; cv {stats['cv']:.3f}"
    if len(log.starts) > 1:
        note += f"; resumed at step(s) {log.starts[1:]}, warm-up excluded after each"
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


def mfu_metric(flops_per_token: float | None, tokens_per_s: float, peak: float | None,
               devices: int = 1) -> Metric:
    """Model FLOP utilisation of ``devices`` devices (``tokens_per_s`` is all of theirs)."""
    if peak is None or flops_per_token is None:
        return Metric.unavailable("fraction", "none",
                                  "no device peak FLOP/s configured (measure.peak_flops)")
    return Metric.estimated(flops_per_token * tokens_per_s / (peak * devices), "fraction",
                            "flop_counter x tokens/s / (measure.peak_flops x devices)",
                            f"peak from config, not measured; {devices} device(s)")


def step_flops_per_token(model, batch: dict, precision: str = "fp32") -> float:
    """FLOPs of one training step per real token, counted in a separate fwd+bwd pass (the
    counter is slow). Under torchrun every rank counts its slice of the batch and the sums are
    the whole batch's, as one process would count it."""

    def step():
        with autocast(batch["input_ids"].device, precision):
            loss = model(**batch).loss
        loss.backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    counted = torch.tensor([float(flops), float(batch["attention_mask"].sum())],
                           dtype=torch.float64, device=batch["input_ids"].device)
    all_reduce_(counted)
    return (counted[0] / counted[1]).item()


def note_window(metrics: dict[str, Metric], text: str) -> None:
    """Add ``text`` to the notes of the metrics the sampling window measured (memory, energy,
    utilisation): what part of the run, or which rank, they describe."""
    for name in ("amu", "memory_peak", "aec", "energy", "pcu"):
        if name in metrics and metrics[name].status != "unavailable":
            metrics[name].note = f"{metrics[name].note or ''}; {text}".lstrip("; ")


def note_rank0(metrics: dict[str, Metric], world: int) -> None:
    """Rank 0 alone samples the window: host memory is its process's, while NVML figures cover
    all the job's GPUs. Say so when there are several ranks."""
    if world > 1:
        note_window(metrics, f"sampled by rank 0 of {world} ranks (host memory: its process; "
                             "NVML: the job's GPUs)")
