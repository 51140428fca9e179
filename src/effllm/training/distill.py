"""Knowledge distillation in pretraining (beyond the paper; the survey of seed 002, Ding et al.
2023, on distillation): a student learns from a larger teacher's next-token distribution as
well as from the text.

A run of the distillation block is a pretraining run of the student (its shape: the teacher's
variant at the student's size) on the same batches and steps as its scratch twin, the grid's
run of that shape; only the loss differs:

    loss = (1 - w) * CE(student, text) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the tokens that have a next token (Hinton et al. 2015, arXiv 1503.02531: the T^2
keeps the soft term's gradients on the scale of the hard one's as T changes). With ``w = 0``
the run is its scratch twin, step for step (tested). The logged training loss is the
cross-entropy alone, comparable with the twin's; the KL is a series of its own. The teacher
runs in eval mode without gradients, in the job's precision, and its forward is part of every
timed step: the cost of distillation is in the run's step time and energy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effllm.specs import DistillSpec


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, predicted: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean over the ``predicted`` positions ([batch, seq] bool) of KL(teacher_T ||
    student_T) over the vocabulary, in fp32."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return per_token[predicted].mean()


class DistillLoss:
    """The distillation loss as :func:`effllm.training.loop.train`'s ``loss_fn``; keeps each
    chunk's KL (``kl``) and the tokens it averaged over (``tokens``) for the record."""

    def __init__(self, teacher: torch.nn.Module, cfg: DistillSpec):
        self.teacher, self.cfg = teacher.eval(), cfg
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.kl: list[float] = []
        self.tokens: list[int] = []

    def __call__(self, model, chunk: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"],
                    labels=chunk["labels"])
        with torch.no_grad():
            teacher = self.teacher(input_ids=chunk["input_ids"],
                                   attention_mask=chunk["attention_mask"]).logits
        # the positions with a next token to predict (the labels are shifted, not the logits)
        predicted = F.pad(chunk["labels"], (0, 1), value=-100)[:, 1:] != -100
        kl = soft_kl(out.logits, teacher, predicted, self.cfg.temperature)
        self.kl.append(kl.item())
        self.tokens.append(int(predicted.sum()))
        w, t = self.cfg.weight, self.cfg.temperature
        return (1 - w) * out.loss + w * t * t * kl, out.loss

    def steps(self, chunks_per_step: int) -> list[float]:
        """The KL per optimiser step (token-weighted over its chunks)."""
        out = []
        for i in range(0, len(self.kl), chunks_per_step):
            kl, n = self.kl[i:i + chunks_per_step], self.tokens[i:i + chunks_per_step]
            out.append(sum(k * m for k, m in zip(kl, n)) / max(1, sum(n)))
        return out
