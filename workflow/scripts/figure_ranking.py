"""Snakemake entry point: the ranking chart (paper Fig. 2) from the normalised table."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.plots.ranking import draw_ranking  # noqa: E402

sm = snakemake  # noqa: F821
draw_ranking(sm.input.normalised, sm.output.pdf, sm.output.png, dict(sm.params.metrics),
             order=list(sm.params.order))
