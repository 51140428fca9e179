"""Snakemake entry point: one tidy table of every run's record."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.analysis.aggregate import write_runs_table  # noqa: E402

write_runs_table(snakemake.input.records, snakemake.output.csv)  # noqa: F821
