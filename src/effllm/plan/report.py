"""The plan of a whole configuration: every job's per-GPU peak by part, whether it fits its
device, FLOPs and GPU-hours, host memory, and the smallest GPU count that fits each device
size; written as ``results/plan/plan.tsv`` and a readable ``plan.md``."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Callable, Mapping

from effllm.plan.check import GPU_STAGES, fit_job, prefetch
from effllm.plan.fit import DEFAULT_MFU, DEFAULT_PEAK_FLOPS, DEVICE_SIZES, GB, PARTS, fits, \
    gpu_hours, host_bytes

COLUMNS = ["stage", "run", "model", "method", "precision", "strategy", "gpus",
           "gpu_memory_gb", "fits", "peak_gb", *[f"{p}_gb" for p in PARTS], "offloaded_gb",
           "peak_phase", "host_gb", *[f"gpus_for_{d}gb" for d in DEVICE_SIZES],
           "flops_per_step", "steps", "flops", "mfu", "peak_flops", "gpu_hours", "note",
           "workload", "simulation"]


def plan_settings(config: Mapping) -> tuple[float, dict[str, float]]:
    """(peak FLOP/s per GPU, MFU per stage) of the GPU-hour estimates."""
    section = config.get("plan") or {}
    peak = section.get("peak_flops") or (config.get("measure") or {}).get("peak_flops") \
        or DEFAULT_PEAK_FLOPS
    return float(peak), {**DEFAULT_MFU, **(section.get("mfu") or {})}


def set_sizes(config: Mapping, results: Path = Path("results")) -> dict[str, tuple[int, str]]:
    """Training samples of each fine-tuning set and where the number came from: the prepared
    set's card, the configured count of a generated set, or the rows of the cached files times
    the training share; sets whose size is not known yet are left out."""
    out = {}
    sets = config["data"]["reasoning"]
    for name in config["finetune"]["datasets"]:
        card = results / "data" / "reasoning" / name / "card.json"
        spec = sets[name]
        if card.is_file():
            out[name] = (json.loads(card.read_text())["splits"]["train"]["samples"],
                         f"{card} (train split)")
            continue
        block = spec.get(spec["source"]) or {}
        if spec["source"] != "hf":
            out[name] = (int(block["n_train"]), f"data.reasoning.{name}.n_train")
            continue
        rows = _cached_rows(block)
        if rows:
            test = block["test_fraction"]
            val = block.get("validation_fraction") or test
            train = int(rows * (1 - test - val))
            if block.get("max_samples"):
                train = min(train, block["max_samples"])
            out[name] = (train, f"{rows} rows in the cached files x (1 - {val} - {test})")
    return out


def _cached_rows(block: Mapping) -> int:
    """Rows in a cached data set's files (0 when they are placeholders or missing)."""
    from effllm.data import DataSourceError
    from effllm.data.hub import cached_dataset

    try:
        files = cached_dataset(block["repo_id"], block["files"], block.get("cache_dir")).files
    except DataSourceError:
        return 0
    rows = 0
    for path in files:
        if path.stat().st_size == 0:
            continue
        if path.suffix == ".jsonl":
            with open(path, "rb") as handle:
                rows += sum(1 for line in handle if line.strip())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            rows += len(data) if isinstance(data, list) else 0
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.ParquetFile(path).metadata.num_rows
    return rows


def job_row(config: Mapping, run, ref, gpus: int, device_gb, samples, peak_flops: float,
            mfu: dict, draft=None) -> dict:
    """The plan of one job: its configured GPUs and, for each device size, the fewest GPUs
    that fit."""
    from effllm.plan.grid import gpu_choices, steps

    spec = run.spec
    job = fit_job(spec, ref, gpus, flops=True, draft=draft)
    peak = job.peak
    smallest: dict[int, int | None] = {size: None for size in DEVICE_SIZES}
    for n in gpu_choices(spec):
        candidate = candidate_peak(job, spec, ref, n, draft)
        for size in DEVICE_SIZES:
            if smallest[size] is None and fits(candidate, size):
                smallest[size] = n
        if smallest[DEVICE_SIZES[0]] is not None:
            break
    world = max(1, gpus)
    note = []
    if spec.stage == "inference":
        flops_step, n_steps = serving_flops(spec, job.sim), 1
        if spec.harness is not None:
            note.append("FLOPs of the timed decoding and the pipeline's own scoring; "
                        "lm-eval's tasks not counted (their documents are the tasks')")
    else:
        flops_step = job.sim.flops["step"] * (world if job.work.strategy != "single" else 1)
        n_steps = steps(spec, samples.get(spec.dataset, (None,))[0]
                        if spec.stage == "finetune" else None)
        if n_steps is None:
            note.append(f"training set {spec.dataset!r} not prepared or cached: its size, "
                        "and so the steps, unknown")
    total = flops_step * n_steps if n_steps else math.nan
    rate = mfu[spec.stage]
    method = getattr(spec, "method", None)
    row = {
        "stage": spec.stage, "run": spec.name, "model": ref.name,
        "method": method.name if method else ("serve" if spec.stage == "inference"
                                              else "pretrain"),
        "precision": getattr(spec, "precision", None) or spec.train.precision,
        "strategy": getattr(job.work, "strategy", "single")
        + (" + offload" if getattr(job.work, "offload", False) else ""),
        "gpus": gpus, "gpu_memory_gb": device_gb or "",
        "fits": ("yes" if fits(peak, device_gb) else "NO") if device_gb else "",
        "peak_gb": round(peak.total / GB, 2),
        **{f"{name}_gb": round(value / GB, 2) for name, value in peak.parts.items()},
        "offloaded_gb": round(peak.offloaded / GB, 2), "peak_phase": peak.phase,
        "host_gb": "" if host_bytes(job) is None else round(host_bytes(job) / GB, 1),
        **{f"gpus_for_{d}gb": smallest[d] or "none" for d in DEVICE_SIZES},
        "flops_per_step": f"{flops_step:.4g}", "steps": n_steps or "",
        "flops": f"{total:.4g}" if n_steps else "", "mfu": rate, "peak_flops": f"{peak_flops:.4g}",
        "gpu_hours": round(gpu_hours(total, peak_flops, rate), 2) if n_steps else "",
        "note": "; ".join(note), "workload": _digest(job.work), "simulation": job.sim.method,
    }
    return row


def candidate_peak(job, spec, ref, gpus: int, draft=None):
    """The job's per-GPU peak on ``gpus`` GPUs: from its own simulation where the step is the
    same (:func:`effllm.plan.fit.rescaled`), else simulated."""
    from effllm.plan.fit import rescaled
    from effllm.plan.grid import job_work

    if gpus == job.gpus:
        return job.peak
    peak = rescaled(job.sim, job.work, job_work(spec, ref, gpus, draft))
    return peak if peak is not None else fit_job(spec, ref, gpus, draft=draft).peak


def serving_flops(spec, sim) -> float:
    """FLOPs of an inference job's own passes: the timed decoding (warm-up and the minimum
    repeats, each prompt and new tokens) and the quality passes (perplexity tokens; every
    held-out problem at its longest prompt and generation), at the FLOPs per token of the
    simulated decoding batch's prefill."""
    ev = spec.eval
    per_token = sim.flops["decode"] / (ev.batch_size * ev.prompt_tokens)
    tokens = ((ev.warmup_runs + ev.min_runs) * ev.batch_size * (ev.prompt_tokens
                                                                + ev.new_tokens)
              + ev.ppl_tokens + ev.eval_problems * (2 * ev.eval_max_length
                                                    + ev.eval_max_new_tokens))
    return per_token * tokens


def _digest(work) -> str:
    from effllm.plan.workload import digest

    return digest(work)


def plan_rows(config: Mapping, runs: Mapping, results: Path = Path("results"),
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """The plan of every pretraining, fine-tuning and inference job of ``runs``: the
    simulations it needs run first, in parallel, round by round of GPU counts (a job whose
    fewer GPUs already fit the smallest device needs no more)."""
    from effllm.cluster import stage_settings
    from effllm.plan.fit import rank_peak, rescaled
    from effllm.plan.grid import draft_ref, gpu_choices, job_model_id, job_work, model_ref
    from effllm.plan.simulate import simulate

    peak_flops, mfu = plan_settings(config)
    samples = set_sizes(config, results)
    refs, jobs, drafts = {}, [], {}
    for stage in GPU_STAGES:
        for name, run in runs.get(stage, {}).items():
            settings = stage_settings(config, stage, name)
            source = job_model_id(run.spec)
            if source not in refs:
                refs[source] = model_ref(config, runs, source)
            jobs.append((run, refs[source], settings.gpus, settings.gpu_memory_gb))
            drafts[run.run_id] = draft_ref(config, runs, run.spec, refs)

    def work(run, ref, n):
        return job_work(run.spec, ref, n, drafts[run.run_id])

    start = time.perf_counter()
    prefetch([work(run, ref, gpus) for run, ref, gpus, _ in jobs], flops=True)
    open_jobs = [(run, ref, gpus) for run, ref, gpus, _ in jobs]
    for n in sorted({n for run, *_ in jobs for n in gpu_choices(run.spec)}):
        batch = [(run, ref, gpus) for run, ref, gpus in open_jobs
                 if n in gpu_choices(run.spec)]
        own = {run.run_id: work(run, ref, gpus) for run, ref, gpus in batch}
        derived = {run.run_id: rescaled(simulate(own[run.run_id], flops=False),
                                        own[run.run_id], work(run, ref, n))
                   for run, ref, gpus in batch}
        prefetch([work(run, ref, n) for run, ref, _ in batch
                  if derived[run.run_id] is None])
        fitted = {run.run_id for run, ref, _ in batch
                  if fits(derived[run.run_id] or rank_peak(
                      simulate(work(run, ref, n), flops=False),
                      work(run, ref, n)), DEVICE_SIZES[0])}
        open_jobs = [job for job in open_jobs if job[0].run_id not in fitted]
        if progress:
            progress(f"{len(batch)} jobs simulated on {n} GPU(s), {len(open_jobs)} not yet "
                     f"fitting {DEVICE_SIZES[0]} GB ({time.perf_counter() - start:.0f} s)")
    rows = [job_row(config, run, ref, gpus, device_gb, samples, peak_flops, mfu,
                    drafts[run.run_id]) for run, ref, gpus, device_gb in jobs]
    if progress:
        progress(f"planned {len(rows)} jobs in {time.perf_counter() - start:.0f} s")
    return rows


def write_tsv(rows: list[dict], path: str | Path) -> None:
    from effllm.io import atomic_file

    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per stage: jobs, jobs that do not fit, the largest peak, GPU-hours (None when some
    job's are unknown) and the jobs whose are."""
    out = {}
    for stage in GPU_STAGES:
        mine = [r for r in rows if r["stage"] == stage]
        if not mine:
            continue
        hours = [r["gpu_hours"] for r in mine]
        known = [h for h in hours if h != ""]
        # GPU-hours of 1,000 optimiser steps of every job whose steps are not known
        per_k = sum(gpu_hours(float(r["flops_per_step"]) * 1000, float(r["peak_flops"]),
                              float(r["mfu"])) for r in mine if r["gpu_hours"] == "")
        checked = any(r["fits"] for r in mine)
        out[stage] = {"jobs": len(mine), "unfit": sum(r["fits"] == "NO" for r in mine)
                      if checked else "n/a (no gpu_memory_gb)",
                      "largest_peak_gb": max(r["peak_gb"] for r in mine),
                      "gpu_hours": round(sum(known), 1) if len(known) == len(hours) else None,
                      "gpu_hours_known": round(sum(known), 1), "unknown": len(hours) - len(known),
                      "gpu_hours_per_1000_steps": round(per_k, 1)}
    return out


def markdown(rows: list[dict], config: Mapping) -> str:
    """The readable plan: per stage totals, then every job's line."""
    peak_flops, mfu = plan_settings(config)
    stages = summary(rows)
    lines = ["# GPU plan", "",
             f"Simulated on fake tensors (docs/plan.md). GPU-hours = FLOPs / (peak "
             f"{peak_flops:.3g} FLOP/s per GPU x MFU); MFU assumed: "
             + ", ".join(f"{s} {v}" for s, v in mfu.items()) + ".", "",
             "| stage | jobs | do not fit | largest peak per GPU (GB) | GPU-hours |",
             "|---|---|---|---|---|"]
    total, complete = 0.0, True
    for stage, s in stages.items():
        hours = s["gpu_hours"]
        if hours is None:
            complete = False
            unknown = (f"{s['unknown']} jobs of unknown length: "
                       f"{s['gpu_hours_per_1000_steps']:,} per 1,000 steps of each")
            shown = (f"{s['gpu_hours_known']:,} + {unknown}" if s["gpu_hours_known"]
                     else unknown)
        else:
            shown = f"{hours:,}"
        total += s["gpu_hours_known"]
        lines.append(f"| {stage} | {s['jobs']} | {s['unfit']} | {s['largest_peak_gb']} | "
                     f"{shown} |")
    lines.append(f"| total | {sum(s['jobs'] for s in stages.values())} | "
                 f"{sum(s['unfit'] for s in stages.values() if isinstance(s['unfit'], int))} | | "
                 f"{total:,.1f}{'' if complete else ' + unknown'} |")
    lines += ["", "| job | strategy x GPUs | peak per GPU (GB) | weights | grads | optimizer | "
              "activations | fits | GPUs for 80 / 96 / 141 GB | GPU-hours |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['stage']}/{r['run']} | {r['strategy']} x {r['gpus'] or 1} | {r['peak_gb']} | "
            f"{r['weights_gb']} | {r['grads_gb']} | {r['optimizer_gb']} | "
            f"{r['activations_gb']} | {r['fits'] or 'n/a'} | {r['gpus_for_80gb']} / "
            f"{r['gpus_for_96gb']} / {r['gpus_for_141gb']} | {r['gpu_hours'] or '?'} |")
    return "\n".join(lines) + "\n"


def write_plan(config: Mapping, tsv: str | Path, md: str | Path,
               results: str | Path = "results") -> list[dict]:
    """Plan every job of ``config``'s grid and write the table and its summary."""
    from effllm.io import atomic_file
    from effllm.sweep import expand_runs

    rows = plan_rows(config, expand_runs(dict(config)), Path(results),
                     progress=lambda line: print(line, flush=True))
    write_tsv(rows, tsv)
    with atomic_file(md) as handle:
        handle.write(markdown(rows, config))
    return rows
