"""Snakemake entry point: pretrain one model of the sweep (one torchrun rank per GPU when the
job has more than one)."""
import json
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.launch import run_stage  # noqa: E402

sm = snakemake  # noqa: F821
run_stage("pretrain", getattr(sm.resources, "gpu", 0),
          gpu_memory_gb=getattr(sm.resources, "gpu_memory_gb", None),
          spec=json.loads(sm.params.spec),
          data_dir=sm.input.tokens, model_out=sm.output.model, record_out=sm.output.record,
          checkpoint_dir=sm.params.checkpoints,
          teacher_dir=str(sm.input.teacher) if sm.input.teacher else None)
