"""Measurement: time-weighted means, energy (counters and the CPU-time estimate), the peak
FLOP/s benchmark and MFU/PCU, FLOP counting on CPU, latency statistics."""

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
    m = w.metrics()  # on a CPU the process's RSS is the second, labelled figure
    assert m["memory_peak_rss"].status == "measured"
    assert m["memory_peak_rss"].value > m["amu_rss"].value * 0.5
    assert m["memory_peak_rss"].value > 0.2  # GB, the allocation is in the peak
    assert w.seconds >= 0.2
    # AMU and peak come from a tensor account of the work, never from RSS: none attached here
    assert m["amu"].status == m["memory_peak"].status == "unavailable"


def test_energy_is_unavailable_not_zero_without_counters(tmp_path, monkeypatch):
    from effllm.measure import energy, nvml

    monkeypatch.setattr(nvml, "job_devices", lambda: nvml.JobDevices(reason="no GPU"))
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)  # an empty powercap tree
    meter = EnergyMeter().start()
    meter.stop()
    assert meter.method is None and meter.joules is None
    assert "measure.watts_per_core" in meter.reason
    with Window(0.01) as w:  # watts_per_core None: no estimate either
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


def _cpu_only(monkeypatch, tmp_path):
    """No GPU and an empty powercap tree: the machine this project's CI runs on."""
    from effllm.measure import energy, nvml

    monkeypatch.setattr(nvml, "job_devices", lambda: nvml.JobDevices(reason="no GPU"))
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path)


def test_energy_estimate_is_cpu_seconds_times_watts_per_core(tmp_path, monkeypatch):
    _cpu_only(monkeypatch, tmp_path)
    clock = iter([100.0, 102.5])  # process CPU seconds at start and stop
    meter = EnergyMeter(watts_per_core=7.0, cpu_clock=lambda: next(clock)).start()
    meter.stop()
    assert meter.method == "cpu_time_x_watts_per_core" and meter.status == "estimated"
    assert meter.cpu_seconds == pytest.approx(2.5) and meter.joules == pytest.approx(17.5)
    assert "2.5 s CPU time" in meter.note and "7 W per core" in meter.note


def test_window_reports_the_cpu_estimate_as_estimated(tmp_path, monkeypatch):
    from effllm.measure import energy

    _cpu_only(monkeypatch, tmp_path)
    clock = iter([10.0, 13.0])
    monkeypatch.setattr(energy, "process_cpu_seconds", lambda: next(clock))
    with Window(0.01, watts_per_core=5.0) as w:
        time.sleep(0.05)
    m = w.metrics()
    assert m["energy"].status == m["aec"].status == "estimated"
    assert m["energy"].value == pytest.approx(15.0)  # 3 CPU seconds x 5 W
    assert m["aec"].value == pytest.approx(15.0 / w.seconds)
    assert m["aec"].method == "cpu_time_x_watts_per_core" and "wall time" in m["aec"].note


def test_process_cpu_time_covers_busy_work_of_every_thread(tmp_path, monkeypatch):
    """The real clock: two threads spinning for 0.3 s each are all in the estimate (the machine
    has 2 cores, shared, so only a lower bound holds)."""
    import threading

    _cpu_only(monkeypatch, tmp_path)

    def spin():
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    meter = EnergyMeter(watts_per_core=10.0).start()
    threads = [threading.Thread(target=spin) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meter.stop()
    assert meter.cpu_seconds >= 0.6 and meter.joules == pytest.approx(meter.cpu_seconds * 10)


def test_readable_rapl_wins_over_the_estimate(tmp_path, monkeypatch):
    _cpu_only(monkeypatch, tmp_path)
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("1000")
    meter = EnergyMeter(watts_per_core=12.0).start()
    (zone / "energy_uj").write_text("3000000")
    meter.stop()
    assert meter.method == "rapl_energy_uj" and meter.status == "measured"
    assert meter.joules == pytest.approx(2.999)


# ------------------------------------------------------------------ peak FLOP/s benchmark

def test_peak_benchmark_is_cached_per_thread_count(tmp_path, monkeypatch):
    from effllm.measure import peak

    monkeypatch.setenv(peak.CACHE_ENV, str(tmp_path))
    before = torch.get_num_threads()
    runs = []
    real = peak.benchmark
    monkeypatch.setattr(peak, "benchmark", lambda *a, **k: runs.append(a) or real(*a, **k))
    first = peak.measured_peak("fp32", threads=1, sizes=(64, 128), repeats=3)
    assert first.flops > 1e6 and first.source == "matmul_benchmark"  # any CPU does 1 MFLOP/s
    assert "fp32 matmul benchmark" in first.note and "1 torch thread" in first.note
    again = peak.measured_peak("fp32", threads=1, sizes=(64, 128), repeats=3)
    assert again.flops == first.flops and len(runs) == 1  # read back, not re-measured
    other = peak.measured_peak("fp32", threads=2, sizes=(64,), repeats=3)
    assert len(runs) == 2 and "2 torch thread" in other.note
    files = sorted(p.name for p in (tmp_path / "peak_flops").glob("*.json"))
    assert len(files) == 2 and all(f.startswith("fp32-t") for f in files)
    assert not list((tmp_path / "peak_flops").glob(".*"))  # no temp files left behind
    assert torch.get_num_threads() == before  # the job's own setting is restored


def test_jobs_racing_for_the_peak_benchmark_once(tmp_path, monkeypatch):
    """Two jobs (here threads, each with its own lock handle) want the same uncached peak: one
    measures, the other waits and reads its result."""
    import threading

    from effllm.measure import peak

    monkeypatch.setenv(peak.CACHE_ENV, str(tmp_path))
    calls = []

    def slow_benchmark(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)
        return {"flops": 1e9 * len(calls), "size": 64, "repeats": 1}

    monkeypatch.setattr(peak, "benchmark", slow_benchmark)
    results = []
    jobs = [threading.Thread(target=lambda: results.append(peak.measured_peak("bf16", 1)))
            for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(calls) == 1 and [r.flops for r in results] == [1e9, 1e9]


def test_peak_cache_survives_a_torn_file_and_a_config_peak_wins(tmp_path, monkeypatch):
    from effllm.measure import peak

    monkeypatch.setenv(peak.CACHE_ENV, str(tmp_path))
    p = peak.measured_peak("fp32", threads=1, sizes=(64,), repeats=2)
    (path,) = (tmp_path / "peak_flops").glob("*.json")
    path.write_text("{\"flops\": ")  # a torn write (cannot happen with os.replace; still safe)
    again = peak.measured_peak("fp32", threads=1, sizes=(64,), repeats=2)
    assert again.flops > 0 and peak.read_json(path)["flops"] == again.flops
    assert p.flops > 0
    configured = peak.device_peak(3e12, "cpu")
    assert configured.flops == 3e12 and configured.source == "config"
    assert peak.device_peak(None, "cuda:0") is None  # a GPU's peak is never benchmarked here


def test_pcu_on_cpu_is_the_mfu_estimated(tmp_path, monkeypatch):
    from effllm.measure import peak
    from effllm.records import Metric
    from effllm.training.loop import utilisation_metrics

    monkeypatch.setenv(peak.CACHE_ENV, str(tmp_path))
    p = peak.measured_peak("fp32", sizes=(64,), repeats=2)  # at torch's current thread count
    metrics = {"tokens_per_s": Metric.measured(1000.0, "tokens/s", "attention_mask_sum"),
               "pcu": Metric.unavailable("fraction", "none", "no accelerator duty cycle")}
    out = utilisation_metrics(metrics, 2e6, None, 1, "cpu", "fp32")
    assert out["mfu"].status == out["pcu"].status == "estimated"
    assert out["mfu"].value == pytest.approx(2e9 / p.flops)
    assert out["pcu"].value == out["mfu"].value and out["pcu"].method.startswith("mfu: ")
    assert "matmul_benchmark_peak" in out["mfu"].method
    # A measured duty cycle (a GPU) stays; a GPU without a configured peak has no MFU.
    metrics["pcu"] = Metric.measured(0.5, "fraction", "nvml_utilization_poll")
    gpu = utilisation_metrics(metrics, 2e6, None, 1, "cuda:0", "bf16")
    assert gpu["mfu"].status == "unavailable" and "pcu" not in gpu
    configured = utilisation_metrics(metrics, 2e6, 1e12, 2, "cuda:0", "bf16")
    assert configured["mfu"].value == pytest.approx(2e9 / 2e12)
    assert "measure.peak_flops" in configured["mfu"].method and "pcu" not in configured


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
    with Window(0.01) as w:
        time.sleep(0.03)
    m = w.metrics()
    assert m["amu_rss"].method == "host_rss_poll"  # on a CPU: RSS is the labelled second figure
    assert m["pcu"].status == "unavailable" and reason in m["pcu"].note
    assert m["energy"].status == "unavailable" and m["energy"].value is None


# Machine load during a window ---------------------------------------------------------------------

def test_machine_load_is_others_cpu_time_over_the_machine(tmp_path, monkeypatch):
    """Arithmetic on a fake /proc/stat: busy ticks minus the job's own CPU time, over cores."""
    import os

    from effllm.measure.load import MachineLoad

    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    clock = iter([0.0, 10.0])  # perf_counter: a 10 s window
    own = iter([5.0, 7.0])  # process_time: the job used 2 CPU s
    monkeypatch.setattr("effllm.measure.load.time.perf_counter", lambda: next(clock))
    monkeypatch.setattr("effllm.measure.load.time.process_time", lambda: next(own))
    load = MachineLoad(str(stat), cores=2)
    # cpu user nice system idle iowait irq softirq steal
    stat.write_text(f"cpu {100 * hz} 0 0 {1000 * hz} {5 * hz} 0 0 0 0 0\ncpu0 ...\n")
    load.start()
    stat.write_text(f"cpu {106 * hz} 0 {2 * hz} {1012 * hz} {5 * hz} 0 0 0 0 0\ncpu0 ...\n")
    load.stop()
    metric = load.metric()  # 8 busy CPU s - 2 own = 6 of 20
    assert metric.status == "measured" and metric.value == pytest.approx(0.3)
    assert "6 CPU s of 20" in metric.note


def test_machine_load_sees_a_busy_neighbour_process():
    import subprocess

    from effllm.measure.load import MachineLoad

    load = MachineLoad()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        load.start()
        time.sleep(1.0)  # this process sleeps: the CPU time is the neighbour's
        load.stop()
    finally:
        busy.kill()
        busy.wait()
    metric = load.metric()
    # one busy core of the machine's: at least most of 1 / cores (plus whatever else runs)
    assert metric.value >= 0.6 / load.cores, metric.note


def test_machine_load_is_unavailable_without_proc_stat(tmp_path):
    from effllm.measure.load import MachineLoad

    load = MachineLoad(str(tmp_path / "absent"))
    load.start()
    load.stop()
    metric = load.metric()
    assert metric.status == "unavailable" and metric.value is None and "absent" in metric.note


def test_window_records_the_machine_load():
    with Window() as w:
        time.sleep(0.05)
    assert "machine_load_others" in w.metrics()
