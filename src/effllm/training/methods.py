"""Fine-tuning methods (the paper's second axis): one place that turns a method's settings into a
trainable model and its optimiser.

Adapter methods come from peft: LoRA, LoRA+ (its optimiser, B learning rate = ratio x A's),
RSLoRA (scale alpha / sqrt(r)), DoRA and PiSSA (exact SVD or fast randomised SVD init). Freeze
(the first N decoder layers and the embeddings frozen; the paper freezes the first 8) and Full
need no library.
"""

from __future__ import annotations

ADAPTER_METHODS = ("lora", "lora_plus", "rslora", "dora", "pissa")
METHODS = ADAPTER_METHODS + ("freeze", "full")
LABELS = {"lora": "LoRA", "lora_plus": "LoRA+", "rslora": "RSLoRA", "dora": "DoRA",
          "pissa": "PiSSA", "freeze": "Freeze", "full": "Full"}


def _lora_config(method: dict):
    from peft import LoraConfig

    name = method["name"]
    init = True
    if name == "pissa":
        niter = method.get("niter")
        init = f"pissa_niter_{niter}" if method.get("init", "fast") == "fast" and niter else "pissa"
    return LoraConfig(
        r=method["r"], lora_alpha=method["alpha"],
        lora_dropout=0.0 if name == "pissa" else method["dropout"],  # PiSSA's init assumes none
        target_modules=list(method["target_modules"]), task_type="CAUSAL_LM",
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


def load_base(model_dir, method: dict):
    """The model a method starts from: fp32, or for QLoRA (an adapter method with
    ``quantized_base``) NF4/FP4 linears frozen in bitsandbytes 4-bit, prepared for k-bit
    training (norms and head in fp32, input gradients on). Returns (model, notes)."""
    import torch
    from transformers import AutoModelForCausalLM

    import effllm.models  # noqa: F401 - registers our config with the Auto classes

    quant = method.get("quantized_base")
    if not quant:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), None
    from peft import prepare_model_for_kbit_training

    from effllm.models.quantize import load_quantised

    model, note = load_quantised(model_dir, "int4", quant, dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.train()  # never evaluate a 4-bit model before training it (measurement.md §10)
    return model, note


def prepare(model, method: dict, lr: float, weight_decay: float = 0.0, shard=None):
    """Wrap ``model`` for ``method``; return (trainable model, optimiser). ``shard`` (Full on
    several ranks) turns the model into its sharded self before the optimiser sees it."""
    import torch

    from effllm.training.loop import adamw

    name = method["name"]
    if name in ADAPTER_METHODS:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(method))
        if name == "lora_plus":
            from peft.optimizers import create_loraplus_optimizer

            return model, create_loraplus_optimizer(
                model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=method["lr_ratio"],
                weight_decay=weight_decay, betas=(0.9, 0.95))
    elif name == "freeze":
        model = _freeze_first_layers(model, method["layers"])
    elif name != "full":
        raise ValueError(f"fine-tuning method {name!r} is not one of {METHODS}")
    if shard is not None:
        model = shard(model)
    return model, adamw(model, lr, weight_decay)


def merged(model, base_dir=None):
    """A plain model with the adapter folded in (or the model itself for Freeze and Full).

    A QLoRA adapter is folded into a fresh fp32 copy of the base from ``base_dir`` (the usual
    QLoRA practice: merging into 4-bit weights would re-quantise them); it was trained against
    the 4-bit base, so the merged model differs from the trained one by the base's quantisation
    error."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(
            model.get_base_model(), "is_loaded_in_4bit", False):
        return model.merge_and_unload()
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
