"""Snakemake entry point: one paper table (CSV, Markdown, LaTeX), written by its registry entry's
function (effllm.outputs)."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.outputs import table  # noqa: E402

sm = snakemake  # noqa: F821
entry = table(sm.wildcards.table)
entry.load()(**{name: sm.input[name] for name in entry.inputs}, name=entry.name,
             out_stem=sm.output.csv[: -len(".csv")])
