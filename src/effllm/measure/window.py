"""A measurement window: memory sampler + energy meter + wall clock, read out as Metrics."""

from __future__ import annotations

import time

from effllm.measure.energy import EnergyMeter
from effllm.measure.load import MachineLoad
from effllm.measure.memory import MemorySampler, time_weighted_mean
from effllm.measure.tensors import TensorAccount
from effllm.measure.timing import sync
from effllm.records import Metric

GB = 1e9


class Window:
    """``with Window() as w: work()`` then ``w.metrics()`` → amu, memory_peak, energy, aec, pcu."""

    def __init__(self, interval: float = 0.02, watts_per_core: float | None = None):
        """``watts_per_core`` (``measure.watts_per_core``): estimate energy from CPU time where
        no counter exists; None leaves it unavailable there."""
        self.memory = MemorySampler(interval)
        self.energy = EnergyMeter(watts_per_core=watts_per_core)
        self.load = MachineLoad()

    # The tensor account of one representative unit of the window's work (a training step, a
    # generate()), set by the stage: see effllm.measure.tensors.
    tensors: TensorAccount | None = None
    tensors_what = ""

    def account(self, tensors: TensorAccount, what: str) -> None:
        """Attach the tensor account of ``what`` (one unit of this window's work)."""
        self.tensors, self.tensors_what = tensors, what

    def _tensor_memory(self) -> dict[str, Metric]:
        """AMU and peak on a CPU: from the tensors of the work, never from the process."""
        t = self.tensors
        if t is None:
            why = "no tensor account of this window's work (RSS in amu_rss/memory_peak_rss)"
            return {"amu": Metric.unavailable("GB", "none", why),
                    "memory_peak": Metric.unavailable("GB", "none", why)}
        note = (f"live tensors of {self.tensors_what} on {t.device} (parameters, gradients, "
                "optimiser state, activations, caches); Python and the process excluded")
        return {"amu": Metric.measured(t.mean / GB, "GB", "tensor_account_time_weighted", note),
                "memory_peak": Metric.measured(t.peak / GB, "GB", "tensor_account_peak", note)}

    def __enter__(self) -> "Window":
        sync()
        self.memory.start()
        self.energy.start()
        self.load.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync()
        self.seconds = time.perf_counter() - self.start
        self.load.stop()
        self.energy.stop()
        self.memory.stop()

    def metrics(self) -> dict[str, Metric]:
        m = self.memory
        out: dict[str, Metric] = {"machine_load_others": self.load.metric()}
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
        else:  # the process's RSS: a second, labelled figure; the tensor account is primary
            note = "host process RSS (no accelerator): includes Python, torch and data"
            out["amu_rss"] = Metric.measured(time_weighted_mean(m.times, m.rss) / GB, "GB",
                                             "host_rss_poll", note)
            out["memory_peak_rss"] = (
                Metric.measured(m.vmhwm / GB, "GB", "rss_vmhwm", note) if m.vmhwm is not None
                else Metric.measured(max(m.rss) / GB, "GB", "host_rss_poll", note))
            out.update(self._tensor_memory())
        if self.tensors is not None:
            out.update(self.tensors.metrics(self.tensors_what))
        e = self.energy
        if e.joules is not None and self.seconds > 0:  # measured, or estimated from CPU time
            out["energy"] = Metric(e.joules, "J", e.method, e.status, e.note)
            out["aec"] = Metric(e.joules / self.seconds, "W", e.method, e.status,
                                e.note if e.status == "measured" else
                                f"{e.note}; over {self.seconds:.4g} s wall time")
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
