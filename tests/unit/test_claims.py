"""The claims check on a hand-built table: a claim that holds beyond the seed spread, one that
holds only within it, one that does not hold, one tied, one not measurable (unavailable metric,
missing block, missing technique), and the MoE pairing by active parameters."""

from __future__ import annotations

import pandas as pd
import pytest

from effllm.analysis.claims import (
    BEYOND, CLAIMS, FAILS, HOLDS, ONE_SEED, TIED, UNMEASURABLE, WITHIN, check_claims,
    claims_markdown, moe_vs_dense, verdict_text, write_claims,
)

NAN = float("nan")
NO_RAPL = "no NVML energy counter and no readable RAPL on this machine"


def _run(stage, block, group, technique, seed, **metrics):
    row = {"stage": stage, "block": block, "group": group, "technique": technique,
           "label": technique.upper() if stage == "pretrain" else technique,
           "model_size": "tiny", "seed": seed}
    for m, value in metrics.items():
        row[m] = value
        row[f"{m}__status"] = "unavailable" if pd.isna(value) else "measured"
        row[f"{m}__unit"] = {"amu": "GB", "al": "s", "aec": "W"}.get(m, "1")
        row[f"{m}__note"] = NO_RAPL if pd.isna(value) else ""
    return row


@pytest.fixture
def table():
    rows = []
    attention = {  # technique: (amu, perplexity, al) per seed
        "mha": [(0.5, 15.0, 0.1), (0.5, 15.0, 0.1)],
        "mqa": [(1.0, 13.0, 0.2), (1.1, 13.0, 0.2)],
        "gqa": [(1.5, 11.0, 0.1), (1.6, 11.5, 0.1)],
        "mla": [(2.0, 10.0, 0.25), (2.1, 12.0, 0.25)],
        "nsa": [(1.8, 14.0, 0.3), (1.9, 14.0, 0.3)],
    }
    for technique, seeds in attention.items():
        for seed, (amu, ppl, al) in enumerate(seeds):
            rows.append(_run("pretrain", "attention", "attention-tiny", technique, seed, amu=amu,
                             perplexity=ppl, al=al, aec=NAN))
    for technique, ppl in (("rope", 8.0), ("relative", 8.0), ("sinusoidal", 9.0), ("none", 10.0)):
        rows.append(_run("pretrain", "position", "position-tiny", technique, 0, perplexity=ppl))
    for precision, amu, perf, nominal, measured in (("bf16", 2.0, 0.50, 1.0, 1.0),
                                                      ("int4", 1.5, 0.40, 3.2, 1.6)):
        rows.append(_run("inference", "inference", "finetune/lora-gqa-tiny-s0", precision, 0,
                         amu=amu, performance=perf, mcr_nominal=nominal, mcr_measured=measured,
                         aec=NAN))
    for method, al, score in (("lora", 0.04, 0.6), ("rslora", 0.05, 0.7), ("freeze", 0.02, 0.9),
                              ("dora", 0.06, 0.3)):
        rows.append(_run("finetune", "finetune", "gqa-tiny", method, 0, al=al,
                         efficiency_score=score, params_total=1.0e6))
    return pd.DataFrame(rows)


def _one(result, key):
    rows = result[result["claim"] == key]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_verdicts_by_hand(table):
    result = check_claims(table)
    assert set(result["claim"]) == {c.key for c in CLAIMS}

    mqa = _one(result, "mqa_lowest_amu")  # MHA (0.5 GB) is not one of the paper's four
    assert (mqa["verdict"], mqa["margin"]) == (HOLDS, BEYOND)
    assert mqa["subject_value"] == pytest.approx(1.05) and mqa["rival"] == "GQA"
    assert mqa["rival_value"] == pytest.approx(1.55) and mqa["seeds"] == 2
    assert "MHA" not in mqa["compared"] and "MQA 1.05 GB" in mqa["values"]
    assert "MQA 1.00\u20131.10 (n=2)" in mqa["spread"]

    mla = _one(result, "mla_lowest_ppl")  # 11.0 vs GQA 11.25, but 10-12 overlaps 11-11.5
    assert (mla["verdict"], mla["margin"]) == (HOLDS, WITHIN)
    assert verdict_text(mla) == "holds (within seed spread)"

    al = _one(result, "mqa_lowest_al")  # GQA is faster, at every seed
    assert (al["verdict"], al["margin"], al["rival"]) == (FAILS, BEYOND, "GQA")
    assert _one(result, "nsa_highest_al")["verdict"] == HOLDS

    aec = _one(result, "nsa_lowest_aec")  # unavailable on this machine: no verdict, the reason
    assert aec["verdict"] == UNMEASURABLE and NO_RAPL in aec["reason"]
    assert pd.isna(aec["subject_value"]) and "n/a" in aec["values"]


def test_ties_one_seed_and_missing_parts(table):
    result = check_claims(table)
    rope = _one(result, "rope_lowest_ppl")  # tied with relative: a shared first rank
    assert (rope["verdict"], rope["margin"]) == (HOLDS, TIED)
    none = _one(result, "none_highest_ppl")
    assert (none["verdict"], none["margin"]) == (HOLDS, ONE_SEED)
    moe = _one(result, "moe_higher_amu")
    assert moe["verdict"] == UNMEASURABLE and "'moe' not in this configuration" in moe["reason"]
    fp16 = _one(result, "bf16_aec_le_fp16")
    assert fp16["verdict"] == UNMEASURABLE and "fp16 not in this group" in fp16["reason"]


def test_inference_claims(table):
    result = check_claims(table)
    assert _one(result, "int4_lower_amu")["verdict"] == HOLDS
    drop = _one(result, "int4_small_drop")  # 0.10 > 0.05
    assert drop["verdict"] == FAILS and "0.100" in drop["reason"]
    mcr = _one(result, "int4_mcr_4x")  # measured bytes give half the nominal compression
    assert mcr["verdict"] == FAILS and "0.500" in mcr["reason"]
    assert mcr["subject_value"] == pytest.approx(1.6) and mcr["rival_value"] == pytest.approx(3.2)


def test_finetune_claims_and_size_scope(table):
    result = check_claims(table)
    assert _one(result, "freeze_lowest_al")["verdict"] == HOLDS
    assert _one(result, "dora_highest_al")["verdict"] == HOLDS
    below = _one(result, "rslora_below_14b")  # a 1M base: RSLoRA 0.7 > LoRA 0.6
    assert below["verdict"] == FAILS and below["group"] == "gqa-tiny"
    scope = _one(result, "rslora_from_14b")  # no base of 14B or more: out of scope
    assert scope["verdict"] == UNMEASURABLE and "14B" in scope["reason"]
    assert not check_claims(table[table["block"] != "finetune"]).query(
        "claim == 'freeze_lowest_al'")["reason"].str.contains("14B").any()


def test_moe_pairs_by_active_parameters():
    rows = pd.DataFrame({
        "technique": ["dense", "dense-2x", "moe-8x", "moe-8x-third"],
        "params_total": [1.0e6, 2.3e6, 5.2e6, 2.2e6], "params_active": [1.0e6, 2.3e6, 2.2e6, 1.1e6]})
    assert moe_vs_dense(rows) == [("moe-8x", "dense-2x"), ("moe-8x-third", "dense")]


def test_write_claims_files(table, tmp_path):
    path = tmp_path / "normalised.csv"
    table.to_csv(path, index=False)
    out = write_claims(path, tmp_path / "claims.md", tmp_path / "claims.csv")
    back = pd.read_csv(tmp_path / "claims.csv")
    assert len(back) == len(out) == len(CLAIMS)
    md = (tmp_path / "claims.md").read_text()
    assert md == claims_markdown(out)
    assert "| mla_lowest_ppl | attention-tiny |" in md and "holds (within seed spread)" in md
    assert md.count(UNMEASURABLE) >= 3
