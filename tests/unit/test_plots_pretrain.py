"""Pretraining figures 3b (bars + raw line) and 3c (bubbles): real files, and missing values are
marked "n/a", never drawn as 0-height bars or 0-size bubbles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer

from effllm.analysis.aggregate import read_table
from invariants import assert_real_figure
from effllm.plots import style
from effllm.analysis.seeds import seed_summary
from effllm.plots.bars import bars_with_line, draw_bars_with_line
from effllm.plots.bubble import bubble_grid, draw_bubbles

NAN = float("nan")
BAR_METRICS = ["perplexity", "amu", "al", "aec"]
BUBBLE_METRICS = ["aec", "tt", "al", "amu", "perplexity"]
POSITION = ("RoPE", "ALiBi", "None")  # "None" must stay a label, not become NaN
MOE = (("Dense", 1.5e9, 1.5e9), ("MoE Sx8", 12e9, 2.9e9))


def _row(block, group, label, seed, values, **extra):
    row = {"run_id": f"{group}-{label}-{seed}", "stage": "pretrain", "block": block,
           "technique": label.lower(), "label": label, "group": group, "model_size": "small",
           "seed": seed, "norm_floor": 0.1, **extra}
    for m, (raw, norm, status) in values.items():
        row.update({m: raw, f"{m}__norm": norm, f"{m}__status": status, f"{m}__unit": "1"})
    return row


def _metric(raw, norm, status="measured"):
    return (NAN, NAN, "unavailable") if raw is None else (raw, norm, status)


@pytest.fixture
def normalised_csv(tmp_path):
    """Two seeds per variant. AEC unavailable for everyone; ALiBi lacks AMU; MoE Sx8 lacks TT;
    RoPE's AL is estimated. Raw perplexity differs by seed, so the line must show the mean."""
    rows = []
    for seed in (0, 1):
        for k, label in enumerate(POSITION):
            rows.append(_row("position", "position-small", label, seed, {
                "perplexity": _metric(8.0 + k + 0.2 * seed, 1.0 - 0.4 * k - 0.05 * seed),
                "amu": _metric(None if label == "ALiBi" else 40.0 + k, 1.0 - 0.9 * k / 2),
                "al": _metric(0.12 + 0.01 * k, 0.1 + 0.45 * k + 0.02 * seed,
                              "estimated" if label == "RoPE" else "measured"),
                "aec": _metric(None, None),
            }))
        for k, (label, total, active) in enumerate(MOE):
            rows.append(_row("moe", "moe-small", label, seed, {
                "perplexity": _metric(9.0 - k + 0.1 * seed, 0.1 + 0.9 * k),
                "amu": _metric(40.0 + 10 * k, 1.0 - 0.9 * k),
                "al": _metric(0.1 + 0.05 * k, 1.0 - 0.9 * k + 0.0 * seed),
                "tt": _metric(None if k else 0.09, 1.0),
                "aec": _metric(None, None),
            }, params_total=total, params_active=active))
    rows.append(_row("attention", "attention-small", "GQA", 0, {"amu": _metric(40.0, 1.0)}))
    path = tmp_path / "normalised.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _group(path, block):
    df = read_table(path)
    return df[df["block"] == block]


def test_draw_bars_with_line_writes_real_files(normalised_csv, tmp_path):
    pdf, png = tmp_path / "fig" / "bars.pdf", tmp_path / "fig" / "bars.png"
    draw_bars_with_line(normalised_csv, pdf, png, "position", BAR_METRICS, title="PE")
    assert_real_figure(pdf, png, min_width=600)


def test_draw_bubbles_writes_real_files(normalised_csv, tmp_path):
    pdf, png = tmp_path / "fig" / "bubbles.pdf", tmp_path / "fig" / "bubbles.png"
    draw_bubbles(normalised_csv, pdf, png, "moe", BUBBLE_METRICS)
    assert_real_figure(pdf, png, min_width=600)


@pytest.mark.parametrize("draw, metrics", [(draw_bars_with_line, BAR_METRICS),
                                           (draw_bubbles, BUBBLE_METRICS)])
def test_unknown_block_is_named(normalised_csv, tmp_path, draw, metrics):
    with pytest.raises(ValueError, match="nonesuch"):
        draw(normalised_csv, tmp_path / "a.pdf", tmp_path / "a.png", "nonesuch", metrics)
    assert not list(tmp_path.glob("a.*"))


def test_bar_seed_summary_averages_seeds_without_zeros(normalised_csv):
    columns = [c for m in BAR_METRICS for c in (m, f"{m}__norm")]
    summary = seed_summary(_group(normalised_csv, "position"), columns, by=["label"])
    assert summary["label"].tolist() == list(POSITION)
    rope = summary.iloc[0]
    assert rope["perplexity"] == pytest.approx(8.1) and rope["perplexity__lo"] == 8.0
    assert rope["perplexity__norm__hi"] == 1.0 and rope["perplexity__norm__lo"] == 0.95
    assert rope["al__status"] == "estimated" and rope["amu__status"] == "measured"
    alibi = summary.iloc[1]
    assert np.isnan(alibi["amu__norm"]) and alibi["amu__status"] == "unavailable"
    assert alibi["amu__n"] == 0 and summary["aec__status"].eq("unavailable").all()


def test_bars_leave_out_unavailable_and_line_is_raw(normalised_csv):
    members = _group(normalised_csv, "position")
    fig, ax = style.plt.subplots(figsize=(style.TWO_COLUMN, 2))
    ax2 = bars_with_line(ax, members, BAR_METRICS, "perplexity")
    means = members.groupby("label", sort=False)[[f"{m}__norm" for m in BAR_METRICS]].mean()
    available = {f"bar:{label}:{m}" for label in POSITION for m in BAR_METRICS
                 if np.isfinite(means.loc[label, f"{m}__norm"])}
    bars = {p.get_gid(): p for p in ax.patches}
    assert set(bars) == available and len(ax.patches) == len(available) == 8
    for gid, bar in bars.items():
        _, label, m = gid.split(":")
        assert bar.get_height() > 0
        assert bar.get_height() == pytest.approx(means.loc[label, f"{m}__norm"])
    assert bool(bars["bar:RoPE:al"].get_hatch()) and not bars["bar:ALiBi:al"].get_hatch()
    marks = {t.get_gid() for t in ax.texts if t.get_text() == "n/a"}
    assert marks == {"n/a:ALiBi:amu"} | {f"n/a:{label}:aec" for label in POSITION}
    (line,) = [ln for ln in ax2.get_lines() if ln.get_gid() == "line:perplexity"]
    raw_means = members.groupby("label", sort=False)["perplexity"].mean().loc[list(POSITION)]
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), raw_means.to_numpy())
    assert raw_means.tolist() == pytest.approx([8.1, 9.1, 10.1])  # not the normalised values
    assert any(isinstance(c, ErrorbarContainer) for c in ax2.containers), "no seed spread"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(POSITION)
    note = ax.get_title(loc="right")
    assert "AEC for all" in note and "ALiBi: AMU" in note
    style.plt.close(fig)


def test_bubbles_never_zero_size_and_mark_missing(normalised_csv):
    members = _group(normalised_csv, "moe")
    fig, ax = style.plt.subplots(figsize=(style.ONE_COLUMN, 3))
    s_max = 400.0
    bubble_grid(ax, members, BUBBLE_METRICS, s_max)
    scatters = {c.get_gid(): c for c in ax.collections if isinstance(c, PathCollection)}
    means = members.groupby("label", sort=False)[[f"{m}__norm" for m in BUBBLE_METRICS]].mean()
    for label, *_ in MOE:
        bubbles = scatters[f"bubble:{label}"]
        expected = [means.loc[label, f"{m}__norm"] for m in BUBBLE_METRICS]
        expected = [v for v in expected if np.isfinite(v)]
        sizes = bubbles.get_sizes()
        assert len(bubbles.get_offsets()) == len(expected) and (sizes > 0).all()
        np.testing.assert_allclose(sizes, s_max * np.asarray(expected))
    assert len(scatters["bubble:MoE Sx8"].get_offsets()) == 3  # no AEC, no TT
    missing = scatters["n/a"]
    assert len(missing.get_offsets()) == 3 and (missing.get_sizes() > 0).all()
    assert (np.asarray(missing.get_facecolors()).reshape(-1, 4)[:, 3] == 0).all()  # empty marker
    marks = {t.get_gid() for t in ax.texts if t.get_text() == "n/a"}
    assert marks == {"n/a:Dense:aec", "n/a:MoE Sx8:aec", "n/a:MoE Sx8:tt"}
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows[0] == "AEC\u2191 (n/a)" and rows[1] == "TT\u2191"
    params = [t.get_text() for t in ax.get_xticklabels()]
    assert params == ["1.5B total\n1.5B active", "12B total\n2.9B active"]
    values = {t.get_gid(): t.get_text() for t in ax.texts if str(t.get_gid()).startswith("value:")}
    assert values["value:Dense:al"] == "1.00" and values["value:MoE Sx8:al"] == "0.10"
    style.plt.close(fig)
