"""How busy the rest of the machine was during a window: the CPU time other processes used.

Timings on a shared machine (a neighbour job, a test run, a helper) are slower and noisier than
on a quiet one; the record says how much, so that a reader and the claims check can tell.
Read from Linux's ``/proc/stat`` (every CPU's busy time) minus this process's own CPU time;
elsewhere it is unavailable.
"""

from __future__ import annotations

import os
import time

from effllm.records import Metric

PROC_STAT = "/proc/stat"


def busy_cpu_seconds(path: str = PROC_STAT) -> float | None:
    """Seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal), or
    None where the file is not there."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # guest time is already inside user/nice
    return busy / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """``start()``/``stop()`` around a window; ``metric()``: others' CPU use as a fraction of
    the machine (0 = quiet, 1 = every core busy with other work)."""

    def __init__(self, path: str = PROC_STAT, cores: int | None = None):
        self.path, self.cores = path, cores or os.cpu_count() or 1

    def start(self) -> None:
        self.busy0, self.own0 = busy_cpu_seconds(self.path), time.process_time()
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        self.busy1, self.own1 = busy_cpu_seconds(self.path), time.process_time()
        self.t1 = time.perf_counter()

    def metric(self) -> Metric:
        wall = self.t1 - self.t0
        if self.busy0 is None or self.busy1 is None:
            return Metric.unavailable("fraction", "none", f"{self.path} is not readable here")
        if wall <= 0:
            return Metric.unavailable("fraction", "none", "the window measured no time")
        own = self.own1 - self.own0
        others = max(0.0, (self.busy1 - self.busy0) - own)
        share = min(1.0, others / (wall * self.cores))
        return Metric.measured(
            share, "fraction", "proc_stat_minus_own_cpu_time",
            f"other processes used {others:.3g} CPU s of {wall * self.cores:.3g} "
            f"({self.cores} cores x {wall:.3g} s); the job itself {own:.3g} CPU s")
