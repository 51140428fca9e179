"""The claims check on hand-built tables: the verdict rule (d against two Welch standard
errors) giving each of its verdicts, one seed (inconclusive unless the metric is exact), the
claims not measurable here, the new claims (MoE FLOPs at equal quality, relative PE most
efficient, LoRA+ lowest loss at the smallest base, Full worst at the largest, no single best
technique) each holding and not holding, and the pooling of an inference model's seeds."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from effllm.analysis.claims import (
    CLAIMS,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    ONE_SEED,
    UNMEASURABLE,
    check_claims,
    claims_markdown,
    comparison_groups,
    judge,
    largest_base,
    moe_vs_dense,
    moe_vs_dense_quality,
    small_base,
    write_claims,
)

NAN = float("nan")
NO_RAPL = "no NVML energy counter and no readable RAPL on this machine"
STAGE = {"attention": "pretrain", "position": "pretrain", "moe": "pretrain",
         "attention_free": "pretrain", "finetune": "finetune", "inference": "inference"}


def _run(block, group, technique, seed, **metrics):
    stage = STAGE[block]
    row = {"stage": stage, "block": block, "group": group, "technique": technique,
           "label": technique.upper() if stage == "pretrain" else technique,
           "model_size": "tiny", "seed": seed}
    for m, value in metrics.items():
        row[m] = value
        row[f"{m}__status"] = "unavailable" if pd.isna(value) else "measured"
        row[f"{m}__unit"] = {"amu": "GB", "al": "s", "aec": "W"}.get(m, "1")
        row[f"{m}__note"] = NO_RAPL if pd.isna(value) else ""
    return row


def _one(result, key, group=None):
    rows = result[result["claim"] == key]
    if group is not None:
        rows = rows[rows["group"] == group]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def _sd(values):
    return pd.Series(values).std(ddof=1)


@pytest.fixture
def table():
    """Attention over three seeds, position over one, fine-tuning of one base over three, and
    inference of one served model over two seeds (two table groups, one served config)."""
    rows = []
    attention = {  # technique: (amu, perplexity, al) per seed
        "mha": [(0.5, 15.0, 0.1), (0.5, 15.0, 0.1), (0.5, 15.0, 0.1)],
        "mqa": [(1.0, 13.0, 0.20), (1.1, 13.0, 0.21), (1.2, 13.0, 0.22)],
        "gqa": [(1.5, 11.0, 0.10), (1.6, 11.5, 0.11), (1.7, 11.25, 0.12)],
        "mla": [(2.0, 10.0, 0.25), (2.1, 12.0, 0.26), (2.2, 11.0, 0.27)],
        "nsa": [(1.8, 14.0, 0.30), (1.9, 14.0, 0.31), (2.0, 14.0, 0.32)],
    }
    for technique, seeds in attention.items():
        for seed, (amu, ppl, al) in enumerate(seeds):
            rows.append(_run("attention", "attention-tiny", technique, seed, amu=amu,
                             perplexity=ppl, al=al, aec=NAN))
    for technique, ppl in (("rope", 8.0), ("relative", 8.5), ("sinusoidal", 9.0), ("none", 10.0)):
        rows.append(_run("position", "position-tiny", technique, 0, perplexity=ppl))
    for seed in (0, 1):
        for precision, amu, perf, nominal, measured in (
                ("bf16", 2.0 + 0.01 * seed, 0.50, 1.0, 1.0),
                ("int4", 1.5 + 0.01 * seed, 0.40 + 0.01 * seed, 3.2, 1.6)):
            rows.append(_run("inference", f"finetune/lora-gqa-tiny-s{seed}", precision, seed,
                             amu=amu, performance=perf, mcr_nominal=nominal,
                             mcr_measured=measured, aec=NAN))
    for method, als, score in (("lora", (0.040, 0.041, 0.042), 0.6),
                               ("rslora", (0.050, 0.051, 0.052), 0.7),
                               ("freeze", (0.020, 0.021, 0.022), 0.9),
                               ("dora", (0.060, 0.061, 0.062), 0.3)):
        for seed, al in enumerate(als):
            rows.append(_run("finetune", "gqa-tiny", method, seed, al=al,
                             efficiency_score=score + 0.01 * seed, params_total=1.0e6))
    return pd.DataFrame(rows)


def test_the_rule():
    assert judge(0.3, 0.1) == HOLDS and judge(-0.3, 0.1) == FAILS
    assert judge(0.2, 0.1) == INCONCLUSIVE and judge(-0.15, 0.1) == INCONCLUSIVE  # not beyond
    assert judge(0.0, 0.0) == INCONCLUSIVE  # an exact tie decides nothing
    assert judge(1e-6, 0.0) == HOLDS and judge(-1e-6, 0.0) == FAILS  # exact: any difference
    assert judge(5.0, None) == ONE_SEED  # no spread, whatever the difference


def test_three_verdicts_from_the_seed_spread(table):
    result = check_claims(table)
    assert set(result["claim"]) == {c.key for c in CLAIMS}

    mqa = _one(result, "mqa_lowest_amu")  # MHA (0.5 GB) is not one of the paper's four
    se = math.sqrt(2 * 0.1 ** 2 / 3)  # Welch: sd 0.1 on both sides, three seeds each
    assert mqa["verdict"] == HOLDS and mqa["rival"] == "GQA"
    assert mqa["difference"] == pytest.approx(0.5) and mqa["std_error"] == pytest.approx(se)
    assert mqa["subject_value"] == pytest.approx(1.1) and mqa["seeds"] == 3
    assert "MHA" not in mqa["compared"] and "MQA 1.10 GB" in mqa["values"]
    assert "MQA sd 0.100 (n=3)" in mqa["spread"]

    # 11.0 vs GQA 11.25: d = 0.25, SE = sqrt(1/3 + 0.0625/3) = 0.61, not two of them
    mla = _one(result, "mla_lowest_ppl")
    assert mla["verdict"] == INCONCLUSIVE and mla["rival"] == "GQA"
    assert mla["difference"] == pytest.approx(0.25)
    assert mla["std_error"] == pytest.approx(math.sqrt((1.0 + _sd([11, 11.5, 11.25]) ** 2) / 3))

    estimated = table.assign(al__status=table["al__status"].where(
        table["technique"] != "nsa", "estimated"))  # e.g. a CPU-time estimate: said so
    assert "estimated, not measured: NSA" in _one(check_claims(estimated), "nsa_highest_al")[
        "reason"]
    assert "estimated" not in _one(result, "nsa_highest_al")["reason"]

    al = _one(result, "mqa_lowest_al")  # GQA beats MQA by 0.1 s at SE 0.008: decided
    assert (al["verdict"], al["rival"]) == (FAILS, "GQA")
    assert al["difference"] == pytest.approx(-0.1)
    assert _one(result, "nsa_highest_al")["verdict"] == HOLDS

    aec = _one(result, "nsa_lowest_aec")  # unavailable on this machine: no verdict, the reason
    assert aec["verdict"] == UNMEASURABLE and NO_RAPL in aec["reason"]
    assert pd.isna(aec["subject_value"]) and "n/a" in aec["values"]


def test_one_seed_and_missing_parts(table):
    result = check_claims(table)
    rope = _one(result, "rope_lowest_ppl")  # first by 0.5, but one seed: spread unknown
    assert rope["verdict"] == ONE_SEED and pd.isna(rope["std_error"])
    assert rope["difference"] == pytest.approx(0.5)
    assert _one(result, "none_highest_ppl")["verdict"] == ONE_SEED
    moe = _one(result, "moe_higher_amu")
    assert moe["verdict"] == UNMEASURABLE and "'moe' not in this configuration" in moe["reason"]
    fp16 = _one(result, "bf16_aec_le_fp16")
    assert fp16["verdict"] == UNMEASURABLE and "fp16 not in this group" in fp16["reason"]


def test_inference_pools_the_seeds_of_a_served_model(table):
    result = check_claims(table)
    amu = _one(result, "int4_lower_amu")  # one comparison group for the two seeds
    assert amu["group"] == "finetune/lora-gqa-tiny" and amu["seeds"] == 2
    assert amu["verdict"] == HOLDS and amu["difference"] == pytest.approx(0.5)
    drop = _one(result, "int4_small_drop")  # 0.095 > 0.05 at SE 0.005: beyond the bound
    assert drop["verdict"] == FAILS and drop["difference"] == pytest.approx(0.05 - 0.095)
    mcr = _one(result, "int4_mcr_4x")  # measured bytes give half the nominal compression
    assert mcr["verdict"] == FAILS and "0.500" in mcr["reason"] and mcr["std_error"] == 0
    assert mcr["subject_value"] == pytest.approx(1.6) and mcr["rival_value"] == pytest.approx(3.2)
    groups = comparison_groups(table[table["stage"] == "inference"])
    assert set(groups) == {"finetune/lora-gqa-tiny"}
    hub = pd.DataFrame({"stage": ["inference"], "group": ["hub/qwen-s1x"], "seed": [1]})
    assert list(comparison_groups(hub)) == ["hub/qwen-s1x"]  # only its own seed's suffix goes


def test_finetune_claims_and_size_scope(table):
    result = check_claims(table)
    assert _one(result, "freeze_lowest_al")["verdict"] == HOLDS
    assert _one(result, "dora_highest_al")["verdict"] == HOLDS
    below = _one(result, "rslora_below_14b")  # a 1M base: RSLoRA 0.71 > LoRA 0.61 at SE 0.008
    assert below["verdict"] == FAILS and below["group"] == "gqa-tiny"
    scope = _one(result, "rslora_from_14b")  # no base of 14B or more: out of scope
    assert scope["verdict"] == UNMEASURABLE and "14B" in scope["reason"]
    assert not check_claims(table[table["block"] != "finetune"]).query(
        "claim == 'freeze_lowest_al'")["reason"].str.contains("14B").any()


def test_moe_pairs_by_active_parameters_and_by_quality():
    rows = pd.DataFrame({
        "technique": ["dense", "dense-2x", "moe-8x", "moe-8x-third"],
        "params_total": [1.0e6, 2.3e6, 5.2e6, 2.2e6], "params_active": [1.0e6, 2.3e6, 2.2e6, 1.1e6],
        "perplexity": [10.0, 8.0, 8.3, 8.9]})  # 8.9: closer to 8 than to 10
    assert moe_vs_dense(rows) == [("moe-8x", "dense-2x"), ("moe-8x-third", "dense")]
    assert moe_vs_dense_quality(rows) == [("moe-8x", "dense-2x"), ("moe-8x-third", "dense-2x")]


def _moe(flops_moe):
    """Dense S (PPL 10), dense 2S (PPL 8) and an MoE of PPL 8.2: its equal-quality partner is
    the dense 2S. FLOPs per token are exact (counted), so one seed decides."""
    return pd.DataFrame([
        _run("moe", "moe-tiny", t, 0, perplexity=ppl, flops_per_token=f, params_total=total,
             params_active=active)
        for t, ppl, f, total, active in (("dense", 10.0, 1.0e6, 1e6, 1e6),
                                         ("dense-2x", 8.0, 2.0e6, 2e6, 2e6),
                                         ("moe-8x", 8.2, flops_moe, 5e6, 1.5e6))])


@pytest.mark.parametrize("flops, verdict", [(1.4e6, HOLDS), (2.6e6, FAILS)])
def test_moe_fewer_flops_at_equal_quality(flops, verdict):
    row = _one(check_claims(_moe(flops)), "moe_fewer_flops")
    assert (row["verdict"], row["rival"], row["std_error"]) == (verdict, "DENSE-2X", 0.0)
    assert row["difference"] == pytest.approx(2.0e6 - flops) and "(exact)" in row["spread"]


@pytest.mark.parametrize("best, verdict", [("relative", HOLDS), ("rope", FAILS)])
def test_relative_most_efficient(best, verdict):
    rows = [_run("position", "position-small", t, seed,  # ALiBi 0.8 is no rival: not the paper's
                 efficiency_score=(0.9 if t == best else 0.5 + 0.1 * k) + 0.01 * seed)
            for k, t in enumerate(("rope", "sinusoidal", "relative", "alibi"))
            for seed in range(3)]
    row = _one(check_claims(pd.DataFrame(rows)), "relative_most_efficient")
    assert row["verdict"] == verdict and "ALIBI" not in row["compared"]  # not the paper's
    assert row["difference"] == pytest.approx(0.3 if best == "relative" else -0.2)


def _finetune(losses_small, losses_large):
    """Two bases (1M and 4M parameters), three seeds, val_loss per method."""
    rows = []
    for base, params, losses in (("gqa-small", 1e6, losses_small),
                                 ("gqa-medium", 4e6, losses_large)):
        for method, loss in losses.items():
            for seed in range(3):
                rows.append(_run("finetune", base, method, seed, val_loss=loss + 0.01 * seed,
                                 params_total=params))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("lora_plus, verdict", [(1.0, HOLDS), (1.6, FAILS)])
def test_lora_plus_lowest_loss_at_the_smallest_base(lora_plus, verdict):
    table = _finetune({"lora": 1.5, "lora_plus": lora_plus, "freeze": 1.4, "full": 2.0},
                      {"lora": 1.5, "lora_plus": 3.0, "freeze": 1.4, "full": 2.0})
    row = _one(check_claims(table), "lora_plus_lowest_loss_small")  # the 4M base is out
    assert row["group"] == "gqa-small" and row["verdict"] == verdict
    assert row["rival"] == "freeze" and row["difference"] == pytest.approx(1.4 - lora_plus)


@pytest.mark.parametrize("full, verdict", [(2.0, HOLDS), (1.0, FAILS)])
def test_full_worst_at_the_largest_base(full, verdict):
    table = _finetune({"lora": 1.5, "freeze": 1.4, "full": 9.0},
                      {"lora": 1.5, "freeze": 1.4, "full": full})
    row = _one(check_claims(table), "full_worst_loss_largest")  # the 1M base is out
    assert row["group"] == "gqa-medium" and row["verdict"] == verdict


def test_base_size_scope_at_cpu_and_paper_scale():
    def bases(*sizes):
        return pd.DataFrame({"group": [f"b{i}" for i in range(len(sizes))],
                             "params_total": list(sizes)})

    cpu = bases(2e5, 1e6, 4e6)  # CPU scale: by size order
    assert [small_base(cpu[cpu.group == g], cpu) for g in cpu.group] == [True, False, False]
    assert [largest_base(cpu[cpu.group == g], cpu) for g in cpu.group] == [False, False, True]
    paper = bases(1.24e9, 3.21e9, 8.0e9)  # the paper's scale: "<= 3B" literally
    assert [small_base(paper[paper.group == g], paper) for g in paper.group] == [True, True,
                                                                                 False]


def _tradeoff(values, seeds=3):
    """Two fine-tuning methods with (val_loss, al) given per method; seeds add a small spread."""
    return pd.DataFrame([
        _run("finetune", "gqa-small", method, seed, val_loss=loss + 0.01 * seed,
             al=al + 0.001 * seed, amu=NAN)
        for method, (loss, al) in values.items() for seed in range(seeds)])


@pytest.mark.parametrize("values, seeds, verdict", [
    ({"lora": (1.0, 0.05), "freeze": (1.5, 0.02)}, 3, HOLDS),  # each best on one metric
    ({"lora": (1.0, 0.02), "freeze": (1.5, 0.05)}, 3, FAILS),  # LoRA best on both
    ({"lora": (1.0, 0.05), "freeze": (1.005, 0.0505)}, 3, INCONCLUSIVE),  # within the spread
    ({"lora": (1.0, 0.05), "freeze": (1.5, 0.02)}, 1, ONE_SEED),
])
def test_no_single_technique_best_on_every_metric(values, seeds, verdict):
    row = _one(check_claims(_tradeoff(values, seeds)), "no_single_best")
    assert row["verdict"] == verdict and row["metric"] == "val_loss, al"  # AMU: no values
    assert "not every technique has" in row["reason"] and "AMU" in row["reason"]
    if verdict == FAILS:
        assert row["subject"] == "lora" and row["difference"] < 0


def test_write_claims_files(table, tmp_path):
    path = tmp_path / "normalised.csv"
    table.to_csv(path, index=False)
    out = write_claims(path, tmp_path / "claims.md", tmp_path / "claims.csv")
    back = pd.read_csv(tmp_path / "claims.csv")
    assert len(back) == len(out) and set(back["claim"]) == {c.key for c in CLAIMS}
    assert {"difference", "std_error"} <= set(back.columns) and "margin" not in back
    md = (tmp_path / "claims.md").read_text()
    assert md == claims_markdown(out)
    assert "| mla_lowest_ppl | attention-tiny |" in md and "two standard errors" not in md
    assert "0.250 (SE 0.595, 0.420 SE)" in md  # d and its standard error, in the details
    assert "d* > 2 SE" in md and md.count(UNMEASURABLE) >= 3
