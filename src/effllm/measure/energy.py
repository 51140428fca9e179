"""Energy over a window: NVML's cumulative energy counter on GPUs, RAPL on CPUs where readable.

Where neither exists (this project's default CPU VM has no RAPL) energy is unavailable. We never
fall back to a TDP model silently; an estimate would have to be labelled ``estimated``.
"""

from __future__ import annotations

from pathlib import Path

from effllm.measure import nvml

RAPL_ROOT = Path("/sys/class/powercap")


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


class EnergyMeter:
    """``start()`` / ``stop()`` around a window; ``joules`` and ``method`` afterwards."""

    def __init__(self, rapl_root: Path = RAPL_ROOT):
        devices = nvml.job_devices()
        self._gpus = list(devices.handles)
        self._rapl, self.method, self.reason = [], None, None
        if self._gpus:
            missing = [n for h, n in zip(self._gpus, devices.names) if nvml.energy_mj(h) is None]
            if missing:  # a partial sum would be no job's energy
                self._gpus = []
                self.reason = (f"no NVML energy counter on GPU(s) {', '.join(missing)} "
                               "(older than Volta)")
            else:
                self.method = "nvml_energy_counter"
                self.note = devices.describe()
            self.joules: float | None = None
            return
        self._rapl = _rapl_zones(rapl_root)
        if self._rapl:
            self.method = "rapl_energy_uj"
            self.note = "CPU package energy (RAPL), the whole socket"
        else:
            self.reason = "no NVML energy counter and no readable RAPL on this machine"
        self.joules = None

    def _read(self) -> list[int]:
        if self._gpus:
            return [nvml.energy_mj(h) for h in self._gpus]
        return [int((z / "energy_uj").read_text()) for z in self._rapl]

    note: str | None = None

    def start(self) -> "EnergyMeter":
        self._begin = self._read() if self.method else None
        return self

    def stop(self) -> None:
        if not self.method:
            return
        end = self._read()
        if self._gpus:
            self.joules = sum(e - b for b, e in zip(self._begin, end)) / 1e3
            return
        total = 0
        for zone, b, e in zip(self._rapl, self._begin, end):
            if e < b:  # the counter wrapped
                e += int((zone / "max_energy_range_uj").read_text())
            total += e - b
        self.joules = total / 1e6
