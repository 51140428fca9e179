"""Thin, failure-tolerant access to NVIDIA's NVML (nvidia-ml-py). No GPU → empty handle list."""

from __future__ import annotations

import functools


@functools.cache
def device_handles() -> tuple:
    try:
        import pynvml

        pynvml.nvmlInit()
        return tuple(pynvml.nvmlDeviceGetHandleByIndex(i)
                     for i in range(pynvml.nvmlDeviceGetCount()))
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound on machines without a driver
        return ()


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
