"""Perplexity of held-out token streams, and metrics that stay honest when a value overflows."""

from __future__ import annotations

import math

import numpy as np
import torch

from effllm.evaluation.logprobs import token_scores
from effllm.precision import autocast
from effllm.records import Metric


def safe_exp(x: float) -> float:
    """exp that gives inf instead of raising for a huge (or NaN stays NaN) mean NLL."""
    return math.exp(x) if x < 709 or math.isnan(x) else math.inf


def finite_metric(value: float, unit: str, method: str, note: str | None = None) -> Metric:
    """A measured value, or ``unavailable`` saying why when the computation overflowed.

    Low precisions can overflow (fp16's largest value is 65504): a NaN or infinite loss is a real
    finding about that precision, recorded with its reason, never a crash and never a number.
    """
    if math.isfinite(value):
        return Metric.measured(value, unit, method, note)
    return Metric.unavailable(unit, method, f"non-finite result ({value}): the model's logits "
                              f"overflowed at this precision; {note or ''}".rstrip("; "))


def token_windows(tokens: np.ndarray, length: int, max_tokens: int) -> list[np.ndarray]:
    """Non-overlapping windows of ``length`` tokens from the start, at most ``max_tokens``
    (at least one window)."""
    n_windows = max(1, min(len(tokens), max_tokens) // length)
    windows = [tokens[i * length:(i + 1) * length] for i in range(n_windows)]
    windows = [w for w in windows if len(w) == length]
    if not windows:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than seq_len {length}")
    return windows


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 8,
               precision: str = "fp32") -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of held-out tokens, forward passes at
    ``precision``, never holding a batch's full logits; returns (ppl, scored)."""
    model.eval()
    windows = token_windows(tokens, seq_len, max_tokens)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.int64))
        ids = ids.to(model.device)
        targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
        with autocast(model.device, precision):
            part, _, scored = token_scores(model, ids, torch.ones_like(ids), targets)
        nll += part
        count += scored
    return safe_exp(nll / count), count
