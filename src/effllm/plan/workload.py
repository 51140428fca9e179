"""What one job does on its GPUs, as a frozen, JSON-able spec: the key of a simulation.

Two jobs whose workloads are equal (seeds, data sets, learning rates and labels differ, shapes
do not) share one simulation, on disk and in memory. Only what changes memory or FLOPs is here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from effllm.specs import MethodSpec, ModelShape, QuantSpec, Spec, WeightQuant, opt


@dataclasses.dataclass(frozen=True)
class ModelRef(Spec):
    """The model a job builds: one of our pretraining families from its ``shape`` and
    ``vocab_size``, or a saved model's ``config`` (its config.json, e.g. a hub model's)."""

    name: str
    shape: ModelShape | None = opt()
    vocab_size: int | None = opt()
    config: dict | None = opt()

    @property
    def family(self) -> str:
        if self.shape is not None:
            return self.shape.family
        return str((self.config or {}).get("model_type"))

    @property
    def layers(self) -> int:
        if self.shape is not None:
            return self.shape.num_hidden_layers
        return int(self.config["num_hidden_layers"])


@dataclasses.dataclass(frozen=True)
class TrainWork(Spec):
    """One optimiser step of a training job on one rank: ``passes`` forward/backward passes of
    ``rows`` × ``seq_len`` tokens each (gradient accumulation), under ``strategy`` (``single``,
    ``ddp`` replicas or ``fsdp`` ZeRO-3) over ``world`` ranks. ``method`` None: pretraining."""

    model: ModelRef
    method: MethodSpec | None
    precision: str
    rows: int
    passes: int
    seq_len: int
    checkpointing: bool
    strategy: str
    world: int
    offload: bool = opt(False)
    # a distillation student's teacher: its weights and logits beside the student's step
    teacher: ModelRef | None = opt()

    kind = "train"


@dataclasses.dataclass(frozen=True)
class ServePass(Spec):
    """One inference pass: a forward of ``batch`` × ``tokens`` with the decoding cache on, then
    ``new_tokens`` more positions of cache (generation); ``logits``: ``all`` positions (scoring,
    lm-eval's log-likelihoods, then a log-softmax over them) or the ``last`` (generation)."""

    name: str
    batch: int
    tokens: int
    new_tokens: int
    logits: str


@dataclasses.dataclass(frozen=True)
class ServeWork(Spec):
    """A served model at one precision and the passes its job makes."""

    model: ModelRef
    precision: str
    quant: QuantSpec
    passes: tuple[ServePass, ...]
    # the techniques block (issue 22): weight-only quantisation, a speculative draft model
    weights: WeightQuant | None = opt()
    draft: ModelRef | None = opt()

    kind = "serve"


def digest(work: Spec) -> str:
    """A stable key of a workload (its canonical JSON)."""
    text = json.dumps({"kind": work.kind, **work.to_json()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
