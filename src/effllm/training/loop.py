"""The training loop shared by pretraining and fine-tuning, and what it measures.

One loop, so that AL, TT/ST and memory mean the same thing in every stage: per optimiser step,
wall time with a device sync (warm-up steps excluded), real tokens counted from the attention
mask (never seq_len × batch guessed), samples counted from the batch.
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from effllm.distributed import all_reduce_, is_distributed, is_main, world
from effllm.measure import Timer, Window, count_flops, latency_summary
from effllm.measure.peak import Peak, device_peak, pcu_from_mfu
from effllm.measure.peak import mfu_metric as peak_mfu
from effllm.measure.tensors import quant_state_bytes, track
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
        self.probed: list[int] = []  # steps run under the tensor tracker (slower: not timed)
        self.nonfinite: list[int] = []  # the step whose loss was NaN/inf (training stopped)
        self.extra: dict[str, list[float]] = {}  # per-step series of a loss_fn (end_step)

    def state(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict) -> "StepLog":
        log = cls()
        vars(log).update({k: {n: list(x) for n, x in v.items()} if isinstance(v, dict)
                          else list(v) for k, v in state.items()})
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
        """The saved state, into the model and optimiser (every rank reads the file: under FSDP
        each keeps its slices), and the log to continue; an empty log when there is none."""
        from effllm.training.sharding import is_sharded, load_full_state

        if not self.path.is_file():
            return StepLog()
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            return StepLog()
        if is_sharded(model):
            load_full_state(model, optimizer, state["model"], state["optimizer"])
        else:
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        log = StepLog.from_state(state["log"])
        log.starts.append(len(log.losses))
        return log

    def maybe_save(self, model, optimizer, scheduler, log: StepLog, steps: int) -> None:
        """Every ``every`` steps, rank 0 writes the whole state (DDP: its replica; FSDP: the
        shards gathered, a collective every rank joins), atomically."""
        from effllm.training.sharding import full_state, is_sharded

        done = len(log.losses)
        if not self.every or done % self.every or done >= steps:
            return
        if is_sharded(model):
            model_state, optim_state = full_state(model, optimizer)
        elif is_main():  # every rank holds the same (DDP) state
            model_state, optim_state = unwrap(model).state_dict(), optimizer.state_dict()
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"fingerprint": self.fingerprint, "model": model_state,
                    "optimizer": optim_state, "scheduler": scheduler.state_dict(),
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
          device: str | None = None, micro_batch_size: int | None = None,
          stop_on_nonfinite: bool = False, on_gradients: Callable[[int], None] | None = None,
          on_step: Callable[[int], None] | None = None, loss_fn: Callable | None = None
          ) -> StepLog:
    """Run optimiser steps up to ``steps`` (continuing ``log`` when resuming) inside ``window``,
    forward passes at ``precision`` (:func:`autocast`).

    Batches move to ``device`` (by default the model's; a model whose shards live on the CPU
    while it computes on a GPU needs it said). Under torchrun (``model`` wrapped in DDP or sharded
    by FSDP, each rank fed its slice of the global batch) a rank's loss is weighed by its share of
    the batch's predicted tokens, so the averaged gradient is the whole batch's mean, as in one
    process; the logged loss, tokens and samples are the global batch's. ``micro_batch_size``
    splits each rank's batch into passes of that many rows (gradient accumulation: the same
    gradient, less activation memory). One step runs under the tensor tracker
    (:mod:`effllm.measure.tensors`) and its account goes to ``window``. A non-finite loss
    raises, or with ``stop_on_nonfinite`` ends training there, noted in ``log.nonfinite``: the
    run is then marked diverged (:func:`divergence`) rather than lost. ``on_gradients(step)``
    runs when the step's gradients are complete (before clipping), ``on_step(step)`` after the
    optimiser step: pruning-aware training scores and masks there (:mod:`effllm.training.prune`).
    ``loss_fn(model, chunk)`` returns (the loss to minimise, the model's own loss to log) in
    place of the model's own loss: distillation's (:mod:`effllm.training.distill`); its
    ``end_step()``, outside the timed step, gives per-step values kept in ``log.extra``.
    """
    log = log or StepLog()
    model.train()
    device = device or next(model.parameters()).device
    distributed = is_distributed()
    # The tensor account is taken on this process's second step (optimiser state exists by
    # then, as in every later step), a warm-up step that the timing leaves out anyway.
    probe_at = len(log.losses) + (1 if steps - len(log.losses) > 1 else 0)
    with window:
        for _ in tqdm(range(len(log.losses), steps), desc=desc, mininterval=2.0,
                      disable=not is_main()):
            batch = {key: value.to(device) for key, value in next(batches).items()}
            predicted = (batch["labels"][:, 1:] != -100).sum().double()  # tokens with a loss
            probing = len(log.losses) == probe_at
            with Timer() as timer, _probe(probing, model, optimizer, device, window,
                                          getattr(loss_fn, "teacher", None)):
                total = all_reduce_(predicted.clone()) if distributed else predicted
                loss_sum = _accumulate(model, batch, micro_batch_size, predicted, total,
                                       precision, device, loss_fn)
                if on_gradients is not None:
                    on_gradients(len(log.losses))
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if on_step is not None:
                    on_step(len(log.losses))
            if probing:
                log.probed.append(len(log.losses))
            counts = torch.stack([loss_sum, predicted,
                                  batch["attention_mask"].sum().double(),  # float64: exact
                                  torch.tensor(float(batch["input_ids"].shape[0]),
                                               dtype=torch.float64, device=device)])
            all_reduce_(counts)  # the global batch's loss, tokens and samples
            loss = counts[0].item() / counts[1].item()
            tokens, samples = counts[2].item(), counts[3].item()
            if not math.isfinite(loss):
                if not stop_on_nonfinite:
                    raise FloatingPointError(f"{desc}: loss became {loss} at step "
                                             f"{len(log.losses)}")
                log.nonfinite.append(len(log.losses))  # diverged: the caller marks the run
                break
            log.losses.append(loss)
            for key, value in (loss_fn.end_step() if hasattr(loss_fn, "end_step")
                               else {}).items():
                log.extra.setdefault(key, []).append(value)
            log.seconds.append(timer.seconds)
            log.tokens.append(int(tokens))
            log.samples.append(int(samples))
            if checkpoint is not None:
                checkpoint.maybe_save(model, optimizer, scheduler, log, steps)
    return log


@contextmanager
def _probe(on: bool, model, optimizer, device, window: Window, teacher=None):
    """Track the tensors of this step (when ``on``) and attach the account to ``window``; a
    distillation ``teacher``'s weights count as parameters held for the step."""
    if not on:
        yield
        return
    inner = unwrap(model)
    also = (teacher,) if teacher is not None else ()
    with track(inner, *also, optimizer, device=device,
               extra_bytes=quant_state_bytes(inner)) as t:
        yield
    window.account(t.account, "one training step (forward, backward, optimiser step)")


def _accumulate(model, batch: dict, micro_batch_size: int | None, predicted, total,
                precision: str, device, loss_fn: Callable | None = None):
    """Forward and backward of the rank's batch in micro-batches of ``micro_batch_size`` rows
    (None: all at once), each loss weighed by its share of the global batch's predicted
    tokens, so the gradient equals one pass over the whole batch. DDP synchronises gradients
    on the last micro-batch only; ZeRO-3 reduce-scatters every micro-batch's
    (:func:`_gradient_sync`). Returns the summed token loss (float64)."""
    rows = batch["input_ids"].shape[0]
    size = micro_batch_size or rows
    starts = range(0, rows, size)
    scale = world() / total if is_distributed() else 1 / predicted
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, start in enumerate(starts):
        chunk = {key: value[start:start + size] for key, value in batch.items()}
        tokens = (chunk["labels"][:, 1:] != -100).sum().double()
        last = i == len(starts) - 1
        with _gradient_sync(model, last):
            with autocast(device, precision):
                if loss_fn is None:
                    loss = logged = model(input_ids=chunk["input_ids"],
                                          attention_mask=chunk["attention_mask"],
                                          labels=chunk["labels"]).loss
                else:
                    loss, logged = loss_fn(model, chunk)
            # DDP/FSDP average the ranks' gradients: weigh by this chunk's share of the batch
            (loss * (tokens * scale).to(loss.dtype)).backward()
        loss_sum += logged.detach().double() * tokens
    return loss_sum


@contextmanager
def _gradient_sync(model, sync: bool):
    """No gradient all-reduce for DDP's micro-batches before the last (``no_sync``). A ZeRO-3
    (FSDP2) model reduce-scatters after every micro-batch, as DeepSpeed's ZeRO-3 does: skipping
    it would keep every layer's whole, unsharded gradient on each rank until the last one (the
    plan: Full on Mistral-Small-24B, 2 GPUs, ~108 GB per GPU), the memory ZeRO-3 is there to
    save. A single process has nothing to skip."""
    if sync or not is_distributed() or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield


def use_checkpointing(model, train_cfg) -> None:
    """Gradient (activation) checkpointing when the run's settings ask for it: each layer keeps
    its input only and recomputes its inside in backward (non-reentrant, so frozen inputs and
    adapters need no special case)."""
    if getattr(train_cfg, "gradient_checkpointing", None):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})


def step_metrics(log: StepLog, warmup: int, params_total: int, timer_method: str
                 ) -> dict[str, Metric]:
    """AL, throughput (TT/ST and plain rates) and final loss from the timed steps."""
    cold = {i for start in log.starts for i in range(start, start + warmup)}
    cold |= set(getattr(log, "probed", []))  # tracked steps run slower
    timed = [i for i in range(len(log.seconds)) if i not in cold]
    stopped = getattr(log, "nonfinite", [])
    if stopped and not timed:  # a non-finite loss stopped the run within its warm-up
        timed = list(range(len(log.seconds)))
    seconds = [log.seconds[i] for i in timed]
    tokens = [log.tokens[i] for i in timed]
    samples = [log.samples[i] for i in timed]
    stats = latency_summary(seconds)
    total = sum(seconds)
    note = f"{stats['count']} timed steps after {warmup} warm-up; cv {stats['cv']:.3f}"
    if len(log.starts) > 1:
        note += f"; resumed at step(s) {log.starts[1:]}, warm-up excluded after each"
    if stopped:
        note += f"; stopped at step {stopped[0]} by a non-finite loss"
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


def divergence(losses: list[float], nonfinite: list[int], val_start: float | None,
               val_end: float | None) -> str | None:
    """Why a training run diverged, or None. Diverged: its loss became non-finite; its final
    training loss (mean of the last 10 % of steps, the ``loss`` metric) is above that of its
    first 10 %; or its validation loss ends non-finite or above its value before training
    (``val_start``; None: not measured, that test is skipped)."""
    if nonfinite:
        return f"the training loss became non-finite at step {nonfinite[0]}"
    n = max(1, len(losses) // 10)
    start, end = sum(losses[:n]) / n, sum(losses[-n:]) / n
    if end > start:
        return (f"final training loss {end:.4g} (last {n} steps) above its start {start:.4g} "
                f"(first {n} steps)")
    if val_end is None or not math.isfinite(val_end):
        return f"the validation loss after training is not finite ({val_end})"
    if val_start is not None and val_end > val_start:
        return f"validation loss {val_end:.4g} above its value before training {val_start:.4g}"
    return None


def mfu_metric(flops_per_token: float | None, tokens_per_s: float, peak: Peak | float | None,
               devices: int = 1) -> Metric:
    """Model FLOP utilisation of ``devices`` devices (``tokens_per_s`` is all of theirs); a
    plain number as ``peak`` is a configured one."""
    if isinstance(peak, (int, float)):
        peak = device_peak(peak, "cpu")
    rate = None if flops_per_token is None else flops_per_token * tokens_per_s
    return peak_mfu(rate, peak, devices)


def utilisation_metrics(metrics: dict[str, Metric], flops_per_token: float | None,
                        peak_flops: float | None, devices: int, device,
                        precision: str = "fp32") -> dict[str, Metric]:
    """``mfu`` (and ``pcu`` = MFU where the window measured no duty cycle) of a training run,
    from its step and window metrics in ``metrics``. The peak is ``peak_flops`` or, on a CPU,
    the machine's measured peak at the run's compute dtype."""
    peak = device_peak(peak_flops, device, precision)
    out = {"mfu": mfu_metric(flops_per_token, metrics["tokens_per_s"].value, peak, devices)}
    pcu = pcu_from_mfu(out["mfu"], metrics.get("pcu"))
    if pcu is not None:
        out["pcu"] = pcu
    return out


def step_flops_per_token(model, batch: dict, precision: str = "fp32",
                         loss_fn: Callable | None = None) -> float:
    """FLOPs of one training step per real token, counted in a separate fwd+bwd pass (the
    counter is slow; with ``loss_fn``, the loss the run trains on, a teacher's forward
    included). Under torchrun every rank counts its slice of the batch and the sums are
    the whole batch's, as one process would count it."""

    def step():
        with autocast(batch["input_ids"].device, precision):
            loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)[0]
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
