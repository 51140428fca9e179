"""The one sweep-expansion function: config → every run of every stage, with its settings.

Snakemake's rules, the tests and the analysis all take the grid from :func:`expand_runs`; nothing
else builds run ids. A run's ``settings`` hold everything its job needs, so a change to a setting
changes that run's params (and reruns it) and nothing else.

Pretraining is organised in *blocks* (the paper's comparisons: attention, positional encoding,
MoE vs dense, attention-free), each a set of variants × sizes. A variant overrides the model
defaults (``pretrain.model``). Two variants that resolve to the same model and training settings
(GQA in the attention block is RoPE in the position block and Dense in the MoE block) are one
run, trained once; the run keeps one :class:`Membership` per place it appears. Memberships are
not part of a job's params, so adding a block or changing a label never retrains a run. A
shared run is named after the first block (in config order) that has it: removing or reordering
that block renames the run, and a renamed run is trained again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any

from effllm.specs import (
    STAGES, DistillSpec, FinetuneSpec, GridOrder, InferenceSpec, LongContext, MeasureSpec,
    ModelShape, PretrainSpec, PretrainTrain, PruningSpec, RunSpec,
)
from effllm.training.methods import ADAPTER_METHODS, LABELS as METHOD_LABELS

LABELS = {
    "mha": "MHA", "mqa": "MQA", "gqa": "GQA", "mla": "MLA", "nsa": "NSA",
    "rope": "RoPE", "sinusoidal": "Absolute", "learned": "Learnable Absolute",
    "relative": "Relative",
    "alibi": "ALiBi", "none": "None",
    "dense": "Dense", "transformer": "Transformer", "mamba": "Mamba", "rwkv": "RWKV",
    "pythia": "Pythia",
    "pruning_aware": "Pruning-aware", "oneshot": "One-shot", "oneshot_obs": "One-shot + OBS",
    "scratch": "Scratch", "distilled": "Distilled",
    **METHOD_LABELS,
    "fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "int8", "int4": "int4",
}
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}
TRAIN_KEYS = ("seq_len", "batch_size", "steps", "lr", "min_lr_ratio", "warmup_steps",
              "weight_decay", "grad_clip", "eval_tokens", "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class Membership:
    """One place a run appears: its comparison group, and its name and label there."""

    block: str  # attention | position | moe | attention_free | finetune | inference | …
    group: str  # normalisation and rank group, e.g. "attention-small"
    technique: str
    label: str


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the grid: the typed spec its job receives, and the places it appears.
    Memberships (display labels, the other blocks a run is in) stay out of the spec, so that
    changing them never retrains: see the module docstring."""

    spec: RunSpec
    memberships: tuple[Membership, ...] = ()

    stage = property(lambda self: self.spec.stage)
    name = property(lambda self: self.spec.name)  # the {run} wildcard: unique within a stage
    technique = property(lambda self: self.spec.technique)
    size = property(lambda self: self.spec.size)
    seed = property(lambda self: self.spec.seed)
    group = property(lambda self: self.spec.group)  # of the first membership: normalisation
    upstream = property(lambda self: self.spec.upstream)  # the run id this run starts from
    run_id = property(lambda self: self.spec.run_id)

    @property
    def label(self) -> str:
        if self.memberships:
            return self.memberships[0].label
        return LABELS.get(self.technique, self.technique)


def _identity(stage: str, name: str, technique: str, size: str, seed: int, group: str,
              upstream: str | None) -> dict[str, Any]:
    """The spec fields every run has (``RunSpec.ENVELOPE``)."""
    return {"run_id": f"{stage}/{name}", "stage": stage, "technique": technique,
            "label": LABELS.get(technique, technique), "size": size, "seed": seed,
            "group": group, "upstream": upstream}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else copy.deepcopy(value)
    return out


def variant_model(config: dict, variant: dict) -> dict:
    """Resolved model defaults for one variant (``pretrain.model`` overridden by the variant)."""
    return _merge(config["pretrain"]["model"], {k: v for k, v in variant.items()
                                                if k not in ("name", "size", "label")})


def model_shape(config: dict, size: str, variant: dict) -> ModelShape:
    """Constructor settings of one pretraining model: a size's shape plus the variant's parts."""
    from_size = config["sizes"][size]
    m = variant_model(config, variant)
    heads = from_size["num_heads"]
    shape = {
        "family": m["family"],
        "hidden_size": from_size["hidden_size"],
        "num_hidden_layers": from_size["num_layers"],
        "num_attention_heads": heads,
        "intermediate_size": from_size["intermediate_size"],
        # Explicit, not derived from downstream lengths: a fine-tuning or inference setting must
        # not retrain every model (config.check_semantics checks that those lengths fit).
        "max_position_embeddings": m["max_position_embeddings"],
    }
    if m["family"] != "decoder":
        return ModelShape.from_json(shape)
    attention = m["attention"]
    shape.update({
        "num_key_value_heads": {"mha": heads, "mqa": 1, "mla": heads}.get(attention,
                                                                           m["kv_heads"]),
        "rope_theta": m["rope_theta"],
        "attention": attention,
        "position_encoding": m["position_encoding"],
    })
    if m["position_encoding"] == "relative":
        shape.update(relative_num_buckets=m["relative"]["num_buckets"],
                     relative_max_distance=m["relative"]["max_distance"])
    if attention == "mla":
        shape.update({k: v for k, v in m["mla"].items() if v is not None})
    if attention == "nsa":
        shape.update({f"nsa_{k}": v for k, v in m["nsa"].items()})
    moe = m["moe"]
    if moe["num_experts"]:
        width = from_size["intermediate_size"] * moe["expert_fraction"]
        shape.update(num_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                     moe_intermediate_size=max(32, round(width / 32) * 32),
                     router_aux_loss_coef=moe["aux_loss_coef"])
    return ModelShape.from_json(shape)


# Library modules only some models use: a run's code inputs leave out the ones its model does not
# use, so editing nsa.py reruns only NSA runs and what depends on them (common.smk).
VARIANT_MODULES = {
    "effllm.models.mla": lambda m: m.attention == "mla",
    "effllm.models.nsa": lambda m: m.attention == "nsa",
    "effllm.models.moe": lambda m: bool(m.num_experts),
    "effllm.models.baselines": lambda m: m.family != "decoder",
}


DISTILL_MODULE = "effllm.training.distill"  # read by distillation students only
PRUNING_MODULE = "effllm.models.pruning"  # read by serving only for structured pruning


def unused_modules(runs: dict[str, dict[str, "Run"]], run: "Run") -> list[str]:
    """The variant modules the model behind ``run`` (its root pretraining run) does not use,
    the distillation loss unless ``run`` is a student, and for serving the structured pruning
    unless ``run`` prunes so."""
    extra = [] if getattr(run.spec, "distill", None) else [DISTILL_MODULE]
    prune = getattr(run.spec, "prune", None)
    if run.stage == "inference" and (prune is None or prune.method != "structured"):
        extra.append(PRUNING_MODULE)
    while run.upstream is not None:
        stage, name = run.upstream.split("/", 1)
        if stage == "hub":  # a transformers model class: none of our variant modules
            return sorted([*VARIANT_MODULES, *extra])
        run = runs[stage][name]
    return sorted([*(m for m, used in VARIANT_MODULES.items() if not used(run.spec.model)),
                   *extra])


PRUNING_BLOCK = "pruning"  # not variants x sizes: a source pruned by several routes
DISTILL_BLOCK = "distillation"  # not variants x sizes: a teacher's student and its twin
# The pruning block's routes after a source: (mode, compensation; None = the block's setting).
PRUNING_ROUTES = {"pruning_aware": ("continuous", None), "oneshot": ("oneshot", False),
                  "oneshot_obs": ("oneshot", True)}
PRUNING_DEFAULTS = {"every": 20, "groups": ["heads", "ffn", "hidden"], "saliency": "taylor",
                    "compensation": True, "calib_batches": 4, "damp": 0.01, "lr": None,
                    "baselines": ["scratch", "oneshot", "oneshot_obs"]}


def pretrain_variants(config: dict):
    """(block, variant name, size, variant settings) in config order; null blocks and the
    pruning and distillation blocks skipped."""
    for block, spec in config["pretrain"]["blocks"].items():
        if spec is None or block in (PRUNING_BLOCK, DISTILL_BLOCK):
            continue
        for size in spec["sizes"]:
            for variant in spec["variants"]:
                yield block, variant["name"], size, variant


def _membership(block: str, group: str, technique: str, label: str | None = None) -> Membership:
    return Membership(block, group, technique, label or LABELS.get(technique, technique))


def block_seeds(config: dict, block: str) -> list[int]:
    """Seeds of a pretraining block: ``pretrain.blocks.<block>.seeds``, else ``seeds``."""
    return list((config["pretrain"]["blocks"][block] or {}).get("seeds") or config["seeds"])


def stage_seeds(config: dict, stage: str) -> list[int]:
    """Seeds of the fine-tuning or inference stage: ``<stage>.seeds``, else ``seeds``."""
    return list(config[stage].get("seeds") or config["seeds"])


def all_seeds(config: dict) -> list[int]:
    """Every seed some block or stage runs: ``seeds`` first, then the others in config order."""
    lists = [config["seeds"], *(block_seeds(config, b) for b, spec in
                                config["pretrain"]["blocks"].items() if spec),
             stage_seeds(config, "finetune"), stage_seeds(config, "inference")]
    return list(dict.fromkeys(seed for seeds in lists for seed in seeds))


def base_run(pretrain: dict[str, Run], base: str, seed: int) -> Run:
    """The pretraining run that fine-tuning ``base`` at ``seed`` starts from: the base trained
    with that seed, else (its blocks run fewer seeds than fine-tuning) with its first seed, so
    that the extra fine-tuning seeds vary the fine-tuning only."""
    run = pretrain.get(f"{base}-s{seed}")
    if run is None:
        run = next((r for r in pretrain.values() if r.name == f"{base}-s{r.seed}"), None)
    if run is None:
        raise ValueError(f"config key 'finetune.bases': {base!r} is not a pretraining run")
    return run


def _add_pretrain_runs(config: dict, seed: int, runs: dict[str, Run]) -> None:
    pre = config["pretrain"]
    train = {**{k: pre.get(k, 0) for k in TRAIN_KEYS},  # checkpoint_every is optional
             **precision_setting(pre), **memory_settings(pre)}
    # The first place of each model in config order, whether or not that block runs this seed:
    # a run's name and spec never depend on which blocks have the seed, so adding a seed to a
    # block later retrains nothing that exists.
    first: dict[str, tuple[str, str, str, str]] = {}  # key -> name, variant, size, group

    for block, variant_name, size, variant in pretrain_variants(config):
        in_block = seed in block_seeds(config, block)
        model_size = variant.get("size", size)
        long_context = pre.get("long_context")
        settings = {"model": model_shape(config, model_size, variant),
                    "train": PretrainTrain.from_json(train, "pretrain"),
                    "long_context": LongContext.from_json(long_context, "pretrain.long_context")
                    if long_context else None,
                    "measure": MeasureSpec.from_json(config["measure"], "measure")}
        member = _membership(block, f"{block}-{size}", variant_name, variant.get("label"))
        key = json.dumps({k: v.to_json() if v else v for k, v in settings.items()},
                         sort_keys=True)
        if key not in first:
            name = f"{variant_name}-{model_size}-s{seed}"  # the size it trains at
            if name in runs or name in (f[0] for f in first.values()):
                raise ValueError(
                    f"config key 'pretrain.blocks.{block}.variants.{variant_name}': run name "
                    f"{name!r} is already used by a different model; rename the variant")
            first[key] = (name, variant_name, model_size, member.group)
        if not in_block:
            continue
        _place(runs, first[key], seed, settings, member)
    _add_pruning_runs(config, seed, runs, first, train)
    _add_distillation_runs(config, seed, runs, first, train)


def _place(runs: dict[str, Run], identity: tuple[str, str, str, str], seed: int,
           settings: dict, member: Membership) -> None:
    """Add the run of ``identity`` (name, technique, size, group) with ``settings``, or, when
    the same model trained the same way is already a run, one more place for it."""
    name, technique, size, group = identity
    if name in runs:
        if any(getattr(runs[name].spec, k) != v for k, v in settings.items()):
            raise ValueError(f"config key 'pretrain.blocks.{member.block}': run name {name!r} "
                             "is already used by a different model; rename the variant")
        runs[name] = dataclasses.replace(runs[name],
                                         memberships=runs[name].memberships + (member,))
        return
    spec = PretrainSpec(**_identity("pretrain", name, technique, size, seed, group, None),
                        **settings)
    runs[name] = Run(spec, memberships=(member,))


def pruning_settings(config: dict) -> dict | None:
    """``pretrain.blocks.pruning`` with its defaults, or None without the block."""
    block = config["pretrain"]["blocks"].get(PRUNING_BLOCK)
    return {**PRUNING_DEFAULTS, **block} if block else None


def hub_fields(config: dict, name: str) -> tuple[dict, dict]:
    """The cached ``config.json`` of the hub model ``name``, and its RoPE settings (the
    ``rope_parameters`` of transformers 5, or the older ``rope_scaling``). Raises
    DataSourceError when the model is not cached."""
    from effllm.data.hub import cached_model

    entry = config["hub_models"][name]
    fields = json.loads((cached_model(entry["repo_id"], entry.get("revision"))
                         / "config.json").read_text())
    return fields, fields.get("rope_parameters") or fields.get("rope_scaling") or {}


def hub_shape(config: dict, name: str) -> ModelShape:
    """The shape of the hub model ``name`` as our decoder, from its cached ``config.json`` (the
    pruning run converts it: :func:`effllm.models.pruning.as_decoder`)."""
    fields, rope = hub_fields(config, name)
    heads = fields["num_attention_heads"]
    kv = fields.get("num_key_value_heads") or heads
    return ModelShape.from_json({
        "family": "decoder", "hidden_size": fields["hidden_size"],
        "num_hidden_layers": fields["num_hidden_layers"], "num_attention_heads": heads,
        "intermediate_size": fields["intermediate_size"],
        "max_position_embeddings": fields["max_position_embeddings"],
        "num_key_value_heads": kv,
        "rope_theta": float(rope.get("rope_theta") or fields.get("rope_theta") or 10000.0),
        "attention": "mha" if kv == heads else "mqa" if kv == 1 else "gqa",
        "position_encoding": "rope"}, f"hub_models.{name}")


def source_variant(config: dict, source: Run) -> dict:
    """The variant settings the pruning source was trained from (its first place)."""
    m = source.memberships[0]
    return next(v for v in config["pretrain"]["blocks"][m.block]["variants"]
                if v["name"] == m.technique)


def _add_pruning_runs(config: dict, seed: int, runs: dict[str, Run], first: dict,
                      train: dict) -> None:
    """The pruning block's runs of ``seed``: each route from the source (the source trained
    with this seed, else with its first) to the target, and the uniform target-size model
    trained from scratch on as many steps (one run with an equal run of another block)."""
    block = pruning_settings(config)
    if not block or seed not in block_seeds(config, PRUNING_BLOCK):
        return
    ours = any(r.name == f"{block['source']}-s{r.seed}" for r in runs.values())
    if block["source"] in (config.get("hub_models") or {}) and not ours:  # a cached Llama
        source_id, source_model = f"hub/{block['source']}", hub_shape(config, block["source"])
        variant = {}  # scratch: pretrain.model's defaults at the target size
    else:
        source = base_run(runs, block["source"], seed)
        source_id, source_model = source.run_id, source.spec.model
        variant = source_variant(config, source)
    target = block["target_params"]
    sized = isinstance(target, str)
    label = target if sized else f"{target / 1e6:g}M"
    group = f"{PRUNING_BLOCK}-{label}"
    steps = block["prune_steps"] + block["continue_steps"]
    long_context = config["pretrain"].get("long_context")
    common = {"measure": MeasureSpec.from_json(config["measure"], "measure"),
              "long_context": LongContext.from_json(long_context, "pretrain.long_context")
              if long_context else None}
    scratch_train = PretrainTrain.from_json({**train, "steps": steps}, "pretrain")
    # The routes train data-parallel (masks and slices need whole weights on every rank).
    route_train = dataclasses.replace(scratch_train, sharding=None)
    target_model = model_shape(config, target, variant) if sized else None
    for technique in ["pruning_aware", *block["baselines"]]:
        member = _membership(PRUNING_BLOCK, group, technique)
        if technique == "scratch":
            if target_model is None:
                continue  # refused by the config check: scratch needs a size
            settings = {"model": target_model, "train": scratch_train, **common}
            key = json.dumps({k: v.to_json() if v else v for k, v in settings.items()},
                             sort_keys=True)
            # The run another block has (or would have, at a seed it does not run) keeps that
            # block's identity, so adding the seed to that block later retrains nothing.
            _place(runs, first.get(key, (f"scratch-{label}-s{seed}", "scratch", label, group)),
                   seed, settings, member)
            continue
        mode, compensation = PRUNING_ROUTES[technique]
        pruning = PruningSpec(
            mode=mode, compensation=block["compensation"] if compensation is None
            else compensation, prune_steps=block["prune_steps"] if mode == "continuous" else 0,
            every=block["every"], groups=tuple(block["groups"]), saliency=block["saliency"],
            calib_batches=block["calib_batches"], damp=block["damp"],
            target_params=None if sized else target, target_model=target_model,
            lr=block["lr"])
        name = f"{technique.replace('_', '-')}-{block['source']}-to-{label}-s{seed}"
        spec = PretrainSpec(**_identity("pretrain", name, technique, label, seed, group,
                                        source_id), model=source_model,
                            train=route_train, pruning=pruning, **common)
        runs[name] = Run(spec, memberships=(member,))


def _add_distillation_runs(config: dict, seed: int, runs: dict[str, Run], first: dict,
                           train: dict) -> None:
    """The distillation block's runs of ``seed``: the student (the teacher's variant at the
    student size) learning from the teacher (trained with this seed, else its first), its
    scratch twin (the same shape, batches and steps: one run with an equal run of another
    block), and the teacher itself as the block's reference row."""
    block = config["pretrain"]["blocks"].get(DISTILL_BLOCK)
    if not block or seed not in block_seeds(config, DISTILL_BLOCK):
        return
    # the teacher by any of its names (rope-small is the run gqa-small trains as)
    variant, teacher_size = next((v, v.get("size", s)) for _, n, s, v in pretrain_variants(config)
                                 if f"{n}-{v.get('size', s)}" == block["teacher"])
    teacher_key = json.dumps({"model": model_shape(config, teacher_size, variant).to_json()},
                             sort_keys=True)
    shared = next((f[0] for k, f in first.items()
                   if json.loads(k)["model"] == json.loads(teacher_key)["model"]),
                  f"{block['teacher']}-s{seed}")
    teacher = base_run(runs, shared.rsplit("-s", 1)[0], seed)
    size = block["student"]
    group = f"{DISTILL_BLOCK}-{size}"
    twin_model = model_shape(config, size, variant)
    long_context = config["pretrain"].get("long_context")
    settings = {"model": twin_model, "train": PretrainTrain.from_json(train, "pretrain"),
                "long_context": LongContext.from_json(long_context, "pretrain.long_context")
                if long_context else None,
                "measure": MeasureSpec.from_json(config["measure"], "measure")}
    key = json.dumps({k: v.to_json() if v else v for k, v in settings.items()}, sort_keys=True)
    # another block's run of this shape and training (the pruning block's scratch baseline
    # too), else the block's own
    equal = next((r for r in runs.values() if r.seed == seed and not r.spec.pruning
                  and not r.spec.distill and all(getattr(r.spec, k) == v
                                                 for k, v in settings.items())), None)
    identity = ((equal.name, equal.technique, equal.size, equal.spec.group) if equal else
                first.get(key, (f"scratch-{variant['name']}-{size}-s{seed}", "scratch", size,
                                group)))
    _place(runs, identity, seed, settings, _membership(DISTILL_BLOCK, group, "scratch"))
    if teacher.seed == seed:  # the reference row, once per seed the teacher has
        runs[teacher.name] = dataclasses.replace(teacher, memberships=teacher.memberships + (
            _membership(DISTILL_BLOCK, group, "teacher", f"Teacher ({block['teacher']})"),))
    name = f"distilled-{block['teacher']}-to-{size}-s{seed}"
    spec = PretrainSpec(**_identity("pretrain", name, "distilled", size, seed, group,
                                    teacher.run_id), **settings,
                        distill=DistillSpec(temperature=block["temperature"],
                                            weight=block["weight"]))
    runs[name] = Run(spec, memberships=(_membership(DISTILL_BLOCK, group, "distilled"),))


# Fine-tuning keys that are method settings (or the grid), not shared training settings.
FINETUNE_METHOD_KEYS = ("bases", "methods", "datasets", "lr_by_base", "lr_by_method",
                        "lr_file", "tune", "quantized_base", "base_quant", "seeds")


def precision_setting(section: dict) -> dict:
    """A stage's training precision as a run setting: present only when it is not fp32, so the
    fp32 runs keep the settings (and results) they had before the key existed."""
    precision = section.get("precision", "fp32")
    return {} if precision == "fp32" else {"precision": precision}


def memory_settings(section: dict) -> dict:
    """Micro-batching, gradient checkpointing and sharding as run settings, present only when
    set: they change memory, not the result (up to rounding), and leave the other runs'
    settings as they were."""
    settings = {k: section[k] for k in ("micro_batch_size", "gradient_checkpointing")
                if section.get(k)}
    if section.get("sharding", "ddp") != "ddp":
        settings["sharding"] = section["sharding"]
    return settings


def tuned_rates(ft: dict) -> dict[str, float]:
    """The rates of the tuned-rates file ``finetune.lr_file`` (written by the ``tune`` target),
    by method; none without the key. Raises ValueError when the file is missing or malformed."""
    from effllm.training.tune import read_rates

    return read_rates(ft["lr_file"]) if ft.get("lr_file") else {}


def resolve_lr(ft: dict, base: str, method: str, tuned: dict[str, float] | None = None
               ) -> tuple[float, str]:
    """(learning rate, where it came from) of one (base, method) run.

    A method's rate is ``lr_by_method`` (set by hand), else the tuned rate of ``tuned`` (read
    from ``finetune.lr_file``), else ``lr``. ``lr_by_base`` sets a base's rate (larger models
    train at smaller rates): with a method rate too, the base's rate is scaled by the method's
    ratio to ``lr``, so a method tuned at one size keeps its relation at every size.
    """
    by_base, by_method = ft.get("lr_by_base") or {}, ft.get("lr_by_method") or {}
    if method in by_method:
        rate, source = by_method[method], f"finetune.lr_by_method.{method}"
    elif method in (tuned or {}):
        rate, source = tuned[method], f"finetune.lr_file ({ft['lr_file']})"
    else:
        rate, source = ft["lr"], "finetune.lr"
    if base not in by_base:
        return rate, source
    if source == "finetune.lr":
        return by_base[base], f"finetune.lr_by_base.{base}"
    return (by_base[base] * (rate / ft["lr"]),
            f"finetune.lr_by_base.{base} x {source} / finetune.lr")


def finetune_lr(ft: dict, base: str, method: str, tuned: dict[str, float] | None = None
                ) -> float:
    """The learning rate of one (base, method) run (:func:`resolve_lr`)."""
    return resolve_lr(ft, base, method, tuned)[0]


def lr_settings(ft: dict, base: str, method: str, tuned: dict[str, float] | None = None
                ) -> dict:
    """``lr`` and ``lr_source`` of a run's training settings; the source is left out when it
    is plain ``finetune.lr`` (the spec's default), so such runs keep their settings."""
    rate, source = resolve_lr(ft, base, method, tuned)
    return {"lr": rate} if source == "finetune.lr" else {"lr": rate, "lr_source": source}


def finetune_group(base: str, dataset: str, datasets: list[str]) -> tuple[str, str]:
    """(block, group) of the runs of ``base`` on ``dataset``. The primary set (the first) is
    block ``finetune`` with the base as group, as before there were several sets, so its runs
    keep their names; another set is block ``finetune_<set>`` (its own table 8) and group
    ``<base>+<set>``: normalisation compares the methods of one base on one set."""
    if dataset == datasets[0]:
        return "finetune", base
    return f"finetune_{dataset}", f"{base}+{dataset}"


def finetune_method(ft: dict, method: str) -> dict:
    """One method's settings: the shared adapter block, the method's own block and, for adapter
    methods on a 4-bit base (QLoRA), the base quantisation. Freeze and Full never see the
    adapter or QLoRA keys, so toggling those does not retrain them."""
    settings = {"name": method}
    if method in ADAPTER_METHODS:
        settings.update(ft["lora"])
        settings["quantized_base"] = ft["base_quant"] if ft.get("quantized_base") else None
    settings.update(ft.get(method, {}))
    if method == "full" and not settings.get("offload", True):
        del settings["offload"]  # off is the default: saying so retrains nothing
    return settings


def expand_runs(config: dict) -> dict[str, dict[str, Run]]:
    """Every run of the grid, by stage and name, in a deterministic order."""
    ft, inf = config["finetune"], config["inference"]
    runs: dict[str, dict[str, Run]] = {stage: {} for stage in STAGES}
    finetune_train = {**{k: v for k, v in ft.items() if k not in FINETUNE_METHOD_KEYS
                         and k not in ("precision", "micro_batch_size", "gradient_checkpointing")
                         and not isinstance(v, dict)},
                      **precision_setting(ft), **memory_settings(ft)}
    datasets = ft["datasets"]
    tuned = tuned_rates(ft) if ft["bases"] else {}
    served_sets = inf.get("finetune_datasets") or datasets[:1]
    seeds = all_seeds(config)
    for seed in seeds:  # every seed's first: a fine-tuning seed may start from another's base
        _add_pretrain_runs(config, seed, runs["pretrain"])
    for seed in seeds:
        for dataset in datasets if seed in stage_seeds(config, "finetune") else ():
            for base in ft["bases"]:
                if base in config.get("hub_models", {}):  # a Hugging Face model from the cache
                    upstream_id, size = f"hub/{base}", base
                else:
                    upstream = base_run(runs["pretrain"], base, seed)
                    upstream_id, size = upstream.run_id, upstream.size
                block, group = finetune_group(base, dataset, datasets)
                for method in ft["methods"]:
                    name = f"{method}-{group}-s{seed}"
                    spec = FinetuneSpec.from_json({
                        **_identity("finetune", name, method, size, seed, group, upstream_id),
                        "method": finetune_method(ft, method),
                        "train": {**finetune_train, **lr_settings(ft, base, method, tuned)},
                        "dataset": dataset, "measure": config["measure"]},
                        f"finetune ({name})")
                    runs["finetune"][name] = Run(spec, (_membership(block, group, method),))
        if seed not in stage_seeds(config, "inference"):
            continue
        # A fine-tuned model is scored on the set it was fine-tuned on, others on the primary.
        served = []
        for stage in inf["sources"]:
            for r in runs[stage].values():
                dataset = getattr(r.spec, "dataset", datasets[0])
                if r.seed == seed and (stage == "pretrain" or dataset in served_sets):
                    served.append((r.name, r.run_id, r.size, dataset))
        served += [(f"{name}-s{seed}", f"hub/{name}", name, datasets[0])
                   for name in inf.get("hub_models", [])]
        for source_name, source_id, size, dataset in served:
            for precision in inf["precisions"]:
                name = f"{precision}-{source_name}"
                spec = inference_spec(config, name, precision, size, seed, source_id, source_id,
                                      dataset)
                runs["inference"][name] = Run(
                    spec, (_membership("inference", source_id, precision),))
        _add_technique_runs(config, seed, runs)
    mark_served(runs)
    return runs


EVAL_KEYS = ("batch_size", "prompt_tokens", "new_tokens", "warmup_runs", "min_runs",
             "min_seconds", "eval_problems", "eval_max_new_tokens", "eval_max_length",
             "ppl_tokens")


def inference_spec(config: dict, name: str, technique: str, size: str, seed: int, group: str,
                   source_id: str, dataset: str, precision: str | None = None,
                   **settings) -> InferenceSpec:
    """The spec of serving ``source_id`` at ``precision`` (default: ``technique``), with a
    technique's ``settings`` (weights, kv_cache, speculative, prune)."""
    inf = config["inference"]
    precision = precision or technique
    quant = inf.get(precision, {}) if precision in ("int4", "int8") else {}
    return InferenceSpec.from_json({
        **_identity("inference", name, technique, size, seed, group, source_id),
        "precision": precision, "quant": quant, "dataset": dataset,
        "bits": settings["weights"]["bits"] if settings.get("weights") else BITS[precision],
        "eval": {k: inf[k] for k in EVAL_KEYS}, "harness": inf.get("harness"),
        "measure": config["measure"], **settings}, f"inference ({name})")


TECHNIQUES_BLOCK = "techniques"
TECHNIQUE_KEYS = ("weights", "kv_cache", "speculative", "prune")


def technique_source(config: dict, seed: int, runs: dict[str, dict[str, Run]]
                     ) -> tuple[str, str, str, str] | None:
    """(name, run id, size, dataset) of the model ``inference.techniques.source`` names at
    ``seed``: a hub model, a pretraining run of the grid (at ``seed``, else its first), or the
    fine-tuning method's run on the first base and the first set served
    (``inference.finetune_datasets``, else the primary; None when fine-tuning does not run
    that seed)."""
    inf, datasets = config["inference"], config["finetune"]["datasets"]
    source = inf["techniques"]["source"]
    if source in (inf.get("hub_models") or []):
        return f"{source}-s{seed}", f"hub/{source}", source, datasets[0]
    if source not in config["finetune"]["methods"]:  # a pretraining run (the config checks it)
        try:
            run = base_run(runs["pretrain"], source, seed)
        except ValueError:
            return None
        # named by the inference seed, as a hub model is: the model of another seed when the
        # pretraining block does not run this one
        return f"{source}-s{seed}", run.run_id, run.size, datasets[0]
    if not config["finetune"]["bases"]:
        return None
    dataset = (inf.get("finetune_datasets") or datasets)[0]
    _, group = finetune_group(config["finetune"]["bases"][0], dataset, datasets)
    run = runs["finetune"].get(f"{source}-{group}-s{seed}")
    return (run.name, run.run_id, run.size, dataset) if run else None


def draft_id(config: dict, draft: str, seed: int, runs: dict[str, dict[str, Run]]) -> str:
    """The run id of a speculative draft: a hub model, or a pretraining run of the grid (its
    run at ``seed``, else at its first seed)."""
    if draft in (config.get("hub_models") or {}):
        return f"hub/{draft}"
    return base_run(runs["pretrain"], draft, seed).run_id


def _add_technique_runs(config: dict, seed: int, runs: dict[str, dict[str, Run]]) -> None:
    """The techniques block's runs of ``seed`` (``inference.techniques``): each variant serves
    the source; a variant with no technique is the inference block's run of its precision when
    there is one (one run, two places)."""
    block = config["inference"].get("techniques")
    source = technique_source(config, seed, runs) if block else None
    if source is None:
        return
    source_name, source_id, size, dataset = source
    group = f"{TECHNIQUES_BLOCK}-{re.sub(r'-s[0-9]+$', '', source_id.rsplit('/', 1)[1])}"
    for variant in block["variants"]:
        member = _membership(TECHNIQUES_BLOCK, group, variant["name"], variant.get("label"))
        precision = variant.get("precision", "bf16")
        settings = {k: copy.deepcopy(variant[k]) for k in TECHNIQUE_KEYS if variant.get(k)}
        if (settings.get("speculative") or {}).get("draft"):
            try:
                settings["speculative"]["draft"] = draft_id(
                    config, settings["speculative"]["draft"], seed, runs)
            except ValueError:  # no such run: the config check names the key
                continue
        name = f"{precision if not settings else variant['name']}-{source_name}"
        existing = runs["inference"].get(name)
        if existing is not None and settings:  # a name taken twice: the config check refuses
            continue
        if existing is not None:  # the same serving, already a run
            runs["inference"][name] = dataclasses.replace(
                existing, memberships=existing.memberships + (member,))
            continue
        technique = variant["name"] if settings else precision
        spec = inference_spec(config, name, technique, size, seed, group, source_id, dataset,
                              precision, **settings)
        runs["inference"][name] = Run(spec, (member,))


def mark_served(runs: dict[str, dict[str, Run]]) -> None:
    """Set ``served`` on the fine-tuning runs whose model an inference run loads: only they
    save merged weights (a run nobody serves keeps its adapter and record)."""
    served = {run.upstream for run in runs["inference"].values()}
    for name, run in runs["finetune"].items():
        if run.run_id in served:
            runs["finetune"][name] = dataclasses.replace(
                run, spec=dataclasses.replace(run.spec, served=True))


# The tune target's settings (finetune.tune) where the config leaves them out.
TUNE_DEFAULTS = {"factors": [0.25, 0.5, 1, 2, 4], "steps": 300, "eval_problems": 20,
                 "base": None, "centre": {}}


def tune_settings(config: dict, runs: dict[str, dict[str, Run]] | None = None) -> dict:
    """``finetune.tune`` with defaults, and what the grid runs on: one base (``base``, else
    the one whose size comes first in ``sizes``; hub models after ours), the primary set, the
    first fine-tuning seed."""
    ft = config["finetune"]
    tune = {**TUNE_DEFAULTS, **(ft.get("tune") or {})}
    seed = stage_seeds(config, "finetune")[0]
    if not tune["base"]:
        runs = runs or expand_runs(config)
        order = list(config["sizes"])

        def rank(base: str) -> tuple[int, int]:
            run = next((r for r in runs["pretrain"].values() if r.name == f"{base}-s{r.seed}"),
                        None)
            return (0, order.index(run.size)) if run else (1, 0)

        tune["base"] = min(ft["bases"], key=rank)  # min keeps the first of equals
    return {**tune, "dataset": ft["datasets"][0], "seed": seed}


def tune_runs(config: dict, runs: dict[str, dict[str, Run]] | None = None) -> dict[str, Run]:
    """The ``tune`` target's runs, by name: every method at each of ``finetune.tune.factors``
    times its centre (``finetune.tune.centre.<method>``, else its rate without the tuned file:
    ``lr_by_method``, ``lr_by_base``, ``lr``), for ``steps`` steps (the run's own ``max_steps``
    when fewer) and ``eval_problems`` exact-match problems. Each is that method's fine-tuning run of the tune base, set and seed with those
    settings changed; its record goes under ``results/tune/`` and it saves no model."""
    runs = runs or expand_runs(config)
    ft = config["finetune"]
    tune = tune_settings(config, runs)
    _, group = finetune_group(tune["base"], tune["dataset"], ft["datasets"])
    out = {}
    for method in ft["methods"]:
        run = runs["finetune"][f"{method}-{group}-s{tune['seed']}"]
        centre, source = resolve_lr(ft, tune["base"], method)
        if method in (tune["centre"] or {}):
            centre, source = tune["centre"][method], f"finetune.tune.centre.{method}"
        train = run.spec.train
        steps = min(train.max_steps or tune["steps"], tune["steps"])
        for factor in tune["factors"]:
            name = f"{method}-{group}-x{factor:g}-s{tune['seed']}"
            spec = dataclasses.replace(
                run.spec, run_id=f"tune/{name}", group=f"tune-{group}", served=False,
                train=dataclasses.replace(
                    train, lr=float(f"{centre * factor:.6g}"), max_steps=steps,
                    lr_source=f"tune: {factor:g} x {source}",
                    eval_problems=min(train.eval_problems, tune["eval_problems"])))
            out[name] = Run(spec, (_membership("tune", spec.group, method),))
    return out


def grid_order(config: dict) -> GridOrder:
    """The grid's names in config order (variants, methods, precisions, sizes)."""
    return GridOrder(
        variants=tuple(v["name"] for b in config["pretrain"]["blocks"].values() if b
                       for v in b.get("variants", ())) + (
            ("pruning_aware", *pruning_settings(config)["baselines"])
            if pruning_settings(config) else ()) + (
            ("distilled", "teacher") if config["pretrain"]["blocks"].get(DISTILL_BLOCK)
            else ()),
        methods=tuple(config["finetune"]["methods"]),
        precisions=tuple(config["inference"]["precisions"]), sizes=tuple(config["sizes"]))


def memberships(runs: dict[str, dict[str, Run]]) -> dict[str, list[dict[str, str]]]:
    """run id → every place it appears (JSON-able), for the aggregation of records."""
    return {run.run_id: [dataclasses.asdict(m) for m in run.memberships]
            for stage in runs.values() for run in stage.values()}
