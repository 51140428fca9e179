"""Energy and utilisation on a CPU, estimated and labelled (issue 20): a tiny pretraining run
and a served model carry estimated energy, AEC, MFU and PCU; the analysis uses them, marks
them, and leaves them out when ``analysis.use_estimates`` is false."""

from __future__ import annotations

import copy
import json
import os
import types

import numpy as np
import pytest
import torch

from effllm.measure import Window
from effllm.measure import peak as peak_lib

ESTIMATED_ON_CPU = ("energy", "aec", "mfu", "pcu")


@pytest.fixture
def cpu_machine(tmp_path, monkeypatch):
    """No GPU, no RAPL, and a peak cache of this test's own (seeded with a tiny benchmark so
    that no test pays for the full one)."""
    from effllm.measure import energy, nvml

    monkeypatch.setattr(nvml, "job_devices", lambda: nvml.JobDevices(reason="no GPU"))
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path / "powercap")
    monkeypatch.setenv(peak_lib.CACHE_ENV, str(tmp_path / "cache"))

    def seed(threads: int, dtype: str = "fp32") -> peak_lib.Peak:
        return peak_lib.measured_peak(dtype, threads, sizes=(64, 128), repeats=3)

    return seed


def test_tiny_pretraining_run_reports_estimated_energy_and_pcu(stdlib_tokens, tmp_path,
                                                                cpu_machine):
    from examples import SPEC

    from effllm.training.pretrain import run_pretrain

    spec = copy.deepcopy(SPEC)
    spec["settings"]["train"].update(steps=6, checkpoint_every=0, eval_tokens=200)
    peak = cpu_machine(spec["settings"]["measure"]["threads"])
    run_pretrain(spec, stdlib_tokens, tmp_path / "model", tmp_path / "record.json")
    m = json.loads((tmp_path / "record.json").read_text())["metrics"]
    for name in ESTIMATED_ON_CPU:
        assert m[name]["status"] == "estimated" and m[name]["value"] > 0, name
    assert m["energy"]["method"] == m["aec"]["method"] == "cpu_time_x_watts_per_core"
    assert "12 W per core" in m["energy"]["note"]  # the default of measure.watts_per_core
    # CPU time cannot exceed wall time x cores: AEC is at most 12 W x the cores there are.
    assert m["aec"]["value"] <= 12.0 * os.cpu_count() * 1.05
    mfu = (m["flops_per_token"]["value"] * m["tokens_per_s"]["value"] / peak.flops)
    assert m["mfu"]["value"] == pytest.approx(mfu)
    assert m["pcu"]["value"] == m["mfu"]["value"] and "PCU = MFU" in m["pcu"]["note"]
    assert "matmul benchmark" in m["mfu"]["note"]


def test_watts_per_core_is_omitted_at_its_default_and_kept_when_null():
    from effllm.specs import MeasureSpec

    base = {"sample_interval_s": 0.02, "warmup_steps": 1, "peak_flops": None, "threads": 1}
    default = MeasureSpec.from_json(base)
    assert default.watts_per_core == 12.0 and "watts_per_core" not in default.to_json()
    off = MeasureSpec.from_json({**base, "watts_per_core": None})
    assert off.watts_per_core is None and off.to_json()["watts_per_core"] is None


def _tiny_decoder():
    from effllm.models import DecoderConfig, DecoderForCausalLM

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           eos_token_id=1, pad_token_id=0, bos_token_id=2,
                           max_position_embeddings=64)
    return DecoderForCausalLM(config).eval()


def test_served_model_reports_mfu_pcu_and_energy_per_token_estimated(cpu_machine):
    from effllm.inference.run import generation_flops, time_generation, timing_metrics

    model = _tiny_decoder()
    prompt = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    new = 6
    window = Window(0.01, watts_per_core=10.0)
    times = time_generation(model, prompt, new, 0, warmup=1, min_runs=3, min_seconds=0.0,
                            window=window)
    flops = generation_flops(model, prompt, new, 0)
    # Every token passes every layer's linear maps once (prefill: 8 per row, then one per new
    # token but the last); the head scores one position per row and step. Attention adds more:
    # the count lies between the linear FLOPs and twice them.
    head = model.get_output_embeddings().weight.numel()
    body = sum(mod.weight.numel() for mod in model.modules()
               if isinstance(mod, torch.nn.Linear)) - head
    linear = 2 * (body * 2 * (8 + new - 1) + head * 2 * new)
    assert linear < flops <= 2 * linear
    peak = cpu_machine(torch.get_num_threads())
    ev = types.SimpleNamespace(batch_size=2, new_tokens=new, prompt_tokens=8, warmup_runs=1)
    m = timing_metrics(ev, times, window, flops, peak)
    runs, total = len(times["e2e"]), sum(times["e2e"])
    assert m["mfu"].status == m["pcu"].status == "estimated"
    assert m["mfu"].value == pytest.approx(flops * runs / total / peak.flops)
    assert m["pcu"].value == m["mfu"].value
    energy = m["energy"]
    assert energy.status == m["energy_per_token"].status == "estimated"
    assert m["energy_per_token"].value == pytest.approx(energy.value / (2 * new * runs))
    assert m["energy_per_token"].method == "cpu_time_x_watts_per_core"


def test_quantised_generation_counts_the_flops_of_the_dense_model(tmp_path):
    """bitsandbytes' LLM.int8 and 4-bit matmuls are custom ops the counter would count as 0;
    the served int8/int4 model does the same matmuls as bf16, so MFU compares."""
    pytest.importorskip("bitsandbytes")
    from effllm.inference.run import generation_flops, load_model
    from effllm.specs import QuantSpec

    _tiny_decoder().save_pretrained(tmp_path / "model")
    prompt = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    counts = {}
    for precision, quant in (("bf16", QuantSpec()), ("int8", QuantSpec(threshold=6.0)),
                             ("int4", QuantSpec(quant_type="nf4", compute_dtype="bf16"))):
        model, _ = load_model(tmp_path / "model", precision, quant)
        counts[precision] = generation_flops(model.eval(), prompt, 4, 0)
    assert counts["bf16"] > 0 and counts["int8"] == counts["int4"] == counts["bf16"], counts


def test_energy_per_token_is_unavailable_with_the_reason_without_an_estimate(cpu_machine):
    from effllm.inference.run import time_generation, timing_metrics

    model = _tiny_decoder()
    prompt = torch.randint(3, 97, (1, 4), generator=torch.Generator().manual_seed(1))
    window = Window(0.01)  # watts_per_core None
    times = time_generation(model, prompt, 3, 0, warmup=0, min_runs=2, min_seconds=0.0,
                            window=window)
    ev = types.SimpleNamespace(batch_size=1, new_tokens=3, prompt_tokens=4, warmup_runs=0)
    m = timing_metrics(ev, times, window)
    assert m["energy_per_token"].status == "unavailable"
    assert m["energy_per_token"].note == m["energy"].note
    assert "mfu" not in m  # no FLOP count given: nothing to divide


# --- analysis --------------------------------------------------------------------------------

@pytest.fixture
def cpu_runs_csv(tmp_path):
    """Three fine-tuning runs of one group on a CPU: measured AMU and AL, estimated AEC and
    PCU (the third run's AEC is unavailable: a machine with watts_per_core null)."""
    from test_analysis import _record

    from effllm.analysis.aggregate import write_runs_table
    from effllm.records import Metric

    def est(value, unit):
        return Metric.estimated(value, unit, "cpu_time_x_watts_per_core", "estimate")

    runs = {"lora": (1.0, 0.5, 20.0, 0.02), "dora": (1.2, 0.7, 25.0, 0.01),
            "full": (2.0, 0.6, None, 0.03)}
    paths = []
    for method, (amu, al, aec, pcu) in runs.items():
        metrics = {"amu": Metric.measured(amu, "GB", "tensor_account"),
                   "al": Metric.measured(al, "s", "perf_counter"),
                   "pcu": est(pcu, "fraction"),
                   "aec": est(aec, "W") if aec is not None
                   else Metric.unavailable("W", "none", "no counter, no estimate")}
        rec = _record(f"finetune/{method}", "finetune", method, method, "base-a", metrics)
        path = tmp_path / "records" / f"{method}.json"
        rec.save(path)
        paths.append(path)
    write_runs_table(paths, tmp_path / "runs.csv")
    return tmp_path / "runs.csv"


WEIGHTS = {"finetune": {"amu": 1.0, "al": 1.0, "aec": 1.0, "pcu": 1.0}}


def test_estimates_are_used_and_marked_by_default(cpu_runs_csv, tmp_path):
    from effllm.analysis.normalise import normalise_table

    df = normalise_table(cpu_runs_csv, {"efficiency_score": WEIGHTS},
                         tmp_path / "norm.csv").set_index("run_id")
    lora = df.loc["finetune/lora"]
    assert lora["aec__norm"] == pytest.approx(1.0) and lora["aec__status"] == "estimated"
    assert lora["efficiency_score__metrics"] == "amu;al;aec;pcu"
    assert lora["efficiency_score__status"] == "estimated"  # the weakest input's status
    full = df.loc["finetune/full"]
    assert np.isnan(full["aec__norm"]) and full["efficiency_score__metrics"] == "amu;al;pcu"
    assert (df["estimates"] == "used").all()


def test_use_estimates_false_treats_estimates_as_unavailable(cpu_runs_csv, tmp_path):
    from effllm.analysis.aggregate import read_table
    from effllm.analysis.normalise import normalise_table

    normalise_table(cpu_runs_csv, {"efficiency_score": WEIGHTS, "use_estimates": False},
                    tmp_path / "norm.csv")
    df = read_table(tmp_path / "norm.csv").set_index("run_id")
    for metric in ("aec", "pcu"):
        assert df[metric].isna().all() and df[f"{metric}__norm"].isna().all()
        assert (df[f"{metric}__status"] == "unavailable").all()
        assert df[f"{metric}__rank"].isna().all()
    assert df.loc["finetune/lora", "aec__note"].startswith("estimate excluded")
    assert df.loc["finetune/full", "aec__note"] == "no counter, no estimate"  # untouched
    # The score is the harmonic mean of the measured AMU and AL alone, and measured.
    lora = df.loc["finetune/lora"]
    assert lora["efficiency_score__metrics"] == "amu;al"
    assert lora["efficiency_score__status"] == "measured"
    assert lora["efficiency_score"] == pytest.approx(2 / (1 / lora["amu__norm"]
                                                          + 1 / lora["al__norm"]))
    assert (df["estimates"] == "excluded").all()


def test_radar_marks_estimated_vertices(cpu_runs_csv, tmp_path, monkeypatch):
    from effllm.analysis.normalise import normalise_table
    from effllm.analysis.tables import ESTIMATED
    from effllm.plots import radar as radar_module
    from effllm.plots import style

    normalise_table(cpu_runs_csv, {"efficiency_score": WEIGHTS}, tmp_path / "norm.csv")
    figures = []
    monkeypatch.setattr(style, "save_figure", lambda fig, *a, **k: figures.append(fig))
    metrics = ["amu", "al", "aec", "pcu"]
    radar_module.draw_radar_figure(tmp_path / "norm.csv", tmp_path / "r.pdf", tmp_path / "r.png",
                                   "finetune", metrics)
    (fig,) = figures
    ax = fig.axes[0]
    hollow = {line.get_gid(): line for line in ax.get_lines()
              if (line.get_gid() or "").startswith("estimated:")}
    assert set(hollow) == {"estimated:lora", "estimated:dora", "estimated:full"}
    theta = dict(zip(metrics, ax.get_xticks()))
    # full has no AEC: only its PCU vertex is estimated (and drawn)
    assert list(hollow["estimated:full"].get_xdata()) == [theta["pcu"]]
    assert len(hollow["estimated:lora"].get_xdata()) == 2
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[2].startswith("AEC") and ESTIMATED in labels[2] and ESTIMATED not in labels[0]
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert radar_module.ESTIMATED_LABEL in texts
    assert not any(t.startswith("_") for t in texts)
    style.plt.close(fig)

    # Estimates excluded: no hollow markers, the axes say n/a, the caption says why.
    normalise_table(cpu_runs_csv, {"efficiency_score": WEIGHTS, "use_estimates": False},
                    tmp_path / "norm.csv")
    radar_module.draw_radar_figure(tmp_path / "norm.csv", tmp_path / "r.pdf", tmp_path / "r.png",
                                   "finetune", metrics)
    fig = figures[-1]
    ax = fig.axes[0]
    assert not any((line.get_gid() or "").startswith("estimated:") for line in ax.get_lines())
    assert all("(n/a)" in t.get_text() for t in ax.get_xticklabels()[2:])
    assert "use_estimates: false" in fig.legends[0].get_title().get_text()
    style.plt.close(fig)
