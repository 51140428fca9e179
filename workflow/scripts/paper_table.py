"""Snakemake entry point: one paper table (CSV, Markdown, LaTeX) from the normalised table."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.analysis.paper_tables import write_paper_table  # noqa: E402

sm = snakemake  # noqa: F821
write_paper_table(sm.input.normalised, sm.wildcards.table, sm.output.csv[: -len(".csv")])
