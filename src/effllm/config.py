"""Load and check the pipeline config before any job runs.

Two passes, both naming the offending key: the JSON schema (types, ranges, known technique names)
and the checks a schema cannot express (a size whose width does not divide into its heads, a
fine-tuning base that is not pretrained, steps that do not cover warm-up). Snakemake's
``common.smk`` calls :func:`check_config`; so do the tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the dotted key at fault."""


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<config>"


def validate_schema(config: dict, schema_path: str | os.PathLike) -> None:
    import jsonschema

    schema = load_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), e.path))
    if errors:
        # best_match picks the most relevant error of an anyOf/allOf tree.
        err = jsonschema.exceptions.best_match(errors)
        raise ConfigError(f"config key '{_key(err.absolute_path)}': {err.message}")


def check_semantics(config: dict) -> None:
    """What the schema cannot say, checked in order; the first problem is raised, naming its
    key. Fills in empty int4/int8 blocks for the precisions served."""
    _check_sizes_and_steps(config)
    _check_pruning(config)
    _check_distillation(config)
    known = _pretrained_bases(config)
    _check_bases(config, known)
    _check_serving(config, known)
    _check_techniques(config, known)
    _check_lengths(config)
    _check_methods(config, known)
    _check_finetune_sets(config)
    _check_tuning(config)
    _check_analysis_and_split(config)
    for precision in config["inference"]["precisions"]:
        if precision in ("int4", "int8") and precision not in config["inference"]:
            config["inference"][precision] = {}


def _check_sizes_and_steps(config: dict) -> None:
    for name, size in config["sizes"].items():
        key = f"sizes.{name}"
        if size["hidden_size"] % size["num_heads"]:
            raise ConfigError(
                f"config key '{key}.hidden_size': {size['hidden_size']} does not divide into "
                f"num_heads {size['num_heads']}"
            )
    pre = config["pretrain"]
    _check_pretrain_variants(config)
    if pre["warmup_steps"] >= pre["steps"]:
        raise ConfigError(f"config key 'pretrain.warmup_steps': {pre['warmup_steps']} must be "
                          f"below pretrain.steps {pre['steps']}")
    if pre["steps"] <= config["measure"]["warmup_steps"]:
        raise ConfigError(f"config key 'measure.warmup_steps': {config['measure']['warmup_steps']}"
                          f" leaves no timed step of pretrain.steps {pre['steps']}")


def _check_pruning(config: dict) -> None:
    """The pruning block's source is a decoder of this grid that the routes can prune, its
    target is below it, and the baselines can be built."""
    from effllm.sweep import PRUNING_DEFAULTS, pretrain_variants, pruning_settings, variant_model

    block = pruning_settings(config)
    if not block:
        return
    key = "pretrain.blocks.pruning"
    sources = {f"{name}-{variant.get('size', size)}": (variant, variant.get("size", size))
               for _, name, size, variant in pretrain_variants(config)}
    if block["every"] > block["prune_steps"]:
        raise ConfigError(f"config key '{key}.every': {block['every']} is more than prune_steps "
                          f"{block['prune_steps']}: no pruning event would run before the end")
    timed = config["measure"]["warmup_steps"] + 1  # the warm-up, and the tensor-tracked step
    if block["continue_steps"] <= timed:
        raise ConfigError(f"config key '{key}.continue_steps': {block['continue_steps']} leaves "
                          f"no timed step after the slice (measure.warmup_steps "
                          f"{config['measure']['warmup_steps']} and one tracked step)")
    if not isinstance(block["target_params"], str) and "scratch" in block["baselines"]:
        raise ConfigError(f"config key '{key}.baselines': the scratch baseline needs a uniform "
                          f"shape: give target_params as a size name, or drop scratch")
    # A grid run wins a name clash with a hub model (refused below, by _check_bases).
    if block["source"] in (config.get("hub_models") or {}) and block["source"] not in sources:
        _check_hub_source(config, block, key)
        return
    if block["source"] not in sources:
        raise ConfigError(f"config key '{key}.source': {block['source']!r} is not a pretraining "
                          f"run of this grid (<variant>-<size>): {sorted(sources)}")
    variant, size = sources[block["source"]]
    m = variant_model(config, variant)
    if m["family"] != "decoder" or m["attention"] not in ("mha", "mqa", "gqa") or \
            m["moe"]["num_experts"]:
        raise ConfigError(f"config key '{key}.source': {block['source']!r} is not a dense "
                          f"MHA/MQA/GQA decoder; only those are pruned (heads, FFN, hidden)")
    _check_groups(f"config key '{key}.groups'", block.get("groups", PRUNING_DEFAULTS["groups"]),
                  m["position_encoding"])
    target = block["target_params"]
    if isinstance(target, str):
        if target not in config["sizes"]:
            raise ConfigError(f"config key '{key}.target_params': unknown size {target!r}; "
                              f"defined sizes: {sorted(config['sizes'])}")
        counts = {name: _uniform_params(config, m, name) for name in (target, size)}
        if counts[target] >= counts[size]:
            raise ConfigError(f"config key '{key}.target_params': size {target!r} "
                              f"(~{counts[target]:,} parameters) is not smaller than the "
                              f"source's size {size!r} (~{counts[size]:,})")


def _check_groups(key: str, groups, position_encoding: str) -> None:
    """Structured pruning's groups against the positions (the pruning block and the techniques
    block's structured variants): head groups not under a per-head score bias, hidden
    dimensions not under a fixed sinusoidal table."""
    if "heads" in groups and position_encoding in ("relative", "alibi"):
        raise ConfigError(f"{key}: heads cannot be pruned under position_encoding "
                          f"{position_encoding!r} (a score bias per head index)")
    if "hidden" in groups and position_encoding == "sinusoidal":
        raise ConfigError(f"{key}: hidden cannot be pruned under sinusoidal positions (a fixed "
                          "table of the full width)")


def _check_distillation(config: dict) -> None:
    """The distillation block's teacher is a run of this grid and its student a smaller size
    of the teacher's variant."""
    from effllm.sweep import DISTILL_BLOCK, pretrain_variants, variant_model

    block = config["pretrain"]["blocks"].get(DISTILL_BLOCK)
    if not block:
        return
    key = f"pretrain.blocks.{DISTILL_BLOCK}"
    teachers = {f"{name}-{variant.get('size', size)}": (variant, variant.get("size", size))
                for _, name, size, variant in pretrain_variants(config)}
    if block["teacher"] not in teachers:
        raise ConfigError(f"config key '{key}.teacher': {block['teacher']!r} is not a "
                          f"pretraining run of this grid (<variant>-<size>): {sorted(teachers)}"
                          " (a hub teacher would need the corpus in its tokens)")
    variant, size = teachers[block["teacher"]]
    student = block["student"]
    if student not in config["sizes"]:
        raise ConfigError(f"config key '{key}.student': unknown size {student!r}; defined "
                          f"sizes: {sorted(config['sizes'])}")
    m = variant_model(config, variant)
    if m["family"] == "decoder":
        counts = {name: _uniform_params(config, m, name) for name in (student, size)}
        if counts[student] >= counts[size]:
            raise ConfigError(f"config key '{key}.student': size {student!r} (~"
                              f"{counts[student]:,} parameters) is not smaller than the "
                              f"teacher's {size!r} (~{counts[size]:,})")
    elif config["sizes"][student]["hidden_size"] >= config["sizes"][size]["hidden_size"]:
        raise ConfigError(f"config key '{key}.student': size {student!r} is not narrower than "
                          f"the teacher's {size!r}")


def _check_hub_source(config: dict, block: dict, key: str) -> None:
    """A hub source is cached, reads the corpus in its own tokens, and maps onto our decoder
    (checked on its config.json; the weights are converted when the run starts)."""
    from effllm.data import DataSourceError
    from effllm.specs import decoder_mismatch
    from effllm.sweep import hub_fields

    name = block["source"]
    tokenizer = config["data"]["tokenizer"].get("hub")
    if tokenizer not in (name, config["hub_models"][name]["repo_id"]):
        raise ConfigError(f"config key 'data.tokenizer.hub': {tokenizer!r}; pruning the hub "
                          f"model {name!r} ({key}.source) trains it on the corpus in its own "
                          f"tokens: set data.tokenizer.hub to {name!r}")
    try:
        fields, _ = hub_fields(config, name)
    except DataSourceError as err:
        raise ConfigError(f"config key '{key}.source': {err}") from None
    why = decoder_mismatch(fields)
    if why:
        raise ConfigError(f"config key '{key}.source': {name!r} is not a plain Llama-"
                          f"architecture decoder, the one hub architecture the pruning maps "
                          f"onto ours: {'; '.join(why)}")
    if isinstance(block["target_params"], str) and block["target_params"] not in config["sizes"]:
        raise ConfigError(f"config key '{key}.target_params': unknown size "
                          f"{block['target_params']!r}; defined sizes: {sorted(config['sizes'])}")


def _uniform_params(config: dict, model: dict, size: str) -> int:
    """About the parameters of the decoder ``model`` (a resolved variant) at ``size``, with the
    configured vocabulary (the trained tokenizer adds a few special tokens)."""
    from effllm.specs import decoder_params

    shape = config["sizes"][size]
    heads, layers = shape["num_heads"], shape["num_layers"]
    kv = {"mha": heads, "mqa": 1}.get(model["attention"], model["kv_heads"])
    learned = model["position_encoding"] == "learned"
    return decoder_params(config["data"]["tokenizer"]["vocab_size"], shape["hidden_size"],
                          shape["hidden_size"] // heads, [heads] * layers, [kv] * layers,
                          [shape["intermediate_size"]] * layers,
                          positions=model["max_position_embeddings"] if learned else 0)


def _pretrained_bases(config: dict) -> dict:
    """Pretraining runs by base name (``<variant>-<size>``), from the sweep."""
    from effllm.sweep import expand_runs

    try:
        return {run.name.rsplit("-s", 1)[0]: run
                for run in expand_runs({**config, "finetune": {**config["finetune"], "bases": []}}
                                       )["pretrain"].values()}
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_bases(config: dict, known: dict) -> None:
    """Every fine-tuning base is a hub model or one of our decoders that can be fine-tuned."""
    hub = config.get("hub_models") or {}
    for name in hub:
        if name in known:
            raise ConfigError(f"config key 'hub_models.{name}': the name is also a pretraining "
                              "run; rename the hub model")
    for i, base in enumerate(config["finetune"]["bases"]):
        if base in hub:
            continue  # its shape is known only once it is read from the cache (run time)
        if base not in known:
            raise ConfigError(f"config key 'finetune.bases.{i}': {base!r} is neither a "
                              f"pretraining run ({sorted(known)}) nor one of hub_models "
                              f"({sorted(hub)})")
        model = known[base].spec.model
        if model.family != "decoder":
            raise ConfigError(f"config key 'finetune.bases.{i}': {base!r} is a "
                              f"{model.family} baseline; fine-tuning takes decoder models")
        if model.attention == "nsa":
            raise ConfigError(f"config key 'finetune.bases.{i}': {base!r} is an NSA model; "
                              "exact match decodes left-padded batches, which NSA refuses")


def _check_serving(config: dict, known: dict) -> None:
    """Something is served, every served hub model is declared, and every served pretraining
    run can decode the padded exact-match batches."""
    hub = config.get("hub_models") or {}
    inf = config["inference"]
    if not inf["sources"] and not inf.get("hub_models"):
        raise ConfigError("config key 'inference.sources': empty, and inference.hub_models names "
                          "no model either: nothing to serve")
    for i, name in enumerate(inf.get("hub_models") or []):
        if name not in hub:
            raise ConfigError(f"config key 'inference.hub_models.{i}': {name!r} is not one of "
                              f"hub_models ({sorted(hub)})")
    harness = inf.get("harness")
    if harness and harness.get("include_path") and not Path(harness["include_path"]).is_dir():
        raise ConfigError(f"config key 'inference.harness.include_path': "
                          f"{harness['include_path']} is not a folder of lm-eval task YAMLs")
    if "pretrain" in inf["sources"]:
        for run in known.values():
            if not decodes_padded(run.spec.model):
                raise ConfigError(
                    f"config key 'inference.sources': serving pretraining runs includes "
                    f"{run.name.rsplit('-s', 1)[0]!r}, which {PADDED}")


# Why a model cannot be served (its exact match decodes left-padded batches).
PADDED = ("cannot decode the left-padded batches of the exact-match evaluation (NSA refuses "
          "them, RWKV lets the padding into its state)")


def decodes_padded(model) -> bool:
    """Whether a model (its ModelShape) can decode left-padded batches: not NSA, not RWKV."""
    return model.attention != "nsa" and model.family != "rwkv"


PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")


def _check_techniques(config: dict, known: dict) -> None:
    """The techniques block serves a model the grid has, its bf16 reference is there, and each
    variant is a technique its library can run here (a speculative draft's tokenizer is
    compared with the served model's when the job starts)."""
    block = config["inference"].get("techniques")
    if not block:
        return
    from effllm.cluster import stage_settings

    key = "config key 'inference.techniques"
    inf, ft, hub = config["inference"], config["finetune"], config.get("hub_models") or {}
    source = block["source"]
    served_hub = source in (inf.get("hub_models") or [])
    tuned = source in ft["methods"] and ft["bases"]
    if not served_hub and not tuned and source not in known:
        raise ConfigError(f"{key}.source': {source!r} is neither a pretraining run "
                          f"({sorted(known)}), a fine-tuning method of finetune.methods "
                          f"({ft['methods']}, served from finetune.bases[0]) nor one of "
                          f"inference.hub_models ({inf.get('hub_models') or []})")
    gpus = stage_settings(config, "inference").gpus
    base = None if served_hub else known.get(ft["bases"][0] if tuned else source)
    if base is not None and not decodes_padded(base.spec.model):
        raise ConfigError(f"{key}.source': {source!r} {PADDED}")
    names = [v["name"] for v in block["variants"]]
    from effllm.sweep import TECHNIQUE_KEYS

    plain = [v for v in block["variants"] if not set(v) & set(TECHNIQUE_KEYS)]
    if not any(v["name"] == "bf16" and v.get("precision", "bf16") == "bf16" for v in plain):
        raise ConfigError(f"{key}.variants': no plain variant named bf16 ({{name: bf16}}): "
                          "the reference of the block's figure, MCR and claims")
    for i, variant in enumerate(block["variants"]):
        where = f"{key}.variants.{i}"
        if variant["name"] in names[:i]:
            raise ConfigError(f"{where}.name': {variant['name']!r} names two variants (the "
                              f"first: variants.{names.index(variant['name'])})")
        precision = variant.get("precision", "bf16")
        weights, kv, spec, prune = (variant.get(k) for k in TECHNIQUE_KEYS)
        if (weights or kv or spec or prune) and variant["name"] in PRECISIONS:
            raise ConfigError(f"{where}.name': {variant['name']!r} is a precision's name, which "
                              "its run would share with the inference block's; name the "
                              "technique")
        if kv and spec:
            raise ConfigError(f"{where}': a quantised KV cache cannot be cropped after rejected "
                              "speculative tokens (transformers' QuantizedCache); use two "
                              "variants")
        if weights:
            if precision not in ("fp32", "bf16", "fp16"):
                raise ConfigError(f"{where}.weights': weight-only quantisation applies to a "
                                  f"float model, not to precision {precision!r} (bitsandbytes)")
            if weights["method"] == "torchao" and weights["bits"] not in (4, 8):
                raise ConfigError(f"{where}.weights.bits': torchao's weight-only configs are "
                                  f"int4 and int8, not {weights['bits']} bits")
            if weights["method"] == "torchao" and weights["bits"] == 4 and not gpus:
                raise ConfigError(f"{where}.weights': torchao int4 weight-only needs a CUDA GPU "
                                  "(tinygemm's layout, sm80 or newer; no CPU kernel in torchao "
                                  "0.18) and resources.inference.gpus is 0; on a CPU use hqq "
                                  "at 4 bits")
        if prune:
            _check_prune(config, prune, f"{where}.prune", precision, bool(weights), served_hub,
                         base)
        if kv:
            if kv["backend"] == "fp8" and set(kv) - {"backend"}:
                raise ConfigError(f"{where}.kv_cache': the fp8 backend quantises per tensor; "
                                  f"{sorted(set(kv) - {'backend'})} apply to hqq only")
            if base is not None and (base.spec.model.family != "decoder"
                                     or base.spec.model.attention in ("mla", "nsa")):
                raise ConfigError(f"{where}.kv_cache': the served model "
                                  f"({ft['bases'][0]}) has no plain key/value cache to quantise")
        if spec is not None:
            if bool(spec.get("draft")) == bool(spec.get("lookup")):
                raise ConfigError(f"{where}.speculative': give exactly one of draft (a draft "
                                  "model) and lookup (prompt lookup)")
            if spec.get("lookup") and spec.get("tokens"):
                raise ConfigError(f"{where}.speculative.tokens': the draft's tokens per round; "
                                  "prompt lookup proposes up to lookup tokens")
            if inf["batch_size"] != 1:
                raise ConfigError(f"{where}.speculative': transformers decodes speculatively "
                                  f"one sequence at a time; inference.batch_size is "
                                  f"{inf['batch_size']}")
            draft = spec.get("draft")
            if draft and served_hub and draft not in hub:
                raise ConfigError(f"{where}.speculative.draft': the source is a hub model, so "
                                  f"the draft must be one of hub_models ({sorted(hub)}) sharing "
                                  "its tokenizer")
            if draft and not served_hub and draft not in known:
                raise ConfigError(f"{where}.speculative.draft': {draft!r} is not a pretraining "
                                  f"run of the grid ({sorted(known)})")
            if draft and not served_hub and (known[draft].spec.model.family != "decoder"
                                             or known[draft].spec.model.attention == "nsa"):
                raise ConfigError(f"{where}.speculative.draft': {draft!r} is not a decoder "
                                  "whose cache can be cropped after rejected tokens (not NSA)")


def _check_prune(config: dict, prune: dict, where: str, precision: str, quantised: bool,
                 served_hub: bool, base) -> None:
    """A post-training pruning variant: a float model, one of sparsity and pattern for the
    unstructured methods, and for structured pruning a dense decoder of ours."""
    from effllm.specs import nm_pattern

    if precision not in ("fp32", "bf16", "fp16") or quantised:
        raise ConfigError(f"{where}': pruning applies to a float model with no weight "
                          f"quantisation, not precision {precision!r}"
                          + (" with weights" if quantised else ""))
    method, pattern, sparsity = prune["method"], prune.get("pattern"), prune.get("sparsity")
    if method == "structured":
        if sparsity is None or pattern:
            raise ConfigError(f"{where}': structured pruning takes sparsity (the share of the "
                              "decoder layers' linear weights removed), not pattern")
        if served_hub or base is None:
            raise ConfigError(f"{where}': structured pruning needs a decoder of this grid, "
                              "not a hub model (saliency from a backward pass the GPU plan "
                              "does not book for hub models); use magnitude or wanda")
        m = base.spec.model if base is not None else None
        if m is not None and (m.family != "decoder" or m.attention not in ("mha", "mqa", "gqa")
                              or m.num_experts):
            raise ConfigError(f"{where}': structured pruning needs a dense MHA/MQA/GQA "
                              f"decoder, not {m.family} {m.attention}")
        _check_groups(f"{where}.groups'", prune.get("groups") or ["heads", "ffn"],
                      m.position_encoding if m is not None else "rope")
        return
    if prune.get("groups"):
        raise ConfigError(f"{where}.groups': groups are structured pruning's; {method} prunes "
                          "single weights")
    if (sparsity is None) == (pattern is None):
        raise ConfigError(f"{where}': give exactly one of sparsity (unstructured) and pattern "
                          f"(n:m) for {method}")
    if pattern:
        try:
            _, m_of = nm_pattern(pattern)
        except ValueError as err:
            raise ConfigError(f"{where}.pattern': {err}") from None
        shape = base.spec.model if base is not None else None
        widths = {"hidden_size": shape.hidden_size, "intermediate_size":
                  shape.intermediate_size} if shape is not None else {}
        for key, width in widths.items():
            if width and width % m_of:
                raise ConfigError(f"{where}.pattern': {pattern} needs every pruned layer's "
                                  f"inputs in groups of {m_of}; the served model's {key} is "
                                  f"{width}")


def _check_lengths(config: dict) -> None:
    """Every downstream length fits the positions the models are built with."""
    pre, inf = config["pretrain"], config["inference"]
    limit = pre["model"]["max_position_embeddings"]
    for what, length in (("pretrain.seq_len", pre["seq_len"]),
                         ("finetune.max_length", config["finetune"]["max_length"]),
                         ("inference.eval_max_length", inf["eval_max_length"]),
                         ("inference.prompt_tokens", inf["prompt_tokens"] + inf["new_tokens"])):
        if length > limit:
            raise ConfigError(f"config key 'pretrain.model.max_position_embeddings': {limit} "
                              f"positions cannot hold {what} ({length} tokens)")


def _check_methods(config: dict, known: dict) -> None:
    """Each method has its settings, and the per-method and per-base rates name real ones."""
    from effllm.training.methods import ADAPTER_METHODS

    ft = config["finetune"]
    for method in ft["methods"]:
        needs = ["lora"] if method in ADAPTER_METHODS else []
        needs += [method] if method in ("lora_plus", "freeze") else []
        for block in needs:
            if block not in ft:
                raise ConfigError(f"config key 'finetune.{block}': settings for method "
                                  f"{method!r} are missing")
        if method == "freeze":
            for base in (b for b in ft["bases"] if b in known):
                layers = known[base].spec.model.num_hidden_layers
                if ft["freeze"]["layers"] >= layers:
                    raise ConfigError(f"config key 'finetune.freeze.layers': "
                                      f"{ft['freeze']['layers']} leaves no layer of {base!r} "
                                      f"({layers} layers) to train")
    if ft.get("quantized_base") and "base_quant" not in ft:
        raise ConfigError("config key 'finetune.base_quant': needed when quantized_base is true")
    if ft.get("quantized_base") and "pissa" in ft["methods"]:
        raise ConfigError("config key 'finetune.quantized_base': PiSSA moves the principal "
                          "components out of the base, and the 4-bit residual cannot be merged "
                          "back exactly; run PiSSA without quantized_base (drop it from methods)")
    unused = set(ft.get("lr_by_method", {})) - set(ft["methods"])
    if unused:
        raise ConfigError(f"config key 'finetune.lr_by_method': {sorted(unused)} not in "
                          "finetune.methods")
    for base in ft.get("lr_by_base", {}):
        if base not in ft["bases"]:
            raise ConfigError(f"config key 'finetune.lr_by_base.{base}': {base!r} is not one of "
                              f"finetune.bases ({ft['bases']})")
    if config["data"]["corpus"]["source"] == "hf" and "hf" not in config["data"]["corpus"]:
        raise ConfigError("config key 'data.corpus.hf': needed when source is hf")


def _check_analysis_and_split(config: dict) -> None:
    from effllm.records import METRICS

    for stage, weights in config["analysis"]["efficiency_score"].items():
        for name in weights:
            if name not in METRICS:
                raise ConfigError(f"config key 'analysis.efficiency_score.{stage}.{name}': "
                                  f"unknown metric; known: {sorted(METRICS)}")
    split = config["data"]["split"]
    if split["validation_fraction"] + split["test_fraction"] >= 0.5:
        raise ConfigError("config key 'data.split': validation_fraction + test_fraction must "
                          "stay below 0.5")


def _check_finetune_sets(config: dict) -> None:
    """The sets finetune.datasets names exist and can give a timed fine-tuning step; inference
    serves only sets that are fine-tuned."""
    sets, ft = config["data"]["reasoning"], config["finetune"]
    for i, name in enumerate(ft["datasets"]):
        if sets.get(name) is None:
            defined = sorted(n for n, s in sets.items() if s is not None)
            raise ConfigError(f"config key 'finetune.datasets.{i}': {name!r} is not a set of "
                              f"data.reasoning ({defined})")
        spec, key = sets[name], f"data.reasoning.{name}"
        source = spec["source"]
        if source not in spec:
            raise ConfigError(f"config key '{key}.{source}': needed when source is {source}")
        block = spec[source]
        if source == "arithmetic" and block["min_digits"] > block["max_digits"]:
            raise ConfigError(f"config key '{key}.arithmetic.min_digits': larger than max_digits")
        if source == "hf":
            continue  # its size is known only once it is read from the cache (run time)
        samples = min(ft["max_samples"], block["n_train"])
        steps = samples // ft["batch_size"] * ft["epochs"]
        if ft.get("max_steps"):
            steps = min(steps, ft["max_steps"])
        if steps <= config["measure"]["warmup_steps"]:
            raise ConfigError(f"config key 'finetune.batch_size': {samples} training samples of "
                              f"{name!r} give {steps} fine-tuning steps, none left after "
                              f"measure.warmup_steps {config['measure']['warmup_steps']}")
    for i, name in enumerate(config["inference"].get("finetune_datasets") or []):
        if name not in ft["datasets"]:
            raise ConfigError(f"config key 'inference.finetune_datasets.{i}': {name!r} is not "
                              f"one of finetune.datasets ({ft['datasets']})")


def _check_tuning(config: dict) -> None:
    """The tuned-rates file reads, and the tune grid has a base and a timed step."""
    from effllm.sweep import tuned_rates

    ft = config["finetune"]
    try:
        tuned_rates(ft)
    except ValueError as err:
        raise ConfigError(f"config key 'finetune.lr_file': {err}") from None
    tune = ft.get("tune") or {}
    if tune.get("base") and tune["base"] not in ft["bases"]:
        raise ConfigError(f"config key 'finetune.tune.base': {tune['base']!r} is not one of "
                          f"finetune.bases ({ft['bases']})")
    if "steps" in tune and tune["steps"] <= config["measure"]["warmup_steps"]:
        raise ConfigError(f"config key 'finetune.tune.steps': {tune['steps']} leaves no timed "
                          f"step after measure.warmup_steps {config['measure']['warmup_steps']}")


def check_renamed(config: dict) -> None:
    """Keys of older configs, refused with where they went (before the schema, whose message
    would only say the key is unexpected)."""
    sets = (config.get("data") or {}).get("reasoning")
    if not isinstance(sets, dict):
        return
    for old in ("source", "synthetic", "hf"):
        if old in sets:
            raise ConfigError(
                f"config key 'data.reasoning.{old}': data.reasoning now holds fine-tuning sets "
                f"by name (data.reasoning.<name>.source, ...), and finetune.datasets lists the "
                f"ones to fine-tune on; move the set under a name (see config/README.md)")
    for name, spec in sets.items():
        if isinstance(spec, dict) and "synthetic" in spec:
            raise ConfigError(
                f"config key 'data.reasoning.{name}.synthetic': renamed; the arithmetic set is "
                f"source: arithmetic with its settings in data.reasoning.{name}.arithmetic")


DECODER_ONLY = ("attention", "kv_heads", "position_encoding", "rope_theta", "relative", "mla",
                "nsa", "moe")


def _check_pretrain_variants(config: dict) -> None:
    """Every block's sizes exist, and every variant makes a model our constructors accept."""
    from effllm.sweep import pretrain_variants, variant_model

    sizes = config["sizes"]
    for block, name, size, variant in pretrain_variants(config):
        key = f"pretrain.blocks.{block}"
        for which, s in (("sizes", size), (f"variants.{name}.size", variant.get("size", size))):
            if s not in sizes:
                raise ConfigError(f"config key '{key}.{which}': unknown size {s!r}; defined "
                                  f"sizes: {sorted(sizes)}")
        m = variant_model(config, variant)
        shape = sizes[variant.get("size", size)]
        key = f"{key}.variants.{name}"
        heads = shape["num_heads"]
        if m["family"] != "decoder":
            # A decoder-only key on a baseline would be ignored and mislabel the run.
            for part in DECODER_ONLY:
                if part in variant:
                    raise ConfigError(f"config key '{key}.{part}': family {m['family']!r} has no "
                                      f"{part}; it applies to family 'decoder' only")
            continue
        rel = m["relative"]
        if m["position_encoding"] == "relative" and rel["max_distance"] <= rel["num_buckets"] // 2:
            raise ConfigError(f"config key 'pretrain.model.relative.max_distance': "
                              f"{rel['max_distance']} must exceed half of num_buckets "
                              f"{rel['num_buckets']} (the exact buckets)")
        nsa = m["nsa"]
        if m["attention"] == "nsa" and nsa["compress_stride"] > nsa["compress_block"]:
            raise ConfigError(f"config key '{key}.nsa.compress_stride': "
                              f"{nsa['compress_stride']} is larger than compress_block "
                              f"{nsa['compress_block']} (tokens between blocks would be lost)")
        if m["attention"] in ("gqa", "nsa") and heads % m["kv_heads"]:
            raise ConfigError(f"config key '{key}.kv_heads': {m['kv_heads']} does not divide "
                              f"num_heads {heads} of size {size!r}")
        head_dim = shape["hidden_size"] // heads
        if m["position_encoding"] == "rope" and head_dim % 2 and m["attention"] != "mla":
            raise ConfigError(f"config key 'sizes.{size}': head dim {head_dim} must be even "
                              "for RoPE")
        if m["attention"] == "nsa" and m["position_encoding"] in ("relative", "alibi"):
            raise ConfigError(f"config key '{key}.position_encoding': NSA does not take the "
                              f"score bias of {m['position_encoding']!r}; use rope, sinusoidal, "
                              "learned or none")
        moe = m["moe"]
        if moe["num_experts"] and moe["top_k"] > moe["num_experts"]:
            raise ConfigError(f"config key '{key}.moe.top_k': {moe['top_k']} is more than "
                              f"num_experts {moe['num_experts']}")


def check_sources(config: dict) -> None:
    """Hugging Face data sets must already be in the local cache: say so before any job runs."""
    from effllm.data import DataSourceError
    from effllm.data.hub import cached_dataset, cached_model

    blocks = {"data.corpus": config["data"]["corpus"]}
    blocks.update({f"data.reasoning.{name}": config["data"]["reasoning"][name]
                   for name in config["finetune"]["datasets"]})
    for key, block in blocks.items():
        if block["source"] != "hf":
            continue
        hf = block["hf"]
        try:
            cached_dataset(hf["repo_id"], hf["files"], hf.get("cache_dir"))
        except DataSourceError as err:
            raise ConfigError(f"config key '{key}.hf.repo_id': {err}") from None
    hub = config.get("hub_models") or {}
    for name in used_hub_models(config):
        try:
            cached_model(hub[name]["repo_id"], hub[name].get("revision"))
        except DataSourceError as err:
            raise ConfigError(f"config key 'hub_models.{name}.repo_id': {err}") from None


def used_hub_models(config: dict) -> list[str]:
    """Hub models some stage reads (a listed but unused one need not be cached)."""
    hub = config.get("hub_models") or {}
    served = config["inference"].get("hub_models") or []
    pruning = (config["pretrain"]["blocks"].get("pruning") or {}).get("source")
    drafts = [(v.get("speculative") or {}).get("draft") for v in
              (config["inference"].get("techniques") or {}).get("variants", [])]
    return [name for name in hub if name in config["finetune"]["bases"] or name in served
            or name == pruning or name in drafts]


def check_config(config: dict, schema_path: str | os.PathLike) -> dict:
    """Validate ``config`` in place and return it; raise ConfigError naming the key."""
    check_renamed(config)
    validate_schema(config, schema_path)
    check_semantics(config)
    check_sources(config)
    check_resources(config)
    return config


def check_resources(config: dict) -> None:
    """Refuse, before any job, GPU counts a stage cannot use."""
    from effllm.cluster import STAGES, stage_settings
    from effllm.specs import DISTRIBUTED

    gpus = {stage: stage_settings(config, stage).gpus for stage in STAGES}
    for stage, n in gpus.items():
        if n > 1 and stage not in DISTRIBUTED:
            raise ConfigError(
                f"config key 'resources.{stage}.gpus': {n} GPUs, but the {stage} stage runs "
                f"in one process (multi-GPU runs: {', '.join(DISTRIBUTED)}); use 0 or 1")
    if gpus["finetune"] > 1 and config["finetune"].get("quantized_base"):
        raise ConfigError(f"config key 'resources.finetune.gpus': {gpus['finetune']} GPUs with "
                          "finetune.quantized_base (QLoRA): a bitsandbytes 4-bit base trains in "
                          "one process here; use 1 GPU")
    ft = config["finetune"]
    if (ft.get("full") or {}).get("offload") and "full" in ft["methods"] and gpus["finetune"] < 2:
        raise ConfigError(f"config key 'finetune.full.offload': CPU offload is part of ZeRO-3, "
                          f"which Full runs on 2 or more GPUs; resources.finetune.gpus is "
                          f"{gpus['finetune']} (set offload: false, or give fine-tuning GPUs)")
    for stage in DISTRIBUTED:
        batch = config[stage]["batch_size"]
        if gpus[stage] > 1 and batch % gpus[stage]:
            raise ConfigError(f"config key '{stage}.batch_size': {batch} does not split over "
                              f"resources.{stage}.gpus = {gpus[stage]} ranks")
    for stage in STAGES:
        settings = stage_settings(config, stage)
        if settings.auto and (stage == "data" or not settings.gpus
                              or not settings.gpu_memory_gb):
            raise ConfigError(f"config key 'resources.{stage}.auto': it picks each job's GPUs "
                              "(up to resources.<stage>.gpus) by the GPU plan against "
                              "resources.<stage>.gpu_memory_gb; a GPU stage needs both set")
    _check_job_resources(config, gpus)


def _check_job_resources(config: dict, gpus: dict[str, int]) -> None:
    """Per-job overrides (``resources.<stage>.jobs``): the GPUs a glob gives stay usable (a GPU
    stage stays on GPUs, one process where the stage needs one, a batch that splits over the
    ranks). A glob may match no run of this grid (a config layered on another's overrides)."""
    from effllm.cluster import job_overrides, stage_settings
    from effllm.specs import DISTRIBUTED
    from fnmatch import fnmatchcase

    stages = [stage for stage in gpus if job_overrides(config, stage)]
    if not stages:
        return
    from effllm.sweep import expand_runs

    runs = expand_runs(config)
    for stage in stages:
        if stage == "data":
            raise ConfigError("config key 'resources.data.jobs': data jobs have no run name to "
                              "match; set resources.data itself")
        names = list(runs.get(stage, {}))
        for pattern, override in stage_settings(config, stage).jobs.items():
            key = f"resources.{stage}.jobs.{pattern}"
            matched = [name for name in names if fnmatchcase(name, pattern)]
            n = override.get("gpus")
            if n is None:
                continue
            if not gpus[stage]:
                raise ConfigError(f"config key '{key}.gpus': resources.{stage}.gpus is 0 (a CPU "
                                  "stage); give the stage GPUs to give its jobs GPUs")
            if n > 1 and stage not in DISTRIBUTED:
                raise ConfigError(f"config key '{key}.gpus': the {stage} stage runs in one "
                                  "process; use 1")
            for name in matched:
                spec = runs[stage][name].spec
                if n > 1 and stage == "finetune" and spec.method.qlora:
                    raise ConfigError(f"config key '{key}.gpus': {name} is QLoRA, which trains "
                                      "in one process; use 1")
                if n < 2 and stage == "finetune" and spec.method.offload:
                    raise ConfigError(f"config key '{key}.gpus': {name} runs Full with CPU "
                                      "offload (finetune.full.offload), which is part of ZeRO-3 "
                                      "on 2 or more GPUs; give it 2 or more, or set offload: "
                                      "false")
                if n > 1 and spec.train.batch_size % n:
                    raise ConfigError(f"config key '{key}.gpus': {stage}.batch_size "
                                      f"{spec.train.batch_size} does not split over {n} ranks "
                                      f"({name})")
