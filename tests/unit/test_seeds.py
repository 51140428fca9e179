"""The one seed-averaging function, against hand-computed values (statuses mixed), and its use by
the tables and every figure that averages seeds; the seed-spread artists of the figures (with two
seeds, not with one); per-block and per-stage seed lists and the jobs they give."""

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


def _smoke(**seeds):
    """smoke.yaml merged into config.yaml and checked, with per-block or per-stage seeds."""
    from pathlib import Path

    from snakemake.utils import update_config

    from effllm.config import check_config, load_yaml

    root = Path(__file__).resolve().parents[2]
    config = load_yaml(root / "config/config.yaml")
    update_config(config, load_yaml(root / "config/smoke.yaml"))
    for key, value in seeds.items():
        section = config
        *path, last = key.split(".")
        for part in path:
            section = section[part]
        section[last] = value
    return check_config(config, root / "workflow/schemas/config.schema.yaml")


def test_per_block_seeds_give_the_expected_jobs():
    import dataclasses

    from effllm.sweep import all_seeds, expand_runs

    plain = expand_runs(_smoke())
    config = _smoke(**{"pretrain.blocks.position.seeds": [0, 1, 2], "finetune.seeds": [0, 1, 5],
                       "inference.seeds": [0, 5]})
    assert all_seeds(config) == [0, 1, 2, 5]
    runs = expand_runs(config)
    # Seed 0 is the plain grid, run for run and setting for setting.
    for stage in ("pretrain", "finetune"):
        assert {n: r.spec for n, r in runs[stage].items() if r.seed == 0} == {
            n: r.spec for n, r in plain[stage].items()}
    # Seeds 1 and 2: the position block only. RoPE is the GQA model, named and specified as in
    # the first block that has it (attention; so adding seeds to attention later retrains
    # nothing), but at these seeds it is in the position block only.
    for seed in (1, 2):
        extra = {n: r for n, r in runs["pretrain"].items() if r.seed == seed}
        assert sorted(extra) == sorted(f"{v}-tiny-s{seed}" for v in ("gqa", "sinusoidal",
                                                                      "relative", "none"))
        gqa = extra[f"gqa-tiny-s{seed}"]
        assert [(m.block, m.label) for m in gqa.memberships] == [("position", "RoPE")]
        assert gqa.spec == dataclasses.replace(plain["pretrain"]["gqa-tiny-s0"].spec, seed=seed,
                                               run_id=f"pretrain/gqa-tiny-s{seed}")
    assert [(m.block, m.label) for m in runs["pretrain"]["gqa-tiny-s0"].memberships] == [
        ("attention", "GQA"), ("position", "RoPE"), ("moe", "Dense"),
        ("attention_free", "Transformer"), ("distillation", "Teacher (gqa-tiny)")]
    # Fine-tuning at 0, 1 and 5: seed 1 starts from the base pretrained at 1; the base has no
    # seed 5, so seed 5 starts from its first seed (the extra seed varies fine-tuning only).
    upstream = {r.seed: r.upstream for r in runs["finetune"].values() if r.technique == "lora"}
    assert upstream == {0: "pretrain/gqa-tiny-s0", 1: "pretrain/gqa-tiny-s1",
                        5: "pretrain/gqa-tiny-s0"}
    assert len(runs["finetune"]) == 3 * len(plain["finetune"])
    # Inference at 0 and 5 only: the fine-tuned models of those seeds, each at both precisions.
    served = {r.upstream for r in runs["inference"].values()}
    assert {int(s.rsplit("-s", 1)[1]) for s in served} == {0, 5}
    assert len(runs["inference"]) == 2 * len(plain["inference"])
    # the techniques block serves the pretrained GQA-tiny at both: seed 5 its seed-0 model
    assert runs["inference"]["draft-gqa-tiny-s5"].upstream == "pretrain/gqa-tiny-s0"
    assert runs["inference"]["draft-gqa-tiny-s5"].spec.seed == 5


def test_stage_seeds_stay_out_of_the_run_settings():
    """A per-stage seed list is grid, not a training setting: the runs it shares with the
    plain grid keep their specs (and so are not rerun)."""
    from effllm.sweep import expand_runs

    plain = expand_runs(_smoke())
    same = expand_runs(_smoke(**{"finetune.seeds": [0], "inference.seeds": [0],
                                 "pretrain.blocks.moe.seeds": [0]}))
    for stage, runs in plain.items():
        assert {n: r.spec.to_json() for n, r in runs.items()} == {
            n: r.spec.to_json() for n, r in same[stage].items()}


def _plot_rows(stage, block, group, techniques, seeds, metrics, **extra):
    """Normalised-table rows: per technique and seed, raw and ``__norm`` values that differ by
    seed (so two seeds always have a spread)."""
    rows = []
    for k, technique in enumerate(techniques):
        for seed in range(seeds):
            row = {"run_id": f"{stage}/{technique}-s{seed}", "stage": stage, "block": block,
                   "group": group, "technique": technique, "label": technique.upper(),
                   "model_size": "small", "seed": seed, "norm_floor": 0.1, **extra}
            for j, m in enumerate(metrics):
                row.update({m: 1.0 + k + j + 0.1 * seed, f"{m}__status": "measured",
                            f"{m}__unit": "1", f"{m}__norm": 0.3 + 0.2 * k + 0.1 * seed})
            rows.append(row)
    return pd.DataFrame(rows)


def _errorbars(*axes):
    from matplotlib.container import ErrorbarContainer

    return sum(isinstance(c, ErrorbarContainer) for ax in axes for c in ax.containers)


@pytest.mark.parametrize("seeds", [1, 2])
def test_figures_draw_the_seed_spread_only_with_two_seeds(seeds):
    """Bars (and their raw line), bubbles, fine-tuning bars, radar and rose petals: seed-spread
    artists exist with two seeds and do not with one."""
    from effllm.plots import style
    from effllm.plots.bars import bars_with_line
    from effllm.plots.bubble import bubble_grid
    from effllm.plots.finetune import finetune_summary, mirrored_bars
    from effllm.plots.radar import radar
    from effllm.plots.rose import METRICS as ROSE_METRICS
    from effllm.plots.rose import rose, rose_summary

    found = {}
    metrics = ["perplexity", "amu", "al"]
    pre = _plot_rows("pretrain", "position", "position-small", ["rope", "none"], seeds, metrics)
    fig, ax = style.plt.subplots()
    ax2 = bars_with_line(ax, pre, metrics)
    found["bars"] = _errorbars(ax, ax2)
    fig2, ax = style.plt.subplots()
    bubble_grid(ax, pre, metrics, s_max=400.0)
    found["bubbles"] = sum(c.get_gid() == f"spread:{n}" for c in ax.collections
                           for n in ("ROPE", "NONE"))
    fig3, ax = style.plt.subplots(subplot_kw={"projection": "polar"})
    radar(ax, seed_summary(pre, [f"{m}__norm" for m in metrics], by=["label"]), metrics)
    found["radar"] = _errorbars(ax)
    ft = _plot_rows("finetune", "finetune", "gqa-small", ["lora", "freeze"], seeds,
                    ["efficiency_score", "val_loss"], params_total=1e6,
                    params_total__status="measured")
    fig4, (top, bottom) = style.plt.subplots(2, 1)
    mirrored_bars(top, bottom, finetune_summary(ft, methods=["lora", "freeze"]))
    found["finetune"] = _errorbars(top, bottom)
    inf = _plot_rows("inference", "inference", "hub/m", ["bf16", "int4"], seeds,
                     list(ROSE_METRICS))
    fig5, ax = style.plt.subplots(subplot_kw={"projection": "polar"})
    rose(ax, rose_summary(inf)[lambda s: s["precision"] == "BF16"])
    found["rose"] = _errorbars(ax)
    for f in (fig, fig2, fig3, fig4, fig5):
        style.plt.close(f)
    if seeds == 1:
        assert found == dict.fromkeys(found, 0)
    else:  # bars: one per bar (2 x 3) and one for the raw line; bubbles: a ring set each
        assert found == {"bars": 7, "bubbles": 2, "radar": 2, "finetune": 4, "rose": 6}
