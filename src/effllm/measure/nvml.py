"""NVML (nvidia-ml-py) scoped to the job's own GPUs.

A Slurm job sees its GPUs through ``CUDA_VISIBLE_DEVICES`` (indices, or ``GPU-…`` UUIDs), while
NVML enumerates every GPU of the node: memory, energy and utilisation are read from exactly the
devices that variable names, never from the whole node. Without such devices the reason is kept,
so that what cannot be measured is recorded ``unavailable`` with why, never silently dropped.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from effllm.distributed import ENV_GPUS


@dataclass(frozen=True)
class JobDevices:
    """The NVML handles of the job's GPUs and their names; ``reason`` says why there are none."""

    handles: tuple = ()
    names: tuple[str, ...] = ()
    reason: str | None = None

    def describe(self) -> str:
        return f"the job's {len(self.handles)} GPU(s): {', '.join(self.names)}"


def job_devices() -> JobDevices:
    """The GPUs this job computes on (see the module docstring)."""
    return _devices(os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get(ENV_GPUS))


@functools.cache
def _devices(visible: str | None, given: str | None) -> JobDevices:
    if given == "0":
        return JobDevices(reason="the job was given no GPU (it computes on the CPU)")
    import torch

    if not torch.cuda.is_available():
        return JobDevices(reason="torch computes on the CPU here (no CUDA build or no device)")
    try:
        import pynvml

        pynvml.nvmlInit()
        if visible is None:
            ids = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            ids = [item.strip() for item in visible.split(",") if item.strip()]
        handles = tuple(_handle(pynvml, item) for item in ids)
    except Exception as err:  # noqa: BLE001 - no driver, an unknown UUID, a MIG slice: say why
        return JobDevices(reason=f"NVML cannot read the job's GPUs: {err}")
    if not handles:
        return JobDevices(reason="CUDA_VISIBLE_DEVICES names no GPU")
    return JobDevices(handles, tuple(ids))


def _handle(pynvml, item: str):
    """The handle of one ``CUDA_VISIBLE_DEVICES`` entry: an index or a GPU UUID."""
    if item.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(item))
    if item.startswith("GPU-"):
        return pynvml.nvmlDeviceGetHandleByUUID(item)
    raise ValueError(f"CUDA_VISIBLE_DEVICES entry {item!r} is neither an index nor a GPU UUID "
                     "(MIG slices are not measured)")


def memory_used(handle) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def energy_mj(handle) -> int | None:
    """Cumulative energy since driver load (mJ), Volta or newer; None where unsupported."""
    import pynvml

    try:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except pynvml.NVMLError:
        return None


def utilization(handle) -> float:
    import pynvml

    return pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
