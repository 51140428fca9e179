"""The pruning block's outputs (issue 21): the trajectory and widths tables from fabricated
records of the three pruned routes over two seeds (values, one row per event and per layer, the
scratch run and other blocks' runs left out), the two figures and the routes' bars drawn through
the registry, the pruning table, the captions, and the two claims on hand-built normalised
tables: holding, not holding, one seed, one route missing, the block missing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from effllm import outputs, records
from effllm.analysis.aggregate import read_table
from effllm.analysis.claims import FAILS, HOLDS, ONE_SEED, UNMEASURABLE, check_claims
from effllm.analysis.paper_tables import paper_table
from effllm.analysis.pruning import (
    TRAJECTORY_COLUMNS, WIDTH_COLUMNS, pruning_tables, write_pruning_tables,
)
from effllm.records import Metric, MetricInfo, RunRecord, config_hash
from invariants import assert_real_figure
from test_outputs import ROOT, load_config, run_script
from test_plots_pretrain import _metric, _row

LABELS = {"pruning_aware": "Pruning-aware", "oneshot": "One-shot",
          "oneshot_obs": "One-shot + OBS", "scratch": "Scratch"}
GROUP = "pruning-tiny"
SOURCE = {"heads": [4, 4, 4], "ffn": [192, 192, 192], "hidden": 64}
# technique -> per-event (tokens, params, heads, ffn channels, hidden), then final per-layer
# (heads, kv heads, ffn) and hidden; seed 1 moves one head and some FFN channels between layers
ROUTES = {
    "pruning_aware": ([(0, 120e3, 12, 576, 64), (1000, 90e3, 10, 400, 56),
                       (2000, 70e3, 8, 300, 48), (3000, 60e3, 6, 240, 48)],
                      ([2, 3, 1], [1, 1, 1], [100, 80, 60]), 48),
    "oneshot": ([(0, 120e3, 12, 576, 64), (0, 60e3, 6, 240, 48)],
                ([2, 2, 2], [1, 1, 1], [80, 80, 80]), 48),
    "oneshot_obs": ([(0, 120e3, 12, 576, 64), (0, 60e3, 6, 240, 48)],
                    ([3, 2, 1], [1, 1, 1], [90, 80, 70]), 48),
}


@pytest.fixture(autouse=True)
def hidden_metrics(monkeypatch):
    """The hidden sizes as canonical metrics, as the pruning block's records carry them (kept
    if records.METRICS has them already)."""
    for name in ("hidden_size", "source_hidden_size"):
        if name not in records.METRICS:
            monkeypatch.setitem(records.METRICS, name,
                                MetricInfo("1", False, name, "hidden dimensions of the model"))


def _hidden(value: float) -> Metric:
    return Metric.configured(value, records.METRICS["hidden_size"].unit, "model shape")


def _record(technique: str, seed: int, pruned: bool = True, group: str = GROUP) -> RunRecord:
    metrics = {"perplexity": Metric.measured(10.0 + seed, "1", "eval")}
    series = {}
    if pruned:
        events, (heads, kv, ffn), hidden = ROUTES[technique]
        if seed:
            heads = [heads[1], heads[0], *heads[2:]]
            ffn = [ffn[0] + 10, ffn[1] - 10, *ffn[2:]]
        names = ("prune_tokens", "prune_params", "prune_heads", "prune_ffn_channels",
                 "prune_hidden")
        series = {name: [float(e[i]) for e in events] for i, name in enumerate(names)}
        series.update(layer_heads=heads, layer_kv_heads=kv, layer_ffn=ffn,
                      source_layer_heads=SOURCE["heads"], source_layer_ffn=SOURCE["ffn"])
        metrics.update(hidden_size=_hidden(hidden), source_hidden_size=_hidden(SOURCE["hidden"]))
    run_id = f"pretrain/{technique}-tiny-s{seed}"
    return RunRecord(
        run_id=run_id, stage="pretrain", technique=technique, model_size="tiny", seed=seed,
        config_hash=config_hash({"run": run_id}),
        params={"group": group, "label": LABELS.get(technique, technique), "upstream": None},
        provenance={"git_commit": "abc", "packages": {}, "python": "3.11", "cpu_model": "cpu",
                    "gpus": [], "torch_threads": 1, "start_time": "2025-01-01T00:00:00+00:00",
                    "end_time": "2025-01-01T00:01:00+00:00"},
        metrics=metrics, series={k: [float(x) for x in v] for k, v in series.items()})


def _save(tmp_path: Path, recs: list[RunRecord]) -> list[str]:
    paths = []
    for rec in recs:
        path = tmp_path / "results" / rec.run_id / "record.json"
        rec.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def record_paths(tmp_path):
    """The three pruned routes over seeds 0 and 1, the scratch runs (no pruning series) and an
    attention run of another block."""
    recs = [_record(t, seed) for seed in (0, 1) for t in ROUTES]
    recs += [_record("scratch", seed, pruned=False) for seed in (0, 1)]
    recs.append(_record("gqa", 0, pruned=False, group="attention-tiny"))
    return _save(tmp_path, recs)


@pytest.fixture
def tables(record_paths, tmp_path):
    out = tmp_path / "tables"
    write_pruning_tables(record_paths, out / "trajectory.csv", out / "widths.csv")
    return out / "trajectory.csv", out / "widths.csv"


def test_trajectory_rows_per_event(tables):
    trajectory = read_table(tables[0])
    assert list(trajectory.columns) == TRAJECTORY_COLUMNS
    assert set(trajectory["technique"]) == set(ROUTES)  # no scratch, no other block
    assert len(trajectory) == 2 * (4 + 2 + 2)
    pa = trajectory[trajectory["run_id"] == "pretrain/pruning_aware-tiny-s1"]
    assert pa["event"].tolist() == [0, 1, 2, 3]
    assert pa["tokens"].tolist() == [0, 1000, 2000, 3000]
    assert pa["params"].tolist() == [120e3, 90e3, 70e3, 60e3]
    assert pa["heads"].tolist() == [12, 10, 8, 6]
    assert pa["ffn_channels"].tolist() == [576, 400, 300, 240]
    assert pa["hidden"].tolist() == [64, 56, 48, 48]
    assert set(pa["label"]) == {"Pruning-aware"} and set(pa["group"]) == {GROUP}
    assert set(pa["seed"]) == {1}
    oneshot = trajectory[trajectory["technique"] == "oneshot"]
    assert oneshot["tokens"].tolist() == [0, 0, 0, 0]  # pruned once, before training


def test_widths_rows_per_layer(tables):
    widths = read_table(tables[1])
    assert list(widths.columns) == WIDTH_COLUMNS
    assert len(widths) == 2 * 3 * 3  # seeds x routes x layers
    pa = widths[widths["run_id"] == "pretrain/pruning_aware-tiny-s1"]
    assert pa["layer"].tolist() == [0, 1, 2]
    assert pa["heads"].tolist() == [3, 2, 1]  # seed 1's layers
    assert pa["ffn"].tolist() == [110, 70, 60]
    assert pa["kv_heads"].tolist() == [1, 1, 1]
    assert pa["source_heads"].tolist() == [4, 4, 4] and pa["source_ffn"].tolist() == [192] * 3
    assert set(pa["hidden"]) == {48} and set(pa["source_hidden"]) == {64}
    assert set(widths.loc[widths["technique"] == "oneshot_obs", "label"]) == {"One-shot + OBS"}


def test_uneven_series_are_an_error_and_no_file_is_left(tmp_path):
    rec = _record("pruning_aware", 0)
    rec.series["prune_heads"] = rec.series["prune_heads"][:-1]
    with pytest.raises(ValueError, match="different lengths"):
        pruning_tables([rec])
    rec = _record("pruning_aware", 0)
    del rec.series["layer_ffn"]
    with pytest.raises(ValueError, match="lacks.*layer_ffn"):
        write_pruning_tables(_save(tmp_path, [rec]), tmp_path / "t.csv", tmp_path / "w.csv")
    assert not list(tmp_path.glob("*.csv"))


def test_no_pruned_run_gives_empty_tables_with_their_columns(tmp_path):
    paths = _save(tmp_path, [_record("scratch", 0, pruned=False)])
    trajectory, widths = write_pruning_tables(paths, tmp_path / "t.csv", tmp_path / "w.csv")
    assert trajectory.empty and widths.empty
    assert list(pd.read_csv(tmp_path / "w.csv").columns) == WIDTH_COLUMNS


def test_the_rule_script_writes_both_tables(record_paths, tmp_path):
    out = tmp_path / "script"
    run_script("pruning_tables.py", tmp_path, input=SimpleNamespace(records=record_paths),
               output=SimpleNamespace(trajectory=str(out / "t.csv"), widths=str(out / "w.csv")))
    assert len(read_table(out / "t.csv")) == 16 and len(read_table(out / "w.csv")) == 18


@pytest.mark.parametrize("name", ["fig_pruning_dynamics", "fig_pruning_architecture"])
def test_figures_draw_through_the_registry(tables, tmp_path, name):
    entry = outputs.FIGURES[name]
    files = dict(zip(["trajectory_csv", "widths_csv"], tables))
    (argument,) = entry.inputs
    out = tmp_path / name
    run_script("figure.py", tmp_path, wildcards=SimpleNamespace(figure=name),
               input={argument: str(files[argument])},
               params=SimpleNamespace(kwargs=entry.kwargs(load_config("config/config.yaml"))),
               output=SimpleNamespace(pdf=str(out / "f.pdf"), png=str(out / "f.png")))
    assert_real_figure(out / "f.pdf", out / "f.png", min_width=600)


@pytest.mark.parametrize("name", ["fig_pruning_dynamics", "fig_pruning_architecture"])
def test_figures_of_one_seed_and_no_hidden_metric(tmp_path, name):
    recs = [_record(t, 0) for t in ROUTES]
    for rec in recs:
        del rec.metrics["hidden_size"]  # not reported: drawn without it, never as 0
    paths = _save(tmp_path, recs)
    write_pruning_tables(paths, tmp_path / "t.csv", tmp_path / "w.csv")
    entry = outputs.FIGURES[name]
    csv = tmp_path / ("t.csv" if "dynamics" in name else "w.csv")
    out = tmp_path / "fig"
    entry.load()(csv, out / "f.pdf", out / "f.png", **entry.kwargs({}))
    assert_real_figure(out / "f.pdf", out / "f.png", min_width=600)


def test_dynamics_needs_a_pruning_aware_run(tmp_path):
    paths = _save(tmp_path, [_record("oneshot", 0)])
    write_pruning_tables(paths, tmp_path / "t.csv", tmp_path / "w.csv")
    draw = outputs.FIGURES["fig_pruning_dynamics"].load()
    with pytest.raises(ValueError, match="pruning_aware"):
        draw(tmp_path / "t.csv", tmp_path / "a.pdf", tmp_path / "a.png", block="pruning")
    assert not list(tmp_path.glob("a.*"))


# ----------------------------------------------------------------- the routes, table, claims


def _routes(ppl: dict[str, list[float]], tmp_path: Path | None = None):
    """A normalised table of the pruning block: per technique, raw perplexity per seed (AMU
    and AL alike for all, AEC unavailable), as test_plots_pretrain builds one."""
    rows = []
    for technique, values in ppl.items():
        for seed, value in enumerate(values):
            row = _row("pruning", GROUP, LABELS[technique], seed, {
                "perplexity": _metric(value, 1.0 - (value - 9.0) / 4),
                "amu": _metric(0.5, 1.0), "al": _metric(0.1, 1.0), "tt": _metric(2.0, 1.0),
                "aec": _metric(None, None)}, params_total=60e3)
            row.update(technique=technique, perplexity__note="", run_id=f"{technique}-s{seed}")
            rows.append(row)
    df = pd.DataFrame(rows)
    if tmp_path is None:
        return df
    df.to_csv(tmp_path / "normalised.csv", index=False)
    return tmp_path / "normalised.csv"


BETTER = {"pruning_aware": [10.0, 10.1], "oneshot": [11.0, 11.1], "oneshot_obs": [10.8, 10.9],
          "scratch": [12.0, 12.1]}


def test_routes_figure_and_table(tmp_path):
    csv = _routes(BETTER, tmp_path)
    entry = outputs.FIGURES["fig_pruning_routes"]
    assert entry.load().__name__ == "draw_bars_with_line"
    out = tmp_path / "routes"
    entry.load()(normalised_csv=csv, out_pdf=out / "f.pdf", out_png=out / "f.png",
                 **entry.kwargs({}))
    assert_real_figure(out / "f.pdf", out / "f.png", min_width=300)
    table = paper_table(read_table(csv), "table_pruning")
    assert table["variant"].tolist() == [LABELS[t] for t in BETTER]
    assert table["perplexity"].tolist() == pytest.approx([10.05, 11.05, 10.85, 12.05])


def _claim(result, key):
    rows = result[result["claim"] == key]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_claims_hold_on_a_clear_margin_over_two_seeds():
    result = check_claims(_routes(BETTER))
    scratch = _claim(result, "pruning_beats_scratch")
    assert scratch["verdict"] == HOLDS and scratch["group"] == GROUP
    assert scratch["difference"] == pytest.approx(2.0) and scratch["seeds"] == 2
    assert "2502.06663" in scratch["source"]
    oneshot = _claim(result, "pruning_beats_oneshot")
    assert oneshot["verdict"] == HOLDS
    assert oneshot["rival"] == "One-shot + OBS"  # the closer (in SE) decides
    assert oneshot["difference"] == pytest.approx(0.8)


def test_claims_do_not_hold_when_reversed():
    reversed_ = {"pruning_aware": [12.0, 12.1], "oneshot": [10.0, 10.1],
                 "oneshot_obs": [10.5, 10.6], "scratch": [10.0, 10.2]}
    result = check_claims(_routes(reversed_))
    assert _claim(result, "pruning_beats_scratch")["verdict"] == FAILS
    oneshot = _claim(result, "pruning_beats_oneshot")
    assert oneshot["verdict"] == FAILS and oneshot["rival"] == "One-shot"  # beats it most


def test_beating_one_one_shot_route_is_not_enough():
    mixed = {**BETTER, "oneshot_obs": [9.0, 9.1]}
    oneshot = _claim(check_claims(_routes(mixed)), "pruning_beats_oneshot")
    assert oneshot["verdict"] == FAILS and oneshot["rival"] == "One-shot + OBS"


def test_one_seed_is_inconclusive():
    result = check_claims(_routes({t: v[:1] for t, v in BETTER.items()}))
    for key in ("pruning_beats_scratch", "pruning_beats_oneshot"):
        row = _claim(result, key)
        assert row["verdict"] == ONE_SEED and pd.isna(row["std_error"])


def test_a_missing_route_or_block_is_not_measurable():
    without_obs = {t: v for t, v in BETTER.items() if t != "oneshot_obs"}
    row = _claim(check_claims(_routes(without_obs)), "pruning_beats_oneshot")
    assert row["verdict"] == UNMEASURABLE and "oneshot_obs not in this group" in row["reason"]
    elsewhere = _routes(BETTER).assign(block="attention")
    result = check_claims(elsewhere)
    for key in ("pruning_beats_scratch", "pruning_beats_oneshot"):
        row = _claim(result, key)
        assert row["verdict"] == UNMEASURABLE
        assert "block 'pruning' not in this configuration" in row["reason"]


# ------------------------------------------------------------------------- registry, captions


def test_registry_entries():
    for name in ("fig_pruning_routes", "fig_pruning_dynamics", "fig_pruning_architecture"):
        assert outputs.FIGURES[name].block == "pruning"
        assert outputs.FIGURES[name].category == "Pretraining"
    assert outputs.FIGURES["fig_pruning_dynamics"].inputs == {
        "trajectory_csv": outputs.PRUNING_TRAJECTORY}
    assert outputs.FIGURES["fig_pruning_architecture"].inputs == {
        "widths_csv": outputs.PRUNING_WIDTHS}
    assert outputs.FIGURES["fig_pruning_routes"].kwargs({}) == {
        "block": "pruning", "metrics": outputs.PRETRAIN_METRICS, "line_metric": "perplexity"}
    assert outputs.TABLES["table_pruning"].block == "pruning"
    names = {Path(p).stem for p in outputs.selected(
        {**outputs.FIGURES, **outputs.TABLES}, {"pruning"})}
    assert {"fig_pruning_routes", "fig_pruning_dynamics", "fig_pruning_architecture",
            "table_pruning"} <= names
    assert not any("pruning" in Path(p).stem for p in outputs.selected(
        {**outputs.FIGURES, **outputs.TABLES}, {"attention"}))
    rules = (ROOT / "workflow/rules/analysis.smk").read_text()
    assert "outputs.PRUNING_TRAJECTORY" in rules and "outputs.PRUNING_WIDTHS" in rules


def _render(template: str, **wildcards) -> str:
    from docutils.core import publish_parts
    from jinja2 import Environment

    config = load_config("config/config.yaml")
    config["pretrain"]["blocks"]["pruning"] = {"source": "gqa-small", "target_params": "tiny",
                                               "prune_steps": 200, "continue_steps": 300,
                                               "every": 20}
    name = wildcards.get("figure") or wildcards.get("table")
    entry = outputs.FIGURES.get(name) or outputs.TABLES[name]
    text = (ROOT / "workflow/report" / template).read_text()
    caption = Environment(trim_blocks=True, lstrip_blocks=True).from_string(text).render(
        snakemake=SimpleNamespace(wildcards=SimpleNamespace(**wildcards), config=config,
                                  params=SimpleNamespace(kwargs=entry.kwargs(config))))
    assert "System Message" not in publish_parts(caption, writer="html")["body"]
    return caption


@pytest.mark.parametrize("name", ["fig_pruning_routes", "fig_pruning_dynamics",
                                  "fig_pruning_architecture"])
def test_figure_captions_name_the_target_size(name):
    caption = _render("figure.rst", figure=name)
    assert "from gqa-small to target size tiny" in caption and "2502.06663" in caption
    if name != "fig_pruning_architecture":
        assert "every route trains 500 steps" in caption


def test_table_caption():
    caption = _render("table.rst", table="table_pruning")
    assert caption.startswith("Pruning routes") and "to target size tiny" in caption
    assert "Inference" not in caption and "Table 16" not in caption
