"""Knowledge distillation in pretraining (beyond the paper; the survey of seed 002, Ding et al.
2023, on distillation): a student learns from a larger teacher's next-token distribution as
well as from the text.

A run of the distillation block is a pretraining run of the student (its shape: the teacher's
variant at the student's size) on the same batches and steps as its scratch twin, the grid's
run of that shape; only the loss differs:

    loss = (1 - w) * CE(student, text) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the tokens that have a next token (Hinton et al. 2015, arXiv 1503.02531: the T^2
keeps the soft term's gradients on the scale of the hard one's as T changes); an MoE student
keeps its router's load-balancing loss at full weight. It is computed as the model's own loss
plus ``w * (T^2 * KL - CE)``, so that with ``w = 0`` the run is its scratch twin step for step,
bit for bit (tested). The logged training loss is the model's own, as the twin logs it; the KL
is a series of its own. The teacher runs in eval mode without gradients, in the job's precision,
and its forward is part of every timed step: the cost of distillation is in the run's step time
and energy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effllm.specs import DistillSpec, PretrainSpec
from effllm.training.loop import unwrap


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, predicted: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean over the ``predicted`` positions ([batch, seq] bool) of KL(teacher_T ||
    student_T) over the vocabulary, in fp32."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    return per_token[predicted].mean()


class DistillLoss:
    """The distillation loss as :func:`effllm.training.loop.train`'s ``loss_fn``. Each step's
    KL (token-weighted over its micro-batches, this rank's tokens) is read once, after the timed
    step, by :meth:`end_step`."""

    def __init__(self, teacher: torch.nn.Module, cfg: DistillSpec):
        self.teacher, self.cfg = teacher.eval(), cfg
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._kl, self._tokens = [], []

    def __call__(self, model, chunk: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"],
                    labels=chunk["labels"])
        with torch.no_grad():
            teacher = self.teacher(input_ids=chunk["input_ids"],
                                   attention_mask=chunk["attention_mask"]).logits
        # the positions with a next token to predict (the labels are shifted, not the logits)
        predicted = F.pad(chunk["labels"], (0, 1), value=-100)[:, 1:] != -100
        kl = soft_kl(out.logits, teacher, predicted, self.cfg.temperature)
        tokens = predicted.sum()
        self._kl.append(kl.detach() * tokens)
        self._tokens.append(tokens)
        ce = out.loss  # an MoE model's loss carries its router's auxiliary loss: not weighed
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            ce = ce - getattr(unwrap(model).config, "router_aux_loss_coef", 0.0) * aux
        w, t = self.cfg.weight, self.cfg.temperature
        return out.loss + w * (t * t * kl - ce), out.loss

    def end_step(self) -> dict[str, float]:
        """The step's KL, and a fresh start for the next step."""
        tokens = sum(self._tokens)
        value = (sum(self._kl) / tokens).item() if self._tokens and tokens else float("nan")
        self._kl, self._tokens = [], []
        return {"distill_kl": value}


def load_teacher(spec: PretrainSpec, teacher_dir, device) -> DistillLoss:
    """The distillation loss with its teacher loaded from ``teacher_dir`` (fp32 weights:
    autocast computes at the run's precision)."""
    if teacher_dir is None:
        raise ValueError(f"{spec.run_id}: distillation needs its teacher's model directory")
    from transformers import AutoModelForCausalLM

    from effllm.models.quantize import model_config

    model_config(teacher_dir)  # our Mamba/RWKV fixes before the weights load
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    return DistillLoss(teacher.to(device), spec.distill)
