"""Wall-clock timing with a device sync, and summary statistics of repeated timings."""

from __future__ import annotations

import statistics
import time

import torch


def sync() -> None:
    """Wait for queued GPU work, so a timer measures execution rather than kernel launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``; syncs the device on both edges."""

    method = "cuda_sync_perf_counter" if torch.cuda.is_available() else "perf_counter"

    def __enter__(self) -> "Timer":
        sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync()
        self.seconds = time.perf_counter() - self.start


def latency_summary(samples: list[float]) -> dict[str, float]:
    """count, total, mean, p25/p50/p75/p90/p95/p99, interquartile range, stdev and coefficient of
    variation of timings."""
    if not samples:
        raise ValueError("no timing samples")
    ordered = sorted(samples)

    def pct(p: float) -> float:
        # Linear interpolation between closest ranks.
        k = (len(ordered) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    mean = statistics.fmean(ordered)
    std = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
    return {
        "count": len(ordered), "total": sum(ordered), "mean": mean, "p25": pct(0.25),
        "p50": pct(0.5), "p75": pct(0.75), "iqr": pct(0.75) - pct(0.25), "p90": pct(0.9),
        "p95": pct(0.95), "p99": pct(0.99), "std": std,
        "cv": std / mean if mean > 0 else float("nan"),
    }
