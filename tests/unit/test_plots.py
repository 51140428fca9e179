"""Plots: style helpers and the radar figure (gaps for missing values, never a point at 0)."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from effllm.plots import style
from effllm.plots.radar import draw_radar_figure, radar

METRICS = ["perplexity", "amu", "al", "tt", "aec"]
NAN = float("nan")


@pytest.fixture
def normalised_csv(tmp_path):
    """Two groups x three series; MLA lacks PPL in group 1; AEC unavailable for everyone."""
    rows = []
    for group in ("attention-tiny", "attention-small"):
        for label, vals in (("MQA", [0.1, 1.0, 1.0, 1.0]), ("GQA", [0.55, 0.6, 0.8, 0.85]),
                            ("MLA", [1.0, 0.1, 0.1, 0.1])):
            rows.append({"stage": "pretrain", "group": group, "label": label, "norm_floor": 0.1,
                         **{f"{m}__norm": v for m, v in zip(METRICS, vals + [NAN])}})
    rows[2]["perplexity__norm"] = NAN
    rows.append({"stage": "inference", "group": "x", "label": "bf16", "amu__norm": 1.0})
    path = tmp_path / "normalised.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_draw_radar_figure_writes_real_files(normalised_csv, tmp_path):
    pdf, png = tmp_path / "fig" / "radar.pdf", tmp_path / "fig" / "radar.png"
    draw_radar_figure(normalised_csv, pdf, png, "pretrain", METRICS, title="Attention")
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5000
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 1000  # two-column width
    rgb = img[..., :3]
    assert rgb.std() > 0.05 and (rgb < 0.9).any()  # not blank, not all white
    assert sorted(p.name for p in pdf.parent.iterdir()) == ["radar.pdf", "radar.png"]  # no temps


def test_draw_radar_figure_names_empty_stage(normalised_csv, tmp_path):
    with pytest.raises(ValueError, match="finetune"):
        draw_radar_figure(normalised_csv, tmp_path / "a.pdf", tmp_path / "a.png", "finetune", METRICS)


def test_radar_leaves_gaps_not_zeros(normalised_csv):
    df = pd.read_csv(normalised_csv)
    df = df[(df["stage"] == "pretrain") & (df["group"] == "attention-tiny")]
    fig, ax = style.plt.subplots(subplot_kw={"projection": "polar"})
    ax = radar(ax, df, METRICS)
    lines = {line.get_gid(): line for line in ax.get_lines()}
    assert set(lines) == {"MQA", "GQA", "MLA"}
    for name, line in lines.items():
        r = np.asarray(line.get_ydata(), dtype=float)
        assert len(r) == len(METRICS) + 1  # closed polygon
        assert not (r[np.isfinite(r)] <= 0).any(), f"{name} has a point at radius 0"
        assert np.isnan(r[METRICS.index("aec")])  # unavailable for all: a gap, not 0
    mla = np.asarray(lines["MLA"].get_ydata(), dtype=float)
    assert np.isnan(mla[0]) and np.isnan(mla[-1])  # PPL missing: both ends of the closure break
    assert mla[1:4].tolist() == pytest.approx([0.1, 0.1, 0.1])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "PPL\u2191" and "(n/a)" in labels[-1] and "(n/a)" not in labels[0]
    assert any("MLA: PPL" in t.get_text() for t in ax.texts)  # per-series note
    assert ax.get_ylim() == (0.0, 1.0)
    style.plt.close(fig)


def test_style_helpers(tmp_path):
    assert style.metric_axis_label("amu") == "AMU\u2191"
    assert style.metric_axis_label("perplexity") == "PPL\u2191"
    assert style.technique_colour("GQA") == style.technique_colour("gqa")
    assert style.technique_colour("LoRA-plus") == style.technique_colour("LoRA+")
    assert style.technique_colour("brand-new") == style.technique_colour("brand-new")
    for sweep in (["MHA", "MQA", "GQA", "MLA", "NSA"], ["fp32", "bf16", "fp16", "int8", "int4"],
                  ["LoRA", "LoRA+", "RSLoRA", "DoRA", "PiSSA", "Freeze", "Full"]):
        assert len({style.technique_colour(x) for x in sweep}) == len(sweep), sweep
    fig, _ = style.plt.subplots(figsize=(style.ONE_COLUMN, 2))
    style.save_figure(fig, tmp_path / "f.pdf", tmp_path / "f.png")
    assert not style.plt.fignum_exists(fig.number)
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF" and math.isfinite(
        mpimg.imread(tmp_path / "f.png").mean())
