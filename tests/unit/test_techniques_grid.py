"""The techniques block (issue 22) from config to outputs: its runs and places in the grid, the
config's refusals (naming the key), the claims on hand-built normalised tables (holding, not
holding, one seed), the table and the figure drawn from a normalised table."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest

from effllm import outputs
from effllm.analysis.claims import FAILS, HOLDS, ONE_SEED, check_claims
from effllm.analysis.paper_tables import paper_table
from effllm.config import ConfigError, check_config
from effllm.plots.techniques import panels
from effllm.sweep import expand_runs
from invariants import assert_real_figure


VARIANTS = ("bf16", "int4", "hqq4", "ao-int8", "kv-fp8", "kv-hqq4", "draft", "lookup",
            "magnitude-2of4", "wanda-2of4", "structured-25")


def techniques(config: dict) -> dict:
    return {n: r for n, r in expand_runs(config)["inference"].items()
            if any(m.block == "techniques" for m in r.memberships)}


def test_each_variant_serves_the_pretrained_source(config, schema):
    runs = techniques(check_config(copy.deepcopy(config), schema))
    source = "gqa-small-s0"
    assert sorted(runs) == sorted(f"{v}-{source}" for v in VARIANTS)
    assert {r.upstream for r in runs.values()} == {f"pretrain/{source}"}
    assert all(len(r.memberships) == 1 for r in runs.values())  # the inference block serves
    nf4 = runs[f"int4-{source}"]                                  # fine-tuned models only
    assert (nf4.technique, nf4.label, nf4.spec.precision) == ("int4", "NF4 (bnb)", "int4")
    hqq = runs[f"hqq4-{source}"].spec
    assert hqq.precision == "bf16" and hqq.bits == 4 and hqq.weights.group_size == 64
    assert hqq.group == "techniques-gqa-small" and hqq.kv_cache is None
    assert runs[f"draft-{source}"].spec.speculative.draft == "pretrain/gqa-tiny-s0"
    assert runs[f"kv-hqq4-{source}"].spec.kv_cache.residual == 16
    wanda = runs[f"wanda-2of4-{source}"].spec
    assert (wanda.prune.method, wanda.prune.pattern, wanda.bits) == ("wanda", "2:4", 16)
    assert runs[f"structured-25-{source}"].spec.prune.groups == ("heads", "ffn")
    # a plain variant's params are the inference block's: the techniques' fields left out
    assert set(runs[f"bf16-{source}"].spec.to_json()["settings"]).isdisjoint(
        {"weights", "kv_cache", "speculative", "prune"})


def test_a_served_source_shares_its_plain_runs_with_the_inference_block(config, schema):
    config = copy.deepcopy(config)
    config["inference"]["techniques"]["source"] = "lora"
    runs = techniques(check_config(config, schema))
    source = "lora-gqa-small-s0"
    assert {r.upstream for r in runs.values()} == {f"finetune/{source}"}
    # bf16 and NF4 are the inference block's runs, with the techniques block as a second place
    both = runs[f"int4-{source}"].memberships
    assert [(m.block, m.technique, m.label) for m in both] == [
        ("inference", "int4", "int4"), ("techniques", "nf4", "NF4 (bnb)")]
    assert runs[f"hqq4-{source}"].spec.group == "techniques-lora-gqa-small"


def test_without_the_block_the_grid_is_the_papers(config, schema):
    on = expand_runs(check_config(copy.deepcopy(config), schema))["inference"]
    config = copy.deepcopy(config)
    config["inference"]["techniques"] = None
    off = expand_runs(check_config(config, schema))["inference"]
    assert set(on) - set(off) == {f"{v}-gqa-small-s0" for v in VARIANTS}
    assert all(on[n].spec == off[n].spec for n in off)  # nothing of the paper's reruns


def _variant(config: dict, index: int) -> dict:
    return config["inference"]["techniques"]["variants"][index]


@pytest.mark.parametrize("mutate, key, words", [
    (lambda c: c["inference"]["techniques"].update(source="qlora"), "source", "neither"),
    (lambda c: c["inference"]["techniques"].update(source="nsa-small"), "source",
     "left-padded"),
    (lambda c: _variant(c, 2)["weights"].update(method="torchao", bits=4), "variants.2.weights",
     "needs a CUDA GPU"),
    (lambda c: _variant(c, 2)["weights"].update(method="torchao", bits=2),
     "variants.2.weights.bits", "int4 and int8"),
    (lambda c: _variant(c, 2).update(precision="int4"), "variants.2.weights", "float model"),
    (lambda c: _variant(c, 4)["kv_cache"].update(bits=4), "variants.4.kv_cache", "per tensor"),
    (lambda c: _variant(c, 6)["speculative"].update(lookup=3), "variants.6.speculative",
     "exactly one"),
    (lambda c: _variant(c, 6)["speculative"].update(draft="gqa-huge"),
     "variants.6.speculative.draft", "not a pretraining run"),
    (lambda c: _variant(c, 6)["speculative"].update(draft="mamba-tiny"),
     "variants.6.speculative.draft", "not a decoder"),
    (lambda c: c["inference"].update(batch_size=2), "variants.6.speculative", "one sequence"),
    (lambda c: _variant(c, 3).update(name="hqq4"), "variants.3.name", "names two variants"),
    (lambda c: _variant(c, 6)["speculative"].update(draft="nsa-tiny"),
     "variants.6.speculative.draft", "not NSA"),
    (lambda c: c["inference"]["techniques"].update(source="mla-small"), "variants.4.kv_cache",
     "no plain key/value cache"),
    (lambda c: _variant(c, 7).update(kv_cache={"backend": "fp8"}), "variants.7'",
     "cannot be cropped"),
    (lambda c: _variant(c, 7)["speculative"].update(tokens=3), "variants.7.speculative.tokens",
     "prompt lookup"),
    (lambda c: _variant(c, 2).update(name="int4"), "variants.2.name", "a precision's name"),
    (lambda c: _variant(c, 9)["prune"].update(sparsity=0.5), "variants.9.prune", "exactly one"),
    (lambda c: _variant(c, 9)["prune"].update(pattern="2:6"), "variants.9.prune.pattern",
     "groups of 6"),
    (lambda c: _variant(c, 9)["prune"].update(pattern="3:2"), "variants.9.prune.pattern",
     "0 < n < m"),
    (lambda c: _variant(c, 9).update(precision="int4"), "variants.9.prune", "float model"),
    (lambda c: _variant(c, 9)["prune"].update(groups=["ffn"]), "variants.9.prune.groups",
     "single weights"),
    (lambda c: _variant(c, 10)["prune"].update(pattern="2:4"), "variants.10.prune",
     "not pattern"),
    (lambda c: c["inference"]["techniques"].update(source="mla-small", variants=[
        v for v in c["inference"]["techniques"]["variants"] if "kv_cache" not in v]),
     "variants.8.prune", "dense MHA/MQA/GQA"),
    (lambda c: c["inference"]["techniques"]["variants"].pop(0), "variants'",
     "no plain variant named bf16"),
])
def test_the_config_refuses_what_cannot_run(config, schema, mutate, key, words):
    config = copy.deepcopy(config)
    mutate(config)
    key = key if key.endswith("'") else f"{key}'"
    with pytest.raises(ConfigError, match=rf"'inference\.techniques\.{key}.*{words}"):
        check_config(config, schema)


def test_torchao_int4_is_accepted_with_a_gpu(config, schema):
    config = copy.deepcopy(config)
    _variant(config, 2)["weights"].update(method="torchao", bits=4)
    config["resources"]["inference"]["gpus"] = 1
    run = techniques(check_config(config, schema))["hqq4-gqa-small-s0"]
    assert run.spec.weights.method == "torchao" and run.spec.bits == 4


GROUP = "techniques-gqa-small"
LABELS = {"bf16": "bf16", "nf4": "NF4 (bnb)", "hqq4": "HQQ int4", "kv-fp8": "KV fp8",
          "draft": "Draft", "lookup": "Prompt lookup", "magnitude-2of4": "Magnitude 2:4",
          "wanda-2of4": "Wanda 2:4", "structured-25": "Structured 25%"}
# technique -> (perplexity, kv_perplexity, al, weight bytes, kv bytes/token, bits,
#               tokens/pass, identical output[, weight sparsity]), per seed
VALUES = {
    "bf16": [(40.0, 30.0, 0.30, 2.0e6, 256.0, 16, None, None),
             (40.4, 30.2, 0.31, 2.0e6, 256.0, 16, None, None)],
    "nf4": [(43.0, 32.0, 0.50, 0.9e6, 256.0, 4, None, None),
            (43.5, 32.2, 0.52, 0.9e6, 256.0, 4, None, None)],
    "hqq4": [(41.0, 31.0, 0.60, 0.8e6, 256.0, 4, None, None),
             (41.2, 31.1, 0.61, 0.8e6, 256.0, 4, None, None)],
    "kv-fp8": [(40.0, 30.3, 0.33, 2.0e6, 130.0, 16, None, None),
               (40.4, 30.4, 0.34, 2.0e6, 130.0, 16, None, None)],
    "draft": [(40.0, 30.0, 0.20, 2.0e6, 260.0, 16, 2.5, 1.0),
              (40.4, 30.2, 0.21, 2.0e6, 260.0, 16, 2.4, 1.0)],
    "lookup": [(40.0, 30.0, 0.28, 2.0e6, 260.0, 16, 1.3, 1.0),
               (40.4, 30.2, 0.29, 2.0e6, 260.0, 16, 1.2, 0.97)],
    "magnitude-2of4": [(48.0, 36.0, 0.30, 2.0e6, 256.0, 16, None, None, 0.5),
                       (48.6, 36.3, 0.31, 2.0e6, 256.0, 16, None, None, 0.5)],
    "wanda-2of4": [(44.0, 33.0, 0.30, 2.0e6, 256.0, 16, None, None, 0.5),
                   (44.3, 33.1, 0.31, 2.0e6, 256.0, 16, None, None, 0.5)],
    "structured-25": [(46.0, 34.0, 0.22, 1.6e6, 200.0, 16, None, None, 0.25),
                      (46.2, 34.4, 0.23, 1.6e6, 200.0, 16, None, None, 0.25)],
}
NAMES = ("perplexity", "kv_perplexity", "al", "weight_bytes", "kv_cache_bytes_per_token",
         "bits_nominal", "tokens_per_pass", "identical_output", "weight_sparsity")


def normalised(values=VALUES, seeds=(0, 1)) -> pd.DataFrame:
    rows = []
    for technique, per_seed in values.items():
        for seed in seeds:
            row = {"run_id": f"inference/{technique}-s{seed}", "stage": "inference",
                   "block": "techniques", "technique": technique, "label": LABELS[technique],
                   "group": GROUP, "model_size": "small", "seed": seed, "norm_floor": 0.1}
            for name, value in zip(NAMES, per_seed[seed]):
                if value is None:
                    continue
                row.update({name: value, f"{name}__status": "measured", f"{name}__unit": "1",
                            f"{name}__norm": 0.5})
            rows.append(row)
    return pd.DataFrame(rows)


def _claims(df: pd.DataFrame) -> dict[str, pd.Series]:
    table = check_claims(df)
    return {row["claim"]: row for _, row in table.iterrows() if row["block"] == "techniques"}


def test_the_techniques_claims_on_two_seeds():
    claims = _claims(normalised())
    assert claims["hqq4_beats_nf4"]["verdict"] == HOLDS
    assert claims["kv_fp8_less_kv"]["verdict"] == HOLDS  # exact: KV bytes are configuration
    # 30.35 vs 30.1: 0.8 % worse, within the 2 % bound of the reference
    kv = claims["kv_fp8_small_ppl_cost"]
    assert kv["verdict"] == HOLDS and "bound" in kv["reason"] and "x bf16" in kv["reason"]
    assert claims["speculative_faster"]["verdict"] == HOLDS
    assert claims["speculative_identical"]["verdict"] == HOLDS
    assert claims["wanda_beats_magnitude"]["verdict"] == HOLDS
    assert claims["structured_prune_faster"]["verdict"] == HOLDS


def test_the_techniques_claims_fail_when_reversed_and_wait_for_seeds():
    worse = copy.deepcopy(VALUES)
    worse["kv-fp8"] = [(40.0, 33.0, 0.33, 2.0e6, 130.0, 16, None, None),
                       (40.4, 33.2, 0.34, 2.0e6, 130.0, 16, None, None)]  # +10 %
    worse["draft"] = [(40.0, 30.0, 0.40, 2.0e6, 260.0, 16, 1.1, 0.9),
                      (40.4, 30.2, 0.41, 2.0e6, 260.0, 16, 1.1, 0.9)]
    claims = _claims(normalised(worse))
    assert claims["kv_fp8_small_ppl_cost"]["verdict"] == FAILS
    assert claims["speculative_faster"]["verdict"] == FAILS
    assert claims["speculative_identical"]["verdict"] == FAILS  # 0.9 < 0.99, exact per run
    one = _claims(normalised(seeds=(0,)))
    assert one["hqq4_beats_nf4"]["verdict"] == ONE_SEED
    assert one["kv_fp8_less_kv"]["verdict"] == HOLDS  # bytes need no spread
    assert one["speculative_identical"]["verdict"] == HOLDS


def test_panels_follow_what_the_runs_recorded():
    from effllm.analysis.seeds import seed_summary

    summary = seed_summary(normalised(), list(NAMES), by=("group", "technique", "label"))
    parts = {name: list(rows["technique"]) for name, rows in panels(summary).items()}
    assert parts == {"weights": ["bf16", "nf4", "hqq4"], "kv": ["bf16", "kv-fp8"],
                     "decoding": ["bf16", "draft", "lookup"],
                     "pruning": ["bf16", "magnitude-2of4", "wanda-2of4", "structured-25"]}


def test_the_figure_and_table_are_drawn_from_the_registry(tmp_path):
    csv = tmp_path / "normalised.csv"
    normalised().to_csv(csv, index=False)
    entry = outputs.FIGURES["fig_techniques"]
    out = tmp_path / "fig"
    out.mkdir()
    entry.load()(normalised_csv=csv, out_pdf=out / "f.pdf", out_png=out / "f.png",
                 **entry.kwargs({}))
    assert_real_figure(out / "f.pdf", out / "f.png", 1000)
    table = paper_table(normalised(), "table_techniques")
    assert list(table["variant"]) == list(LABELS.values())
    assert {"kv_perplexity", "tokens_per_pass", "identical_output"} <= set(table.columns)
    assert math.isnan(table.set_index("variant").loc["bf16", "tokens_per_pass"])
