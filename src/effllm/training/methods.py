"""Fine-tuning methods (the paper's second axis): one place that turns a method's settings into a
trainable model and its optimiser.

Adapter methods come from peft: LoRA, LoRA+ (its optimiser, B learning rate = ratio x A's),
RSLoRA (scale alpha / sqrt(r)), DoRA and PiSSA (exact SVD or fast randomised SVD init). Freeze
(the first N decoder layers and the embeddings frozen; the paper freezes the first 8) and Full
need no library.

Precision (``finetune.precision``): ``fp32`` trains and stores everything in fp32; ``bf16`` is
mixed precision as fine-tuning toolkits run it: matrix products in bf16 under autocast, trainable
weights, their gradients and the optimiser state in fp32, and frozen weights (an adapter method's
base, Freeze's frozen layers) read from the checkpoint straight into bf16, which halves their
memory. The model is saved in the precision's dtype (:func:`merged`).
"""

from __future__ import annotations

from effllm.precision import PRECISIONS
from effllm.specs import MethodSpec

ADAPTER_METHODS = ("lora", "lora_plus", "rslora", "dora", "pissa")
METHODS = ADAPTER_METHODS + ("freeze", "full")
# Methods that shard parameters, gradients and optimiser state over 2 or more ranks (ZeRO-3 with
# FSDP2: effllm.training.finetune.load_sharded); the adapter methods run DDP replicas, their
# frozen base whole on every rank. Freeze trains most of a model's weights, so at 7-24B a replica
# per rank would not fit (the plan: 113-385 GB per GPU).
SHARDED_METHODS = ("freeze", "full")
LABELS = {"lora": "LoRA", "lora_plus": "LoRA+", "rslora": "RSLoRA", "dora": "DoRA",
          "pissa": "PiSSA", "freeze": "Freeze", "full": "Full"}


def _lora_config(method: MethodSpec):
    from peft import LoraConfig

    name = method.name
    init = True
    if name == "pissa":
        fast = (method.init or "fast") == "fast" and method.niter
        init = f"pissa_niter_{method.niter}" if fast else "pissa"
    return LoraConfig(
        r=method.r, lora_alpha=method.alpha,
        lora_dropout=0.0 if name == "pissa" else method.dropout,  # PiSSA's init assumes none
        target_modules=list(method.target_modules), task_type="CAUSAL_LM",
        use_rslora=name == "rslora", use_dora=name == "dora", init_lora_weights=init,
    )


def _freeze_first_layers(model, n_layers: int):
    layers = model.model.layers
    if not 0 <= n_layers < len(layers):
        raise ValueError(f"finetune.freeze.layers: {n_layers} must be below the model's "
                         f"{len(layers)} layers")
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the LM head
    for layer in layers[:n_layers]:
        layer.requires_grad_(False)
    return model


def mark_frozen(model, method: MethodSpec):
    """Set ``requires_grad`` off on the base parameters ``method`` never trains (all of them for
    the adapter methods, whose base peft freezes; Freeze's first layers and embeddings; none
    for Full), so that a load can give each parameter its dtype before any weight is read.
    :func:`prepare` freezes the same ones again (idempotent)."""
    if method.name in ADAPTER_METHODS:
        model.requires_grad_(False)
    elif method.name == "freeze":
        _freeze_first_layers(model, method.layers)
    return model


def load_base(model_dir, method: MethodSpec, precision: str = "fp32", device="cpu"):
    """The model a method starts from, on ``device``: every weight the method trains in fp32,
    every frozen one in the training precision's dtype (bf16 at bf16: an adapter method's
    whole base, Freeze's frozen layers and embeddings), read straight into that dtype: never an
    fp32 copy of a frozen weight. Under torchrun only rank 0 reads the checkpoint, one tensor at
    a time, and the others receive each by broadcast (``effllm.training.loading``).

    QLoRA (an adapter method with ``quantized_base``): NF4/FP4 linears frozen in bitsandbytes
    4-bit, quantised by bitsandbytes as transformers loads each weight onto the job's device,
    prepared for k-bit training (norms and head in fp32, input gradients on). QLoRA runs in one
    process (the config refuses more than 1 GPU for it). Returns (model, notes)."""
    import torch

    from effllm.training.loading import empty_model, load_weights

    if precision not in PRECISIONS:
        raise ValueError(f"finetune.precision {precision!r} is not one of {PRECISIONS}")
    quant = method.qlora
    if not quant:
        frozen = torch.bfloat16 if precision == "bf16" else torch.float32
        model = mark_frozen(empty_model(model_dir), method)
        return load_weights(model, model_dir, device,
                            lambda p: torch.float32 if p.requires_grad else frozen), None
    from peft import prepare_model_for_kbit_training

    from effllm.models.quantize import load_quantised

    model, note = load_quantised(model_dir, "int4", quant, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.train()  # never evaluate a 4-bit model before training it (docs/metrics.md §8)
    return model, note


def lora_layers(model):
    """The peft LoRA layers of ``model`` (each wraps one base linear)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def init_from_base(model, method: MethodSpec) -> None:
    """The initialisations that read the base weights, run per layer in fp32 on the layer's
    device (never an fp32 copy of the whole model):

    - PiSSA (Meng et al. 2024, arXiv 2404.02948): A and B from the top-r singular triplets
      of W, the base replaced by the residual W - s·BA. peft's ``pissa_init`` does that in fp32
      from the weight as stored (the bf16 base at bf16, as a bf16 run loads it), writes the
      residual back in the base's dtype, and is run here after the adapters
      are fp32, so A and B keep their fp32 values (inside ``get_peft_model`` they would be
      rounded to the base's bf16 after the SVD).
    - DoRA (Liu et al. 2024, arXiv 2402.09353): the magnitude m = ||W + s·BA||_c, the column
      norm of the weight the layer computes with. peft computes it in the base's dtype (bf16 at
      bf16, then widened); here it is the fp32 norm of the stored (bf16) weights, so that the
      model at step 0 is the base.
    """
    import torch

    if method.name == "pissa":
        init = _lora_config(method).init_lora_weights
        for layer in lora_layers(model):
            for name in layer.lora_A:
                with torch.no_grad():
                    layer.pissa_init(name, init)
        for config in model.peft_config.values():
            config.init_lora_weights = init  # what the adapter's config says it is
    elif method.name == "dora":
        for layer in lora_layers(model):
            weight = layer.get_base_layer().weight
            for name, dora in layer.lora_magnitude_vector.items():
                with torch.no_grad():
                    delta = layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()
                    dora.weight.data = dora.get_weight_norm(weight.float(), delta,
                                                            layer.scaling[name]).float()


def prepare(model, method: MethodSpec, lr: float, weight_decay: float = 0.0,
            precision: str = "fp32"):
    """Wrap ``model`` for ``method``; return (trainable model, optimiser). At bf16 precision the
    frozen weights are stored in bf16 (see the module's docstring): a base from
    :func:`load_base` already holds them so, a model built in fp32 is cast here; a 4-bit base
    keeps its own dtypes. On the device the model is on, PiSSA's and DoRA's initialisation
    runs per layer in fp32 (:func:`init_from_base`)."""
    import torch

    from effllm.training.loop import adamw
    from effllm.training.sharding import is_sharded

    name = method.name
    if name in ADAPTER_METHODS:
        from peft import get_peft_model

        config = _lora_config(method)
        if name == "pissa" and not method.qlora:  # initialised below, in fp32 per layer
            config.init_lora_weights = False
        model = get_peft_model(model, config)
        if not method.qlora:
            init_from_base(model, method)
    elif name == "freeze":
        model = _freeze_first_layers(model, method.layers)
    elif name != "full":
        raise ValueError(f"fine-tuning method {name!r} is not one of {METHODS}")
    if precision == "bf16" and not method.qlora and not is_sharded(model):
        store_frozen(model, torch.bfloat16)  # a sharded model got its dtypes before sharding
    if name == "lora_plus":
        from peft.optimizers import create_loraplus_optimizer

        return model, create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=method.lr_ratio,
            weight_decay=weight_decay, betas=(0.9, 0.95))
    return model, adamw(model, lr, weight_decay)


def dtypes_for_sharding(model, method: MethodSpec, precision: str):
    """Before ZeRO-3 sharding (FSDP2 fixes each unit's dtypes when it shards): ``method``'s
    frozen weights off, and at bf16 stored in bf16 as :func:`load_base` reads them; on the meta
    device, nothing is read. Returns the model."""
    import torch

    mark_frozen(model, method)
    if precision == "bf16":
        store_frozen(model, torch.bfloat16)
    return model


def store_frozen(model, dtype) -> None:
    """Keep every frozen floating-point weight in ``dtype`` (trainable ones stay as they are)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def initial_adapter(model, method: MethodSpec):
    """PiSSA's factors at initialisation, saved as a plain LoRA adapter in a temporary folder
    (a TemporaryDirectory, and the folder in it), so that the trained adapter can be saved for
    the original base (:func:`save_adapter`); None for the other methods, whose adapter
    applies to the base as it is."""
    import tempfile
    from pathlib import Path

    if method.name != "pissa":
        return None
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name) / "pissa_init"
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # peft's rule for this
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        config.init_lora_weights = init
    return tmp, folder


def save_adapter(model, folder, initial=None) -> None:
    """The trained peft adapter in ``folder``. PiSSA's factors apply to the residual base,
    which exists only inside the run (its randomised SVD would not be drawn again), so with
    ``initial`` (:func:`initial_adapter`) peft saves it converted to a LoRA of rank 2r on the
    original base: ΔW = s·(BA - B0·A0), the trained factors beside the initial ones."""
    extra = {} if initial is None else {
        "path_initial_model_for_weight_conversion": str(initial[1])}
    model.save_pretrained(folder, safe_serialization=True, **extra)


STORED = {"fp32": "float32", "bf16": "bfloat16"}  # the dtype a precision's model is saved in


def merged(model, base_dir=None, precision: str = "fp32"):
    """The trained model as a plain model in the training precision's dtype (bf16 at bf16, fp32
    at fp32), with every adapter folded into its base weight in fp32 one module at a time
    (:func:`fold`): never an fp32 copy of the whole model. Freeze and Full are the model
    itself, cast parameter by parameter.

    A QLoRA adapter is folded into a fresh copy of the base from ``base_dir``, loaded in the
    training precision (the usual QLoRA practice: merging into 4-bit weights would re-quantise
    them); it was trained against the 4-bit base, so the merged model differs from the trained
    one by the base's quantisation error."""
    import torch

    dtype = getattr(torch, STORED[precision])
    if not hasattr(model, "merge_and_unload"):
        return model.to(dtype)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(
            model.get_base_model(), "is_loaded_in_4bit", False):
        model = fresh_base_with(model, base_dir, precision)
    return fold(model, dtype)


def fold(model, dtype):
    """peft's merge, layer by layer: each LoRA layer's base weight widened to fp32, the adapter
    (LoRA, DoRA's magnitude and direction, PiSSA's factors on its residual) merged into it by
    peft, the result stored in ``dtype``; then the adapters unloaded. Equals
    ``merge_and_unload`` of the model in fp32, cast to ``dtype``, while at most one layer's
    weight is in fp32 at a time."""
    import torch

    with torch.no_grad():
        for layer in lora_layers(model):
            base = layer.get_base_layer()
            stored = base.weight.dtype
            base.weight.data = base.weight.data.float()
            layer.merge()
            base.weight.data = base.weight.data.to(dtype if stored.is_floating_point else stored)
    return model.unload().to(dtype)


def fresh_base_with(model, base_dir, precision: str):
    """The adapter of a QLoRA model on a fresh base read from ``base_dir`` (loaded as a
    LoRA base: frozen weights in the training precision's dtype, on the adapter's device)."""
    import tempfile

    from peft import PeftModel

    if base_dir is None:
        raise ValueError("merging a QLoRA adapter needs the base model's directory")
    device = next(p.device for n, p in model.named_parameters() if "lora_" in n)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        base, _ = load_base(base_dir, MethodSpec("lora"), precision, device=str(device))
        return PeftModel.from_pretrained(base, tmp)
