"""Snakemake entry point: bubble chart of normalised metrics (PDF and PNG)."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.plots.bubble import draw_bubbles  # noqa: E402

sm = snakemake  # noqa: F821
draw_bubbles(sm.input.normalised, sm.output.pdf, sm.output.png, sm.params.block,
             sm.params.metrics)
