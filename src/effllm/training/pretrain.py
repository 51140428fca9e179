"""Pretraining a model from scratch on the prepared token stream, measured."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from effllm.data.tokenizer import load_tokenizer, save_tokenizer
from effllm.distributed import Placement, end
from effllm.evaluation.perplexity import perplexity
from effllm.measure import Timer, Window
from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.models.baselines import sequence_kernel
from effllm.models.params import count_params
from effllm.precision import PRECISION_NOTES
from effllm.records import Metric
from effllm.specs import LongContext, ModelShape, PretrainSpec
from effllm.stage import Outcome, run_job
from effllm.training.loop import (
    Checkpoint, StepLog, adamw, cosine_schedule, note_rank0, note_window, step_batches,
    step_flops_per_token, step_metrics, train, use_checkpointing, utilisation_metrics,
)
from effllm.training.sharding import full_state, shard


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


def build_model(shape: ModelShape, tokenizer):
    """Our decoder (any attention, position encoding, MoE), or a transformers baseline family."""
    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if shape.family != "decoder":
        from effllm.models.baselines import build_baseline

        return build_baseline(shape.family, shape.constructor_kwargs(),
                              vocab_size=len(tokenizer), **ids)
    return DecoderForCausalLM(DecoderConfig(vocab_size=len(tokenizer), **ids,
                                            **shape.constructor_kwargs()))


def run_pretrain(spec: PretrainSpec | dict, data_dir: str | os.PathLike,
                 model_out: str | os.PathLike, record_out: str | os.PathLike,
                 checkpoint_dir: str | os.PathLike | None = None,
                 teacher_dir: str | os.PathLike | None = None):
    """Train one model of the sweep from scratch, measure it, save model and record.

    With ``checkpoint_dir`` (outside the declared outputs) the run saves its state every
    ``train.checkpoint_every`` steps and a restarted job resumes from there. The model trains on
    a GPU when torch sees one; under torchrun (``effllm.launch.run_stage``) every rank trains
    its slice of each batch (DDP) and rank 0 measures, saves and returns the record (the other
    ranks return None). A student of the distillation block learns from the model in
    ``teacher_dir`` too (:mod:`effllm.training.distill`).
    """
    return run_job(spec, lambda s, placement: pretrain(s, placement, Path(data_dir),
                                                       checkpoint_dir, teacher_dir),
                   record_out, model_out)


def pretrain(spec: PretrainSpec, placement: Placement, data_dir: Path,
             checkpoint_dir: str | os.PathLike | None,
             teacher_dir: str | os.PathLike | None = None) -> Outcome | None:
    """Build, train and measure; rank 0 gets the outcome, the other ranks None."""
    train_cfg, shape = spec.train, spec.model
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    train_tokens = np.load(data_dir / "train.npy", mmap_mode="r")  # paged in per window
    val_tokens = np.load(data_dir / "validation.npy", mmap_mode="r")
    model = build_model(shape, tokenizer)
    check_variant(model, shape)
    params_total, _ = count_params(model)
    params_active = params_total
    if shape.num_experts:
        from effllm.models.moe import moe_param_counts

        _, params_active = moe_param_counts(model)
    local_batch = window_batch(train_tokens, train_cfg.batch_size, train_cfg.seq_len,
                               placement.rank, placement.world)
    model.to(placement.device)
    probe = local_batch(np.random.default_rng([spec.seed, 2**31]))  # not a training step
    probe = {key: value.to(placement.device) for key, value in probe.items()}
    distill = None
    if spec.distill is not None:  # only a student reads (and depends on) the distillation code
        from effllm.training.distill import load_teacher

        distill = load_teacher(spec, teacher_dir, placement.device)
    flops_per_token = step_flops_per_token(model, probe, train_cfg.precision, distill)
    if distill is not None:
        distill.end_step()  # the count's pass is not a step

    use_checkpointing(model, train_cfg)  # after the FLOP count: it counts the plain step
    sharded = placement.world > 1 and train_cfg.sharding == "fsdp"
    if sharded:  # ZeRO-3: every rank built the same (seeded) model and keeps its slices
        shard(model, placement.device, train_cfg.precision)
    optimizer = adamw(model, train_cfg.lr, train_cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, train_cfg.warmup_steps, train_cfg.steps,
                                train_cfg.min_lr_ratio)
    checkpoint = None
    if checkpoint_dir and train_cfg.checkpoint_every:
        fingerprint = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()
                                     ).hexdigest()
        checkpoint = Checkpoint(checkpoint_dir, train_cfg.checkpoint_every, fingerprint)
    log = checkpoint.load(model, optimizer, scheduler) if checkpoint else StepLog()
    window = Window(spec.measure.sample_interval_s, spec.measure.watts_per_core)
    trained = model
    if placement.world > 1 and not sharded:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if placement.device == "cpu" else [placement.device])
    log = train(trained, step_batches(local_batch, spec.seed, len(log.losses)),
                train_cfg.steps, optimizer, scheduler, train_cfg.grad_clip, window,
                desc=f"pretrain {spec.run_id}", log=log, checkpoint=checkpoint,
                precision=train_cfg.precision, micro_batch_size=train_cfg.micro_batch_size,
                loss_fn=distill)
    if sharded:  # the whole trained model on rank 0, to evaluate and save (a collective)
        weights = full_state(model)[0]
        model = None
        if placement.main:
            model = build_model(shape, tokenizer)
            model.load_state_dict(weights)
            model.to(placement.device)
    end()
    if not placement.main:
        return None
    metrics = pretrain_metrics(spec, model, log, window, val_tokens, probe, flops_per_token,
                               params_total, params_active, placement.world)
    series = {"train_loss": log.losses, "step_seconds": log.seconds}
    if distill is not None:  # per step, kept in the checkpoint's log across a resume
        series["distill_kl"] = log.extra.get("distill_kl", [])
        metrics.update(distill_metrics(spec, distill, series["distill_kl"]))

    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        save_tokenizer(tokenizer, folder)

    return Outcome(metrics, series,
                   {"precision": PRECISION_NOTES[train_cfg.precision],
                    **sequence_kernel(model, placement.device)}, save=save,
                   strategy="FSDP full shard (ZeRO-3)" if sharded else "DDP",
                   cleanup=checkpoint.clear if checkpoint else None)


def pretrain_metrics(spec: PretrainSpec, model, log: StepLog, window: Window,
                     val_tokens: np.ndarray, probe: dict, flops_per_token: float,
                     params_total: int, params_active: int, world: int) -> dict[str, Metric]:
    """Everything a pretraining record measures, on rank 0 after training."""
    from effllm.measure.cache import cache_bytes_per_token

    train_cfg = spec.train
    ppl, scored = perplexity(model, val_tokens, train_cfg.seq_len, train_cfg.eval_tokens,
                             precision=train_cfg.precision)
    metrics = step_metrics(log, spec.measure.warmup_steps, params_total, Timer.method)
    metrics.update(window.metrics())
    note_rank0(metrics, world)
    if len(log.starts) > 1:
        note_window(metrics, f"window covers the steps after the resume at step "
                             f"{log.starts[-1]}")
    metrics["perplexity"] = Metric.measured(ppl, "1", "exp_mean_nll_validation",
                                            f"{scored} scored tokens, seq_len "
                                            f"{train_cfg.seq_len}")
    metrics["flops_per_token"] = Metric.measured(
        flops_per_token, "FLOP/token", "flop_counter_fwd_bwd", flop_note(spec.model)
        + ("; the teacher's forward included" if spec.distill else ""))
    metrics["flops_per_token_6n"] = Metric.estimated(
        6 * (params_active - embedding_params(model)), "FLOP/token", "analytic_6N",
        "6 x active non-embedding parameters, attention FLOPs not included")
    metrics["params_total"] = Metric.measured(params_total, "params", "count_unique_parameters")
    metrics["params_active"] = Metric.measured(
        params_active, "params", "total - unrouted experts" if params_active != params_total
        else "dense: all parameters")
    metrics.update(utilisation_metrics(metrics, flops_per_token, spec.measure.peak_flops, world,
                                       next(model.parameters()).device, train_cfg.precision))
    metrics["kv_cache_bytes_per_token"] = Metric.measured(
        cache_bytes_per_token(model, probe["input_ids"][:1]), "B/token",
        "cache_tensor_bytes_growth", f"model dtype {model.dtype}; growth of every tensor the "
        "decoding cache holds, per token (0 = constant-size state)")
    metrics["decode_latency_long"] = long_context_decode(model, val_tokens, spec.long_context)
    return metrics


def distill_metrics(spec: PretrainSpec, distill, kl_steps: list[float]) -> dict[str, Metric]:
    """The student's final soft-target KL (mean of the last 10 % of steps, as ``loss``) and its
    teacher's size; the cross-entropy is ``loss`` as for every run."""
    tail = kl_steps[-max(1, len(kl_steps) // 10):]
    cfg = spec.distill
    return {
        "distill_kl": Metric.measured(
            sum(tail) / len(tail), "nats/token", "mean_last_10pct_steps",
            f"KL(teacher || student) at temperature {cfg.temperature}, rank 0's tokens; "
            f"loss = {1 - cfg.weight:g} CE + {cfg.weight:g} T^2 KL (+ an MoE router's "
            "auxiliary loss)") if tail
        else Metric.unavailable("nats/token", "mean_last_10pct_steps", "no step ran"),
        "teacher_params": Metric.measured(count_params(distill.teacher)[0], "params",
                                          "count_unique_parameters", spec.upstream),
    }


def check_variant(model, shape: ModelShape) -> None:
    """Assert the requested variant is really in the model (the paper's toolkit trained plain
    attention under every label and a dense model as 'MoE': docs/protocol.md §8, defects 1
    and 5)."""
    family = shape.family
    if family != "decoder":
        from effllm.models.baselines import FAMILIES

        expected = {"mamba": "Mamba", "rwkv": "Rwkv", "gpt_neox": "GPTNeoX"}[family]
        if family not in FAMILIES or not type(model).__name__.startswith(expected):
            raise AssertionError(f"built {type(model).__name__} for family {family!r}")
        return
    attn = model.model.layers[0].self_attn
    expected = {"mla": "MultiHeadLatentAttention", "nsa": "NativeSparseAttention"}.get(
        shape.attention, "Attention")
    if type(attn).__name__ != expected:
        raise AssertionError(f"attention {shape.attention!r} built {type(attn).__name__}")
    if expected == "Attention" and attn.n_kv != shape.num_key_value_heads:
        raise AssertionError(f"{attn.n_kv} KV heads, expected {shape.num_key_value_heads}")
    experts = shape.num_experts or 0
    mlp = model.model.layers[0].mlp
    if experts and len(getattr(mlp, "experts", ())) != experts:
        raise AssertionError(f"expected an MoE layer with {experts} experts, got "
                             f"{type(mlp).__name__}")


def flop_note(shape: ModelShape) -> str:
    if shape.family in ("mamba", "rwkv"):
        return ("matmul and convolution FLOPs of one fwd+bwd step; the recurrent scan's "
                "elementwise work is not counted")
    return "one fwd+bwd step, counted per non-padding token"


def embedding_params(model) -> int:
    return model.get_input_embeddings().weight.numel()


@torch.no_grad()
def long_context_decode(model, tokens: np.ndarray, cfg: LongContext | None) -> Metric:
    """Time per generated token after a long prefilled context (beyond the paper): where
    sparse attention and small caches pay off. Fixed length, greedy, EOS disabled."""
    if not cfg or not cfg.tokens:
        return Metric.unavailable("s/token", "none", "pretrain.long_context.tokens not set")
    context, new, repeats = cfg.tokens, cfg.new_tokens, cfg.repeats
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
        for _ in range(repeats):
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
                                  f"any of {repeats} repeats (timing noise)")
    per_token.sort()
    return Metric.measured(per_token[len(per_token) // 2], "s/token", Timer.method + "_generate",
                           f"median of {len(per_token)}/{repeats} repeats: (generate "
                           f"{new + 1} - generate 1) / {new} after a {context}-token context")
