"""Measurement: time-weighted means, energy status, FLOP counting on CPU, latency statistics."""

import sys
import time
import types

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

    monkeypatch.setattr(nvml, "job_devices", lambda: nvml.JobDevices(reason="no GPU"))
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

    monkeypatch.setattr(nvml, "job_devices", lambda: nvml.JobDevices(reason="no GPU"))
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


# ------------------------------------------------------------------ NVML scoped to the job

def fake_nvml(n: int = 4, energy: tuple[int, ...] | None = None):
    """A stand-in for pynvml on a node of ``n`` GPUs: GPU i holds (i + 1) GB, has used
    1000 (i + 1) mJ and is 10 (i + 1) % busy; ``energy`` lists the GPUs with an energy counter."""
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    devices = [{"index": i, "uuid": f"GPU-{i:08x}-aaaa", "used": (i + 1) * 10**9,
                "mj": 1000 * (i + 1), "util": 10 * (i + 1)} for i in range(n)]

    def by_index(i):
        if not 0 <= i < n:
            raise NVMLError(f"no GPU at index {i}")
        return devices[i]

    def by_uuid(uuid):
        for d in devices:
            if d["uuid"] == uuid:
                return d
        raise NVMLError(f"no GPU with UUID {uuid}")

    def energy_of(d):
        if energy is not None and d["index"] not in energy:
            raise NVMLError("not supported")
        return d["mj"]

    module.NVMLError = NVMLError
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetCount = lambda: n
    module.nvmlDeviceGetHandleByIndex = by_index
    module.nvmlDeviceGetHandleByUUID = by_uuid
    module.nvmlDeviceGetMemoryInfo = lambda d: types.SimpleNamespace(used=d["used"])
    module.nvmlDeviceGetTotalEnergyConsumption = energy_of
    module.nvmlDeviceGetUtilizationRates = lambda d: types.SimpleNamespace(gpu=d["util"])
    return module


@pytest.fixture
def node(monkeypatch):
    """A 4-GPU node seen through the fake NVML, torch reporting CUDA; returns a setter of the
    job's environment (CUDA_VISIBLE_DEVICES, EFFLLM_GPUS) and of the fake module."""
    import torch

    from effllm.distributed import ENV_GPUS
    from effllm.measure import nvml

    def setup(visible=None, gpus=None, cuda=True, **fake):
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(**fake))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        for key, value in (("CUDA_VISIBLE_DEVICES", visible), (ENV_GPUS, gpus)):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        nvml._devices.cache_clear()
        return nvml.job_devices()

    yield setup
    nvml._devices.cache_clear()


@pytest.mark.parametrize("visible, expected", [
    ("2,3", [2, 3]),
    ("GPU-00000003-aaaa,GPU-00000001-aaaa", [3, 1]),  # Slurm may hand out UUIDs
    (None, [0, 1, 2, 3]),  # outside a job: every GPU torch could see
])
def test_nvml_reads_exactly_the_jobs_gpus(node, visible, expected):
    from effllm.measure.memory import MemorySampler

    devices = node(visible)
    assert [d["index"] for d in devices.handles] == expected and devices.reason is None
    sampler = MemorySampler()
    sampler._sample()
    assert sampler.gpu_used == [sum((i + 1) * 10**9 for i in expected)]
    assert sampler.gpu_util == [pytest.approx(sum(0.1 * (i + 1) for i in expected)
                                              / len(expected))]
    meter = EnergyMeter().start()
    meter.stop()
    assert meter.method == "nvml_energy_counter" and meter.joules == 0.0
    assert meter.note.startswith(f"the job's {len(expected)} GPU(s)")


def test_energy_of_a_gpu_without_counter_is_unavailable_with_the_reason(node):
    node("1,2", energy=(1,))
    meter = EnergyMeter().start()
    meter.stop()
    assert meter.method is None and meter.joules is None
    assert "no NVML energy counter on GPU(s) 2" in meter.reason


@pytest.mark.parametrize("kwargs, reason", [
    ({"visible": "0", "gpus": "0"}, "given no GPU"),  # a CUDA build, a job with gpus: 0
    ({"visible": "0", "cuda": False}, "computes on the CPU"),  # NVML present, CPU torch
    ({"visible": "GPU-deadbeef"}, "no GPU with UUID GPU-deadbeef"),
    ({"visible": "MIG-1234"}, "MIG slices are not measured"),
    ({"visible": ""}, "names no GPU"),
])
def test_no_job_gpu_is_a_reason_never_a_device_or_a_crash(node, monkeypatch, tmp_path, kwargs,
                                                          reason):
    import torch

    from effllm.measure import energy

    devices = node(**kwargs)
    assert devices.handles == () and reason in devices.reason
    # The whole window runs on the CPU and says why the GPU metrics are missing.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)
    monkeypatch.setattr(EnergyMeter.__init__, "__defaults__", (tmp_path,))
    with Window(0.01) as w:
        time.sleep(0.03)
    m = w.metrics()
    assert m["amu"].method == "host_rss_poll"
    assert m["pcu"].status == "unavailable" and reason in m["pcu"].note
    assert m["energy"].status == "unavailable" and m["energy"].value is None
