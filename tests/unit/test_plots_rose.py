"""Figure 5, the quantised-inference rose: real files, one panel per precision, a sector per
model, petal heights equal the table's normalised seed means, missing values hatched "n/a" and
never drawn as 0, a model without a run at a precision marked "no run"."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from effllm.analysis.aggregate import read_table
from effllm.analysis.normalise import normalise_table
from effllm.plots import style
from effllm.plots.rose import METRICS, draw_inference_rose, model_names, rose, rose_summary
from invariants import assert_real_figure

NAN = float("nan")
MODELS = {"hub/DeepSeek-R1-Distill-Qwen-1.5B": 1.5e9, "hub/Phi-3.5-mini": 3.8e9,
          "hub/Qwen2.5-7B": 7.6e9}
PRECISIONS = {"int4": 4, "fp16": 16, "bf16": 16, "int8": 8}  # not in paper order on purpose
ANALYSIS = {"normalise_floor": 0.1, "efficiency_score": {"inference": {"amu": 1, "al": 1, "it": 1}}}


def _metric(value, unit):
    status = "unavailable" if np.isnan(value) else "measured"
    return {"": value, "__unit": unit, "__status": status, "__method": "test"}


def _row(model, precision, seed, drop=()):
    """Raw inference metrics, distinct per model, precision and seed. AEC is unavailable (no
    RAPL), as on the CI machine."""
    params, bits = MODELS[model], PRECISIONS[precision]
    k = list(MODELS).index(model)
    narrow = {"bf16": 0.0, "fp16": 0.01, "int8": 0.03, "int4": 0.08}[precision]
    values = {
        "performance": (0.5 + 0.05 * k - narrow + 0.01 * seed, "fraction"),
        "exact_match": (0.4 + 0.05 * k - narrow, "fraction"),
        "token_accuracy": (0.6 + 0.05 * k - narrow, "fraction"),
        "amu": (params * bits / 8e9 + 0.3 + 0.01 * seed, "GB"),
        "al": (1.0 + 0.2 * k + {"bf16": 0.0, "fp16": -0.1, "int8": 0.8, "int4": 0.5}[precision]
               + 0.05 * seed, "s"),
        "it": (300.0 - 30 * k - {"bf16": 0, "fp16": -20, "int8": 120, "int4": 60}[precision]
               - 5 * seed, "tokens/s"),
        "aec": (NAN, "W"),
        "weight_bytes": (params * bits / 8 * 1.04, "B"),
        "bits_nominal": (float(bits), "bits"),
    }
    row = {"run_id": f"inference/{precision}-{model.split('/')[1]}-s{seed}", "stage": "inference",
           "block": "inference", "technique": precision, "label": precision, "group": model,
           "upstream": model, "model_size": model.split("/")[1], "seed": seed}
    for name, (value, unit) in values.items():
        for suffix, v in _metric(NAN if name in drop else value, unit).items():
            row[name + suffix] = v
    return row


def _rows(seeds=(0, 1)):
    return [_row(m, p, s) for s in seeds for m in MODELS for p in PRECISIONS]


def _normalised(tmp_path, rows, name="normalised.csv"):
    """Through the pipeline's own normalisation (MCR derived, ``__norm`` in [0.1, 1])."""
    runs = tmp_path / f"runs-{name}"
    pd.DataFrame(rows).to_csv(runs, index=False)
    normalise_table(runs, ANALYSIS, tmp_path / name)
    return tmp_path / name


@pytest.fixture
def normalised_csv(tmp_path):
    return _normalised(tmp_path, _rows())


@pytest.fixture
def gappy_csv(tmp_path):
    """One seed. Phi has no int8 run at all; Qwen's IT is unavailable at fp16 only."""
    rows = [r for r in _rows(seeds=(0,))
            if not (r["group"] == "hub/Phi-3.5-mini" and r["technique"] == "int8")]
    rows = [_row("hub/Qwen2.5-7B", "fp16", 0, drop=("it",))
            if (r["group"], r["technique"]) == ("hub/Qwen2.5-7B", "fp16") else r for r in rows]
    return _normalised(tmp_path, rows, "gappy.csv")


def _figure_axes(draw, path, tmp_path, monkeypatch):
    """Draw, keeping the figure: its polar axes by title."""
    kept = {}
    monkeypatch.setattr(style, "save_figure", lambda fig, pdf, png: kept.setdefault("fig", fig))
    summary = draw(path, tmp_path / "a.pdf", tmp_path / "a.png")
    axes = {ax.get_title(): ax for ax in kept["fig"].axes
            if ax.name == "polar" and ax.get_visible()}
    return summary, axes


def _bars(ax):
    return {p.get_gid(): p for p in ax.patches if p.get_gid()}


def _spreads(ax):
    """Error bars by gid: their one segment in data coordinates (theta, r)."""
    return {c.get_gid(): c.get_segments()[0] for c in ax.collections
            if str(c.get_gid()).startswith("sd:")}


# ------------------------------------------------------------------------------ files


@pytest.mark.parametrize("case", ["normalised_csv", "gappy_csv"])
def test_draw_inference_rose_writes_real_files(case, request, tmp_path):
    path = request.getfixturevalue(case)
    pdf, png = tmp_path / "fig" / "rose.pdf", tmp_path / "fig" / "rose.png"
    summary = draw_inference_rose(path, pdf, png)
    assert_real_figure(pdf, png, min_width=1000)  # two-column width
    assert set(summary["model"]) == set(MODELS)




def test_no_inference_rows_is_an_error_naming_the_block(tmp_path):
    path = tmp_path / "n.csv"
    pd.DataFrame([{"stage": "pretrain", "block": "attention", "group": "g", "label": "GQA",
                   "seed": 0, "amu__norm": 1.0}]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="inference"):
        draw_inference_rose(path, tmp_path / "out" / "a.pdf", tmp_path / "out" / "a.png")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ content


def test_one_panel_per_precision_widest_first(normalised_csv, tmp_path, monkeypatch):
    _, axes = _figure_axes(draw_inference_rose, normalised_csv, tmp_path, monkeypatch)
    assert list(axes) == ["bf16 (16-bit)", "fp16 (16-bit)", "int8 (8-bit)", "int4 (4-bit)"]
    for ax in axes.values():
        names = [t.get_text().replace("\n", "") for t in ax.texts
                 if str(t.get_gid()).startswith("model:")]
        assert names == ["DeepSeek-R1-Distill-Qwen-1.5B", "Phi-3.5-mini", "Qwen2.5-7B"]


def test_petal_heights_are_the_seed_means_of_the_norm_columns(normalised_csv, tmp_path,
                                                              monkeypatch):
    _, axes = _figure_axes(draw_inference_rose, normalised_csv, tmp_path, monkeypatch)
    df = read_table(normalised_csv)
    means = df.groupby(["label", "group"])[[f"{m}__norm" for m in METRICS]].mean()
    assert means["aec__norm"].isna().all() and means.drop(columns="aec__norm").notna().all().all()
    checked = 0
    for title, ax in axes.items():
        precision = title.split()[0]
        bars = _bars(ax)
        for model in MODELS:
            for m in METRICS:
                expected = means.at[(precision, model), f"{m}__norm"]
                if np.isnan(expected):
                    assert f"{m}:{model}" not in bars
                    continue
                assert bars[f"{m}:{model}"].get_height() == pytest.approx(expected)
                assert bars[f"{m}:{model}"].get_y() == 0.0  # petals start at the centre
                checked += 1
    assert checked == 4 * 3 * 5
    # two seeds: the spread is a radial error bar of +-1 s.d. around the mean
    stds = df.groupby(["label", "group"])["it__norm"].std(ddof=1)
    for title, ax in axes.items():
        spreads = _spreads(ax)
        for model in MODELS:
            std = stds[(title.split()[0], model)]
            if std > 0:
                (theta0, lo), (theta1, hi) = spreads[f"sd:it:{model}"]
                assert theta0 == theta1 and hi - lo == pytest.approx(2 * std)


def test_missing_values_are_hatched_not_zero(gappy_csv, tmp_path, monkeypatch):
    summary, axes = _figure_axes(draw_inference_rose, gappy_csv, tmp_path, monkeypatch)
    for title, ax in axes.items():
        bars = _bars(ax)
        heights = [p.get_height() for gid, p in bars.items() if not gid.startswith(("n/a", "no"))]
        assert min(heights) >= 0.1  # the floor: nothing is drawn at 0
        for model in MODELS:  # AEC unavailable everywhere: a hatched slot, no petal
            if f"no run:{model}" in bars:
                continue
            na = bars[f"n/a:{model}:aec"]
            assert na.get_hatch() and not na.get_fill() and f"aec:{model}" not in bars
    fp16, int8 = _bars(axes["fp16 (16-bit)"]), _bars(axes["int8 (8-bit)"])
    assert "it:hub/Qwen2.5-7B" not in fp16 and "n/a:hub/Qwen2.5-7B:it" in fp16
    assert "it:hub/Phi-3.5-mini" in fp16
    assert "no run:hub/Phi-3.5-mini" in int8 and not any(
        g.startswith(("it:hub/Phi", "n/a:hub/Phi")) for g in int8)
    assert any(t.get_text() == "no run" for t in axes["int8 (8-bit)"].texts)
    assert not any(_spreads(ax) for ax in axes.values())  # one seed: no error bars
    cell = summary[(summary["model"] == "hub/Phi-3.5-mini") & (summary["precision"] == "int8")]
    assert cell["seeds"].item() == 0 and cell[list(METRICS)].isna().all(axis=None)


def test_summary_is_the_tables_seed_mean_with_statuses(normalised_csv):
    df = read_table(normalised_csv)
    summary = rose_summary(df)
    assert list(dict.fromkeys(summary["precision"])) == ["bf16", "fp16", "int8", "int4"]
    row = summary[(summary["model"] == "hub/Qwen2.5-7B") & (summary["precision"] == "int4")].iloc[0]
    values = df[(df["group"] == "hub/Qwen2.5-7B") & (df["label"] == "int4")]["it__norm"]
    assert row["it"] == pytest.approx(values.mean())
    assert row["it__std"] == pytest.approx(values.std(ddof=1)) and row["it__n"] == 2
    assert row["it__status"] == "measured" and row["aec__status"] == "unavailable"
    assert row["bits"] == 4 and row["seeds"] == 2
    with pytest.raises(KeyError, match="made_up"):
        rose_summary(df, ["performance", "made_up"])


def test_rose_on_one_axes_and_model_names():
    cells = pd.DataFrame([{"model": f"finetune/m{i}-s0", "precision": "bf16", "seeds": 1,
                           **{m: v for m in METRICS for v in [0.1 + 0.3 * i]},
                           **{f"{m}__std": NAN for m in METRICS},
                           **{f"{m}__status": "measured" for m in METRICS}} for i in range(3)])
    cells.loc[1, "al"] = NAN
    cells.loc[2, "it__status"] = "estimated"
    fig, ax = style.plt.subplots(subplot_kw={"projection": "polar"})
    flags = rose(ax, cells, METRICS)
    bars = _bars(ax)
    assert flags == {"estimated": True, "spread": False, "n/a": True}
    assert bars["al:finetune/m0-s0"].get_height() == pytest.approx(0.1)
    assert "al:finetune/m1-s0" not in bars and bars["n/a:finetune/m1-s0:al"].get_height() == 1.0
    assert bars["it:finetune/m2-s0"].get_hatch()
    assert ax.get_ylim() == (0.0, 1.0)
    style.plt.close(fig)
    assert model_names(["hub/a", "finetune/a"]) == ["hub/a", "finetune/a"]  # kept distinct
    assert model_names(["hub/Qwen2.5-7B"]) == ["Qwen2.5-7B"]
