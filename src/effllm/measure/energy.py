"""Energy over a window: NVML's cumulative energy counter on GPUs, RAPL on CPUs where readable,
and otherwise, when ``measure.watts_per_core`` is set, an estimate from the process's CPU time.

The estimate is the Green Algorithms model (Lannelongue et al., Adv. Sci. 2021): energy = CPU
core-seconds x power per core, the power being a TDP divided by the core count. It is labelled
``estimated`` and never stands in for a counter: with ``watts_per_core: null`` a machine without
counters reports energy as unavailable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from effllm.measure import nvml

RAPL_ROOT = Path("/sys/class/powercap")
CPU_TIME_METHOD = "cpu_time_x_watts_per_core"


def _rapl_zones(root: Path = RAPL_ROOT) -> list[Path]:
    """Top-level package zones (intel-rapl:N); sub-zones are part of their package's count."""
    zones = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and (zone / "energy_uj").exists():
            try:
                int((zone / "energy_uj").read_text())
                zones.append(zone)
            except (OSError, ValueError):
                return []  # unreadable (root-only since CVE-2020-8694): treat as absent
    return zones


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (torch's intra-op pool too)."""
    return time.process_time()


class EnergyMeter:
    """``start()`` / ``stop()`` around a window; ``joules``, ``method``, ``status`` afterwards.

    ``rapl_root`` defaults to :data:`RAPL_ROOT`. ``watts_per_core`` (None: no estimate) and
    ``cpu_clock`` (the process CPU-time clock, a parameter so that tests can fake it) serve the
    estimate on machines without counters.
    """

    note: str | None = None

    def __init__(self, rapl_root: Path | None = None, watts_per_core: float | None = None,
                 cpu_clock: Callable[[], float] | None = None):
        devices = nvml.job_devices()
        self._gpus = list(devices.handles)
        self._rapl, self.method, self.reason = [], None, None
        self.status = "measured"
        self.joules: float | None = None
        self.cpu_seconds: float | None = None
        self.watts_per_core = watts_per_core
        self._cpu_clock = cpu_clock or process_cpu_seconds
        if self._gpus:
            missing = [n for h, n in zip(self._gpus, devices.names) if nvml.energy_mj(h) is None]
            if missing:  # a partial sum would be no job's energy
                self._gpus = []
                self.reason = (f"no NVML energy counter on GPU(s) {', '.join(missing)} "
                               "(older than Volta)")
            else:
                self.method = "nvml_energy_counter"
                self.note = devices.describe()
            return  # a GPU job's CPU time says nothing about its energy: no estimate
        self._rapl = _rapl_zones(rapl_root or RAPL_ROOT)  # read at call time: tests patch it
        if self._rapl:
            self.method = "rapl_energy_uj"
            self.note = "CPU package energy (RAPL), the whole socket"
        elif watts_per_core:
            self.method, self.status = CPU_TIME_METHOD, "estimated"
        else:
            self.reason = ("no NVML energy counter and no readable RAPL on this machine, and no "
                           "measure.watts_per_core for an estimate")

    def _read(self) -> list[float]:
        if self._gpus:
            return [nvml.energy_mj(h) for h in self._gpus]
        if self._rapl:
            return [int((z / "energy_uj").read_text()) for z in self._rapl]
        return [self._cpu_clock()]

    def start(self) -> EnergyMeter:
        self._begin = self._read() if self.method else None
        return self

    def stop(self) -> None:
        if not self.method:
            return
        end = self._read()
        if self._gpus:
            self.joules = sum(e - b for b, e in zip(self._begin, end)) / 1e3
            return
        if not self._rapl:
            self.cpu_seconds = end[0] - self._begin[0]
            self.joules = self.cpu_seconds * self.watts_per_core
            self.note = (f"estimate: {self.cpu_seconds:.4g} s CPU time (user + system, all "
                         f"threads of this process) x {self.watts_per_core:g} W per core "
                         "(measure.watts_per_core); no idle, DRAM or uncore power")
            return
        total = 0
        for zone, b, e in zip(self._rapl, self._begin, end):
            if e < b:  # the counter wrapped
                e += int((zone / "max_energy_range_uj").read_text())
            total += e - b
        self.joules = total / 1e6
