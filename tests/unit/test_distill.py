"""Knowledge distillation (issue 22): the soft-target KL against torch's own KL divergence,
distillation at weight 0 is its scratch twin step for step, a student at weight > 0 learns
towards its teacher, and the record says what the student learnt from."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from effllm.specs import DistillSpec
from effllm.training.distill import DistillLoss, soft_kl
from examples import SPEC


def test_soft_kl_is_torchs_kl_divergence_over_the_predicted_tokens():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    predicted = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    for t in (1.0, 2.0, 4.0):
        reference = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                             log_target=True, reduction="none").sum(-1)
        assert soft_kl(student, teacher, predicted, t).item() == pytest.approx(
            reference[predicted].mean().item(), rel=1e-6)
    assert soft_kl(teacher, teacher, predicted, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_the_loss_mixes_cross_entropy_and_the_scaled_kl():
    from effllm.models import DecoderConfig, DecoderForCausalLM

    def model(seed):
        torch.manual_seed(seed)
        return DecoderForCausalLM(DecoderConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))

    student, teacher = model(0), model(1)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    chunk = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_fn = DistillLoss(teacher, DistillSpec(temperature=2.0, weight=0.25))
    loss, ce = loss_fn(student, chunk)
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    kl = soft_kl(s[:, :-1], t[:, :-1], torch.ones(2, 11, dtype=torch.bool), 2.0)
    assert ce.item() == pytest.approx(student(**chunk).loss.item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.75 * ce.item() + 0.25 * 4 * kl.item(), rel=1e-5)
    loss_fn(student, {k: v[:1] for k, v in chunk.items()})  # a second micro-batch: one row
    first = soft_kl(s[:1, :-1], t[:1, :-1], torch.ones(1, 11, dtype=torch.bool), 2.0)
    step = loss_fn.end_step()["distill_kl"]  # token-weighted over the step's micro-batches
    assert step == pytest.approx((22 * kl.item() + 11 * first.item()) / 33, rel=1e-5)
    assert math.isnan(loss_fn.end_step()["distill_kl"])  # a fresh step: nothing yet
    assert not any(p.requires_grad for p in teacher.parameters())


def test_an_moe_students_router_loss_keeps_its_weight():
    from effllm.models import DecoderConfig, DecoderForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    student = DecoderForCausalLM(DecoderConfig(**config, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32))
    teacher = DecoderForCausalLM(DecoderConfig(**config))
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    chunk = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    out = student(**chunk)
    aux = student.config.router_aux_loss_coef * out.aux_loss
    with torch.no_grad():
        kl = soft_kl(out.logits[:, :-1], teacher(input_ids=ids).logits[:, :-1],
                     torch.ones(2, 11, dtype=torch.bool), 2.0)
    loss, logged = DistillLoss(teacher, DistillSpec(temperature=2.0, weight=1.0))(student, chunk)
    assert aux.item() > 0 and logged.item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert loss.item() == pytest.approx(4 * kl.item() + aux.item(), rel=1e-4)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, stdlib_tokens):
    """A trained teacher: the example run at twice the width, for a few steps."""
    from effllm.training.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("teacher")
    spec = copy.deepcopy(SPEC)
    spec["settings"]["model"].update(hidden_size=64, intermediate_size=128)
    spec["settings"]["train"].update(steps=30, checkpoint_every=0, eval_tokens=300)
    run_pretrain(spec, stdlib_tokens, out / "model", out / "record.json")
    return out / "model"


def _student(stdlib_tokens, root, teacher_dir, weight: float | None):
    from effllm.training.pretrain import run_pretrain

    spec = copy.deepcopy(SPEC)
    spec["settings"]["train"].update(steps=12, checkpoint_every=0, eval_tokens=300)
    if weight is not None:
        spec.update(run_id="pretrain/distilled-s0", technique="distilled",
                    upstream="pretrain/teacher")
        spec["settings"]["distill"] = {"temperature": 2.0, "weight": weight}
    run_pretrain(spec, stdlib_tokens, root / "model", root / "record.json",
                 teacher_dir=teacher_dir if weight is not None else None)
    return (json.loads((root / "record.json").read_text()),
            load_file(root / "model/model.safetensors"))


def test_distillation_at_weight_0_is_its_scratch_twin(stdlib_tokens, tmp_path, teacher_dir):
    scratch, scratch_w = _student(stdlib_tokens, tmp_path / "scratch", teacher_dir, None)
    zero, zero_w = _student(stdlib_tokens, tmp_path / "zero", teacher_dir, 0.0)
    half, half_w = _student(stdlib_tokens, tmp_path / "half", teacher_dir, 0.5)
    # the teacher ran (its KL is recorded) and changed nothing: same losses, same weights
    assert zero["series"]["train_loss"] == scratch["series"]["train_loss"]
    assert all(torch.equal(zero_w[k], scratch_w[k]) for k in scratch_w)
    assert len(zero["series"]["distill_kl"]) == 12 and zero["metrics"]["distill_kl"]["value"] > 0
    assert all(math.isfinite(v) for v in zero["series"]["distill_kl"])
    # at weight 0.5 the student moves towards the teacher: the first step is the same batch,
    # same weights (same CE), after that the KL falls faster than without its pull
    assert half["series"]["train_loss"][0] == scratch["series"]["train_loss"][0]
    assert not all(torch.equal(half_w[k], scratch_w[k]) for k in scratch_w)
    assert half["metrics"]["distill_kl"]["value"] < zero["metrics"]["distill_kl"]["value"]
    m = half["metrics"]
    assert m["teacher_params"]["value"] > m["params_total"]["value"]
    assert "teacher's forward included" in m["flops_per_token"]["note"]
    assert "distill_kl" not in scratch["metrics"]


def test_a_student_without_its_teacher_is_refused(stdlib_tokens, tmp_path):
    from effllm.training.pretrain import run_pretrain

    spec = copy.deepcopy(SPEC)
    spec["settings"]["distill"] = {"temperature": 2.0, "weight": 0.5}
    with pytest.raises(ValueError, match="teacher's model directory"):
        run_pretrain(spec, stdlib_tokens, tmp_path / "model", tmp_path / "record.json")
    assert not (tmp_path / "record.json").exists()
