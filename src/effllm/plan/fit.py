"""From a simulated workload to what one GPU holds: the per-rank peak by part, whether it fits a
device, the smallest GPU count that fits each device size, and GPU-hours.

The simulation (:mod:`effllm.plan.simulate`) books one rank as it runs: a single process, or
FSDP2 over a fake process group of the job's ranks. Two things it cannot book are added here,
each labelled in the part it goes to: DDP's gradient buckets (one more copy of the trained
gradients, torch's default ``gradient_as_bucket_view=False``; torch's DDP notes) and, under
CPU offload, the shards, their gradients and the optimiser state moved off the device.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
DEVICE_SIZES = (80, 96, 141)  # GB: H100 80 GB, H100 NVL/GH200 96 GB, H200 141 GB
GPU_COUNTS = (1, 2, 4, 8)  # one node
# Display parts, each the sum of the tensor account's parts.
PARTS = {
    # draft: a speculative draft model; teacher: a distillation teacher's weights and logits
    "weights": ("params", "buffers", "quant_state", "draft", "teacher"),
    "grads": ("grads",),
    "optimizer": ("optimizer",),
    "activations": ("activations", "temporaries", "other", "kv_growth"),
    "ddp_buckets": ("ddp_buckets",),
}
# Peak FLOP/s per GPU when the config states none: NVIDIA H100 SXM, dense BF16 Tensor Core
# (989 TFLOP/s; the datasheet's 1,979 is with 2:4 sparsity).
DEFAULT_PEAK_FLOPS = 9.89e14
# Model FLOP utilisation assumed per stage when the config states none: assumptions, not
# measurements (docs/plan.md): large-model training reaches 30-50 % on H100s, fine-tuning at
# small per-rank batches less, serving (decoding is memory-bound) far less.
DEFAULT_MFU = {"pretrain": 0.4, "finetune": 0.3, "inference": 0.1}


@dataclasses.dataclass
class RankPeak:
    """One rank's device peak: bytes by display part at the phase whose total peaked."""

    phase: str
    parts: dict[str, int]
    offloaded: int = 0  # bytes the job keeps on the host instead (CPU offload)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def gb(self) -> dict[str, float]:
        return {name: round(value / GB, 2) for name, value in self.parts.items()}

    def describe(self) -> str:
        """``weights 16.1 + grads 0.7 + ... = 74.6 GB`` (the refusal and the table say this)."""
        shown = [f"{name} {gb(value)}" for name, value in self.parts.items() if value]
        return f"{' + '.join(shown)} = {gb(self.total)} GB"


def gb(value: float) -> str:
    """Bytes as GB: one decimal, or three significant digits below 1 GB."""
    value /= GB
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def rank_peak(sim, work) -> RankPeak:
    """The peak of ``sim`` on one device under ``work``'s strategy."""
    static = sim.static
    best = None
    for name, phase in sim.phases.items():
        raw = dict(phase)
        raw.pop("total", None)
        offloaded = 0
        if getattr(work, "strategy", None) == "ddp" and work.world > 1:
            raw["ddp_buckets"] = static.get("grads", 0)
        if getattr(work, "offload", False) and work.strategy == "fsdp":
            # shards, their gradients and AdamW's state live on the host; gathered layers and
            # in-flight gradients stay on the device
            moved = {part: min(raw.get(part, 0), static.get(part, 0))
                     for part in ("params", "grads", "optimizer")}
            for part, value in moved.items():
                raw[part] -= value
            offloaded = sum(moved.values())
        parts = {show: sum(raw.get(p, 0) for p in members) for show, members in PARTS.items()}
        peak = RankPeak(name, parts, offloaded)
        if best is None or peak.total > best.total:
            best = peak
    return best


def fits(peak: RankPeak, device_gb: float) -> bool:
    return peak.total <= device_gb * GB


def gpu_hours(flops: float, peak_flops: float, mfu: float) -> float:
    """GPU-hours of ``flops`` at ``mfu`` of ``peak_flops`` per GPU (wall hours × GPUs: the
    same on any number of GPUs at that utilisation)."""
    return flops / (peak_flops * mfu) / 3600


def rescaled(sim, work, candidate) -> RankPeak | None:
    """The peak of ``candidate`` (the same step on another number of ranks) estimated from the
    simulation of ``work``, or None when it needs a simulation of its own. Replicas (one
    process, DDP) run the same step: exact. ZeRO-3 shards scale by the ranks (each rank's
    parameter, gradient and optimiser bytes × ``work.world`` / ``candidate.world``; one rank
    holds them whole), the rest (gathered layers, activations) stays: an estimate."""
    from effllm.plan.simulate import canonical

    if work.kind != "train" or candidate.kind != "train":
        return rank_peak(sim, candidate) if canonical(work) == canonical(candidate) else None
    same = dataclasses.replace(candidate, strategy=work.strategy, world=work.world,
                               offload=work.offload)
    if same != work:  # another step (rows per pass, method, ...): not derived
        return None
    if canonical(work) == canonical(candidate):
        return rank_peak(sim, candidate)
    if work.strategy != "fsdp":
        return None
    factor = work.world / max(1, candidate.world)
    phases = {}
    for name, phase in sim.phases.items():
        scaled = dict(phase)
        for part in ("params", "grads", "optimizer"):
            sharded = min(phase.get(part, 0), sim.static.get(part, 0))
            scaled[part] = phase.get(part, 0) + round((factor - 1) * sharded)
        scaled["total"] = phase["total"] + sum(scaled[p] - phase.get(p, 0)
                                               for p in ("params", "grads", "optimizer"))
        phases[name] = scaled
    static = {part: round(value * factor) if part in ("params", "grads", "optimizer")
              else value for part, value in sim.static.items()}
    return rank_peak(dataclasses.replace(sim, phases=phases, static=static), candidate)


def host_bytes(job) -> int | None:
    """Host memory of the job's node (estimated, tensors only): what its loading path holds at
    once. Pretraining builds the model in fp32 on every rank's CPU before placing it; ZeRO-3
    Full fine-tuning holds rank 0's fp32 copy while it is broadcast (and, offloaded, every
    rank's shards, gradients and optimiser state); serving reads one model copy in its dtype;
    the other fine-tuning paths read one tensor at a time (``training.loading``): not
    estimated here (None), never 0."""
    static, work = job.sim.static, job.work
    if work.kind == "serve":
        return static["params"] + static["buffers"] + static.get("draft", 0)
    world = work.world
    if work.method is None:
        full = static["params"] * (world if work.strategy == "fsdp" else 1)
        return full * world
    if work.strategy == "fsdp":
        whole = static["params"] * world  # fp32 shards of every rank: the whole model
        offloaded = world * job.peak.offloaded if work.offload else 0
        return whole + offloaded
    return None
