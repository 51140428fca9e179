"""Snakemake entry point: pretrain one model of the sweep."""
import json
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.training.pretrain import run_pretrain  # noqa: E402

sm = snakemake  # noqa: F821
run_pretrain(json.loads(sm.params.spec), sm.input.tokens, sm.output.model, sm.output.record,
             checkpoint_dir=sm.params.checkpoints)
