"""One workload on fake tensors: a job's training step or serving passes, booked by part.

The model is built from its spec or config.json inside ``FakeTensorMode`` (shapes and dtypes,
no storage), the method applied with the jobs' own functions (``training.methods.prepare``,
``training.sharding.shard`` over a fake process group of the job's ranks, ``loop._accumulate``
for the forward/backward passes), and the step runs under :func:`effllm.measure.tensors.track`
and ``FlopCounterMode``. Each phase (forward, backward, optimiser step; or each serving pass)
keeps the parts at its own peak.

Depth: the stack of identical layers is simulated at two depths and every part of every phase
extrapolated linearly to the model's depth (layers add the same bytes and FLOPs each). Mamba
and RWKV, whose reference recurrences loop over time in Python, are also simulated at two
lengths and extrapolated bilinearly in (depth, length): their memory and FLOPs are linear in
both. Results are cached on disk by workload (``cache_dir()/plan``), so seeds, data sets and
figures that share a shape share one simulation, and a later DAG build reads them back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import sys
import tempfile
from pathlib import Path

from effllm.io import read_json, write_json
from effllm.plan.workload import ModelRef, ServeWork, TrainWork, digest

VERSION = 9  # of the simulation: a change that moves any number bumps it (the cache key)
RECURRENT = ("mamba", "rwkv")  # families whose reference path loops over time
LENGTHS = (8, 16)  # sequence lengths at which RECURRENT families are simulated
STEADY = ("work", "optimizer")  # training phases without activations: not extrapolated in length
BNB_BLOCK = 64  # bitsandbytes' 4-bit block size (weights per absmax)
BNB_NESTED_BLOCK = 256  # double quantisation: absmax values per second-level absmax


@dataclasses.dataclass
class Simulation:
    """A workload's account, extrapolated to the model's depth (and length): per phase, the
    parts at that phase's peak (bytes, with ``total``); FLOPs of the unit of work (one optimiser
    step of the rank, or each serving pass); the exact static parts of the full model; and how
    it was obtained."""

    phases: dict[str, dict[str, int]]
    flops: dict[str, float]  # training: {"step": one optimiser step of the rank}; serving: per pass
    static: dict[str, int]
    kv_cache: dict[str, int]
    method: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- models


def _torch():
    import torch

    return torch


def model_config(ref: ModelRef):
    """The full model's transformers config (any family; our Mamba/RWKV fixes imported)."""
    from transformers import AutoConfig

    import effllm.models  # noqa: F401 - registers our decoder with the Auto classes

    if ref.shape is not None:
        if ref.shape.family != "decoder":
            return _baseline(ref).config
        from effllm.models import DecoderConfig

        return DecoderConfig(vocab_size=ref.vocab_size, **ref.shape.constructor_kwargs())
    # a copy: transformers rewrites nested entries in place (Llama's rope_scaling), which would
    # change the workload's key after its first build
    fields = {k: copy.deepcopy(v) for k, v in ref.config.items()
              if k not in ("architectures", "auto_map")}
    if fields.get("model_type") in RECURRENT:
        import effllm.models.baselines  # noqa: F401
    return AutoConfig.for_model(**fields)


def _baseline(ref: ModelRef):
    """A baseline family's model at full depth, on the meta device (its depth and widths are
    solved from counted parameters: built, not derived)."""
    from effllm.models.baselines import build_baseline

    with _torch().device("meta"):
        return build_baseline(ref.shape.family, ref.shape.constructor_kwargs(), ref.vocab_size,
                              None, None, None)


def depth(ref: ModelRef) -> int:
    """Layers (blocks) of the full model as built."""
    return int(model_config(ref).num_hidden_layers)


def build(ref: ModelRef, layers: int | None = None, dtype=None):
    """The model of ``ref`` with ``layers`` layers (None: all), in the current device or fake
    mode; parameters in ``dtype`` (default fp32)."""

    from transformers import AutoModelForCausalLM

    torch = _torch()
    config = copy.deepcopy(model_config(ref))
    if layers is not None:
        config.num_hidden_layers = layers
    dtype = dtype or torch.float32
    if ref.shape is not None and ref.shape.family == "decoder":
        from effllm.models import DecoderForCausalLM

        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # Module.to() cannot swap fake parameters
        try:
            return DecoderForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


@contextlib.contextmanager
def saved_config(ref: ModelRef):
    """A folder holding ``ref``'s config.json, for the functions that read a model folder."""
    with tempfile.TemporaryDirectory(prefix="effllm-plan-") as folder:
        model_config(ref).save_pretrained(folder)
        yield Path(folder)


# ------------------------------------------------------------------------- quantised linears


def int4_bytes(out_features: int, in_features: int, double_quant: bool) -> dict[str, int]:
    """What bitsandbytes holds for one 4-bit linear weight (as loaded on a GPU): two weights a
    byte (uint8), one absmax per 64-weight block (fp32; with double quantisation uint8 plus an
    fp32 absmax per 256 blocks, their 256-entry fp32 code and an fp32 offset) and the 16-entry
    fp32 code of NF4/FP4."""
    n = out_features * in_features
    blocks = math.ceil(n / BNB_BLOCK)
    state = 16 * 4
    if double_quant:
        state += blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCK) + 256 * 4 + 4
    else:
        state += 4 * blocks
    return {"weight": math.ceil(n / 2), "quant_state": state}


def int8_bytes(out_features: int, in_features: int) -> dict[str, int]:
    """LLM.int8: the int8 weight and one fp32 scale per output row (``SCB``)."""
    return {"weight": out_features * in_features, "quant_state": 4 * out_features}


def weight_only_bytes(out_features: int, in_features: int, method: str, bits: int,
                      group_size: int | None) -> dict[str, int]:
    """What a weight-only quantiser of the techniques block holds for one linear weight: HQQ
    views it as rows of ``group_size`` (64) weights, packs 8 / ``bits`` rows a byte (3 bits:
    10 rows an int32) and keeps a bf16 scale and zero point per row; torchao int8 an int8
    weight with an fp32 scale and an int8 zero point per output row; torchao int4 two weights
    a byte and a bf16 scale and zero point per group (128). As
    :func:`effllm.measure.tensors.linear_weight_bytes` counts them (tested)."""
    n = out_features * in_features
    if method == "torchao" and bits == 8:
        return {"weight": n, "quant_state": 5 * out_features}
    group = group_size or (64 if method == "hqq" else 128)
    rows = math.ceil(n / group)
    if method == "hqq":
        packed = (4 * group * math.ceil(rows / 10) if bits == 3
                  else group * math.ceil(rows * bits / 8))
        return {"weight": packed, "quant_state": 4 * rows}
    return {"weight": math.ceil(n / 2), "quant_state": 4 * rows}


def _quantised_linear_class():
    torch = _torch()

    class Dequantised(torch.autograd.Function):
        """A quantised matmul as bitsandbytes runs it: the weight dequantised to the compute
        dtype for the product (forward, and again for the input gradient), nothing saved but
        the packed weight."""

        @staticmethod
        def forward(ctx, x, packed, out_features, in_features):
            ctx.shape = (out_features, in_features)
            ctx.save_for_backward(packed)
            weight = x.new_empty(ctx.shape)
            return torch.nn.functional.linear(x, weight)

        @staticmethod
        def backward(ctx, grad):
            weight = grad.new_empty(ctx.shape)
            return grad @ weight, None, None, None

    class QuantisedLinear(torch.nn.Linear):
        """A linear layer holding bitsandbytes' bytes (packed weight as a frozen parameter,
        quantisation state as buffers), computing as its kernels do."""

        def __init__(self, linear, parts: dict[str, int]):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = torch.nn.Parameter(torch.empty(parts["weight"], 1, dtype=torch.uint8),
                                             requires_grad=False)
            self.register_buffer("quant_state", torch.empty(parts["quant_state"],
                                                            dtype=torch.uint8))
            self.bias = linear.bias

        def forward(self, x):
            out = Dequantised.apply(x, self.weight, self.out_features, self.in_features)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    return QuantisedLinear


def quantise(model, ref: ModelRef, bits: int, double_quant: bool, weights=None) -> list[str]:
    """Replace the linears bitsandbytes would quantise (every one the job's ``bnb_config``
    does not keep: head, routers, the CPU kernels' odd widths), or with ``weights`` (a
    :class:`effllm.specs.WeightQuant`) those the weight-only quantiser takes (all but head,
    routers and directly read layers), by :func:`_quantised_linear_class` layers holding their
    bytes; returns the names kept in high precision."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from effllm.models.quantize import exact_modules, quantisable_skips

    torch = _torch()
    with saved_config(ref) as folder:
        keep = exact_modules(folder) + (quantisable_skips(folder) if bits == 4 and not weights
                                        else [])
    cls = _quantised_linear_class()

    def parts(linear) -> dict[str, int]:
        shape = (linear.out_features, linear.in_features)
        if weights is not None:
            return weight_only_bytes(*shape, weights.method, weights.bits, weights.group_size)
        return int4_bytes(*shape, double_quant) if bits == 4 else int8_bytes(*shape)

    kept = []
    if weights is not None:
        from effllm.inference.techniques import takes
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        if not (takes(name, module, weights, keep) if weights is not None
                else should_convert_module(name, keep)):
            kept.append(name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                cls(module, parts(module)))
    model.is_loaded_in_4bit = bits == 4 and weights is None
    return kept


# ------------------------------------------------------------------------------- fake runtime


@contextlib.contextmanager
def fake_world(world: int):
    """A process group of ``world`` fake ranks (no other process, no communication), its mesh
    yielded: FSDP2 shards and gathers as on ``world`` GPUs. ``world`` 1: none, yields None."""
    if world < 2:
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the plan simulates ranks in a process of its own; a process group "
                           "is already initialised here")
    hook = sys.excepthook  # each init wraps it in one more "[rank0]:" prefix: restored below
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


@contextlib.contextmanager
def balanced_routing():
    """Routing is data-dependent: an MoE layer reads its expert counts on the host, NSA packs
    its selected blocks by count. On fake tensors every expert (every key block) gets an equal
    share of the assignments, the balanced routing a load-balancing loss drives to: the counts
    are made as real tensors (fake mode adopts them), and NSA packs a balanced selection."""
    torch = _torch()
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    from effllm.models import nsa

    original, pack = torch.bincount, nsa.pack_tiles

    def bincount(values, weights=None, minlength=0):
        if not isinstance(values, FakeTensor):
            return original(values, weights, minlength)
        n, bins = values.numel(), max(minlength, 1)
        with unset_fake_temporarily():
            return torch.tensor([n // bins + (i < n % bins) for i in range(bins)])

    def pack_tiles(key, n_keys, tile):
        if not isinstance(key, FakeTensor):
            return pack(key, n_keys, tile)
        with unset_fake_temporarily():
            return pack(torch.arange(key.numel(), device="cpu") % n_keys, n_keys, tile)

    torch.bincount, nsa.pack_tiles = bincount, pack_tiles
    try:
        yield
    finally:
        torch.bincount, nsa.pack_tiles = original, pack


def _host_reads():
    """A dispatch mode that answers the host reads of fake values fake mode cannot answer
    (constants such as the optimiser's step it keeps itself). Positions are ``torch.arange``
    tensors: their elements are followed through views, indexing and max/min, so
    ``int(pos[-1])`` or ``int(position_ids.max())`` reads the real value. Any other read is
    answered 0 and counted (``HostReads.unknown``); masks are left out (:func:`unmasked`), so
    none of the families here makes one."""
    torch = _torch()
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.weak import WeakIdKeyDictionary

    aten = torch.ops.aten
    same = {aten.unsqueeze.default, aten.expand.default, aten.view.default, aten.alias.default,
            aten._unsafe_view.default, aten.detach.default, aten.clone.default,
            aten._to_copy.default, aten.lift_fresh.default}
    aranges = {aten.arange.default, aten.arange.start, aten.arange.start_step}

    class HostReads(TorchDispatchMode):
        unknown = 0

        def __init__(self):
            super().__init__()
            self.values = WeakIdKeyDictionary()  # tensor -> its elements (a range or list)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is aten._local_scalar_dense.default and args[0] in self.values:
                known = self.values[args[0]]
                if len(known) == 1:
                    return known[0]
            try:
                out = func(*args, **kwargs)
            except DataDependentOutputException:  # a value fake mode does not track
                if func is not aten._local_scalar_dense.default:
                    raise
                HostReads.unknown += 1
                return 0.0 if args[0].dtype.is_floating_point else 0
            self._follow(func, args, out)
            return out

        def _follow(self, func, args, out):
            if func in aranges:
                self.values[out] = range(*[int(a) for a in args[:3]])
            elif not args or not isinstance(args[0], torch.Tensor) \
                    or args[0] not in self.values:
                return
            elif func in same:
                self.values[out] = self.values[args[0]]
            elif func is aten.select.int and args[1] == 0:
                self.values[out] = [self.values[args[0]][args[2]]]
            elif func is aten.slice.Tensor and (len(args) < 2 or args[1] == 0):
                start, end = (list(args[2:4]) + [None, None])[:2]
                step = args[4] if len(args) > 4 else 1
                self.values[out] = self.values[args[0]][slice(start, end, step)]
            elif func in (aten.max.default, aten.min.default):
                known = self.values[args[0]]
                self.values[out] = [max(known) if func is aten.max.default else min(known)]

    return HostReads()


@contextlib.contextmanager
def movable_fakes():
    """``Module.to()`` swaps a fake parameter for its converted copy, which fails on the
    parameters fake mode keeps weak references to (torch 2.13); the conversion is then done as
    ``param.data = converted``, what ``to()`` does for real tensors (peft moves each new adapter
    to its base layer's device and dtype)."""
    import torch.utils
    from torch._subclasses.fake_tensor import FakeTensor

    original = torch.utils.swap_tensors

    def swap(t1, t2):
        try:
            return original(t1, t2)
        except RuntimeError:
            if not (isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor)):
                raise
            t1.data = t2.data

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


@contextlib.contextmanager
def own_propagation():
    """DTensor (FSDP's shards) derives each op's output shape by running the op on fake
    tensors of the *global* shape, in the fake mode it finds active: ours, under which the
    account would book them (the whole model at once for ``clip_grad_norm_``). It is given a
    fake mode of its own, which the account skips as it does in a real run."""
    from torch.distributed.tensor import _sharding_prop

    original = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args, **kwargs: None
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = original


@contextlib.contextmanager
def fake_runtime(world: int, fake: bool = True):
    """Fake tensors, a fake process group of ``world`` ranks, balanced MoE routing, host reads
    answered (:func:`_host_reads`) and fake modules movable (:func:`movable_fakes`).
    ``fake`` False: real tensors in this process (the tests' reference run), nothing else."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not fake:
        with fake_world(world) as mesh:
            yield mesh
        return
    with fake_world(world) as mesh, FakeTensorMode(allow_non_fake_inputs=True), \
            balanced_routing(), movable_fakes(), own_propagation(), _host_reads():
        yield mesh


@contextlib.contextmanager
def _collected():
    """Reference cycles collected before the work and where each phase begins
    (:func:`phase`), never in between: what is freed, and when, does not hang on the garbage
    collector's timing (a real run's frequent young-generation collections free cyclic
    garbage soon after it is made)."""
    import gc

    gc.collect()
    gc.freeze()  # what exists now is never garbage here: later collections skip it (fast)
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def phase(tracking, name: str) -> None:
    """Start phase ``name`` of the account, cyclic garbage of the last one collected. The
    optimiser step runs with the collector on: FSDP's sharded (DTensor) temporaries come in
    reference cycles, which a real run frees as it goes."""
    import gc

    gc.collect()
    tracking.phase(name)
    if name == "optimizer":
        gc.enable()


def unmasked(model):
    """Drop the attention mask of ``model``'s forward calls: on fake tensors its padding is
    unknown, and a full mask means plain causal attention (what unpadded windows use; a padded
    batch's [B, 1, T, T] boolean mask is left out of the account). Returns the hook's handle."""

    def hook(module, args, kwargs):
        kwargs.pop("attention_mask", None)
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------- training


def _methods():
    from effllm.training import methods

    return methods


def trainable_model(work: TrainWork, layers: int, mesh=None):
    """The job's model and optimiser as its stage prepares them, at ``layers`` layers: a
    pretraining model (fp32, every weight trained) or a fine-tuning base with its method
    applied (frozen weights in bf16 at bf16 precision, a 4-bit base for QLoRA), sharded with
    FSDP2 under ``fsdp``, with gradient checkpointing when asked."""
    from effllm.training.loop import adamw, use_checkpointing
    from effllm.training.sharding import shard

    method = work.method
    model = build(work.model, layers)
    if method is not None and method.qlora:
        from peft import prepare_model_for_kbit_training

        quantise(model, work.model, 4, method.qlora.double_quant is not False)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.train()
    if work.strategy == "fsdp":  # ZeRO-3 (FSDP2), before the method, as the stages do
        if method is not None:  # each weight in its dtype first, as finetune.load_sharded
            _methods().dtypes_for_sharding(model, method, work.precision)
        shard(model, "cpu", work.precision, work.offload, mesh=mesh)
    if method is None:
        optimizer = adamw(model, 1e-4, 0.0)
    else:
        model, optimizer = _methods().prepare(model, method, 1e-4, precision=work.precision)
    use_checkpointing(model, type("Cfg", (), {"gradient_checkpointing": work.checkpointing}))
    return model, optimizer


def train_account(work: TrainWork, layers: int, seq_len: int, fake: bool = True,
                  flops: bool = True) -> dict:
    """Phases and FLOPs of one optimiser step of ``work`` at ``layers`` layers and ``seq_len``
    tokens, on fake tensors (``fake`` False: real ones), the second step (optimiser state
    exists). ``flops`` False: not counted (None), the first step left out."""
    from effllm.measure import count_flops
    from effllm.measure.tensors import track
    from effllm.training.loop import _accumulate

    torch = _torch()
    passes = min(work.passes, 2)  # the second pass peaks with the first's gradients: so do all
    with fake_runtime(work.world if work.strategy == "fsdp" else 1, fake) as mesh:
        model, optimizer = trainable_model(work, layers, mesh)
        static = static_bytes(model, training=True)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(3, vocab, (work.rows * passes, seq_len))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        trained = [p for p in model.parameters() if p.requires_grad]

        def step(tracking=None):
            predicted = (batch["labels"][:, 1:] != -100).sum().double()
            total = predicted * (work.world if work.strategy == "fsdp" else 1)
            _accumulate(model, batch, work.rows, predicted, total, work.precision, "cpu")
            if tracking is not None:
                phase(tracking, "optimizer")
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        masks = unmasked(model)
        # The first step, counted (the counter keeps tensors alive: never under the account),
        # leaves the optimiser's state; the second is booked.
        if flops:
            flops = count_flops(step)
        else:  # the optimiser's state as after a first step, without its work
            for p in trained:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            flops = None
        with _collected(), track(model, optimizer, device="cpu") as t:
            hooks = [model.register_forward_pre_hook(lambda *a: phase(t, "forward")),
                     model.register_forward_hook(lambda *a: phase(t, "backward"))]
            step(t)
            for hook in hooks:
                hook.remove()
        masks.remove()
    return {"phases": t.account.phases,
            "flops": {"step": None if flops is None else flops * work.passes / passes},
            "kv_cache": {}, "static": static}


# ----------------------------------------------------------------------------------- serving

SERVE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def serving_model(work: ServeWork, layers: int):
    """The served model at its precision (int4/int8: bitsandbytes' bytes, other weights in
    the compute dtype), in eval mode."""
    torch = _torch()
    quant = work.quant
    if work.precision in SERVE_DTYPES:
        dtype = getattr(torch, SERVE_DTYPES[work.precision])
    else:
        compute = (quant.compute_dtype or "bf16") if work.precision == "int4" else "bf16"
        dtype = getattr(torch, SERVE_DTYPES[compute])
    model = build(work.model, layers, dtype)
    if work.precision in ("int4", "int8"):
        quantise(model, work.model, 4 if work.precision == "int4" else 8,
                 quant.double_quant is not False)
    elif work.weights is not None:
        quantise(model, work.model, work.weights.bits, False, work.weights)
    return model.eval()


def draft_bytes(work: ServeWork) -> int:
    """Bytes of a speculative draft model's weights, held beside the served model for the
    whole job (full depth on fake tensors, in the served compute dtype; its own small cache
    and activations while it drafts are left out)."""
    if work.draft is None:
        return 0
    torch = _torch()
    dtype = getattr(torch, SERVE_DTYPES.get(work.precision, "bfloat16"))
    with fake_runtime(1):
        return sum(static_bytes(build(work.draft, None, dtype), training=False).values())


def teacher_bytes(work: TrainWork) -> int:
    """Bytes a distillation teacher adds to each rank: its fp32 weights (the job loads it so;
    replicated, not sharded), its logits for one pass at the compute dtype, and the fp32
    log-softmax of teacher and student and the teacher's probabilities that the KL holds
    (activations of its forward, freed layer by layer under no_grad, left out)."""
    if work.teacher is None:
        return 0
    with fake_runtime(1):
        model = build(work.teacher, None, _torch().float32)
        weights = sum(static_bytes(model, training=False).values())
        vocab = model.get_input_embeddings().num_embeddings
    logits = work.rows * work.seq_len * vocab
    compute = 2 if work.precision in ("bf16", "fp16") else 4
    return weights + logits * (compute + 3 * 4)


def _with_draft(sim: Simulation, work) -> Simulation:
    """``sim`` with the second model's bytes added to every phase: a speculative draft's weights
    (:func:`draft_bytes`) as ``draft``, a distillation teacher's (:func:`teacher_bytes`) as
    ``teacher``."""
    part = "draft" if work.kind == "serve" else "teacher"
    extra = draft_bytes(work) if work.kind == "serve" else teacher_bytes(work)
    if not extra:
        return sim
    phases = {name: {**parts, part: extra, "total": parts["total"] + extra}
              for name, parts in sim.phases.items()}
    return dataclasses.replace(sim, phases=phases, static={**sim.static, part: extra},
                               method=f"{sim.method}; {part} model's bytes added")


def serve_account(work: ServeWork, layers: int, seq_len: int | None, fake: bool = True,
                  flops: bool = True) -> dict:
    """Phases (one per pass) and FLOPs of the serving passes at ``layers`` layers; each pass's
    cache grown by its ``new_tokens`` as generation would (attention caches grow per token,
    Mamba/RWKV states do not). ``seq_len``: the pass length for recurrent families (None: each
    pass's own)."""
    from effllm.measure import count_flops
    from effllm.measure.cache import CACHE_FIELDS, tensor_bytes
    from effllm.measure.tensors import track

    torch = _torch()
    phases, caches, counted = {}, {}, {}
    with fake_runtime(1, fake), torch.no_grad():
        model = serving_model(work, layers)
        static = static_bytes(model, training=False)
        vocab = model.get_input_embeddings().num_embeddings
        keeps = "logits_to_keep" in inspect.signature(model.forward).parameters

        def forward(p):
            ids = torch.randint(3, vocab, (p.batch, seq_len or p.tokens))
            kwargs = {"logits_to_keep": 1} if keeps and p.logits == "last" else {}
            out = model(input_ids=ids, use_cache=True, **kwargs)
            if p.logits == "all":
                torch.nn.functional.log_softmax(out.logits, dim=-1)
            state = next((getattr(out, f) for f in CACHE_FIELDS
                          if getattr(out, f, None) is not None), None)
            return tensor_bytes(state) if state is not None else 0

        for p in work.passes:  # counted apart: the counter keeps tensors alive
            counted[p.name] = count_flops(lambda: forward(p)) if flops else None
        with _collected(), track(model, device="cpu") as t:
            for p in work.passes:
                phase(t, p.name)
                caches[p.name] = forward(p)
        phases = {name: dict(parts) for name, parts in t.account.phases.items()}
    for p in work.passes:
        grown = 0 if work.model.family in RECURRENT else caches[p.name] * p.new_tokens // (
            seq_len or p.tokens)
        phases[p.name]["kv_growth"] = grown
        phases[p.name]["total"] += grown
    return {"phases": phases, "flops": counted, "kv_cache": caches, "static": static}


# ------------------------------------------------------------------------ extrapolation, cache


def sim_depths(work) -> tuple[int, int]:
    """The two depths simulated: the first layers that behave like every later one (Freeze's
    frozen layers come first, so past them; under FSDP past the first layers, whose gather of
    the next layer ahead is not yet in steady state)."""
    base = 1
    method = getattr(work, "method", None)
    if method is not None and method.name == "freeze":
        base = method.layers + 1
    if getattr(work, "strategy", None) == "fsdp":
        base += 1
    return base + 1, base + 2


def _fit(points: dict[tuple[int, int], float], depth_at: int, length_at: int) -> float:
    """Value at (``depth_at``, ``length_at``) of the bilinear (with one simulated length:
    linear in depth) function through ``points`` {(depth, length): value}."""
    (d1, d2) = sorted({d for d, _ in points})
    lengths = sorted({t for _, t in points})

    def along_depth(t):
        v1, v2 = points[(d1, t)], points[(d2, t)]
        return v1 + (v2 - v1) * (depth_at - d1) / (d2 - d1)

    if len(lengths) == 1:
        return along_depth(lengths[0])
    (t1, t2) = lengths
    a, b = along_depth(t1), along_depth(t2)
    return a + (b - a) * (length_at - t1) / (t2 - t1)


def _extrapolate(accounts: dict[tuple[int, int], dict], layers: int,
                 lengths: dict[str, int], length: int = 0) -> dict:
    """Every part of every phase, the FLOPs and the caches of ``accounts`` {(depth, length):
    account} at ``layers`` layers, each phase at its own length (``lengths``, else
    ``length``)."""
    first = next(iter(accounts.values()))

    def fit(key, name, part=None):
        return _fit({k: (acc[key][name] if part is None else acc[key][name].get(part, 0))
                     for k, acc in accounts.items()}, layers, lengths.get(name, length))

    phases = {}
    for name in first["phases"]:
        parts = sorted({p for acc in accounts.values() for p in acc["phases"][name]})
        if name in STEADY and len({t for _, t in accounts}) > 1:
            # no activations live here: not a function of length (simulated ones differ only
            # in transient booking), taken where it is largest, extrapolated in depth
            best = max({t for _, t in accounts},
                       key=lambda t: sum(acc["phases"][name]["total"]
                                         for (d, tt), acc in accounts.items() if tt == t))
            at = {k: acc for k, acc in accounts.items() if k[1] == best}
            phases[name] = {part: max(0, round(_fit({k: acc["phases"][name].get(part, 0)
                                                     for k, acc in at.items()}, layers, 0)))
                            for part in parts}
        else:
            phases[name] = {part: max(0, round(fit("phases", name, part))) for part in parts}
        # the total is fitted on its own (the moment a phase peaks may hold its bytes in other
        # parts at another depth); what the persistent parts leave of it is activations
        held = ("params", "buffers", "grads", "optimizer", "quant_state", "kv_growth")
        fitted = phases[name]
        rest = fitted["total"] - sum(fitted.get(p, 0) for p in held)
        for part in ("activations", "temporaries", "other"):
            fitted.pop(part, None)
        fitted["activations"] = max(0, rest)
    return {"phases": phases,
            "flops": {name: None if first["flops"][name] is None
                      else max(0.0, fit("flops", name)) for name in first["flops"]},
            "kv_cache": {name: max(0, round(fit("kv_cache", name)))
                         for name in first["kv_cache"]},
            "static": {name: round(fit("static", name)) for name in first["static"]}}


def static_bytes(model, training: bool) -> dict[str, int]:
    """Bytes ``model`` holds before any work, on this rank, counted tensor by tensor:
    parameters (each rank's shards under FSDP; tied ones once), buffers and quantisation state,
    and in training the gradients and AdamW's state of the trained parameters (``exp_avg`` and
    ``exp_avg_sq`` like the parameter, a 4-byte ``step`` each)."""
    seen, params, trained, count = set(), 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p.to_local() if hasattr(p, "to_local") else p
        size = local.numel() * local.element_size()
        params += size
        if p.requires_grad:
            trained += size
            count += 1
    state = {name: b.numel() * b.element_size() for name, b in model.named_buffers()}
    quant = sum(v for name, v in state.items() if name.endswith(".quant_state"))
    out = {"params": params, "buffers": sum(state.values()) - quant, "quant_state": quant}
    if training:
        out.update(grads=trained, optimizer=2 * trained + 4 * count)
    return out


def cache_path(work, kind: str | None = None) -> Path:
    """Where the simulation of ``work`` is cached (``kind`` "state": :func:`state`'s)."""
    from effllm.measure.peak import cache_dir

    import torch
    import transformers

    # the release, not the build (+cpu, +cu124): a GPU node reads what a CPU node planned
    versions = (f"v{VERSION}-torch{torch.__version__.split('+')[0]}"
                f"-tf{transformers.__version__}")
    return cache_dir() / "plan" / versions / f"{kind or work.kind}-{digest(work)}.json"


def canonical(work):
    """The workload as simulated: DDP ranks each run the single process's step (their gradient
    buckets are added by :func:`effllm.plan.fit.rank_peak`), so they share its simulation."""
    if work.kind == "train" and work.strategy == "ddp":
        return dataclasses.replace(work, strategy="single", world=1)
    return work


def simulate(work: TrainWork | ServeWork, use_cache: bool = True, flops: bool = True
             ) -> Simulation:
    """The workload's account at full depth (and length), from the disk cache when this
    workload was simulated before with this code and these library versions (and, if
    ``flops``, with its FLOPs counted)."""
    work = canonical(work)
    path = cache_path(work)
    if use_cache:
        found = cached(work, flops)
        if found is not None:
            return found
    layers = depth(work.model)
    recurrent = work.model.family in RECURRENT
    accounts = {}
    for d in sim_depths(work):
        for t in (LENGTHS if recurrent else (None,)):
            accounts[(d, t or 0)] = (
                train_account(work, d, t or work.seq_len, flops=flops) if work.kind == "train"
                else serve_account(work, d, t, flops=flops))
    if work.kind == "train":
        lengths, length = {}, work.seq_len
    else:
        lengths, length = {p.name: p.tokens for p in work.passes}, 0
    result = _extrapolate(accounts, layers, lengths, length)
    how = (f"simulated at depths {sim_depths(work)}"
           + (f" x lengths {LENGTHS}" if recurrent else "") + f", extrapolated to {layers}")
    sim = _with_draft(Simulation(result["phases"], result["flops"], result["static"],
                                 result["kv_cache"], how), work)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, sim.to_json())
    return sim


def cached(work: TrainWork | ServeWork, flops: bool = False) -> Simulation | None:
    """The workload's simulation from the disk cache (with its FLOPs if ``flops``), else None."""
    path = cache_path(canonical(work))
    if not path.is_file():
        return None
    try:
        found = Simulation(**read_json(path))
    except (OSError, ValueError, TypeError):
        return None  # torn or stale: simulate again
    return found if not flops or None not in found.flops.values() else None


def state(work: TrainWork | ServeWork) -> Simulation:
    """What the workload's rank holds before any work, a floor under its peak cheap enough for
    every DAG build (about a second; :func:`simulate` takes several, more at 24-34B): weights,
    buffers and quantisation state, and in training the gradients and AdamW state of the
    trained weights, each rank's shards under ZeRO-3. Built on fake tensors at two depths as
    :func:`simulate` builds it, extrapolated to the model's depth; no step runs (no
    activations: one phase, ``state``; no FLOPs)."""
    work = canonical(work)
    path = cache_path(work, "state")
    if path.is_file():
        try:
            return Simulation(**read_json(path))
        except (OSError, ValueError, TypeError):
            pass  # torn or stale: build again
    layers, points = depth(work.model), {}
    for d in sim_depths(work):
        if work.kind == "train":
            with fake_runtime(work.world if work.strategy == "fsdp" else 1) as mesh:
                points[(d, 0)] = static_bytes(trainable_model(work, d, mesh)[0], training=True)
        else:
            with fake_runtime(1):
                points[(d, 0)] = static_bytes(serving_model(work, d), training=False)
    first = next(iter(points.values()))
    static = {name: round(_fit({k: v[name] for k, v in points.items()}, layers, 0))
              for name in first}
    result = _with_draft(Simulation(
        {"state": {**static, "total": sum(static.values())}}, {}, static, {},
        f"state only (no step), built at depths {sim_depths(work)}, extrapolated to {layers}"),
        work)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result.to_json())
    return result
