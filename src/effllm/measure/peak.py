"""A CPU's peak FLOP/s, measured once per machine by a matmul benchmark and cached.

MFU needs a peak. A GPU's comes from its datasheet (``measure.peak_flops``); a CPU has no
trustworthy datasheet figure (turbo, AVX frequency offsets, a VM's share of a socket), so we
measure what this process can reach: square GEMMs at the job's torch thread count and compute
dtype, sized to be compute-bound, best of a few repeats. That is an achievable peak, not a
theoretical one, so MFU against it reads higher than against a datasheet peak.

The result is cached in one small JSON file per key (host, CPU model, threads, dtype, torch
version) under :func:`cache_dir`. Jobs that start together measure one at a time under a file
lock (the others then read the result), and each file is written atomically, so a reader never
sees a torn one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from effllm.io import atomic_file, read_json
from effllm.records import Metric

# Compute dtypes by the names the config uses; training "bf16" is autocast, whose matmuls run
# in bf16. int8/int4 serving computes its unquantised parts in a float dtype: callers pass that.
DTYPES = ("fp32", "bf16", "fp16")
# Square GEMM sizes tried, smallest first: large enough to be compute-bound on many cores.
SIZES = (256, 512, 1024, 2048, 4096)
CACHE_ENV = "EFFLLM_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s and where it came from (``source``: config or benchmark)."""

    flops: float
    source: str
    note: str


def cache_dir() -> Path:
    """``$EFFLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/effllm``, else ``~/.cache/effllm``: per
    user and machine (a shared home on a cluster is told apart by the key's host name)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "effllm"


def cpu_model() -> str:
    """The CPU's marketing name (the record's own reading of /proc/cpuinfo)."""
    from effllm.records import _cpu_model

    return _cpu_model()


def machine_key(threads: int, dtype: str) -> dict:
    import torch

    return {"host": socket.gethostname(), "cpu": cpu_model(), "threads": int(threads),
            "dtype": dtype, "torch": torch.__version__}


def _cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "peak_flops" / f"{key['dtype']}-t{key['threads']}-{digest}.json"


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"no GEMM benchmark for dtype {dtype!r}; one of {DTYPES}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _gemm_seconds(n: int, dtype: str, repeats: int, budget: float) -> list[float]:
    """Wall times of ``repeats`` n × n GEMMs after one warm-up (fewer once ``budget`` seconds
    are spent, never fewer than two)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(_torch_dtype(dtype))
    b = torch.randn(n, n, generator=gen).to(_torch_dtype(dtype))
    out = torch.empty(n, n, dtype=a.dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, kernel selection, page faults
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - begin < budget):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return times


def benchmark(dtype: str = "fp32", sizes: tuple[int, ...] = SIZES, repeats: int = 5,
              max_gemm_seconds: float = 0.5) -> dict:
    """Best GEMM FLOP/s of this process at its torch thread count over ``sizes`` (ascending),
    best of ``repeats`` each. A size whose GEMM would take over ``max_gemm_seconds`` (eight
    times the previous size's) is skipped with all larger ones: an fp16 GEMM without native
    support runs ~100× slower than fp32, and the rate has levelled off by then anyway."""
    best = {"flops": 0.0, "size": sizes[0], "repeats": 0}
    last, prev = None, sizes[0]
    for n in sizes:
        if last is not None and last * (n / prev) ** 3 > max_gemm_seconds:
            break
        times = _gemm_seconds(n, dtype, repeats, budget=max(1.0, 4 * max_gemm_seconds))
        last, prev = min(times), n
        if 2 * n**3 / last > best["flops"]:
            best = {"flops": 2 * n**3 / last, "size": n, "repeats": len(times)}
    return best


def _read_entry(path: Path, key: dict) -> dict | None:
    """The cached entry of ``key``, or None when absent, torn or of another key."""
    try:
        entry = read_json(path)
    except (OSError, ValueError):
        return None
    ok = isinstance(entry, dict) and entry.get("key") == key and entry.get("flops", 0) > 0
    return entry if ok else None


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an advisory lock beside ``path`` (POSIX), so that jobs starting together benchmark
    one at a time: the second reads the first one's result instead of competing with it for the
    cores. Without ``fcntl`` there is no lock; the atomic write still keeps the file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measured_peak(dtype: str = "fp32", threads: int | None = None,
                  sizes: tuple[int, ...] = SIZES, repeats: int = 5) -> Peak:
    """The cached peak of this machine at ``threads`` (default: torch's current count) and
    ``dtype``, measured and cached first if there is none."""
    import torch

    threads = threads or torch.get_num_threads()
    key = machine_key(threads, dtype)
    path = _cache_file(key)
    entry = _read_entry(path, key)
    if entry is None:
        with _exclusive(path):
            entry = _read_entry(path, key)  # another job may have measured it meanwhile
            if entry is None:
                previous = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    result = benchmark(dtype, sizes, repeats)
                finally:
                    torch.set_num_threads(previous)
                entry = {"key": key, **result,
                         "measured_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
                with atomic_file(path) as handle:  # readers see the old file or ours, whole
                    json.dump(entry, handle, indent=2, sort_keys=True)
    note = (f"peak {entry['flops'] / 1e9:.4g} GFLOP/s measured by a {dtype} matmul benchmark "
            f"(best at {entry['size']}x{entry['size']}, best of {entry['repeats']}, {threads} "
            f"torch thread(s), {key['cpu']}, torch {key['torch']}, {entry['measured_at']}; "
            f"cached in {path.name})")
    return Peak(float(entry["flops"]), "matmul_benchmark", note)


def device_peak(configured: float | None, device, dtype: str = "fp32",
                threads: int | None = None) -> Peak | None:
    """The peak MFU divides by: ``measure.peak_flops`` when given; else, for a job computing on
    the CPU, the measured peak; else (a GPU without a configured peak) None."""
    if configured:
        return Peak(float(configured), "config", "peak from config (measure.peak_flops), "
                                                 "not measured")
    if str(device).split(":")[0] != "cpu":
        return None
    return measured_peak(dtype, threads)


def mfu_metric(flops_per_s: float | None, peak: Peak | None, devices: int = 1,
               counted: str = "flop_counter x tokens/s") -> Metric:
    """Model FLOP utilisation: counted FLOP/s over ``devices`` × the peak. Estimated, since the
    peak is a configured figure or a benchmark, never a counter. ``counted`` names how the
    FLOP/s were obtained, for the method string."""
    if peak is None or flops_per_s is None:
        return Metric.unavailable("fraction", "none",
                                  "no device peak FLOP/s configured (measure.peak_flops)")
    divisor = "measure.peak_flops" if peak.source == "config" else "matmul_benchmark_peak"
    return Metric.estimated(flops_per_s / (peak.flops * devices), "fraction",
                            f"{counted} / ({divisor} x devices)", f"{peak.note}; {devices} "
                            "device(s)")


def pcu_from_mfu(mfu: Metric, pcu: Metric | None) -> Metric | None:
    """PCU where no duty cycle was measured (a CPU): the MFU, labelled estimated and saying so.
    None keeps ``pcu`` as it is (a measured duty cycle, or no MFU to estimate from)."""
    if (pcu is not None and pcu.status != "unavailable") or mfu.status == "unavailable":
        return None
    return Metric.estimated(mfu.value, "fraction", f"mfu: {mfu.method}",
                            "no device duty cycle here, so PCU = MFU (a share of peak FLOP/s, "
                            f"not of time); {mfu.note}")
