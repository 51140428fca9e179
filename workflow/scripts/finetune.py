"""Snakemake entry point: fine-tune one base model with one method."""
import json
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.training.finetune import run_finetune  # noqa: E402

sm = snakemake  # noqa: F821
run_finetune(json.loads(sm.params.spec), sm.input.base, sm.input.reasoning, sm.output.model,
             sm.output.record)
