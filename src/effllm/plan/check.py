"""Fit enforced: a job the plan does not fit on its GPUs is refused before it runs.

With ``resources.<stage>.gpu_memory_gb`` set (or a job's own, ``resources.<stage>.jobs``), the
workflow checks every job of the DAG when it builds it (:func:`refuse_unfit`, from
``workflow/rules/common.smk``: by the job's plan when ``snakemake plan`` has simulated it, else
by the weights, gradients and optimiser state it holds before any work), and each GPU job
checks itself again, its activations included, as its first act, on the device it got, before
it reads a weight (:func:`preflight`, from ``effllm.launch``). The
refusal names the job, its predicted peak by part, the device size and the config keys that
would make it fit. Without the key nothing is checked and nothing is imported (the default
config's DAG builds as fast as before).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

GPU_STAGES = ("pretrain", "finetune", "inference")


class PlanRefusal(RuntimeError):
    """Jobs that do not fit their GPUs; the message says why and what would fit."""


def enforced(config: Mapping) -> bool:
    """Whether some stage or job states its GPUs' memory (cheap: no torch)."""
    section = config.get("resources") or {}
    for stage in GPU_STAGES:
        entry = section.get(stage) or {}
        if entry.get("gpu_memory_gb") or any(
                (o or {}).get("gpu_memory_gb") for o in (entry.get("jobs") or {}).values()):
            return True
    return False


@dataclasses.dataclass
class JobFit:
    """One job on ``gpus`` GPUs: its workload, simulation and per-rank peak."""

    stage: str
    name: str
    gpus: int
    work: object
    sim: object
    peak: object

    @property
    def run_id(self) -> str:
        return f"{self.stage}/{self.name}"


def fit_job(spec, ref, gpus: int, *, use_cache: bool = True, flops: bool = False,
            draft=None) -> JobFit:
    """Simulate ``spec`` (a run spec) with model ``ref`` (and speculative ``draft``) on
    ``gpus`` GPUs (its FLOPs counted too with ``flops``)."""
    from effllm.plan.fit import rank_peak
    from effllm.plan.grid import job_work
    from effllm.plan.simulate import simulate

    work = job_work(spec, ref, gpus, draft)
    sim = simulate(work, use_cache=use_cache, flops=flops)
    return JobFit(spec.stage, spec.name, gpus, work, sim, rank_peak(sim, work))


def remedies(spec, ref, gpus: int, device_gb: float, draft=None) -> list[str]:
    """Config keys that would make the job fit ``device_gb`` devices, each checked by
    simulation: more GPUs (the smallest count that fits), ZeRO-3 offload, gradient
    checkpointing, a smaller micro-batch, and together."""
    from effllm.plan.fit import fits
    from effllm.plan.grid import gpu_choices, strategy

    stage, out = spec.stage, []

    def peak_gb(candidate, n):
        return fit_job(candidate, ref, n, draft=draft).peak

    for n in gpu_choices(spec):
        if n > gpus and fits(state_fit(spec, ref, n, draft).peak, device_gb):  # the floor first
            peak = peak_gb(spec, n)
            if fits(peak, device_gb):
                way = {"fsdp": "ZeRO-3 (FSDP2)", "ddp": "DDP", "single": "one process"}[
                    strategy(spec, n)]
                if strategy(spec, n) == "fsdp" and getattr(spec, "method", None) is not None \
                        and spec.method.offload:
                    way += " with CPU offload"
                out.append(f"resources.{stage}.gpus: {n} (or resources.{stage}.jobs."
                           f"'{spec.name}'.gpus: {n}), {way}: {peak.total / 1e9:.1f} GB")
                break
    if stage == "inference":
        if spec.harness is not None and (spec.harness.batch_size or 1) > 1:
            smaller = dataclasses.replace(spec, harness=dataclasses.replace(
                spec.harness, batch_size=1))
            peak = peak_gb(smaller, gpus)
            if fits(peak, device_gb):
                out.append(f"inference.harness.batch_size: 1: {peak.total / 1e9:.1f} GB")
        return out
    train = spec.train
    changes = []  # (config key, function of a spec)
    if stage == "finetune" and spec.method.name == "full" and gpus > 1 \
            and not spec.method.offload:
        changes.append(("finetune.full.offload: true", lambda s: dataclasses.replace(
            s, method=dataclasses.replace(s.method, offload=True))))
    if not train.gradient_checkpointing:
        changes.append((f"{stage}.gradient_checkpointing: true", lambda s: dataclasses.replace(
            s, train=dataclasses.replace(s.train, gradient_checkpointing=True))))
    if (train.micro_batch_size or train.batch_size // max(1, gpus)) > 1:
        changes.append((f"{stage}.micro_batch_size: 1", lambda s: dataclasses.replace(
            s, train=dataclasses.replace(s.train, micro_batch_size=1))))
    alone = []
    for key, change in changes:
        peak = peak_gb(change(spec), gpus)
        if fits(peak, device_gb):
            alone.append(f"{key}: {peak.total / 1e9:.1f} GB")
    out += alone
    if len(changes) > 1 and not alone:
        combined = spec
        for _, change in changes:
            combined = change(combined)
        peak = peak_gb(combined, gpus)
        if fits(peak, device_gb):
            out.append(" and ".join(k for k, _ in changes)
                       + f" together: {peak.total / 1e9:.1f} GB")
    return out


_TODO: list = []  # the workloads a pool simulates (forked workers inherit them: no pickling)


def _simulate_cached(index: int) -> None:
    from effllm.plan.simulate import simulate

    work, flops = _TODO[index]
    simulate(work, flops=flops)


def prefetch(works, flops: bool = False, processes: int | None = None) -> None:
    """Simulate the distinct ``works`` not cached yet (with their FLOPs: ``flops``), in
    parallel processes (each writes the disk cache the planner then reads)."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from effllm.plan.simulate import cached, canonical
    from effllm.plan.workload import digest

    todo = list({digest(canonical(w)): (canonical(w), flops)
                 for w in works if cached(w, flops) is None}.values())
    if not todo:
        return
    processes = processes or min(len(os.sched_getaffinity(0)), 4)
    _TODO[:] = todo
    if processes < 2 or len(todo) < 2:
        for index in range(len(todo)):
            _simulate_cached(index)
        return
    # forked workers must not use the tokenizers' thread pool of the parent (it deadlocks)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ProcessPoolExecutor(processes, mp_context=get_context("fork")) as pool:
            list(pool.map(_simulate_cached, range(len(todo))))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def refusal(job: JobFit, device_gb: float, key: str, fixes: list[str] | None) -> str:
    """The refusal of one job: its name, its peak by part, the device, what would fit (None:
    not looked for)."""
    from effllm.plan.fit import GB, gb

    over = job.peak.total - device_gb * GB
    when = ("its weights, gradients and optimiser state alone, before any activation"
            if job.peak.phase == "state" else f"at its {job.peak.phase} phase")
    text = (f"job {job.run_id} does not fit: predicted peak per GPU on {job.gpus or 1} "
            f"GPU(s) ({job.work.strategy if job.work.kind == 'train' else 'serving'}"
            f", {when}): {job.peak.describe()}, {gb(over)} GB over the "
            f"{device_gb:g} GB of each device ({key}).")
    if fixes is None:
        return text + " See its plan: snakemake plan (docs/plan.md)."
    if fixes:
        text += " It would fit with: " + "; ".join(fixes) + "."
    else:
        text += (" No single change of GPUs, offload, gradient checkpointing or micro-batch "
                 "makes it fit; a larger device (resources.<stage>.gpu_memory_gb) or a smaller "
                 "model would.")
    return text


def jobs_to_check(config: Mapping, runs: Mapping):
    """(stage, run, GPUs, device GB, key naming the device size) of every job whose stage or
    own resources state a device size."""
    from effllm.cluster import stage_settings

    for stage in GPU_STAGES:
        for name, run in runs.get(stage, {}).items():
            settings = stage_settings(config, stage, name)
            if not settings.gpu_memory_gb:
                continue
            own = settings.gpu_memory_gb != stage_settings(config, stage).gpu_memory_gb
            key = (f"resources.{stage}.jobs.<{name}>.gpu_memory_gb" if own
                   else f"resources.{stage}.gpu_memory_gb")
            yield stage, run, settings.gpus, settings.gpu_memory_gb, key


def state_fit(spec, ref, gpus: int, draft=None) -> JobFit:
    """The job's floor: its weights, gradients and optimiser state alone, from the full
    simulation when one is cached, else built without a step (``simulate.state``: a second)."""
    from effllm.plan.fit import rank_peak
    from effllm.plan.grid import job_work
    from effllm.plan.simulate import cached, state

    work = job_work(spec, ref, gpus, draft)
    sim = cached(work) or state(work)
    return JobFit(spec.stage, spec.name, gpus, work, sim, rank_peak(sim, work))


def refuse_unfit(config: Mapping, runs: Mapping, limit: int = 5) -> tuple[int, int]:
    """Check every job with a device size; raise :class:`PlanRefusal` naming each that does not
    fit (the first ``limit`` with what would fit). Cheap enough for every DAG build: a job whose
    full simulation is cached (``snakemake plan`` made it) is checked by its plan's peak, any
    other by its state alone (weights, gradients, optimiser state), which no fitting job
    exceeds; its activations are checked by the job itself before it reads a weight
    (:func:`preflight`). Returns (jobs checked by their plan, jobs checked by their state)."""
    from effllm.plan.fit import fits
    from effllm.plan.grid import draft_ref, job_model_id, model_ref

    refused, refs, counts = [], {}, [0, 0]
    for stage, run, gpus, device_gb, key in jobs_to_check(config, runs):
        upstream = job_model_id(run.spec)
        if upstream not in refs:
            refs[upstream] = model_ref(config, runs, upstream)
        draft = draft_ref(config, runs, run.spec, refs)
        job = state_fit(run.spec, refs[upstream], gpus, draft)
        counts[job.peak.phase == "state"] += 1
        if not fits(job.peak, device_gb):
            fixes = (remedies(run.spec, refs[upstream], gpus, device_gb, draft)
                     if len(refused) < limit else None)
            refused.append(refusal(job, device_gb, key, fixes))
    if refused:
        more = f"\n... and {len(refused) - limit} more" if len(refused) > limit else ""
        raise PlanRefusal(f"{len(refused)} of {sum(counts)} jobs do not fit their GPUs (the "
                          "plan: snakemake plan, docs/plan.md); nothing was run:\n"
                          + "\n".join(refused[:limit]) + more)
    return counts[0], counts[1]


def auto_stages(config: Mapping) -> list[str]:
    """The GPU stages whose jobs take their GPUs from the plan (``resources.<stage>.auto``;
    cheap: no torch)."""
    section = config.get("resources") or {}
    return [stage for stage in GPU_STAGES if (section.get(stage) or {}).get("auto")]


def auto_resources(config: Mapping, runs: Mapping, only: set[str] | None = None
                   ) -> dict[str, dict[str, dict]]:
    """For every job of an ``auto`` stage (or only the run ids in ``only``): the fewest GPUs,
    of those its batch splits over and at most the stage's ``gpus``, on which its simulated
    plan fits ``gpu_memory_gb`` (Full with CPU offload: 2 or more, offload being ZeRO-3's),
    and ``mem_mb`` raised to its plan's host memory + 25 % when that is more. A job that fits
    on none keeps the stage's GPUs (and :func:`refuse_unfit` refuses it). Returns {stage:
    {run name: resources}}; simulations come from the cache when ``snakemake plan`` made
    them."""
    import math

    from effllm.cluster import stage_settings
    from effllm.plan.fit import GB, fits, host_bytes
    from effllm.plan.grid import draft_ref, gpu_choices, job_model_id, model_ref

    out, refs = {}, {}
    for stage in auto_stages(config):
        for name, run in runs.get(stage, {}).items():
            if only is not None and run.run_id not in only:
                continue
            settings = stage_settings(config, stage, name)
            upstream = job_model_id(run.spec)
            if upstream not in refs:
                refs[upstream] = model_ref(config, runs, upstream)
            ref, device_gb = refs[upstream], settings.gpu_memory_gb
            draft = draft_ref(config, runs, run.spec, refs)
            offload = getattr(getattr(run.spec, "method", None), "offload", False)
            chosen = None
            for n in gpu_choices(run.spec):
                if n > settings.gpus or (offload and n < 2):
                    continue
                if fits(state_fit(run.spec, ref, n, draft).peak, device_gb) and \
                        fits(fit_job(run.spec, ref, n, draft=draft).peak, device_gb):
                    chosen = n
                    break
            mine = {"gpus": chosen or settings.gpus}
            host = host_bytes(fit_job(run.spec, ref, mine["gpus"]))
            need = None if host is None else math.ceil(host * 1.25 / GB * 1000)
            if need is not None and need > settings.mem_mb:
                mine["mem_mb"] = need
            out.setdefault(stage, {})[name] = mine
    return out


def with_auto_resources(config: dict, chosen: Mapping[str, Mapping[str, dict]]) -> None:
    """Write ``chosen`` (:func:`auto_resources`) into ``config`` as per-job overrides, each
    under its run's exact name and after the config's own, so that it applies last."""
    for stage, jobs in chosen.items():
        entry = config["resources"][stage]
        own = dict(entry.get("jobs") or {})
        for name, resources in jobs.items():
            own.pop(name, None)
            own[name] = dict(resources)
        entry["jobs"] = own


PLAN_TARGETS = frozenset({"plan", "results/plan/plan.tsv", "results/plan/plan.md"})


def at_dag_build(config: dict, runs: Mapping, targets=(), target_jobs=()) -> str | None:
    """What the plan does while Snakemake builds the DAG (``workflow/rules/common.smk``):
    ``auto`` stages get their jobs' GPUs (a cluster job's own Snakemake, given ``target_jobs``,
    only its run's), then every job with a device size is checked (:func:`refuse_unfit`,
    raising :class:`PlanRefusal`), except inside a cluster job (its first act checks it) and
    for the plan's own targets (the plan reports the fit). Nothing is imported beyond this
    module when the config states no device. Returns a line for the log, or None."""
    if targets and set(targets) <= PLAN_TARGETS:
        return None
    if auto_stages(config):
        own = {f"{t.rulename}/{t.wildcards_dict['run']}" for t in target_jobs
               if "run" in t.wildcards_dict}
        with_auto_resources(config, auto_resources(config, runs,
                                                   only=own if target_jobs else None))
    if target_jobs or not enforced(config):
        return None
    planned, floors = refuse_unfit(config, runs)
    if not floors:
        return None
    return (f"GPU fit: {planned} jobs checked by their plan, {floors} by their weights, "
            "gradients and optimiser state alone; each of those checks its activations as its "
            "first act (snakemake plan checks them all now)")


def device_memory_gb() -> float | None:
    """Memory of this process's first CUDA device (GB), None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1e9


def preflight(spec: dict, gpus: int, gpu_memory_gb: float | None, model_dir=None,
              data_dir=None, draft_dir=None) -> None:
    """A job's first act, before it reads a weight: simulate its own workload (the model's
    config.json in ``model_dir``, or for pretraining the tokenizer in ``data_dir``) and refuse
    it, as the DAG build would, when it does not fit the smaller of ``gpu_memory_gb`` and the
    device it got. Nothing is checked without ``gpu_memory_gb`` (the plan's known upper bounds,
    such as Mamba's reference recurrence, must not refuse a job nobody asked to check)."""
    import json
    from pathlib import Path

    from effllm.plan.fit import fits
    from effllm.plan.workload import ModelRef
    from effllm.specs import RunSpec

    if not gpu_memory_gb or spec.get("stage") not in GPU_STAGES:
        return
    device = device_memory_gb()
    device_gb = min(s for s in (gpu_memory_gb, device) if s)
    run = RunSpec.from_json(spec)
    if run.stage == "pretrain":
        from effllm.data.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(Path(data_dir) / "tokenizer"))
        ref = ModelRef(run.name.rsplit("-s", 1)[0], shape=run.model, vocab_size=vocab)
    else:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        ref = ModelRef(Path(model_dir).parent.name, config=config)
    draft = None
    if draft_dir:  # a speculative draft or a distillation teacher: on the device too
        draft = ModelRef(Path(draft_dir).parent.name,
                         config=json.loads((Path(draft_dir) / "config.json").read_text()))
    job = fit_job(run, ref, gpus, draft=draft)
    if not fits(job.peak, device_gb):
        key = ("the device it got" if device_gb == device and device != gpu_memory_gb
               else f"resources.{run.stage}.gpu_memory_gb")
        raise PlanRefusal(refusal(job, device_gb, key, None))
