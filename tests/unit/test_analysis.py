"""Analysis: runs table, MCR, min-max normalisation, efficiency score, ranks, tables (hand-computed)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

from effllm.analysis.aggregate import (
    combine_status, derive_compression, read_table, runs_table, write_runs_table,
)
from effllm.analysis.normalise import (
    efficiency_inputs, efficiency_score, minmax, normalise_table, ranks,
)
from effllm.analysis.tables import format_number, to_latex, to_markdown, write_table
from effllm.records import Metric, RunRecord, config_hash

NAN = float("nan")


# --- fixtures -------------------------------------------------------------------------------------

def _record(run_id, stage, technique, label, group, metrics, seed=0, upstream=None):
    return RunRecord(
        run_id=run_id, stage=stage, technique=technique, model_size="tiny", seed=seed,
        config_hash=config_hash({"run": run_id}),
        params={"group": group, "label": label, "upstream": upstream},
        provenance={
            "git_commit": "abc123", "packages": {"numpy": "2"}, "python": "3.12", "cpu_model": "cpu",
            "gpus": [], "torch_threads": 2, "start_time": "2025-01-01T00:00:00+00:00",
            "end_time": "2025-01-01T00:01:00+00:00",
        },
        metrics=metrics,
    )


def _m(value, unit="1", status="measured"):
    if status == "unavailable":
        return Metric.unavailable(unit, "rapl", "no energy counter on this machine")
    if status == "estimated":
        return Metric.estimated(value, unit, "model", "estimated from FLOPs")
    return Metric.measured(value, unit, "sampler")


@pytest.fixture
def record_paths(tmp_path):
    recs = [
        _record("pretrain/gqa-tiny", "pretrain", "gqa", "GQA", "attention-tiny",
                {"perplexity": _m(30.0), "amu": _m(0.5, "GB"), "aec": _m(None, "W", "unavailable")}),
        _record("pretrain/none-tiny", "pretrain", "none", "None", "pe-tiny",
                {"perplexity": _m(40.0), "amu": _m(0.4, "GB"), "aec": _m(None, "W", "unavailable")}),
        _record("inference/a-bf16", "inference", "bf16", "bf16", "finetune/a",
                {"bits_nominal": _m(16.0, "bits"), "weight_bytes": _m(1000.0, "B"),
                 "performance": _m(0.5, "fraction"), "amu": _m(1.0, "GB"),
                 "aec": _m(None, "W", "unavailable")}, upstream="finetune/a"),
        _record("inference/a-int4", "inference", "int4", "int4", "finetune/a",
                {"bits_nominal": _m(4.0, "bits"), "weight_bytes": _m(300.0, "B"),
                 "performance": _m(0.45, "fraction"), "amu": _m(0.4, "GB"),
                 "aec": _m(None, "W", "unavailable")}, upstream="finetune/a"),
    ]
    paths = []
    for rec in recs:
        path = tmp_path / "records" / (rec.run_id.replace("/", "__") + ".json")
        rec.save(path)
        paths.append(path)
    return paths


# --- runs table -----------------------------------------------------------------------------------

def test_runs_table_columns_and_unavailable(record_paths, tmp_path):
    df = runs_table(record_paths)
    assert len(df) == 4
    assert list(df.columns[:13]) == [
        "run_id", "stage", "block", "technique", "label", "group", "upstream", "model_size",
        "seed", "config_hash", "git_commit", "start_time", "end_time",
    ]
    assert set(df["block"]) == {"pretrain", "inference"}  # no memberships given: the stage
    row = df.set_index("run_id").loc["pretrain/gqa-tiny"]
    assert row["perplexity"] == 30.0 and row["perplexity__status"] == "measured"
    assert row["amu__unit"] == "GB" and row["amu__method"] == "sampler"
    assert math.isnan(row["aec"]) and row["aec__status"] == "unavailable"
    assert pd.isna(row["bits_nominal"]) and pd.isna(row["bits_nominal__status"])  # not reported
    assert df.set_index("run_id").loc["inference/a-int4", "upstream"] == "finetune/a"

    out_csv, out_pq = tmp_path / "t" / "runs.csv", tmp_path / "t" / "runs.parquet"
    write_runs_table(record_paths, out_csv, out_pq)
    back = read_table(out_csv)
    assert set(back["label"]) == {"GQA", "None", "bf16", "int4"}  # "None" is a label, not NaN
    assert back["aec"].isna().all() and (back["aec__status"] == "unavailable").all()
    assert pd.read_parquet(out_pq).shape == df.shape
    assert sorted(p.name for p in out_csv.parent.iterdir()) == ["runs.csv", "runs.parquet"]


def test_runs_table_gives_a_shared_run_one_row_per_membership(record_paths):
    places = {"pretrain/gqa-tiny": [
        {"block": "attention", "group": "attention-tiny", "technique": "gqa", "label": "GQA"},
        {"block": "position", "group": "position-tiny", "technique": "rope", "label": "RoPE"},
    ]}
    df = runs_table(record_paths, places)
    rows = df[df["run_id"] == "pretrain/gqa-tiny"].set_index("block")
    assert len(df) == 5 and list(rows.index) == ["attention", "position"]
    assert rows.loc["position", "label"] == "RoPE" and rows.loc["position", "perplexity"] == 30.0
    assert rows.loc["attention", "group"] == "attention-tiny"


def test_block_table_averages_seeds_with_spread(tmp_path):
    from effllm.analysis.paper_tables import block_table
    from effllm.analysis.tables import to_markdown

    df = pd.DataFrame({
        "block": ["attention"] * 4 + ["moe"], "group": ["attention-tiny"] * 4 + ["moe-tiny"],
        "label": ["MHA", "MHA", "MQA", "MQA", "Dense"], "model_size": ["tiny"] * 5,
        "seed": [0, 1, 0, 1, 0], "perplexity": [10.0, 12.0, 11.0, np.nan, 9.0],
        "perplexity__status": ["measured", "measured", "measured", "unavailable", "measured"],
        "aec": [np.nan] * 5, "aec__status": ["unavailable"] * 5,
    })
    table = block_table(df, "attention", ["perplexity", "aec", "amu"])
    assert list(table["variant"]) == ["MHA", "MQA"] and list(table["seeds"]) == [2, 2]
    mha, mqa = table.iloc[0], table.iloc[1]
    assert mha["perplexity"] == 11.0 and mha["perplexity__std"] == pytest.approx(2 ** 0.5)
    assert mqa["perplexity"] == 11.0 and pd.isna(mqa["perplexity__std"])  # one seed had a value
    assert mqa["perplexity__status"] == "measured" and mqa["perplexity__n"] == 1
    assert mha["perplexity__n"] == 2 and mha["aec__n"] == 0
    assert mha["aec__status"] == "unavailable" and pd.isna(mha["aec"])
    assert mha["amu__status"] == "unavailable"  # not in the table at all
    md = to_markdown(table)
    assert "11.0 \u00b1 1.41" in md and "n/a" in md
    with pytest.raises(ValueError, match="'position'"):
        block_table(df, "position", ["perplexity"])


# --- fine-tuning tables (7 and 8) ----------------------------------------------------------------

def _finetune_records(tmp_path, sets):
    """LoRA and Full on one base, on each fine-tuning set of ``sets`` (the first is primary),
    named and grouped as effllm.sweep names them; AL differs per set, AEC is unavailable."""
    from effllm.sweep import finetune_group

    paths, places = [], {}
    for k, dataset in enumerate(sets):
        block, group = finetune_group("gqa-small", dataset, sets)
        for method, label, al in (("lora", "LoRA", 1.0), ("full", "Full", 2.0)):
            run_id = f"finetune/{method}-{group}-s0"
            record = _record(run_id, "finetune", method, label, group, {
                "al": _m(al * (k + 1), "s"), "amu": _m(1.0 + k + (method == "full"), "GB"),
                "loss": _m(0.5 + k, "nats/token"), "aec": _m(None, "W", "unavailable")})
            paths.append(tmp_path / "records" / f"{method}-{dataset}.json")
            record.save(paths[-1])
            places[run_id] = [{"block": block, "group": group, "technique": method,
                               "label": label}]
    write_runs_table(paths, tmp_path / "runs.csv", memberships=places)
    cfg = {"normalise_floor": 0.1, "efficiency_score": {"finetune": {"amu": 1.0, "al": 1.0}}}
    normalise_table(tmp_path / "runs.csv", cfg, tmp_path / "normalised.csv")
    return tmp_path / "normalised.csv"


def test_table8_is_table7_on_the_second_set_and_leaves_table7_alone(tmp_path):
    from effllm.analysis.paper_tables import paper_table, write_paper_table

    both = read_table(_finetune_records(tmp_path / "both", ["arithmetic", "word_problems"]))
    alone = read_table(_finetune_records(tmp_path / "alone", ["arithmetic"]))
    t7 = paper_table(both, "table7_finetune")
    t8 = paper_table(both, "table8_finetune_word_problems")
    assert list(t8.columns) == list(t7.columns)
    assert list(t7["group"]) == ["gqa-small"] * 2
    assert list(t8["group"]) == ["gqa-small+word_problems"] * 2
    t8 = t8.set_index("variant")
    assert t8.loc["LoRA", "al"] == 2.0 and t8.loc["Full", "al"] == 4.0
    assert t8["loss"].tolist() == [1.5, 1.5] and t8["aec"].isna().all()
    # scores compare methods within one base on one set: the second set changes nothing in table 7
    pd.testing.assert_frame_equal(t7, paper_table(alone, "table7_finetune"))
    assert t8.loc["LoRA", "efficiency_score"] == 1.0  # best on both AMU and AL
    assert t8.loc["Full", "efficiency_score"] == pytest.approx(0.1)
    write_paper_table(tmp_path / "both" / "normalised.csv", "table8_finetune_word_problems",
                      tmp_path / "t8")
    assert "gqa-small+word\\_problems" in (tmp_path / "t8.tex").read_text()
    header, _, *rows = (tmp_path / "t8.md").read_text().splitlines()
    aec = [c.strip() for c in header.split("|")].index("AEC [W]")
    assert len(rows) == 2 and all(row.split("|")[aec].strip() == "n/a" for row in rows)
    with pytest.raises(ValueError, match="'finetune_medical'"):  # no runs of that set
        paper_table(both, "table8_finetune_medical")
    with pytest.raises(KeyError, match="table8_attention"):
        paper_table(both, "table8_attention")


# --- inference tables (9 and 16) --------------------------------------------------------------------

def _served(extra=lambda model, precision, seed: {}):
    """Two served models x three precisions (listed narrowest first) x two seeds; AEC is
    unavailable everywhere and weight bytes are not in the table at all."""
    rows = []
    for seed in (0, 1):
        for model in ("hub/Qwen2.5-7B", "finetune/lora-gqa-small-s0"):
            for precision in ("int4", "fp16", "bf16"):
                row = {"block": "inference", "stage": "inference", "group": model,
                       "label": precision, "technique": precision, "model_size": "7B",
                       "seed": seed}
                values = {"performance": 0.5 + 0.1 * seed, "amu": 2.0, "al": 1.0,
                          "prefill_latency": 0.1, "decode_latency": 0.03, "it": 30.0 + seed,
                          "aec": NAN, "mcr_nominal": 1.0, "mcr_measured": 1.1,
                          "exact_match": 0.4, "token_accuracy": 0.6,
                          **extra(model, precision, seed)}
                for m, v in values.items():
                    row[m] = v
                    row[f"{m}__status"] = "unavailable" if np.isnan(v) else "measured"
                rows.append(row)
    return pd.DataFrame(rows)


def test_table9_inference_columns_rows_and_missing(tmp_path):
    from effllm.analysis.paper_tables import paper_table, write_paper_table

    df = _served()
    table = paper_table(df, "table9_inference")
    shown = [c for c in table.columns if "__" not in c]
    assert shown == ["model", "precision", "size", "seeds", "performance", "amu", "al",
                     "prefill_latency", "decode_latency", "it", "aec", "mcr_nominal",
                     "mcr_measured"]  # weight_bytes: no column, left out
    assert list(table["model"]) == ["hub/Qwen2.5-7B"] * 3 + ["finetune/lora-gqa-small-s0"] * 3
    assert list(table["precision"]) == ["bf16", "fp16", "int4"] * 2  # widest first
    assert table["performance"].tolist() == pytest.approx([0.55] * 6)
    assert table["it__std"].tolist() == pytest.approx([0.5 ** 0.5] * 6)
    assert table["aec"].isna().all() and (table["aec__status"] == "unavailable").all()
    path = tmp_path / "normalised.csv"
    df.to_csv(path, index=False)
    write_paper_table(path, "table9_inference", tmp_path / "t9")
    md = (tmp_path / "t9.md").read_text().splitlines()
    assert md[0].startswith("| model | precision | size | seeds | Perf")
    assert all(line.split("|")[11].strip() == "n/a" for line in md[2:])  # AEC
    csv = pd.read_csv(tmp_path / "t9.csv", keep_default_na=False)
    assert (csv["aec"] == "").all()  # blank, not 0
    assert (tmp_path / "t9.tex").read_text().count("n/a") == 6


def test_table16_offline_falls_back_to_the_performance_components():
    from effllm.analysis.paper_tables import paper_table

    columns = lambda t: [c for c in t.columns if "__" not in c][4:]  # noqa: E731
    assert columns(paper_table(_served(), "table16_tasks")) == [
        "exact_match", "token_accuracy", "performance"]
    # a task column without any value (harness off) is no task score to show
    empty = _served(lambda *_: {"task_bbh": NAN})
    assert columns(paper_table(empty, "table16_tasks")) == [
        "exact_match", "token_accuracy", "performance"]


def test_table16_orders_tasks_paper_six_first_and_leaves_missing_blank(tmp_path):
    from effllm.analysis.paper_tables import paper_table
    from effllm.analysis.tables import to_markdown

    def scores(model, precision, seed):
        out = {"task_musr": 0.3, "task_zeta": 0.2, "task_bbh": 0.4, "task_mmlu_pro": 0.5,
               "task_arc_easy": 0.7}
        if model == "hub/Qwen2.5-7B" and precision == "int4":
            out["task_bbh"] = NAN  # this cell has no BBH score at any seed
        return out

    table = paper_table(_served(scores), "table16_tasks")
    assert [c for c in table.columns if "__" not in c] == [
        "model", "precision", "size", "seeds", "task_mmlu_pro", "task_bbh", "task_musr",
        "task_arc_easy", "task_zeta", "performance"]
    md = to_markdown(table).splitlines()
    assert md[0].split("|")[5:8] == [" MMLU-Pro [fraction] ", " BBH [fraction] ",
                                     " MuSR [fraction] "]
    int4 = next(line for line in md if "hub/Qwen2.5-7B | int4" in line).split("|")
    assert int4[6].strip() == "n/a" and int4[5].strip() == "0.500 \u00b1 0"
    assert pd.isna(table.loc[2, "task_bbh"]) and table.loc[2, "task_bbh__status"] == "unavailable"


# --- compression ----------------------------------------------------------------------------------

def _inference(rows):
    base = {"stage": "inference", "seed": 0}
    df = pd.DataFrame([{**base, **r} for r in rows])
    for m in ("bits_nominal", "weight_bytes", "performance"):
        df[f"{m}__status"] = [r.get(f"{m}__status", "measured") for r in rows]
    return df


def test_derive_compression_by_hand():
    df = _inference([
        {"group": "G", "technique": "bf16", "bits_nominal": 16, "weight_bytes": 1000, "performance": 0.5},
        {"group": "G", "technique": "int4", "bits_nominal": 4, "weight_bytes": 300, "performance": 0.45},
        {"group": "Z", "technique": "bf16", "bits_nominal": 16, "weight_bytes": 1000, "performance": 0.0},
        {"group": "Z", "technique": "int4", "bits_nominal": 4, "weight_bytes": 300, "performance": 0.1},
        {"group": "F", "technique": "fp32", "bits_nominal": 32, "weight_bytes": 4000, "performance": 0.5},
        {"group": "F", "technique": "int8", "bits_nominal": 8, "weight_bytes": 1000, "performance": 0.5,
         "performance__status": "estimated"},
        {"group": "M", "technique": "bf16", "bits_nominal": 16, "weight_bytes": 1000, "performance": 0.5},
        {"group": "M", "technique": "int4", "bits_nominal": 4, "weight_bytes": NAN, "performance": 0.5,
         "weight_bytes__status": "unavailable"},
    ])
    out = derive_compression(df).set_index(["group", "technique"])
    assert out.loc[("G", "int4"), "mcr_nominal"] == pytest.approx(4 * 0.9)  # 3.6
    assert out.loc[("G", "int4"), "mcr_measured"] == pytest.approx(1000 / 300 * 0.9)
    assert out.loc[("G", "int4"), "mcr_nominal__status"] == "measured"
    assert out.loc[("G", "int4"), "mcr_nominal__method"] == "nominal_bits_x_retention"
    assert out.loc[("G", "int4"), "mcr_measured__method"] == "measured_bytes_x_retention"
    assert out.loc[("G", "bf16"), "mcr_nominal"] == pytest.approx(1.0)
    for tech in ("bf16", "int4"):  # reference performance 0 -> unavailable, never a number
        assert math.isnan(out.loc[("Z", tech), "mcr_nominal"])
        assert out.loc[("Z", tech), "mcr_nominal__status"] == "unavailable"
    # no bf16 run: the widest bit width (fp32) is the reference; estimated inputs propagate
    assert out.loc[("F", "int8"), "mcr_nominal"] == pytest.approx(4.0)
    assert out.loc[("F", "int8"), "mcr_nominal__status"] == "estimated"
    # one missing input: that ratio is unavailable, the other is still measured
    assert math.isnan(out.loc[("M", "int4"), "mcr_measured"])
    assert out.loc[("M", "int4"), "mcr_measured__status"] == "unavailable"
    assert out.loc[("M", "int4"), "mcr_nominal"] == pytest.approx(4.0)


def test_derive_compression_leaves_other_stages_empty():
    df = pd.DataFrame({"stage": ["pretrain"], "group": ["g"], "technique": ["gqa"], "seed": [0]})
    out = derive_compression(df)
    assert math.isnan(out.loc[0, "mcr_nominal"]) and pd.isna(out.loc[0, "mcr_nominal__status"])


# --- normalisation --------------------------------------------------------------------------------

@pytest.fixture
def grouped():
    """g1: PPL (lower better) 10/20/30/missing; EM (higher better) 0.2/0.2/0.6/0.4.
    g2: a single run. g3: two runs that tie on everything."""
    return pd.DataFrame({
        "group": ["g1", "g1", "g1", "g1", "g2", "g3", "g3"],
        "perplexity": [10.0, 20.0, 30.0, NAN, 5.0, 7.0, 7.0],
        "exact_match": [0.2, 0.2, 0.6, 0.4, 0.3, 0.5, 0.5],
    })


def test_minmax_by_hand(grouped, caplog):
    with caplog.at_level(logging.INFO, logger="effllm.analysis.normalise"):
        out = minmax(grouped, ["perplexity", "exact_match"], floor=0.1)
    ppl, em = out["perplexity__norm"], out["exact_match__norm"]
    # lower-is-better is flipped: best (10) -> 1, worst (30) -> floor, middle -> 0.1 + 0.9 * 0.5
    assert ppl[:3].tolist() == pytest.approx([1.0, 0.55, 0.1])
    assert math.isnan(ppl[3])  # missing stays missing and does not count in min/max
    assert em[:4].tolist() == pytest.approx([0.1, 0.1, 1.0, 0.55])  # ties share the value
    assert ppl[4] == 1.0 and em[4] == 1.0  # single member
    assert ppl[5:].tolist() == [1.0, 1.0] and em[5:].tolist() == [1.0, 1.0]  # max == min
    assert "degenerate" in caplog.text
    raw = minmax(grouped, ["perplexity"], floor=0.0)["perplexity__norm"]
    assert raw[:3].tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_minmax_rejects_unknown_metric_and_bad_floor(grouped):
    with pytest.raises(KeyError, match="METRICS"):
        minmax(grouped.assign(foo=1.0), ["foo"])
    with pytest.raises(ValueError):
        minmax(grouped, ["perplexity"], floor=1.0)


def test_efficiency_score_by_hand():
    df = pd.DataFrame({"amu__norm": [0.5, 0.5, NAN, NAN], "al__norm": [1.0, 1.0, 1.0, NAN]})
    es = efficiency_score(df, {"amu": 1, "al": 1})
    assert es[0] == pytest.approx(2 / (1 / 0.5 + 1 / 1.0))  # 0.6667
    assert es[2] == pytest.approx(1.0)  # amu missing: dropped, weights renormalised
    assert math.isnan(es[3])
    weighted = efficiency_score(df, {"amu": 1, "al": 3})
    assert weighted[0] == pytest.approx(4 / (1 / 0.5 + 3 / 1.0))  # 0.8
    assert efficiency_score(df, {"amu": 1, "al": 1, "aec": 1})[0] == pytest.approx(2 / 3)
    assert efficiency_inputs(df, {"amu": 1, "al": 1}).tolist() == ["amu;al", "amu;al", "al", ""]
    with pytest.raises(ValueError):
        efficiency_score(df, {"amu": -1})


def test_ranks_by_hand(grouped):
    out = ranks(grouped, ["perplexity", "exact_match"])
    assert out["perplexity__rank"][:3].tolist() == [1, 2, 3]  # lower is better
    assert pd.isna(out["perplexity__rank"][3])
    assert out["exact_match__rank"][:4].tolist() == [3, 3, 1, 2]  # ties take the min rank
    assert out["perplexity__rank"][5:].tolist() == [1, 1]


def test_normalise_table_end_to_end(record_paths, tmp_path):
    runs = tmp_path / "runs.csv"
    write_runs_table(record_paths, runs)
    cfg = {"normalise_floor": 0.1, "efficiency_score": {"inference": {"amu": 1.0, "aec": 1.0}}}
    out = normalise_table(runs, cfg, tmp_path / "norm.csv")
    back = read_table(tmp_path / "norm.csv").set_index("run_id")
    assert back.loc["inference/a-int4", "mcr_nominal"] == pytest.approx(3.6)
    assert back.loc["inference/a-int4", "amu__norm"] == 1.0
    assert back.loc["inference/a-bf16", "amu__norm"] == pytest.approx(0.1)
    assert back.loc["inference/a-int4", "amu__rank"] == 1
    # pretrain runs sit in different groups: each is degenerate, 1.0
    assert back.loc["pretrain/gqa-tiny", "perplexity__norm"] == 1.0
    assert back["aec__norm"].isna().all()  # unavailable everywhere: never normalised to a number
    assert back.loc["inference/a-bf16", "efficiency_score"] == pytest.approx(0.1)  # amu only
    assert back.loc["inference/a-bf16", "efficiency_score__metrics"] == "amu"
    assert back.loc["inference/a-bf16", "efficiency_score__status"] == "measured"
    assert "amu:1" in back.loc["inference/a-bf16", "efficiency_score__method"]
    assert (back["norm_floor"] == 0.1).all() and len(out) == 4
    pre = back.loc["pretrain/gqa-tiny"]  # no weights for pretraining: unavailable, not 0
    assert pd.isna(pre["efficiency_score"]) and pre["efficiency_score__status"] == "unavailable"


# --- tables ---------------------------------------------------------------------------------------

def test_format_number():
    assert format_number(3.6) == "3.60"
    assert format_number(0.012345) == "0.0123"
    assert format_number(1234.5) == "1230"
    assert format_number(0.000012345) == "1.23e-5"
    assert format_number(123456.0) == "1.23e5"
    assert format_number(0.0) == "0" and format_number(7) == "7"


def test_tables_na_dagger_and_escapes(tmp_path):
    df = pd.DataFrame({
        "label": ["a_b & 50%", "GQA"],
        "amu": [0.5, NAN], "amu__status": ["measured", "unavailable"], "amu__unit": ["GB", "GB"],
        "aec": [12.0, NAN], "aec__status": ["estimated", np.nan],
    })
    md = to_markdown(df)
    lines = md.splitlines()
    assert lines[0] == "| label | AMU [GB] | AEC [W] |"
    assert lines[3] == "| GQA | n/a | n/a |"
    assert "12.0\u2020" in lines[2] and "estimated" in md
    assert not any(cell.strip() in {"0", "0.0", "nan", "NaN"} for cell in lines[3].split("|"))
    tex = to_latex(df)
    assert r"a\_b \& 50\%" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"12.0$^{\dagger}$" in tex and "GQA & n/a & n/a" in tex
    paths = write_table(df, tmp_path / "tab")
    assert [p.name for p in paths] == ["tab.csv", "tab.md", "tab.tex"]
    assert paths[1].read_text() == md


def test_runs_parquet_equals_the_csv(record_paths, tmp_path):
    """The aggregate rule's two outputs hold the same table: values, missing cells, statuses."""
    places = {"pretrain/gqa-tiny": [
        {"block": "attention", "group": "attention-tiny", "technique": "gqa", "label": "GQA"},
        {"block": "position", "group": "position-tiny", "technique": "rope", "label": "RoPE"},
    ]}
    out_csv, out_pq = tmp_path / "runs.csv", tmp_path / "runs.parquet"
    written = write_runs_table(record_paths, out_csv, out_pq, memberships=places)
    csv, parquet = read_table(out_csv), pd.read_parquet(out_pq)
    assert list(parquet.columns) == list(csv.columns) == list(written.columns)
    assert len(parquet) == len(csv) == 5
    pd.testing.assert_frame_equal(parquet.fillna(np.nan), csv.fillna(np.nan), check_dtype=False)
    assert parquet["aec"].isna().all() and (parquet["aec__status"] == "unavailable").all()
    assert "None" in set(parquet["label"])  # a label, not a missing value


def test_configured_inputs_count_as_measured_and_stay_configured_alone():
    """A setting (nominal bits) is exact: it never weakens a derived status, and a quantity made
    of settings alone is not reported as measured."""
    assert combine_status(["configured", "measured"], [4.0, 0.5]) == "measured"
    assert combine_status(["configured", "estimated"], [4.0, 0.5]) == "estimated"
    assert combine_status(["configured", "configured"], [4.0, 4.0]) == "configured"
    assert combine_status(["configured", "unavailable"], [4.0, None]) == "unavailable"


def test_window_conditions_are_not_normalised():
    from effllm.analysis.normalise import normalisable_metrics

    df = pd.DataFrame({"al": [1.0], "al__status": ["measured"],
                       "machine_load_others": [0.5], "machine_load_others__status": ["measured"]})
    assert normalisable_metrics(df) == ["al"]
