"""Measurement: time-weighted means, energy status, FLOP counting on CPU, latency statistics."""

import time

import pytest
import torch
import torch.nn.functional as F

from effllm.measure import EnergyMeter, Window, count_flops, latency_summary
from effllm.measure.memory import time_weighted_mean


def test_time_weighted_mean_weights_by_duration():
    # 1 GB for 9 s then 10 GB for 1 s: trapezoid over the actual times, not a plain mean.
    assert time_weighted_mean([0, 9, 9, 10], [1, 1, 10, 10]) == pytest.approx(1.9)


def test_window_sees_an_allocation():
    with Window(interval=0.005) as w:
        block = torch.ones(50_000_000)  # 200 MB
        time.sleep(0.2)
        del block
    m = w.metrics()
    assert m["memory_peak"].status == "measured"
    assert m["memory_peak"].value > m["amu"].value * 0.5
    assert m["memory_peak"].value > 0.2  # GB, the allocation is in the peak
    assert w.seconds >= 0.2


def test_energy_is_unavailable_not_zero_without_counters(tmp_path, monkeypatch):
    from effllm.measure import energy, nvml

    monkeypatch.setattr(nvml, "device_handles", lambda: ())  # no GPU
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)  # an empty powercap tree
    monkeypatch.setattr(EnergyMeter.__init__, "__defaults__", (tmp_path,))
    meter = EnergyMeter().start()
    meter.stop()
    assert meter.method is None and meter.joules is None
    with Window(0.01) as w:
        time.sleep(0.05)
    m = w.metrics()
    for name in ("aec", "energy"):
        assert m[name].status == "unavailable" and m[name].value is None and m[name].note


def test_energy_reads_rapl_with_wraparound(tmp_path, monkeypatch):
    from effllm.measure import nvml

    monkeypatch.setattr(nvml, "device_handles", lambda: ())
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("900")
    (zone / "max_energy_range_uj").write_text("1000")
    meter = EnergyMeter(rapl_root=tmp_path).start()
    (zone / "energy_uj").write_text("100")  # wrapped: 100 uJ to the top, 100 after
    meter.stop()
    assert meter.method == "rapl_energy_uj"
    assert meter.joules == pytest.approx(200e-6)


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(2, 4, 16, 8)
    k = torch.randn(2, 2, 16, 8)
    v = torch.randn(2, 2, 16, 8)
    flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=True))
    assert flops == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # QK^T and PV, causal not discounted


def test_flop_counter_linear_forward_backward():
    lin = torch.nn.Linear(32, 64)
    x = torch.randn(8, 32, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * 8 * 32 * 64
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 32 * 64


def test_latency_summary():
    s = latency_summary([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["p50"] == 2.5 and s["count"] == 4
    assert s["cv"] == pytest.approx(s["std"] / 2.5)
    with pytest.raises(ValueError):
        latency_summary([])
