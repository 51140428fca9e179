"""Compute precision of training and scoring passes: one definition of what "bf16" means."""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16")  # training precisions (fp16 training is refused by the config)

# What each training precision ran as, for the record.
PRECISION_NOTES = {"fp32": "fp32",
                   "bf16": "bf16 autocast; trainable weights, gradients and optimiser state fp32"}


def autocast(device, precision: str = "fp32"):
    """The compute precision of a forward pass: bf16 autocast (matrix products in bf16, norms,
    softmax and losses in fp32) or, for fp32, a context that changes nothing. Without autocast's
    weight cache: it would keep a bf16 copy of every weight for as long as the context lasts
    (a whole evaluation), and each weight is cast once per forward pass anyway. torch is imported
    here, not at the top: the Snakefile reads PRECISIONS through the sweep at parse time."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16", cache_enabled=False)
