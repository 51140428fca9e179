"""Snakemake entry point: the paper's rank-level claims checked on the normalised table."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.analysis.claims import write_claims  # noqa: E402

sm = snakemake  # noqa: F821
write_claims(sm.input.normalised, sm.output.md, sm.output.csv)
