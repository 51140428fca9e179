"""Snakemake entry point: one tidy table of every run's record (a row per comparison group)."""
import json
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.analysis.aggregate import write_runs_table  # noqa: E402

sm = snakemake  # noqa: F821
write_runs_table(sm.input.records, sm.output.csv, sm.output.parquet,
                 memberships=json.loads(sm.params.memberships))
