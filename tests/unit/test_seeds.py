"""The one seed-averaging function, against hand-computed values (statuses mixed), and its use by
the tables and every figure that averages seeds."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pandas as pd
import pytest

from effllm.analysis.seeds import seed_summary, status_column

NAN = float("nan")


@pytest.fixture
def runs():
    """Group g: A over three seeds (measured, estimated, unavailable), B two measured seeds,
    C never available, D a value whose record says unavailable (the weakest status wins)."""
    rows = [("A", 0, 1.0, "measured", 0.2), ("A", 1, 2.0, "estimated", 0.4),
            ("A", 2, NAN, "unavailable", NAN), ("B", 0, 3.0, "measured", 0.6),
            ("B", 1, 5.0, "measured", 1.0), ("C", 0, NAN, "unavailable", NAN),
            ("D", 0, 4.0, "unavailable", 0.8)]
    return pd.DataFrame([{"group": "g", "label": label, "seed": seed, "model_size": "tiny",
                          "amu": amu, "amu__status": status, "amu__norm": norm}
                         for label, seed, amu, status, norm in rows])


def test_seed_summary_by_hand(runs):
    s = seed_summary(runs, ["amu", "amu__norm", "aec"]).set_index("label")
    assert list(s.index) == ["A", "B", "C", "D"]  # first appearance
    assert s.loc["A", "seeds"] == 3 and s.loc["A", "runs"] == 3 and s.loc["A", "size"] == "tiny"
    # A: the unavailable seed is left out of the mean, not counted as 0 (which would give 1.0)
    assert s.loc["A", "amu"] == pytest.approx(1.5)
    assert s.loc["A", "amu__std"] == pytest.approx(math.sqrt(0.5))
    assert (s.loc["A", "amu__lo"], s.loc["A", "amu__hi"], s.loc["A", "amu__n"]) == (1.0, 2.0, 2)
    assert s.loc["A", "amu__status"] == "estimated"  # one of the averaged values is estimated
    assert s.loc["A", "amu__norm"] == pytest.approx(0.3)
    assert s.loc["A", "amu__norm__status"] == "estimated"  # inherits the raw metric's status
    assert s.loc["B", "amu"] == 4.0 and s.loc["B", "amu__std"] == pytest.approx(math.sqrt(2))
    assert s.loc["B", "amu__status"] == "measured"
    assert np.isnan(s.loc["C", "amu"]) and s.loc["C", "amu__n"] == 0
    assert s.loc["C", "amu__status"] == "unavailable" and np.isnan(s.loc["C", "amu__std"])
    assert s.loc["D", "amu"] == 4.0 and s.loc["D", "amu__status"] == "unavailable"
    assert np.isnan(s.loc["D", "amu__std"])  # one value: no spread
    assert s["aec"].isna().all() and (s["aec__status"] == "unavailable").all()  # no column
    assert (s["aec__n"] == 0).all()


def test_seed_summary_keys_and_status_column(runs):
    two = runs.assign(group=["g1", "g1", "g1", "g2", "g2", "g1", "g2"])
    s = seed_summary(two, ["amu"], by=("group", "label"))
    assert list(zip(s["group"], s["label"])) == [("g1", "A"), ("g2", "B"), ("g1", "C"),
                                                 ("g2", "D")]
    assert status_column("amu__norm") == status_column("amu__rank") == "amu__status"
    assert status_column("efficiency_score") == "efficiency_score__status"


def test_tables_and_figures_average_through_seed_summary():
    """No second averaging: each consumer calls the one function (its source names it)."""
    from effllm.analysis import claims, paper_tables
    from effllm.plots import bars, bubble, radar, ranking, rose

    for module in (paper_tables, bars, bubble, radar, rose, claims, ranking):
        assert "seed_summary(" in inspect.getsource(module), module.__name__


def test_radar_draws_the_seed_range_as_whiskers(tmp_path):
    from matplotlib.container import ErrorbarContainer

    from effllm.plots import style
    from effllm.plots.radar import radar

    metrics = ["perplexity", "amu", "al"]
    runs = pd.DataFrame([{"group": "g", "label": label, "seed": seed, "perplexity__norm": p,
                          "amu__norm": 0.5, "al__norm": NAN if label == "GQA" else 1.0}
                         for label, seed, p in (("MQA", 0, 0.2), ("MQA", 1, 0.6),
                                                ("GQA", 0, 1.0), ("GQA", 1, 1.0))])
    series = seed_summary(runs, [f"{m}__norm" for m in metrics], by=["label"])
    fig, ax = style.plt.subplots(subplot_kw={"projection": "polar"})
    radar(ax, series, metrics)
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == ["_spread:MQA"]  # GQA's seeds agree: no whisker
    (segment,) = bars[0].lines[2][0].get_segments()  # one vertex with a range: PPL, 0.2-0.6
    assert sorted(segment[:, 1]) == pytest.approx([0.2, 0.6])
    mqa = next(line for line in ax.get_lines() if line.get_gid() == "MQA")
    assert mqa.get_ydata()[0] == pytest.approx(0.4)  # the vertex is the seed mean
    style.plt.close(fig)
