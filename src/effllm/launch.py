"""How a job runs: on which device, and with more than one GPU, the torchrun command that
starts one process (rank) per GPU inside the job.

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
from dataclasses import dataclass
from pathlib import Path

ENV_GPUS = "EFFLLM_GPUS"  # the job's GPUs (set by run_stage, inherited by the ranks)
ENV_ALLOW_CPU = "EFFLLM_ALLOW_CPU"  # "1": a job given GPUs may run on the CPU (fake GPUs)

# The stage functions run_stage starts: (module, function). DISTRIBUTED stages split the work
# over torchrun ranks; the others run in one process and refuse more than one GPU.
STAGE_FUNCTIONS = {"pretrain": ("effllm.training.pretrain", "run_pretrain"),
                   "finetune": ("effllm.training.finetune", "run_finetune"),
                   "inference": ("effllm.inference.run", "run_inference")}
DISTRIBUTED = ("pretrain", "finetune")


# The process group of a torchrun job: on GPUs NCCL, with Gloo beside it for the collectives on
# CPU tensors (ZeRO-3 Offload clips gradients that live on the CPU; NCCL alone refuses them).
PROCESS_GROUP_BACKENDS = {"nccl": "cpu:gloo,cuda:nccl", "gloo": "gloo"}


@dataclass
class Placement:
    """Where this process trains: its rank among ``world`` data-parallel ranks and its device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    backend: str | None = None  # torch.distributed backend, None for one process

    @property
    def main(self) -> bool:
        """Rank 0 evaluates, saves and writes the record; the other ranks only train."""
        return self.rank == 0

    def execution(self, strategy: str = "DDP") -> dict:
        """How the run ran, for the record's provenance (``strategy``: how the ranks share the
        work, when there are several)."""
        import torch

        name = torch.cuda.get_device_name(self.device) if self.device.startswith("cuda") else None
        return {"backend": f"torchrun {strategy} ({self.backend})" if self.world > 1
                else "single-process", "world_size": self.world, "device": self.device,
                "device_name": name}


def place() -> Placement:
    """This process's placement, and a torchrun rank (``WORLD_SIZE`` > 1) joins the process group
    (NCCL on GPUs, with Gloo for CPU tensors; Gloo on CPUs).

    The device follows the GPUs the job was given (``EFFLLM_GPUS``, set by :func:`run_stage`):
    none → the CPU; some → the local rank's GPU, and an error if torch sees none (a CPU build of
    torch, a missing driver) unless ``EFFLLM_ALLOW_CPU=1``. Outside a job (unset) it is whatever
    torch sees.
    """
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    given = os.environ.get(ENV_GPUS)
    cuda = torch.cuda.is_available()
    if given is not None and int(given) > 0 and not cuda and os.environ.get(ENV_ALLOW_CPU) != "1":
        raise RuntimeError(f"the job was given {given} GPU(s) but torch sees no CUDA device (a "
                           f"CPU build of torch, or no driver); set {ENV_ALLOW_CPU}=1 to run on "
                           "the CPU anyway")
    use_gpu = cuda and (given is None or int(given) > 0)
    if use_gpu and torch.cuda.device_count() <= local_rank:
        raise RuntimeError(f"rank {local_rank} has no GPU: torch sees "
                           f"{torch.cuda.device_count()}")
    device = f"cuda:{local_rank}" if use_gpu else "cpu"
    if use_gpu:
        torch.cuda.set_device(device)
    if world == 1:
        return Placement(device=device)
    import torch.distributed as dist

    backend = "nccl" if use_gpu else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(PROCESS_GROUP_BACKENDS[backend])
    return Placement(dist.get_rank(), dist.get_world_size(), device, backend)


def torchrun_command(nproc: int, stage: str, args_file: str | os.PathLike) -> list[str]:
    """The command that starts ``nproc`` ranks of ``stage`` on this node (single-node DDP:
    torchrun's standalone rendezvous picks a free local port, so jobs sharing a node do not
    collide)."""
    if nproc < 2:
        raise ValueError(f"torchrun needs 2 or more processes, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "-m", "effllm.launch", stage, str(args_file)]


def run_stage(stage: str, gpus: int, **kwargs) -> None:
    """Run a stage function with the job's ``gpus``: in this process, or for a distributed stage
    with 2 or more, in one torchrun rank per GPU.

    The keyword arguments travel to the ranks as JSON, so they must be plain values (paths as
    strings). A rank that fails makes torchrun, and so the job, fail.
    """
    if stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; one of {sorted(STAGE_FUNCTIONS)}")
    if gpus > 1 and stage not in DISTRIBUTED:
        raise ValueError(f"stage {stage!r} runs in one process; it cannot use {gpus} GPUs")
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
