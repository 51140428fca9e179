"""The ranking chart (paper Fig. 2): ranks of the seed means, unavailable metrics hatched n/a
(never a rank, never 0), a real and non-blank figure."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

from effllm.plots import style
from effllm.plots.ranking import draw_ranking, rank_panel, rank_table
from invariants import assert_real_figure

NAN = float("nan")
METRICS = {"pretrain": ["perplexity", "amu", "al", "aec"],
           "inference": ["performance", "amu", "aec"]}


def _row(stage, block, group, label, seed, **values):
    row = {"stage": stage, "block": block, "group": group, "technique": label.lower(),
           "label": label, "model_size": "tiny", "seed": seed}
    for m, v in values.items():
        row[m] = v
        row[f"{m}__status"] = "unavailable" if np.isnan(v) else "measured"
    return row


@pytest.fixture
def normalised_csv(tmp_path):
    """Attention at two sizes (two seeds; MQA and GQA perplexities overlap across seeds), a
    one-group position block, an inference block; AEC unavailable everywhere."""
    rows = []
    for group, shift in (("attention-tiny", 0.0), ("attention-small", -5.0)):
        for seed in (0, 1):
            for label, ppl, amu, al in (("MQA", 30.0 + 2 * seed, 1.0, 0.10),
                                        ("GQA", 31.0, 1.2, 0.09),
                                        ("MLA", 28.0 - seed, 1.5, 0.20)):
                rows.append(_row("pretrain", "attention", group, label, seed, perplexity=ppl + shift,
                                 amu=amu, al=al, aec=NAN))
    for label, ppl in (("RoPE", 20.0), ("None", 25.0), ("ALiBi", 21.0)):
        rows.append(_row("pretrain", "position", "position-tiny", label, 0, perplexity=ppl,
                         amu=1.0, al=0.1, aec=NAN))
    for label, perf, amu in (("bf16", 0.5, 2.0), ("int4", 0.45, 1.0)):
        rows.append(_row("inference", "inference", "finetune/lora-gqa-tiny-s0", label, 0,
                         performance=perf, amu=amu, aec=NAN))
    path = tmp_path / "normalised.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_rank_table_ranks_seed_means(normalised_csv):
    from effllm.analysis.aggregate import read_table

    table = rank_table(read_table(normalised_csv), METRICS)
    assert list(dict.fromkeys(table["block"])) == ["attention", "position", "inference"]
    tiny = table[table["group"] == "attention-tiny"].set_index("label")
    # means: MQA 31, GQA 31 (tied: both rank 1), MLA 27.5 -> MLA 1, MQA 2, GQA 2
    assert tiny["perplexity"].to_dict() == {"MQA": 31.0, "GQA": 31.0, "MLA": 27.5}
    assert tiny["perplexity__rank"].tolist() == [2, 2, 1]
    assert tiny["amu__rank"].tolist() == [1, 2, 3] and tiny["al__rank"].tolist() == [2, 1, 3]
    assert tiny["aec__rank"].isna().all() and (tiny["aec__status"] == "unavailable").all()
    # MQA 30-32 overlaps GQA 31-31; MLA 27-28 overlaps nothing
    assert tiny["perplexity__unsettled"].tolist() == [True, True, False]
    assert not tiny["amu__unsettled"].any()  # equal seeds: ranges of width 0 that do not touch
    ordered = rank_table(read_table(normalised_csv), METRICS, order=["gqa", "mla", "none"])
    assert ordered.loc[ordered["group"] == "attention-tiny", "label"].tolist() == [
        "GQA", "MLA", "MQA"]  # the given order first, the others after in table order
    assert ordered.loc[ordered["block"] == "position", "label"].tolist() == [
        "None", "RoPE", "ALiBi"]
    inference = table[table["block"] == "inference"].set_index("label")
    assert inference["performance__rank"].tolist() == [1, 2]  # higher is better
    assert inference["amu__rank"].tolist() == [2, 1]


def test_panel_hatches_unavailable_and_prints_ranks(normalised_csv):
    from effllm.analysis.aggregate import read_table

    table = rank_table(read_table(normalised_csv), METRICS)
    rows = table[table["block"] == "attention"]
    fig, ax = style.plt.subplots()
    used = rank_panel(ax, rows, METRICS["pretrain"], "Attention")
    cells = {p.get_gid(): p for p in ax.patches if isinstance(p, Rectangle)}
    na = {g for g in cells if g.startswith("n/a:")}
    ranked = {g for g in cells if g.startswith("rank:")}
    assert len(na) == 6 and all(g.endswith(":aec") for g in na)  # AEC: no rank, hatched
    assert all(cells[g].get_hatch() for g in na)
    assert len(ranked) == 18 and not any(g.endswith(":aec") for g in ranked)
    texts = [t.get_text() for t in ax.texts]
    assert "1" in texts and "2~" in texts and "0" not in texts and texts.count("n/a") == 6
    assert used == {"estimated": False, "unsettled": True, "n/a": True}
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "AEC\n(n/a)"
    style.plt.close(fig)


def test_draw_ranking_writes_a_real_figure(normalised_csv, tmp_path):
    pdf, png = tmp_path / "fig" / "fig2.pdf", tmp_path / "fig" / "fig2.png"
    draw_ranking(normalised_csv, pdf, png, METRICS)
    assert_real_figure(pdf, png, min_width=1000)
    img = mpimg.imread(png)[..., :3]
    blue = (img[..., 2] > img[..., 0] + 0.2)  # rank cells are shades of blue
    assert blue.mean() > 0.01


def test_no_rankable_stage_is_an_error(normalised_csv, tmp_path):
    with pytest.raises(ValueError, match="finetune"):
        draw_ranking(normalised_csv, tmp_path / "a.pdf", tmp_path / "a.png",
                     {"finetune": ["al"]})
    assert not list(tmp_path.glob("a.*"))
