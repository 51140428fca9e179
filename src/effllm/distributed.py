"""The ground floor of multi-process work: where this process runs, its rank among the job's
ranks, and the few collectives the stages use.

Every stage function runs the same in one process or in each of N torchrun ranks
(:func:`effllm.launch.run_stage` decides which); everything that asks "am I rank 0?", "how many
ranks?" or sums a count over the ranks asks here. In one process each helper is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_GPUS = "EFFLLM_GPUS"  # the job's GPUs (set by run_stage, inherited by the ranks)
ENV_ALLOW_CPU = "EFFLLM_ALLOW_CPU"  # "1": a job given GPUs may run on the CPU (fake GPUs)

# The process group of a torchrun job: on GPUs NCCL, with Gloo beside it for the collectives on
# CPU tensors (ZeRO-3 Offload clips gradients that live on the CPU; NCCL alone refuses them).
PROCESS_GROUP_BACKENDS = {"nccl": "cpu:gloo,cuda:nccl", "gloo": "gloo"}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    """Rank 0 evaluates, saves and writes the record; the other ranks only train."""
    return rank() == 0


def all_reduce_(tensor):
    """Sum ``tensor`` over the ranks in place (unchanged in one process); returns it."""
    if is_distributed():
        _dist().all_reduce(tensor)
    return tensor


def summed(*values: float) -> list[float]:
    """``values`` summed over the ranks (unchanged in one process)."""
    if not is_distributed():
        return list(values)
    import torch

    # On CPU tensors through Gloo (a GPU job's group has it beside NCCL, see above).
    device = "cpu" if "gloo" in str(_dist().get_backend()) else "cuda"
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def rank_share(items: list) -> tuple[list, int]:
    """(this rank's items, how many of them count): every ``world``-th item from the rank's own,
    padded with copies of the first item to the longest share, so that every rank runs the same
    number of collective forward passes. In one process: all of them."""
    if not is_distributed():
        return items, len(items)
    mine = items[rank()::world()]
    return mine + items[:1] * (-(-len(items) // world()) - len(mine)), len(mine)


def end() -> None:
    """Leave the process group (a torchrun rank's last collective step)."""
    if _dist() is not None:
        _dist().destroy_process_group()


@dataclass
class Placement:
    """Where this process runs: its rank among ``world`` ranks and its device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    backend: str | None = None  # torch.distributed backend, None for one process

    @property
    def main(self) -> bool:
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

    The device follows the GPUs the job was given (``EFFLLM_GPUS``, set by ``run_stage``):
    none → the CPU; some → the local rank's GPU, and an error if torch sees none (a CPU build of
    torch, a missing driver) unless ``EFFLLM_ALLOW_CPU=1``. Outside a job (unset) it is whatever
    torch sees.
    """
    import torch

    n_ranks = int(os.environ.get("WORLD_SIZE", "1"))
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
    if n_ranks == 1:
        return Placement(device=device)
    import torch.distributed as dist

    backend = "nccl" if use_gpu else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(PROCESS_GROUP_BACKENDS[backend])
    return Placement(dist.get_rank(), dist.get_world_size(), device, backend)
