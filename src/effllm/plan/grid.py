"""The workload of every job of the grid, from its run spec and the job's GPUs.

A job's workload says what its stage does on one rank (:mod:`effllm.plan.workload`): the model
(our pretraining families from their shape; hub models from the config.json in the local
cache; a fine-tuned or served model from the base it started from), the method, the precision,
the rows and tokens of each forward/backward pass, gradient checkpointing and how the ranks
share the work (one process, DDP replicas or FSDP's ZeRO-3, as :mod:`effllm.training` decides
it), or the serving passes of an inference job.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Mapping

from effllm.plan.workload import ModelRef, ServePass, ServeWork, TrainWork
from effllm.specs import FinetuneSpec, InferenceSpec, MethodSpec, PretrainSpec, RunSpec
from effllm.training.methods import SHARDED_METHODS

# Adapter methods with one memory layout: the same adapters and AdamW state (LoRA+ only sets
# B's learning rate, RSLoRA only the scale).
SAME_AS_LORA = ("lora_plus", "rslora")


class PlanError(ValueError):
    """A job the plan cannot describe (a model's config missing from the cache, ...)."""


def vocab_size(config: Mapping) -> int:
    """The pipeline tokenizer's vocabulary: the trained BPE's ``vocab_size`` (its upper bound),
    or a hub tokenizer's model vocabulary."""
    tok = config["data"]["tokenizer"]
    if tok.get("hub"):
        from effllm.data.plan import hub_tokenizer

        entry = hub_tokenizer(config)
        return int(hub_config(entry["repo_id"], entry.get("revision"))["vocab_size"])
    return int(tok["vocab_size"])


def hub_config(repo_id: str, revision: str | None = None) -> dict:
    """The config.json of a model in the local Hugging Face cache."""
    from effllm.data import DataSourceError
    from effllm.data.hub import cached_model

    try:
        snapshot = cached_model(repo_id, revision)
    except DataSourceError as err:
        raise PlanError(str(err)) from None
    return json.loads((snapshot / "config.json").read_text())


def model_ref(config: Mapping, runs: Mapping, run_id: str) -> ModelRef:
    """The model behind ``run_id`` (``hub/<name>``, ``pretrain/<run>``, ``finetune/<run>``):
    fine-tuned models have their base's architecture."""
    stage, name = run_id.split("/", 1)
    if stage == "hub":
        entry = config["hub_models"][name]
        return ModelRef(name, config=hub_config(entry["repo_id"], entry.get("revision")))
    run = runs[stage][name]
    if stage == "pretrain":
        return ModelRef(name.rsplit("-s", 1)[0], shape=run.spec.model,
                        vocab_size=vocab_size(config))
    return model_ref(config, runs, run.spec.upstream)


def memory_method(method: MethodSpec) -> MethodSpec:
    """The method as far as memory goes (the workload key): LoRA+ and RSLoRA are LoRA."""
    if method.name in SAME_AS_LORA:
        return dataclasses.replace(method, name="lora", lr_ratio=None)
    return method


def strategy(spec: RunSpec, gpus: int) -> str:
    """How ``gpus`` ranks share a training job: ``single``, ``ddp`` or ``fsdp``."""
    if gpus < 2:
        return "single"
    if isinstance(spec, PretrainSpec):
        return "fsdp" if spec.train.sharding == "fsdp" else "ddp"
    return "fsdp" if spec.method.name in SHARDED_METHODS else "ddp"


def train_work(spec: RunSpec, ref: ModelRef, gpus: int, teacher: ModelRef | None = None
               ) -> TrainWork:
    """One optimiser step of a pretraining or fine-tuning job on one of its ``gpus`` ranks
    (``teacher``: a distillation student's)."""
    train = spec.train
    world = max(1, gpus)
    local = train.batch_size // world
    rows = min(train.micro_batch_size or local, local)
    way = strategy(spec, gpus)
    if isinstance(spec, PretrainSpec):
        method, seq_len, offload = None, train.seq_len, False
    else:
        method, seq_len = memory_method(spec.method), train.max_length
        offload = way == "fsdp" and bool(spec.method.offload)
    return TrainWork(ref, method, train.precision, rows, math.ceil(local / rows), seq_len,
                     bool(train.gradient_checkpointing), way, world, offload, teacher=teacher)


def serve_work(spec: InferenceSpec, ref: ModelRef, draft: ModelRef | None = None) -> ServeWork:
    """The passes of an inference job: the timed decoding batch, the held-out problems'
    generation (batches of ``generate_answers``), and with lm-evaluation-harness its
    log-likelihood batches over ``eval_max_length + eval_max_new_tokens`` tokens with every
    position's log-softmax, and its generation batches. A weight-only quantiser and a
    speculative ``draft`` model (:func:`draft_ref`) are part of the work; a quantised KV cache
    is planned at the full cache's bytes (an upper bound), pruned weights at the dense bytes
    they keep, with Wanda's calibration forwards as a pass (structured pruning's saliency
    backward, for grid decoders only, is not booked)."""
    import inspect

    from effllm.evaluation.scoring import generate_answers

    ev = spec.eval
    problems = inspect.signature(generate_answers).parameters["batch_size"].default
    passes = [ServePass("decode", ev.batch_size, ev.prompt_tokens, ev.new_tokens, "last"),
              ServePass("exact_match", problems, ev.eval_max_length, ev.eval_max_new_tokens,
                        "last")]
    if spec.prune is not None and spec.prune.method == "wanda":
        from effllm.inference.techniques import CALIB_BATCH, CALIB_WINDOWS

        windows = spec.prune.calib_windows or CALIB_WINDOWS
        passes.append(ServePass("prune_calibration", min(CALIB_BATCH, windows),
                                ev.eval_max_length, 0, "last"))
    if spec.harness is not None:
        batch = spec.harness.batch_size or 1
        passes += [ServePass("lm_eval_loglik", batch, ev.eval_max_length + ev.eval_max_new_tokens,
                             0, "all"),
                   ServePass("lm_eval_generate", batch, ev.eval_max_length,
                             ev.eval_max_new_tokens, "last")]
    # fp16 holds and moves the bytes bf16 does: one simulation for both
    precision = "bf16" if spec.precision == "fp16" else spec.precision
    return ServeWork(ref, precision, spec.quant, tuple(passes), weights=spec.weights,
                     draft=draft)


def job_work(spec: RunSpec, ref: ModelRef, gpus: int, draft: ModelRef | None = None
             ) -> TrainWork | ServeWork:
    """The workload of ``spec`` on ``gpus`` GPUs; ``draft``: its speculative draft model, or a
    distillation student's teacher (:func:`draft_ref`)."""
    if isinstance(spec, InferenceSpec):
        return serve_work(spec, ref, draft)
    return train_work(spec, ref, gpus, draft)


def job_model_id(spec: RunSpec) -> str:
    """The run whose model a job trains or serves: its upstream (a fine-tuned base, a served
    model, a pruning route's source), or itself (pretraining from scratch, and a distillation
    student, whose upstream is its teacher)."""
    if spec.upstream is None or getattr(spec, "distill", None):
        return spec.run_id
    return spec.upstream


def draft_ref(config: Mapping, runs: Mapping, spec: RunSpec,
              refs: dict | None = None) -> ModelRef | None:
    """The second model a job holds (None without one), kept in ``refs`` by run id: an
    inference job's speculative draft, or a distillation student's teacher (its upstream)."""
    speculative = getattr(spec, "speculative", None)
    if getattr(spec, "distill", None):
        other = spec.upstream
    elif speculative and speculative.draft:
        other = speculative.draft
    else:
        return None
    refs = {} if refs is None else refs
    if other not in refs:
        refs[other] = model_ref(config, runs, other)
    return refs[other]


def gpu_choices(spec: RunSpec) -> tuple[int, ...]:
    """GPU counts a job can run on (one node): 1 for inference and QLoRA, else the counts the
    batch splits over."""
    if isinstance(spec, InferenceSpec) or (isinstance(spec, FinetuneSpec) and spec.method.qlora):
        return (1,)
    from effllm.plan.fit import GPU_COUNTS

    return tuple(n for n in GPU_COUNTS if spec.train.batch_size % n == 0)


def steps(spec: RunSpec, samples: int | None) -> int | None:
    """Optimiser steps of a training job (fine-tuning: from the training set's size, None when
    it is not known)."""
    if isinstance(spec, PretrainSpec):
        return spec.train.steps
    if samples is None:
        return spec.train.max_steps
    train = spec.train
    n = (min(samples, train.max_samples) // train.batch_size) * train.epochs
    return min(n, train.max_steps) if train.max_steps else n
