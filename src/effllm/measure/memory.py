"""Memory in use over a window, sampled by a background thread.

CPU: process resident set size (psutil), plus the kernel's own peak (VmHWM, reset per window by
writing 5 to /proc/self/clear_refs). GPU: torch allocated/reserved peaks and NVML device memory
used. AMU is the time-weighted mean of the samples (paper Eq. 1), not a plain mean.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import torch

from effllm.measure import nvml


def _reset_vmhwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vmhwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def time_weighted_mean(times: list[float], values: list[float]) -> float:
    """Trapezoid integral over the actual sample times divided by the span."""
    if len(values) == 1 or times[-1] == times[0]:
        return float(values[0])
    area = sum((t1 - t0) * (v0 + v1) / 2 for t0, t1, v0, v1 in
               zip(times, times[1:], values, values[1:]))
    return area / (times[-1] - times[0])


class MemorySampler:
    """Poll memory every ``interval`` seconds between ``start()`` and ``stop()``."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.times: list[float] = []
        self.rss: list[float] = []
        self.gpu_used: list[float] = []
        self.gpu_util: list[float] = []  # NVML duty cycle, mean over devices (for PCU)
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self.devices = nvml.job_devices()
        self._handles = self.devices.handles

    def _sample(self) -> None:
        self.times.append(time.perf_counter())
        self.rss.append(float(self._proc.memory_info().rss))
        if self._handles:
            self.gpu_used.append(float(sum(nvml.memory_used(h) for h in self._handles)))
            utils = [nvml.utilization(h) for h in self._handles]
            self.gpu_util.append(sum(utils) / len(utils))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "MemorySampler":
        self.vmhwm_reset = _reset_vmhwm()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            for d in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(d)
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.vmhwm = _vmhwm_bytes() if self.vmhwm_reset else None
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            self.torch_allocated_peak = sum(torch.cuda.max_memory_allocated(d) for d in range(n))
            self.torch_reserved_peak = sum(torch.cuda.max_memory_reserved(d) for d in range(n))
