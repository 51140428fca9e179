"""Snakemake entry point: serve one model at one precision, evaluate and time it."""
import json
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.inference.run import run_inference  # noqa: E402

sm = snakemake  # noqa: F821
run_inference(json.loads(sm.params.spec), sm.input.model, sm.input.corpus, sm.input.reasoning,
              sm.output.record)
