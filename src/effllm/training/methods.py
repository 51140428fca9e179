"""Fine-tuning methods (the paper's second axis): one place that turns a method's settings into a
trainable model and its optimiser.

Adapter methods come from peft: LoRA, LoRA+ (its optimiser, B learning rate = ratio x A's),
RSLoRA (scale alpha / sqrt(r)), DoRA and PiSSA (exact SVD or fast randomised SVD init). Freeze
(the first N decoder layers and the embeddings frozen; the paper freezes the first 8) and Full
need no library.

Precision (``finetune.precision``): ``fp32`` trains and stores everything in fp32; ``bf16`` is
mixed precision as fine-tuning toolkits run it: matrix products in bf16 under autocast, trainable
weights, their gradients and the optimiser state in fp32, and frozen weights (an adapter method's
base, Freeze's frozen layers) stored in bf16, which halves their memory.
"""

from __future__ import annotations

from effllm.precision import PRECISIONS
from effllm.specs import MethodSpec

ADAPTER_METHODS = ("lora", "lora_plus", "rslora", "dora", "pissa")
METHODS = ADAPTER_METHODS + ("freeze", "full")
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


# Adapter methods whose initialisation never reads the base's weights (PiSSA takes their SVD,
# DoRA their norms: those start from the fp32 base, which prepare() then stores in bf16).
BASE_BLIND = ("lora", "lora_plus", "rslora")


def load_base(model_dir, method: MethodSpec, precision: str = "fp32"):
    """The model a method starts from, on the CPU: fp32; in bf16 for LoRA, LoRA+ and RSLoRA at
    bf16 precision (their base stays frozen and peft keeps the adapter in fp32), which halves
    the host memory of loading; or for QLoRA (an adapter method with ``quantized_base``)
    NF4/FP4 linears frozen in bitsandbytes 4-bit, prepared for k-bit training (norms and head in
    fp32, input gradients on), on the device. Returns (model, notes)."""
    import torch
    from transformers import AutoModelForCausalLM

    import effllm.models  # noqa: F401 - registers our config with the Auto classes

    if precision not in PRECISIONS:
        raise ValueError(f"finetune.precision {precision!r} is not one of {PRECISIONS}")
    quant = method.qlora
    if not quant:
        frozen_base = precision == "bf16" and method.name in BASE_BLIND
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16 if frozen_base else torch.float32), None
    from peft import prepare_model_for_kbit_training

    from effllm.models.quantize import load_quantised

    model, note = load_quantised(model_dir, "int4", quant, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.train()  # never evaluate a 4-bit model before training it (docs/metrics.md §8)
    return model, note


def prepare(model, method: MethodSpec, lr: float, weight_decay: float = 0.0,
            precision: str = "fp32"):
    """Wrap ``model`` for ``method``; return (trainable model, optimiser). At bf16 precision the
    frozen weights are stored in bf16 (see the module's docstring); a 4-bit base keeps its own
    dtypes."""
    import torch

    from effllm.training.loop import adamw

    name = method.name
    if name in ADAPTER_METHODS:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(method))
    elif name == "freeze":
        model = _freeze_first_layers(model, method.layers)
    elif name != "full":
        raise ValueError(f"fine-tuning method {name!r} is not one of {METHODS}")
    if precision == "bf16" and not method.qlora:
        store_frozen(model, torch.bfloat16)
    if name == "lora_plus":
        from peft.optimizers import create_loraplus_optimizer

        return model, create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=method.lr_ratio,
            weight_decay=weight_decay, betas=(0.9, 0.95))
    return model, adamw(model, lr, weight_decay)


def store_frozen(model, dtype) -> None:
    """Keep every frozen floating-point weight in ``dtype`` (trainable ones stay as they are)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def merged(model, base_dir=None):
    """A plain fp32 model with the adapter folded in (or the model itself for Freeze and Full).
    Weights stored in bf16 are widened first: an update folded into bf16 weights would mostly
    round away.

    A QLoRA adapter is folded into a fresh fp32 copy of the base from ``base_dir`` (the usual
    QLoRA practice: merging into 4-bit weights would re-quantise them); it was trained against
    the 4-bit base, so the merged model differs from the trained one by the base's quantisation
    error."""
    if not hasattr(model, "merge_and_unload"):
        return model.float()
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(
            model.get_base_model(), "is_loaded_in_4bit", False):
        return model.float().merge_and_unload()
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base_dir is None:
        raise ValueError("merging a QLoRA adapter needs the base model's directory")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()
