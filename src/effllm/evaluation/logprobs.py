"""Summed token log-likelihoods without the full ``batch × seq × vocab`` logits.

At paper scale the logits of one scoring batch are the largest tensor of the job (16 × 2048
tokens × a 152k vocabulary is 20 GB in fp32, plus the copies a loss makes). Here the model runs
with its output head swapped for a stand-in that keeps the hidden states and returns a
zero-strided view, and the head is applied in blocks of rows and of vocabulary: a running
log-sum-exp, the target's logit and the running argmax, at most ``rows × vocab`` logits at once.
Models whose logits are transformed after the head (soft-capping) and sharded (FSDP) models are
scored the plain way.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

ROWS, VOCAB = 1024, 32768  # logits held at once: 32 M (128 MB in fp32)


def blockable(model) -> bool:
    """Whether the head can be applied in blocks: a plain linear head, no soft-capping, and
    not a sharded model (its head's weights are gathered only inside its forward)."""
    from torch.distributed.fsdp import FSDPModule

    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    return (type(head) is torch.nn.Linear and not isinstance(model, FSDPModule)
            and getattr(config, "final_logit_softcapping", None) is None)


@contextmanager
def _hidden_only(head: torch.nn.Linear, kept: list):
    """The head keeps its input and returns a zero-strided fp32 view in place of logits."""
    def forward(x):
        kept.append(x)
        return x.new_zeros((), dtype=torch.float32).expand(*x.shape[:-1], head.out_features)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


@torch.no_grad()
def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 targets: torch.Tensor, rows: int = ROWS, vocab: int = VOCAB,
                 forward: dict | None = None) -> tuple[float, int, int]:
    """(summed NLL, correct argmax predictions, scored tokens) of ``targets`` (the next token
    at each position; -100 = not scored) under the model's causal predictions; ``forward``:
    more forward arguments (a decoding cache holding earlier tokens)."""
    head = model.get_output_embeddings()
    forward = {"use_cache": False, **(forward or {})}
    if not blockable(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       **forward).logits.float()
        keep = targets != -100
        nll = F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        return nll, int((logits.argmax(-1)[keep] == targets[keep]).sum()), int(keep.sum())
    kept: list = []
    with _hidden_only(head, kept):
        model(input_ids=input_ids, attention_mask=attention_mask, **forward)
    keep = targets != -100
    hidden, wanted = kept[-1][keep], targets[keep]
    nll, correct = 0.0, 0
    for r in range(0, hidden.shape[0], rows):
        part_nll, part_argmax = _blocked(hidden[r:r + rows], head, wanted[r:r + rows], vocab)
        nll += part_nll.sum().item()
        correct += int((part_argmax == wanted[r:r + rows]).sum())
    return nll, correct, int(keep.sum())


def _blocked(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, vocab: int):
    """Per row: -log p(target) and the argmax, over the vocabulary in blocks."""
    n = hidden.shape[0]
    running_max = hidden.new_full((n,), -float("inf"), dtype=torch.float32)
    running_sum = hidden.new_zeros((n,), dtype=torch.float32)
    target_logit = hidden.new_zeros((n,), dtype=torch.float32)
    best, best_at = running_max.clone(), torch.zeros(n, dtype=torch.long, device=hidden.device)
    for v in range(0, head.out_features, vocab):
        bias = head.bias[v:v + vocab] if head.bias is not None else None
        logits = F.linear(hidden, head.weight[v:v + vocab], bias).float()
        block_max, block_at = logits.max(-1)
        new_max = torch.maximum(running_max, block_max)
        running_sum = (running_sum * torch.exp(running_max - new_max)
                       + torch.exp(logits - new_max[:, None]).sum(-1))
        running_max = new_max
        inside = (targets >= v) & (targets < v + logits.shape[1])
        rows = inside.nonzero().squeeze(-1)
        target_logit[rows] = logits[rows, targets[rows] - v]
        better = block_max > best  # strictly: the first maximum wins, as argmax
        best, best_at = torch.where(better, block_max, best), torch.where(better, block_at + v,
                                                                          best_at)
    return running_max + torch.log(running_sum) - target_logit, best_at
