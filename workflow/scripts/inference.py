"""Snakemake entry point: serve one model at one precision, evaluate and time it (on the job's
GPU, when it was given one)."""
import json
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.launch import run_stage  # noqa: E402

sm = snakemake  # noqa: F821
run_stage("inference", getattr(sm.resources, "gpu", 0),
          gpu_memory_gb=getattr(sm.resources, "gpu_memory_gb", None),
          spec=json.loads(sm.params.spec),
          model_dir=sm.input.model, corpus_dir=sm.input.corpus,
          reasoning_dir=sm.input.reasoning, record_out=sm.output.record,
          draft_dir=str(sm.input.draft) if sm.input.draft else None)
