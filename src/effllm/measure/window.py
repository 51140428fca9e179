"""A measurement window: memory sampler + energy meter + wall clock, read out as Metrics."""

from __future__ import annotations

import time

from effllm.measure.energy import EnergyMeter
from effllm.measure.memory import MemorySampler, time_weighted_mean
from effllm.measure.timing import sync
from effllm.records import Metric

GB = 1e9


class Window:
    """``with Window() as w: work()`` then ``w.metrics()`` → amu, memory_peak, energy, aec, pcu."""

    def __init__(self, interval: float = 0.02):
        self.memory = MemorySampler(interval)
        self.energy = EnergyMeter()

    def __enter__(self) -> "Window":
        sync()
        self.memory.start()
        self.energy.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync()
        self.seconds = time.perf_counter() - self.start
        self.energy.stop()
        self.memory.stop()

    def metrics(self) -> dict[str, Metric]:
        m = self.memory
        out: dict[str, Metric] = {}
        if m.gpu_used:
            where = f"device memory used on {m.devices.describe()}"
            out["amu"] = Metric.measured(time_weighted_mean(m.times, m.gpu_used) / GB, "GB",
                                         "nvml_used_poll", where)
            out["memory_peak"] = Metric.measured(max(m.gpu_used) / GB, "GB", "nvml_used_poll",
                                                 where)
            out["memory_torch_reserved_peak"] = Metric.measured(
                m.torch_reserved_peak / GB, "GB", "torch_max_reserved")
            out["memory_torch_allocated_peak"] = Metric.measured(
                m.torch_allocated_peak / GB, "GB", "torch_max_allocated")
        else:
            note = "host process RSS (no accelerator): includes Python, torch and data"
            out["amu"] = Metric.measured(time_weighted_mean(m.times, m.rss) / GB, "GB",
                                         "host_rss_poll", note)
            if m.vmhwm is not None:
                out["memory_peak"] = Metric.measured(m.vmhwm / GB, "GB", "rss_vmhwm", note)
            else:
                out["memory_peak"] = Metric.measured(max(m.rss) / GB, "GB", "host_rss_poll", note)
        if self.energy.joules is not None and self.seconds > 0:
            out["energy"] = Metric.measured(self.energy.joules, "J", self.energy.method,
                                            self.energy.note)
            out["aec"] = Metric.measured(self.energy.joules / self.seconds, "W",
                                         self.energy.method, self.energy.note)
        else:
            why = self.energy.reason or "the window measured no time"
            out["energy"] = Metric.unavailable("J", "none", why)
            out["aec"] = Metric.unavailable("W", "none", why)
        if m.gpu_util:
            out["pcu"] = Metric.measured(time_weighted_mean(m.times, m.gpu_util), "fraction",
                                         "nvml_utilization_poll",
                                         "duty cycle: share of time any kernel ran, not FLOP "
                                         f"use; mean over {m.devices.describe()}")
        else:
            out["pcu"] = Metric.unavailable("fraction", "none",
                                            f"no accelerator duty cycle: {m.devices.reason}")
        return out
