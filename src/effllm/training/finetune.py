"""Fine-tuning a pretrained model with one method of ``effllm.training.methods``, measured.

The base is read once per node, straight into each weight's training dtype on the device
(``methods.load_base``; ZeRO-3 Full: :func:`load_sharded`). The model folder holds the peft
adapter (``adapter/``) of an adapter method (whose base weights never change: peft wraps them and
only adapter tensors train) and, only when an inference run serves the model (``spec.served``),
the merged model in the training precision's dtype, which the inference stage quantises
(:func:`save_model`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

import effllm.models  # noqa: F401 - registers our config with the Auto classes
from effllm.data.sft import collate, encode_example
from effllm.data.splits import read_split
from effllm.data.tokenizer import save_tokenizer, with_pad_token
from effllm.distributed import Placement, end
from effllm.evaluation.scoring import completion_scores, reasoning_metrics
from effllm.measure import Timer, Window
from effllm.models.params import count_params
from effllm.precision import PRECISION_NOTES, autocast
from effllm.evaluation.perplexity import finite_metric
from effllm.records import METRICS, Metric
from effllm.specs import FinetuneSpec, MethodSpec
from effllm.stage import Outcome, run_job
from effllm.training import loading, methods
from effllm.training.loading import empty_model
from effllm.training.loop import (
    StepLog, cosine_schedule, divergence, note_rank0, step_flops_per_token, step_metrics,
    train, use_checkpointing, utilisation_metrics,
)
from effllm.training.sharding import shard


def base_precision(method: str, precision: str) -> str:
    """How the base's weights were stored while a method trained (for the record)."""
    if precision == "fp32" or method == "full":
        return "fp32"
    if method == "freeze":
        return "bf16 frozen layers and embeddings, fp32 trained layers"
    return "bf16 (frozen)"


def epoch_batches(examples: list[dict], batch_size: int, pad_id: int, seed: int,
                  rank: int = 0, world: int = 1):
    """Shuffled batches, a new permutation every epoch, for as long as asked.

    Under torchrun every rank draws the same global batch and keeps rows ``rank::world``; the
    training loop weighs each rank's loss by its share of the batch's completion tokens.
    """
    if batch_size % world:
        raise ValueError(f"finetune.batch_size {batch_size} does not split over {world} ranks")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = collate([examples[j] for j in order[i:i + batch_size]], pad_id)
            yield {key: value[rank::world] for key, value in batch.items()}


def load_sharded(base_dir, placement, offload: bool = False, precision: str = "fp32",
                 method: MethodSpec | None = None):
    """Full fine-tuning over several ranks as ZeRO-3 with torch's FSDP2: parameters, gradients
    and optimiser state sharded over the ranks, one unit per decoder layer plus the rest, each
    layer's weights gathered only while it runs (DeepSpeed's ZeRO-3, the paper's Full*, shards
    the same three; ``effllm.training.sharding.shard``, with ``offload`` and bf16 as there).

    Rank 0 alone reads the weights, tensor by tensor from the checkpoint, each into its dtype as
    :func:`methods.load_base` gives it: fp32 for a trained weight (all of them for Full, None
    being Full), the precision's for a frozen one (Freeze's frozen layers and embeddings in bf16
    at bf16; FSDP2 needs one dtype only among a unit's trained weights). Every rank builds the
    model on the meta device and shards it, then rank 0's tensors are broadcast into the shards:
    a node holds one host copy of the model (rank 0's, plus each rank's shard), not one per
    rank.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = empty_model(base_dir)
    if method is not None:
        methods.dtypes_for_sharding(model, method, precision)
    dtypes = {name: p.dtype for name, p in model.named_parameters(remove_duplicate=False)}
    groups = loading.tied_groups(model)  # each tensor once, with its tied names
    buffers = {name: b.clone() for name, b in model.named_buffers(remove_duplicate=False)}
    shard(model, placement.device, precision, offload)
    model.to_empty(device="cpu" if offload else placement.device)  # shards live here
    with torch.no_grad():  # to_empty left the buffers uninitialised; they live where it computes
        for module_name, module in model.named_modules():
            for name, b in module.named_buffers(recurse=False):
                key = f"{module_name}.{name}" if module_name else name
                module._buffers[name] = buffers[key].to(placement.device)
    weights = {}
    if placement.main:
        for name, tensor in loading.read_tensors(base_dir, groups):
            weights.update({key: tensor.to(dtypes.get(key, torch.float32))
                            for key in groups[name]})
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                  broadcast_from_rank0=True))
    return model


def gathered(model, base_dir, placement):
    """The trained weights of a sharded model as a whole model on rank 0's CPU, to be saved (a
    collective: every rank calls it; the other ranks get None). Nothing is read from disk."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if not placement.main:
        return None
    whole = empty_model(base_dir)
    whole.load_state_dict(state, assign=True)
    whole.tie_weights()
    return whole


def run_finetune(spec: FinetuneSpec | dict, base_dir: str | os.PathLike,
                 reasoning_dir: str | os.PathLike, model_out: str | os.PathLike | None,
                 record_out: str | os.PathLike):
    """Fine-tune one base with one method, measure it, save its model folder (unless
    ``model_out`` is None: a tune run; :func:`save_model`) and the record (rank 0; under
    torchrun the other ranks train and score their shares, then return None)."""
    return run_job(spec, lambda s, placement: finetune(s, placement, base_dir, reasoning_dir),
                   record_out, model_out)


def training_set(spec: FinetuneSpec, tokenizer, reasoning_dir) -> tuple[list[dict], int]:
    """(encoded training examples, optimiser steps), refusing a run with no timed step."""
    train_cfg = spec.train
    train_set = read_split(reasoning_dir, "train")[: train_cfg.max_samples]
    examples = [encode_example(tokenizer, p["prompt"], p["completion"], train_cfg.max_length)
                for p in train_set]
    if len(examples) < train_cfg.batch_size:
        raise ValueError(f"{len(examples)} training examples, fewer than one batch of "
                         f"{train_cfg.batch_size}")
    steps = (len(examples) // train_cfg.batch_size) * train_cfg.epochs
    if train_cfg.max_steps:
        steps = min(steps, train_cfg.max_steps)
    if steps <= spec.measure.warmup_steps:
        raise ValueError(f"{steps} fine-tuning steps leave none after "
                         f"{spec.measure.warmup_steps} warm-up")
    return examples, steps


def finetune(spec: FinetuneSpec, placement: Placement, base_dir, reasoning_dir
             ) -> Outcome | None:
    """Load, adapt, train, score; rank 0 gets the outcome, the other ranks None."""
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(base_dir), base_dir)
    method, train_cfg, device = spec.method, spec.train, placement.device
    precision = train_cfg.precision
    sharded = placement.world > 1 and method.name in methods.SHARDED_METHODS
    offload = sharded and bool(method.offload)
    if sharded:
        model, base_note = load_sharded(base_dir, placement, offload, precision, method), None
    else:  # on the device, frozen weights in the precision's dtype, read by rank 0 alone
        model, base_note = methods.load_base(base_dir, method, precision, device)
    examples, steps = training_set(spec, tokenizer, reasoning_dir)

    # Prepared on the device: PiSSA's SVD and DoRA's norms run there, per layer in fp32; the
    # optimiser's state is made on the device at its first step.
    model, optimizer = methods.prepare(model, method, train_cfg.lr, precision=precision)
    if not sharded and not method.qlora:  # a 4-bit base is placed by its loader
        model.to(device)
    initial = methods.initial_adapter(model, method) if placement.main else None  # PiSSA's
    params = count_params(model)

    def batches(seed: int):
        return epoch_batches(examples, train_cfg.batch_size, tokenizer.pad_token_id, seed,
                             placement.rank, placement.world)

    # FLOPs of one step in a separate pass. The counter follows autograd, so frozen weights cost
    # forward + input gradient only (about 4N per token instead of 6N).
    probe = {key: value.to(device) for key, value in next(batches(spec.seed + 1)).items()}
    flops_per_token = step_flops_per_token(model, probe, precision)
    val_start = start_val_loss(spec, model, tokenizer, reasoning_dir, device)  # divergence
    scheduler = cosine_schedule(optimizer, math.ceil(train_cfg.warmup_ratio * steps), steps,
                                0.0)
    use_checkpointing(model, train_cfg)  # after the FLOP count: it counts the plain step
    window = Window(spec.measure.sample_interval_s, spec.measure.watts_per_core)
    trained = model
    if placement.world > 1 and not sharded:  # adapter methods: replicas, gradients averaged
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if device == "cpu" else [device])
    log = train(trained, batches(spec.seed), steps, optimizer, scheduler, 1.0, window,
                desc=f"finetune {spec.run_id}", precision=precision, device=device,
                micro_batch_size=train_cfg.micro_batch_size, stop_on_nonfinite=True)
    if log.nonfinite and not log.losses:
        raise FloatingPointError(f"finetune {spec.run_id}: the loss of the first step is not "
                                 "finite: the base or the data is broken, not the rate")
    quality = {} if log.nonfinite else score(spec, model, tokenizer, reasoning_dir, device)
    if sharded:  # every rank hands in its shards; rank 0 saves the whole model, if served
        model = gathered(model, base_dir, placement) if spec.served else None
    end()
    if not placement.main:
        return None
    metrics = finetune_metrics(spec, log, window, quality, flops_per_token, params,
                               placement.world, device)
    mark_divergence(metrics, log, val_start)

    def save(folder: Path) -> None:
        save_model(spec, model, base_dir, tokenizer, folder, initial)

    strategy = "FSDP full shard (ZeRO-3)" + (" + CPU offload" if offload else "")
    return Outcome(metrics, {"train_loss": log.losses, "step_seconds": log.seconds},
                   execution(spec, base_note), strategy if sharded else "DDP", save,
                   initial[0].cleanup if initial else None)


def save_model(spec: FinetuneSpec, model, base_dir, tokenizer, folder: Path,
               initial=None) -> None:
    """The run's model folder: what is kept depends on whether an inference run serves the
    model (``spec.served``, set by the sweep), so that nothing large is written that nobody
    reads (docs/protocol.md §4, "What a fine-tuning run saves"):

    - served: the merged model in the training precision's dtype (bf16 at bf16, fp32 at fp32,
      folded layer by layer: ``methods.merged``), which the inference stage loads;
    - adapter methods, always: the peft adapter in ``adapter/`` (megabytes);
    - always: the tokenizer and a README saying what the folder holds and why.

    A Freeze or Full run no inference run serves keeps no weights (they are the model, as
    large as the base)."""
    method = spec.method.name
    adapter = method in methods.ADAPTER_METHODS
    if adapter:  # PiSSA's as a LoRA of the original base (``initial``: its first factors)
        methods.save_adapter(model, folder / "adapter", initial)
    if spec.served:
        methods.merged(model, base_dir, spec.train.precision).save_pretrained(
            folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    (folder / "README.md").write_text(model_readme(spec, adapter))


def model_readme(spec: FinetuneSpec, adapter: bool) -> str:
    """What a fine-tuning run's model folder holds, for whoever opens it."""
    dtype = methods.STORED[spec.train.precision]
    lines = [f"# {spec.run_id}", ""]
    if spec.served:
        lines.append(f"The fine-tuned model, merged and saved in {dtype} (the training "
                     f"precision, {spec.train.precision}): an inference run serves it.")
    else:
        lines.append("No inference run serves this model (`inference.sources`, "
                     "`inference.finetune_datasets`), so no merged weights are saved.")
    if adapter:
        note = (" PiSSA's is saved as peft converts it, a LoRA of rank 2r that applies to "
                "the original base (the trained factors beside the initial ones)."
                if spec.method.name == "pissa" else "")
        lines.append(f"`adapter/` holds the trained peft adapter, for the base this run "
                     f"started from ({spec.upstream}).{note}")
    elif not spec.served:
        lines.append(f"{spec.technique} trains the base's own weights, so keeping them would "
                     "mean a model as large as the base; the record holds the run's results.")
    return "\n".join(lines) + "\n"


def score(spec: FinetuneSpec, model, tokenizer, reasoning_dir, device) -> dict[str, Metric]:
    """Validation loss and held-out quality. Every rank scores its share (a sharded model is
    never gathered onto one device to be scored), at the precision it trained at."""
    train_cfg = spec.train
    val_set = read_split(reasoning_dir, "validation")
    test_set = read_split(reasoning_dir, "test")[: train_cfg.eval_problems]
    with autocast(device, train_cfg.precision):
        val = completion_scores(model, tokenizer, val_set, train_cfg.max_length, device=device)
        quality = reasoning_metrics(model, tokenizer, test_set, train_cfg.max_length,
                                    train_cfg.max_new_tokens, "finetune.max_new_tokens",
                                    desc=f"exact match {spec.run_id}", device=device)
    quality["val_loss"] = finite_metric(val["loss"], "nats/token", "completion_nll_validation",
                                        f"{val['tokens']} completion tokens")
    return quality


def start_val_loss(spec: FinetuneSpec, model, tokenizer, reasoning_dir, device) -> Metric:
    """Validation loss of the prepared model before its first step, what divergence is judged
    against (the pass :func:`score` makes at the end). Not taken for a 4-bit base on a CPU:
    evaluating it there repacks its weights, which then pass no gradient (docs/metrics.md §8)."""
    method = "completion_nll_validation_before_training"
    if spec.method.qlora and str(device) == "cpu":
        return Metric.unavailable("nats/token", method, "a 4-bit base on a CPU is not evaluated "
                                  "before training (bitsandbytes repacks it for good)")
    with autocast(device, spec.train.precision):
        val = completion_scores(model, tokenizer, read_split(reasoning_dir, "validation"),
                                spec.train.max_length, device=device)
    return finite_metric(val["loss"], "nats/token", method, f"{val['tokens']} completion tokens")


QUALITY = ("val_loss", "completion_perplexity", "token_accuracy", "exact_match", "performance")


def mark_divergence(metrics: dict[str, Metric], log: StepLog, val_start: Metric) -> None:
    """Add ``diverged`` (1 or 0, the reason in its note), ``loss_start`` and ``val_loss_start``;
    a diverged run's quality metrics become unavailable, saying why: no method is reported
    from a diverged run."""
    n = max(1, len(log.losses) // 10)
    metrics["loss_start"] = Metric.measured(sum(log.losses[:n]) / n, "nats/token",
                                            "mean_first_10pct_steps")
    metrics["val_loss_start"] = val_start
    val = metrics.get("val_loss")
    reason = divergence(log.losses, log.nonfinite, val_start.value,
                        val.value if val is not None else None)
    metrics["diverged"] = Metric.measured(float(reason is not None), "1",
                                          "loss_vs_start_and_finite", reason)
    if reason is None:
        return
    for name in QUALITY:
        measured = metrics.get(name)
        value = f"; the measured {measured.value:.4g} is not reported" \
            if measured is not None and measured.value is not None else ""
        metrics[name] = Metric.unavailable(METRICS[name].unit, measured.method if measured
                                           else "not_scored", f"run diverged: {reason}{value}")


def finetune_metrics(spec: FinetuneSpec, log: StepLog, window: Window, quality: dict,
                     flops_per_token: float, params: tuple[int, int], world: int,
                     device) -> dict[str, Metric]:
    """Everything a fine-tuning record measures, on rank 0 after training."""
    params_total, params_trainable = params
    metrics = step_metrics(log, spec.measure.warmup_steps, params_total, Timer.method)
    metrics.update(window.metrics())
    note_rank0(metrics, world)
    metrics.update(quality)
    metrics["flops_per_token"] = Metric.measured(flops_per_token, "FLOP/token",
                                                 "flop_counter_fwd_bwd")
    metrics["params_total"] = Metric.measured(params_total, "params", "count_unique_parameters")
    metrics["params_trainable"] = Metric.measured(params_trainable, "params",
                                                  "count_requires_grad")
    metrics.update(utilisation_metrics(metrics, flops_per_token, spec.measure.peak_flops, world,
                                       device, spec.train.precision))
    return metrics


def execution(spec: FinetuneSpec, base_note: str | None) -> dict:
    """How the method ran, for the record. The paper's Full* used DeepSpeed ZeRO-3 with offload
    on 8 GPUs (docs/protocol.md); with resources.finetune.gpus > 1 Full runs ZeRO-3 as FSDP2."""
    quant, precision = spec.method.qlora, spec.train.precision
    return {
        "precision": PRECISION_NOTES[precision],
        "base_precision": f"{quant.quant_type} (bitsandbytes 4-bit"
                          f"{', double quant' if quant.double_quant else ''})"
                          if quant else base_precision(spec.method.name, precision),
        "lr": spec.train.lr,
        "lr_source": spec.train.lr_source or "finetune.lr",
        "notes": [n for n in (base_note,) if n],
    }
