"""Fine-tuning figures 4a (mirrored bars) and 4b (area + line across model sizes): real files,
seed means drawn, loss pointing down, missing values marked "n/a" and never drawn as 0, bases in
parameter order, one-size and multi-size cases, a clear error without fine-tuning rows."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from effllm.analysis.aggregate import read_table
from invariants import assert_real_figure
from effllm.plots import style
from effllm.plots.finetune import (
    DEFAULT_LOSS, area_lines, draw_finetune, finetune_summary, mirrored_bars, score_definition,
)

NAN = float("nan")
METHODS = ["lora", "lora_plus", "dora", "full"]
LABELS = {"lora": "LoRA", "lora_plus": "LoRA+", "dora": "DoRA", "full": "Full"}
# (base, size, base parameters): listed out of parameter order on purpose.
BASES = (("gqa-small", "small", 2.0e6), ("gqa-medium", "medium", 8.0e6),
         ("gqa-tiny", "tiny", 1.3e5))
BY_PARAMS = ["gqa-tiny", "gqa-small", "gqa-medium"]
WEIGHTS = "weighted_harmonic_mean(amu:1,pcu:1,al:1,st:1,aec:1)"


def _es(base, method, seed):
    """Distinct per base, method and seed, so that a wrong average or order shows."""
    return 0.2 + 0.1 * METHODS.index(method) + 0.05 * _base(base) + 0.04 * seed


def _loss(base, method, seed):
    return 3.0 - 0.3 * METHODS.index(method) + 0.5 * _base(base) + 0.2 * seed


def _base(base):
    return [b for b, *_ in BASES].index(base)


def _row(base, size, params, method, seed, es, val_loss):
    row = {"run_id": f"finetune/{method}-{base}-s{seed}", "stage": "finetune", "block": "finetune",
           "technique": method, "label": LABELS[method], "group": base, "model_size": size,
           "seed": seed, "norm_floor": 0.1,
           # adapters add parameters: the base is the smallest count of its runs
           "params_total": params * (1.1 if method in ("lora", "lora_plus", "dora") else 1.0),
           "params_total__status": "measured", "params_total__unit": "params"}
    for m, value, unit in (("efficiency_score", es, "1"), ("val_loss", val_loss, "nats/token"),
                           ("loss", 1.0 + 0.1 * seed, "nats/token"), ("aec", NAN, "W")):
        row.update({m: value, f"{m}__unit": unit,
                    f"{m}__status": "unavailable" if np.isnan(value) else "measured"})
    row["efficiency_score__method"] = WEIGHTS
    row["efficiency_score__metrics"] = "amu;al;st" if np.isfinite(es) else ""
    return row


def _rows():
    """Two seeds. gqa-small DoRA has no val loss (any seed); gqa-medium LoRA+ lacks its score
    in seed 0 only (mean of one seed); gqa-medium has no Full run at all; gqa-tiny LoRA's val
    loss is estimated. AEC is unavailable everywhere."""
    rows = []
    for seed in (0, 1):
        for base, size, params in BASES:
            for method in METHODS:
                if base == "gqa-medium" and method == "full":
                    continue
                es, val_loss = _es(base, method, seed), _loss(base, method, seed)
                if base == "gqa-small" and method == "dora":
                    val_loss = NAN
                if base == "gqa-medium" and method == "lora_plus" and seed == 0:
                    es = NAN
                row = _row(base, size, params, method, seed, es, val_loss)
                if base == "gqa-tiny" and method == "lora":
                    row["val_loss__status"] = "estimated"
                rows.append(row)
    rows.append({"run_id": "pretrain/gqa-small-s0", "stage": "pretrain", "block": "attention",
                 "technique": "gqa", "label": "GQA", "group": "attention-small",
                 "model_size": "small", "seed": 0, "efficiency_score": 0.5,
                 "efficiency_score__status": "measured", "val_loss": 9.0})
    return rows


def _write(tmp_path, rows, name="normalised.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def normalised_csv(tmp_path):
    return _write(tmp_path, _rows())


@pytest.fixture
def one_size_csv(tmp_path):
    return _write(tmp_path, [r for r in _rows() if r["group"] == "gqa-tiny"], "one.csv")


def _finetune(path):
    df = read_table(path)
    return df[df["block"] == "finetune"]


def _means(path, metric):
    return _finetune(path).groupby(["group", "label"])[metric].mean()


def _axes():
    fig, (top, bottom) = style.plt.subplots(2, 1, sharex=True, figsize=(style.TWO_COLUMN, 4))
    return fig, top, bottom


# ------------------------------------------------------------------------------ files


@pytest.mark.parametrize("kind", ["mirrored", "area"])
@pytest.mark.parametrize("case", ["normalised_csv", "one_size_csv"])
def test_draw_finetune_writes_real_files(kind, case, request, tmp_path):
    path = request.getfixturevalue(case)
    pdf, png = tmp_path / "fig" / f"{kind}.pdf", tmp_path / "fig" / f"{kind}.png"
    summary = draw_finetune(path, pdf, png, kind, methods=METHODS)
    assert_real_figure(pdf, png, min_width=600)
    assert summary["group"].nunique() == (3 if case == "normalised_csv" else 1)


@pytest.mark.parametrize("kind", ["mirrored", "area"])
def test_no_finetune_rows_is_an_error_naming_the_block(tmp_path, kind):
    path = _write(tmp_path, [r for r in _rows() if r["stage"] != "finetune"])
    with pytest.raises(ValueError, match="finetune"):
        draw_finetune(path, tmp_path / "out" / "a.pdf", tmp_path / "out" / "a.png", kind)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_bad_kind_and_metric_are_errors(normalised_csv, tmp_path):
    with pytest.raises(ValueError, match="radar"):
        draw_finetune(normalised_csv, tmp_path / "a.pdf", tmp_path / "a.png", "radar")
    with pytest.raises(KeyError, match="val_los"):
        draw_finetune(normalised_csv, tmp_path / "a.pdf", tmp_path / "a.png", "area",
                      loss="val_los")
    assert not list(tmp_path.glob("a.*"))




# ------------------------------------------------------------------------------- data


def test_summary_averages_seeds_and_keeps_the_whole_grid(normalised_csv):
    df = read_table(normalised_csv)
    summary = finetune_summary(df, methods=METHODS)
    assert DEFAULT_LOSS == "val_loss" and summary.attrs == {"score": "efficiency_score",
                                                            "loss": "val_loss"}
    assert len(summary) == len(BASES) * len(METHODS)  # the missing Full run is a row too
    assert summary.drop_duplicates("x")["group"].tolist() == BY_PARAMS
    assert summary["technique"].tolist()[:4] == METHODS
    es, loss = _means(normalised_csv, "efficiency_score"), _means(normalised_csv, "val_loss")
    for _, row in summary.iterrows():
        key = (row["group"], row["label"])
        if key == ("gqa-medium", "Full"):
            assert row["seeds"] == 0 and row["efficiency_score__status"] == "unavailable"
            assert np.isnan(row["efficiency_score"]) and np.isnan(row["val_loss"])
            continue
        assert row["seeds"] == 2
        assert row["efficiency_score"] == pytest.approx(es[key])
        if np.isfinite(loss[key]):
            assert row["val_loss"] == pytest.approx(loss[key])
            assert row["val_loss__std"] == pytest.approx(np.std([0.0, 0.2], ddof=1))
    small_dora = summary[(summary["group"] == "gqa-small") & (summary["label"] == "DoRA")].iloc[0]
    assert np.isnan(small_dora["val_loss"]) and small_dora["val_loss__n"] == 0
    assert small_dora["val_loss__status"] == "unavailable"
    partial = summary[(summary["group"] == "gqa-medium") & (summary["label"] == "LoRA+")].iloc[0]
    assert partial["efficiency_score__n"] == 1 and np.isnan(partial["efficiency_score__std"])
    assert partial["efficiency_score"] == pytest.approx(_es("gqa-medium", "lora_plus", 1))
    # the smallest count of a base's runs: Full is the base; gqa-medium has only adapter runs
    assert summary["base_params"].tolist()[::4] == pytest.approx([1.3e5, 2.0e6, 8.8e6])


def test_summary_orders_bases_without_params_by_size_order(normalised_csv):
    df = read_table(normalised_csv).drop(columns=["params_total"])
    summary = finetune_summary(df, "loss", methods=METHODS)
    assert summary.drop_duplicates("x")["group"].tolist() == [b for b, *_ in BASES]  # appearance
    summary = finetune_summary(df, "loss", size_order=["medium", "tiny", "small"])
    assert summary.drop_duplicates("x")["group"].tolist() == ["gqa-medium", "gqa-tiny", "gqa-small"]
    assert summary["loss"].tolist()[0] == pytest.approx(1.05)  # the loss parameter is honoured


def test_score_definition_names_weights_and_unused_metrics(normalised_csv):
    text = score_definition(_finetune(normalised_csv))
    assert "AMU, PCU, AL, ST, AEC" in text and "1:1:1:1:1" in text
    assert "PCU, AEC n/a for every run" in text


# ------------------------------------------------------------------------------ 4a


def test_mirrored_bars_are_seed_means_loss_down_and_missing_marked(normalised_csv):
    summary = finetune_summary(read_table(normalised_csv), methods=METHODS)
    fig, top, bottom = _axes()
    flags = mirrored_bars(top, bottom, summary)
    es, loss = _means(normalised_csv, "efficiency_score"), _means(normalised_csv, "val_loss")
    score_bars = {p.get_gid(): p for p in top.patches}
    loss_bars = {p.get_gid(): p for p in bottom.patches}
    assert len(score_bars) == len(top.patches) == 11  # 12 cells, the missing Full run has none
    assert len(loss_bars) == len(bottom.patches) == 10  # and gqa-small DoRA has no val loss
    for gid, bar in score_bars.items():
        _, group, label = gid.split(":")
        assert bar.get_height() > 0 and bar.get_height() == pytest.approx(es[(group, label)])
        assert bar.get_y() == 0
    for gid, bar in loss_bars.items():
        _, group, label = gid.split(":")
        assert bar.get_height() < 0, f"{gid} does not point down"
        assert bar.get_height() == pytest.approx(-loss[(group, label)])
    assert bool(loss_bars["loss:gqa-tiny:LoRA"].get_hatch()) and flags["estimated"]
    assert not loss_bars["loss:gqa-tiny:LoRA+"].get_hatch()
    marks = {t.get_gid() for t in top.texts + bottom.texts if t.get_text() == "n/a"}
    assert marks == {"n/a:gqa-medium:Full:efficiency_score", "n/a:gqa-medium:Full:val_loss",
                     "n/a:gqa-small:DoRA:val_loss"}
    assert flags["spread"] and top.containers and bottom.containers  # s.d. error bars
    # clusters in parameter order: the leftmost bars belong to the smallest base
    first = min(score_bars.values(), key=lambda p: p.get_x())
    assert first.get_gid() == "score:gqa-tiny:LoRA"
    assert top.get_ylim()[0] == 0 and bottom.get_ylim()[1] == 0
    assert [t.get_text() for t in bottom.get_xticklabels()][:4] == ["LoRA", "LoRA+", "DoRA", "Full"]
    style.plt.close(fig)


# ------------------------------------------------------------------------------ 4b


def _lines(ax):
    return {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}


def test_area_follows_parameter_order_with_gaps_not_zeros(normalised_csv):
    summary = finetune_summary(read_table(normalised_csv), methods=METHODS)
    fig, top, bottom = _axes()
    area_lines(top, bottom, summary)
    ticks = [t.get_text().split("\n")[0] for t in bottom.get_xticklabels()]
    assert ticks == BY_PARAMS
    es, loss = _means(normalised_csv, "efficiency_score"), _means(normalised_csv, "val_loss")
    score_lines, loss_lines = _lines(top), _lines(bottom)
    assert set(score_lines) == {f"score:{LABELS[m]}" for m in METHODS}
    for method in METHODS:
        label = LABELS[method]
        expected_es = [es.get((g, label), NAN) for g in BY_PARAMS]
        expected_loss = [loss.get((g, label), NAN) for g in BY_PARAMS]
        np.testing.assert_allclose(score_lines[f"score:{label}"].get_ydata(), expected_es)
        np.testing.assert_allclose(loss_lines[f"loss:{label}"].get_ydata(), expected_loss)
        np.testing.assert_allclose(score_lines[f"score:{label}"].get_xdata(), [0, 1, 2])
        assert score_lines[f"score:{label}"].get_linestyle() == "-"
    assert np.isnan(score_lines["score:Full"].get_ydata()[2])  # no run: a gap, not 0
    assert np.isnan(loss_lines["loss:DoRA"].get_ydata()[1])
    areas = {c.get_gid() for c in top.collections if isinstance(c, PolyCollection)}
    assert areas == {f"area:{LABELS[m]}" for m in METHODS}
    marks = {t.get_gid() for t in top.texts + bottom.texts if "n/a" in t.get_text()}
    assert marks == {"n/a:gqa-medium:Full:efficiency_score", "n/a:gqa-medium:Full:val_loss",
                     "n/a:gqa-small:DoRA:val_loss"}
    hollow = _lines(bottom)["estimated:loss:LoRA"]  # gqa-tiny LoRA's val loss is estimated
    assert hollow.get_xdata().tolist() == [0] and hollow.get_markerfacecolor() == "white"
    assert not [g for g in _lines(top) if g.startswith("estimated")]
    style.plt.close(fig)


def test_area_with_one_size_draws_points(one_size_csv):
    summary = finetune_summary(read_table(one_size_csv), methods=METHODS)
    fig, top, bottom = _axes()
    area_lines(top, bottom, summary)
    es = _means(one_size_csv, "efficiency_score")
    lines = _lines(top)
    assert len(lines) == len(METHODS)
    xs = []
    for method in METHODS:
        line = lines[f"score:{LABELS[method]}"]
        assert line.get_linestyle() == "None" and line.get_marker() == "o"
        assert line.get_ydata()[0] == pytest.approx(es[("gqa-tiny", LABELS[method])])
        xs.append(line.get_xdata()[0])
    assert len(set(xs)) == len(METHODS) and all(-0.5 < x < 0.5 for x in xs)  # side by side
    assert not [c for c in top.collections if isinstance(c, PolyCollection)]  # no area
    assert [t.get_text().split("\n")[0] for t in bottom.get_xticklabels()] == ["gqa-tiny"]
    style.plt.close(fig)
