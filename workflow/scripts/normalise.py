"""Snakemake entry point: min-max normalisation, efficiency score and ranks per group."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.analysis.normalise import normalise_table  # noqa: E402

sm = snakemake  # noqa: F821
normalise_table(sm.input.runs, sm.params.analysis, sm.output.csv)
