"""One job of a stage: the sequence every stage runs, written once.

Seed → place the job (device, torchrun rank) → the stage's own work (build or load, train or
serve, measure) → on rank 0, the model folder and the record written atomically. Pretraining,
fine-tuning and inference supply only the work; a job killed midway leaves neither output.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from effllm.distributed import Placement, place
from effllm.io import atomic_dir
from effllm.records import Metric, RunRecord, now_iso
from effllm.specs import RunSpec


@dataclass
class Outcome:
    """What a stage's work hands back on rank 0: its metrics and series, how it ran (merged into
    the placement's ``execution``), and how to write its model folder, if it has one."""

    metrics: dict[str, Metric]
    series: dict[str, list[float]] = field(default_factory=dict)
    execution: dict = field(default_factory=dict)
    strategy: str = "DDP"  # how several ranks shared the work
    save: Callable[[Path], None] | None = None
    cleanup: Callable[[], None] | None = None  # after the record is written


def seed_everything(seed: int, threads: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def run_job(spec: RunSpec | dict, work: Callable[[RunSpec, Placement], Outcome | None],
            record_out: str | os.PathLike, model_out: str | os.PathLike | None = None
            ) -> RunRecord | None:
    """Run ``work`` as one job of ``spec`` (a spec or its JSON). ``work`` returns None on
    ranks other than 0, which write nothing; so does this function."""
    spec = spec if isinstance(spec, RunSpec) else RunSpec.from_json(spec)
    start = now_iso()
    seed_everything(spec.seed, spec.measure.threads)
    placement = place()
    outcome = work(spec, placement)
    if outcome is None:
        return None
    if model_out is not None:
        with atomic_dir(model_out) as tmp:
            outcome.save(Path(tmp))
    record = RunRecord.for_run(spec, start, outcome.metrics, outcome.series,
                               {**placement.execution(outcome.strategy), **outcome.execution})
    record.save(record_out)
    if outcome.cleanup:
        outcome.cleanup()
    return record
