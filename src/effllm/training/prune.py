"""Pruning-aware pretraining (Xing et al. 2025, arXiv 2502.06663) and its one-shot baselines.

A run of the pruning block starts from a pretrained model of ours (its ``upstream``) and ends as
a smaller decoder of about ``target_params`` parameters with per-layer widths, trained on the
same batches as a model pretrained from scratch for ``train.steps`` steps:

* ``continuous``: train the source for ``prune_steps`` steps; every ``every`` steps mask the
  least salient groups (:mod:`effllm.models.pruning`; first-order saliency summed over the steps
  since the last event) down to a cubic schedule (Zhu & Gupta 2017) that reaches the target at
  ``prune_steps``; then slice and train the small model for the remaining steps;
* ``oneshot``: score the source on ``calib_batches`` batches, mask down to the target at once,
  slice, and train the small model for all ``train.steps`` steps.

``compensation`` applies the second-order (OBS-style) update to the layers each event cuts, from
``calib_batches`` forward passes. Each phase has its own AdamW, warm-up and cosine decay (the
paper does not say; a fresh optimiser is what slicing leaves). The record measures the final,
small model like any pretraining record (its training steps after the slice are the timed
ones), plus the route: source size, tokens, the pruning phase's time, and the trajectory of
widths at each event (series ``prune_*``) and the final per-layer widths (``layer_*``).
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import numpy as np
import torch

from effllm.data.tokenizer import load_tokenizer, save_tokenizer
from effllm.distributed import Placement, all_reduce_, end, is_distributed, world
from effllm.measure import Window
from effllm.models import DecoderForCausalLM
from effllm.models.params import count_params
from effllm.models.pruning import (
    Masks, apply_masks, as_decoder, check_prunable, compensate_model, group_saliency,
    params_of, select, slice_model,
)
from effllm.precision import PRECISION_NOTES, autocast
from effllm.records import Metric
from effllm.specs import PretrainSpec, PruningSpec
from effllm.stage import Outcome, run_job
from effllm.training.loop import (
    adamw, cosine_schedule, step_batches, step_flops_per_token, train, unwrap, use_checkpointing,
)
from effllm.training.pretrain import build_model, pretrain_metrics, window_batch

CALIBRATION_STREAM = 2**31 + 1  # batches drawn apart from the training stream (seed, i)


def run_prune(spec: PretrainSpec | dict, data_dir: str | os.PathLike,
              source_dir: str | os.PathLike, model_out: str | os.PathLike,
              record_out: str | os.PathLike):
    """One run of the pruning block: source in, small model and record out."""
    return run_job(spec, lambda s, placement: prune_pretrain(s, placement, Path(data_dir),
                                                             Path(source_dir)),
                   record_out, model_out)


def cubic_target(source: int, target: int, step: int, steps: int) -> int:
    """Parameters allowed after ``step`` of ``steps``: fast at first, slow near the target."""
    left = max(0.0, 1.0 - step / steps)
    return int(target + (source - target) * left**3)


def target_count(cfg: PruningSpec, tokenizer) -> int:
    """The target's parameter count: given, or that of the uniform target-size model."""
    if cfg.target_params:
        return cfg.target_params
    with torch.device("meta"):
        return count_params(build_model(cfg.target_model, tokenizer))[0]


def widths_entry(config, masks: Masks, tokens: int) -> dict[str, float]:
    w = masks.widths(config)
    return {"tokens": tokens, "params": params_of(config, w), "heads": sum(w["heads"]),
            "ffn_channels": sum(w["ffn"]), "hidden": w["hidden"]}


class Pruner:
    """The pruning phase's state: masks, accumulated saliency, trajectory."""

    def __init__(self, model: DecoderForCausalLM, cfg: PruningSpec, target: int,
                 calibration, tokens_per_step: int):
        self.model, self.cfg, self.target = model, cfg, target
        self.config = model.config
        self.masks = Masks.full(self.config)
        self.source = params_of(self.config, self.masks.widths(self.config))
        if target >= self.source:
            raise ValueError(f"target {target} parameters is not below the source's "
                             f"{self.source}")
        self.calibration = calibration
        self.tokens_per_step = tokens_per_step
        self.scores: Masks | None = None
        self.trajectory = [widths_entry(self.config, self.masks, 0)]
        self.removed = {"heads": 0, "ffn": 0, "hidden": 0}
        self.calibration_passes = 0  # passes over the calibration batches (saliency, OBS)

    def accumulate(self) -> None:
        """Add the current gradients' saliency (summed across steps between events)."""
        s = group_saliency(self.model, self.cfg.saliency)
        if self.scores is None:
            self.scores = s
            return
        self.scores = Masks([a + b for a, b in zip(self.scores.heads, s.heads)],
                            [a + b for a, b in zip(self.scores.ffn, s.ffn)],
                            self.scores.hidden + s.hidden)

    def event(self, allowed: int, tokens: int) -> None:
        """Mask down to ``allowed`` parameters by the saliency gathered so far (summed over the
        ranks: each ranks' one-shot gradients are its own; DDP's are already shared)."""
        if is_distributed():
            for score in (*self.scores.heads, *self.scores.ffn, self.scores.hidden):
                all_reduce_(score)
        new, removed = select(self.config, self.masks, self.scores, allowed,
                              self.cfg.groups)
        if self.cfg.compensation:
            reduce = all_reduce_ if is_distributed() else None
            self.calibration_passes += bool(compensate_model(
                self.model, self.masks, new, self.calibration(), self.cfg.damp, reduce))
        self.masks = new
        apply_masks(self.model, self.masks)
        for kind, n in removed.items():
            self.removed[kind] += n
        self.scores = None
        self.trajectory.append(widths_entry(self.config, self.masks, tokens))

    # train() hooks, during continuous pruning
    def on_gradients(self, step: int) -> None:
        self.accumulate()

    def on_step(self, step: int) -> None:
        apply_masks(self.model, self.masks)  # the optimiser moved masked weights off zero
        done = step + 1
        if done % self.cfg.every == 0 or done == self.cfg.prune_steps:
            allowed = cubic_target(self.source, self.target, done, self.cfg.prune_steps)
            self.event(allowed, done * self.tokens_per_step)


def oneshot_scores(pruner: Pruner, model, batches, precision: str,
                   micro_batch_size: int | None) -> None:
    """Saliency of the untouched source from the gradients of ``batches`` (no update): each
    batch's whole gradient (in micro-batches of ``micro_batch_size`` rows, weighed by their
    tokens), averaged over the ranks before the saliency's absolute value, so the masks do not
    depend on how many GPUs the job has."""
    device = next(model.parameters()).device
    for batch in batches:
        rows = batch["input_ids"].shape[0]
        size = micro_batch_size or rows
        total = (batch["labels"][:, 1:] != -100).sum()
        for start in range(0, rows, size):
            chunk = {k: v[start:start + size].to(device) for k, v in batch.items()}
            with autocast(device, precision):
                out = model(**chunk)
            share = (chunk["labels"][:, 1:] != -100).sum() / total
            (out.loss * share.to(out.loss.dtype)).backward()
        if is_distributed():
            for p in model.parameters():
                if p.grad is not None:
                    all_reduce_(p.grad)
                    p.grad /= world()
        pruner.accumulate()
        model.zero_grad(set_to_none=True)
    pruner.calibration_passes += 1


def phase(model, spec: PretrainSpec, lr: float, steps: int, batches, placement: Placement,
          window: Window, desc: str, pruner: Pruner | None = None):
    """Train ``model`` for ``steps`` with its own AdamW, warm-up and cosine decay."""
    t = spec.train
    optimizer = adamw(model, lr, t.weight_decay)
    scheduler = cosine_schedule(optimizer, min(t.warmup_steps, steps // 10 or 1), steps,
                                t.min_lr_ratio)
    trained = model
    if placement.world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if placement.device == "cpu" else [placement.device])
    return train(trained, batches, steps, optimizer, scheduler, t.grad_clip, window, desc,
                 precision=t.precision, micro_batch_size=t.micro_batch_size,
                 on_gradients=pruner.on_gradients if pruner else None,
                 on_step=pruner.on_step if pruner else None)


def prune_pretrain(spec: PretrainSpec, placement: Placement, data_dir: Path,
                   source_dir: Path) -> Outcome | None:
    """Prune the source as ``spec.pruning`` says, slice, train on; rank 0 gets the outcome."""
    from transformers import AutoModelForCausalLM

    cfg, t = spec.pruning, spec.train
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    train_tokens = np.load(data_dir / "train.npy", mmap_mode="r")
    val_tokens = np.load(data_dir / "validation.npy", mmap_mode="r")
    # Our decoder, or a cached Llama-architecture hub model mapped onto it weight for weight.
    model = as_decoder(AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32))
    check_prunable(model.config, cfg.groups)
    model.to(placement.device).train()
    use_checkpointing(model, t)  # as the grid's runs (and the GPU plan) do
    source_config = model.config
    local_batch = window_batch(train_tokens, t.batch_size, t.seq_len, placement.rank,
                               placement.world)
    calib_stream = [local_batch(np.random.default_rng([spec.seed, CALIBRATION_STREAM, i]))
                    for i in range(cfg.calib_batches)]

    def calibration():
        return [{k: v.to(placement.device) for k, v in b.items()} for b in calib_stream]

    tokens_per_step = t.batch_size * t.seq_len
    pruner = Pruner(model, cfg, target_count(cfg, tokenizer), calibration, tokens_per_step)
    lr = cfg.lr or t.lr
    started = time.perf_counter()
    prune_log = None
    if cfg.mode == "continuous":
        prune_log = phase(model, spec, lr, cfg.prune_steps,
                          step_batches(local_batch, spec.seed, 0), placement,
                          Window(spec.measure.sample_interval_s), f"prune {spec.run_id}",
                          pruner)
        first_step = cfg.prune_steps
    else:
        oneshot_scores(pruner, model, calibration(), t.precision, t.micro_batch_size)
        pruner.event(pruner.target, 0)
        first_step = 0
    small = slice_model(unwrap(model), pruner.masks)
    # Free the source (and its optimiser's and DDP's memory) before the measured phase, or the
    # device memory the small model's window reads would still hold it.
    del model
    pruner.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    prune_seconds = time.perf_counter() - started
    params_total = count_params(small)[0]
    expected = params_of(source_config, pruner.masks.widths(source_config))
    if params_total != expected:
        raise AssertionError(f"sliced model has {params_total} parameters, widths say {expected}")

    probe = {k: v.to(placement.device) for k, v in
             local_batch(np.random.default_rng([spec.seed, 2**31])).items()}
    flops_per_token = step_flops_per_token(small, probe, t.precision)
    use_checkpointing(small, t)  # after the FLOP count: it counts the plain step
    window = Window(spec.measure.sample_interval_s, spec.measure.watts_per_core)
    log = phase(small, spec, lr, t.steps - first_step,
                step_batches(local_batch, spec.seed, first_step), placement, window,
                f"train pruned {spec.run_id}")
    end()
    if not placement.main:
        return None
    small.eval()
    metrics = pretrain_metrics(spec, small, log, window, val_tokens, probe, flops_per_token,
                               params_total, params_total, placement.world)
    metrics.update(route_metrics(spec, pruner, source_config, small.config, prune_seconds))

    def save(folder: Path) -> None:
        small.save_pretrained(folder, safe_serialization=True)
        save_tokenizer(tokenizer, folder)

    return Outcome(metrics, {"train_loss": log.losses, "step_seconds": log.seconds,
                             **({"prune_train_loss": prune_log.losses} if prune_log else {}),
                             **route_series(pruner, source_config, small.config)},
                   {"precision": PRECISION_NOTES[t.precision],
                    "pruning": f"{cfg.mode}, groups {list(cfg.groups)}, saliency "
                               f"{cfg.saliency}, compensation {cfg.compensation}"},
                   save=save)


def route_metrics(spec: PretrainSpec, pruner: Pruner, source, final, seconds: float
                  ) -> dict[str, Metric]:
    cfg, t = spec.pruning, spec.train
    calib = cfg.calib_batches * pruner.calibration_passes
    return {
        "params_source": Metric.measured(pruner.source, "params", "count_widths"),
        "params_target": Metric.configured(pruner.target, "params", "pruning target"),
        "hidden_size": Metric.measured(final.hidden_size, "1", "config"),
        "source_hidden_size": Metric.configured(source.hidden_size, "1", "config"),
        "route_tokens": Metric.configured(t.steps * t.batch_size * t.seq_len, "tokens",
                                        "steps x batch x seq_len",
                                        f"{cfg.prune_steps if cfg.mode == 'continuous' else 0} "
                                        f"steps while pruning, the rest after the slice"),
        "calibration_tokens": Metric.configured(
            calib * t.batch_size * t.seq_len, "tokens", "calib_batches x batch x seq_len",
            f"{pruner.calibration_passes} passes over the calibration batches (one-shot "
            "saliency: forward and backward; compensation: forward), outside the training"),
        "prune_phase_seconds": Metric.measured(seconds, "s", "perf_counter",
                                               "source training and pruning, up to the slice"),
        **{f"groups_removed_{kind}": Metric.measured(n, "groups", "count")
           for kind, n in pruner.removed.items()},
    }


def route_series(pruner: Pruner, source, final) -> dict[str, list[float]]:
    out = {f"prune_{key}": [float(e[key]) for e in pruner.trajectory]
           for key in ("tokens", "params", "heads", "ffn_channels", "hidden")}
    layers = range(final.num_hidden_layers)
    out.update(layer_heads=[float(final.heads_at(i)) for i in layers],
               layer_kv_heads=[float(final.kv_heads_at(i)) for i in layers],
               layer_ffn=[float(final.ffn_at(i)) for i in layers],
               source_layer_heads=[float(source.heads_at(i)) for i in layers],
               source_layer_ffn=[float(source.ffn_at(i)) for i in layers])
    return out
