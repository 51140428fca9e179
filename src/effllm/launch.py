"""How a job is launched: in this process, or with more than one GPU, by the torchrun command
that starts one process (rank) per GPU inside the job. Where each process then runs (device,
rank) is :mod:`effllm.distributed`.

Kept apart from what the jobs measure (as optimum-benchmark separates launchers from
benchmarks): a stage function runs the same in one process or in each of N ranks, and
:func:`run_stage` decides which. What a job asks the scheduler for is :mod:`effllm.cluster`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from effllm.distributed import ENV_GPUS
from effllm.specs import DISTRIBUTED, STAGES

# The stage functions run_stage starts: (module, function), one per stage of effllm.specs.
# DISTRIBUTED stages split the work over torchrun ranks; the others run in one process and
# refuse more than one GPU.
# A stage may have more than one kind of job: the pruning block's runs are pretraining runs that
# start from a source (JOB_STAGES names each extra kind's stage).
STAGE_FUNCTIONS = {"pretrain": ("effllm.training.pretrain", "run_pretrain"),
                   "prune_pretrain": ("effllm.training.prune", "run_prune"),
                   "finetune": ("effllm.training.finetune", "run_finetune"),
                   "inference": ("effllm.inference.run", "run_inference")}
JOB_STAGES = {"prune_pretrain": "pretrain"}
assert {JOB_STAGES.get(kind, kind) for kind in STAGE_FUNCTIONS} == set(STAGES)


def torchrun_command(nproc: int, stage: str, args_file: str | os.PathLike) -> list[str]:
    """The command that starts ``nproc`` ranks of ``stage`` on this node (single-node DDP:
    torchrun's standalone rendezvous picks a free local port, so jobs sharing a node do not
    collide)."""
    if nproc < 2:
        raise ValueError(f"torchrun needs 2 or more processes, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "-m", "effllm.launch", stage, str(args_file)]


def run_stage(stage: str, gpus: int, gpu_memory_gb: float | None = None, **kwargs) -> None:
    """Run a stage function with the job's ``gpus``: in this process, or for a distributed stage
    with 2 or more, in one torchrun rank per GPU.

    The keyword arguments travel to the ranks as JSON, so they must be plain values (paths as
    strings). A rank that fails makes torchrun, and so the job, fail. A GPU job first checks
    that its plan fits its devices (``gpu_memory_gb`` and the device it got), before any
    rank starts or any weight is read (:func:`effllm.plan.check.preflight`).
    """
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; one of {sorted(STAGE_FUNCTIONS)}")
    if gpus > 1 and JOB_STAGES.get(stage, stage) not in DISTRIBUTED:
        raise ValueError(f"stage {stage!r} runs in one process; it cannot use {gpus} GPUs")
    if gpus and "spec" in kwargs:
        from effllm.plan.check import preflight

        preflight(kwargs["spec"], gpus, gpu_memory_gb,
                  model_dir=kwargs.get("base_dir") or kwargs.get("model_dir"),
                  data_dir=kwargs.get("data_dir"),
                  draft_dir=kwargs.get("draft_dir") or kwargs.get("teacher_dir"))
    if gpus < 2:
        previous = os.environ.get(ENV_GPUS)
        os.environ[ENV_GPUS] = str(gpus)
        try:
            _stage_function(stage)(**kwargs)
        finally:  # leave a calling process (a test) as it was
            if previous is None:
                del os.environ[ENV_GPUS]
            else:
                os.environ[ENV_GPUS] = previous
        return
    with tempfile.TemporaryDirectory(prefix=f"effllm-{stage}-") as tmp:
        args_file = Path(tmp) / "kwargs.json"
        args_file.write_text(json.dumps(kwargs))
        command = torchrun_command(gpus, stage, args_file)
        print("launch:", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, ENV_GPUS: str(gpus)},
                       stdout=_fd(sys.stdout), stderr=_fd(sys.stderr))


def _fd(stream):
    """The file a stream writes to (a job's log), or None (inherit) when it has none."""
    try:
        stream.flush()
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _stage_function(stage: str):
    module, name = STAGE_FUNCTIONS[stage]
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> None:
    """One rank: ``python -m effllm.launch STAGE KWARGS.json`` (what torchrun starts)."""
    stage, args_file = (argv if argv is not None else sys.argv[1:])
    _stage_function(stage)(**json.loads(Path(args_file).read_text()))


if __name__ == "__main__":
    main()
