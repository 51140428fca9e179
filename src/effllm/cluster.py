"""What a job asks a cluster scheduler for, from the config's ``resources`` section.

Apart from :mod:`effllm.launch` (what the jobs themselves import), so that editing how jobs are
scheduled retrains nothing. Snakemake's Slurm plugin turns the resources into sbatch flags
(``gpu`` → ``--gpus``, ``cpus_per_gpu`` → ``--cpus-per-gpu``, ``nodes`` → ``--nodes``,
``mem_mb`` → ``--mem``, ``runtime`` → ``-t``). ``tasks`` is never set: on a GPU job the plugin
makes it ``--ntasks-per-gpu``, which would start the job once per GPU (profiles/slurm/README.md).
"""

from __future__ import annotations

import os
from typing import Mapping

from effllm.specs import STAGES as RUN_STAGES, ResourceSpec

STAGES = ("data", *RUN_STAGES)  # resource sections: data preparation, then the run stages
ENV_PARTITION = {"cpu": "EFFLLM_CPU_PARTITION", "gpu": "EFFLLM_GPU_PARTITION"}
ENV_ACCOUNT = "EFFLLM_ACCOUNT"


def stage_settings(config: Mapping, stage: str, run: str | None = None) -> ResourceSpec:
    """One stage's ``resources`` entry with the defaults filled in; with ``run`` (a run's name
    within the stage), the entry's ``jobs`` overrides whose glob matches it applied in config
    order."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    spec = ResourceSpec.from_json((config.get("resources") or {}).get(stage) or {},
                                  f"resources.{stage}")
    if run is None or not spec.jobs:
        return spec
    import dataclasses
    from fnmatch import fnmatchcase

    for pattern, override in spec.jobs.items():
        if fnmatchcase(run, pattern):
            spec = dataclasses.replace(spec, **override)
    return spec


def job_overrides(config: Mapping, stage: str) -> bool:
    """Whether some job of ``stage`` has resources of its own (``resources.<stage>.jobs``)."""
    return bool(stage_settings(config, stage).jobs)


def job_resources(config: Mapping, stage: str, threads: int,
                  environ: Mapping[str, str] | None = None, run: str | None = None) -> dict:
    """Snakemake resources of one stage's jobs.

    Partition and account come from the environment when set (``EFFLLM_CPU_PARTITION``,
    ``EFFLLM_GPU_PARTITION``, ``EFFLLM_ACCOUNT``), else from the config, else are left out (the
    site's default partition; the plugin guesses an account unless ``--slurm-no-account``).
    ``mem_mb`` and ``runtime`` are the first attempt's: the rule scales both by the attempt
    number, so a job killed for memory or time is retried with more. GPU jobs stay on one node
    (torchrun starts their ranks there). ``run``: one job's resources (its ``jobs`` overrides);
    ``gpu_memory_gb`` is passed to a GPU job, whose first act checks its plan against it.
    """
    environ = os.environ if environ is None else environ
    section = config.get("resources") or {}
    spec = stage_settings(config, stage, run)
    kind = "gpu" if spec.gpus else "cpu"
    out: dict = {"mem_mb": spec.mem_mb, "runtime": spec.runtime}
    partition = environ.get(ENV_PARTITION[kind]) or (section.get("partition") or {}).get(kind)
    if partition:
        out["slurm_partition"] = partition
    account = environ.get(ENV_ACCOUNT) or section.get("account")
    if account:
        out["slurm_account"] = account
    if spec.gpus:
        out.update(gpu=spec.gpus, cpus_per_gpu=threads, nodes=1)
        if spec.gpu_model:
            out["gpu_model"] = spec.gpu_model
        if spec.gpu_memory_gb:
            out["gpu_memory_gb"] = int(spec.gpu_memory_gb)
    return out
