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


def prepare(model, method: dict, lr: float, weight_decay: float = 0.0):
    """Wrap ``model`` for ``method``; return (trainable model, optimiser)."""
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
    return model, adamw(model, lr, weight_decay)


def merged(model):
    """A plain model with the adapter folded in (or the model itself for Freeze and Full)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
