"""Snakemake entry point: build one verifiable step-by-step fine-tuning set."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.data.reasoning import prepare_reasoning  # noqa: E402

p = snakemake.params  # noqa: F821
prepare_reasoning(p.reasoning, p.seed, snakemake.output[0], p.key)  # noqa: F821
