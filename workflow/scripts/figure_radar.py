"""Snakemake entry point: one radar figure (PDF and PNG) from the normalised table."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.plots.radar import draw_radar_figure  # noqa: E402

sm = snakemake  # noqa: F821
draw_radar_figure(sm.input.normalised, sm.output.pdf, sm.output.png, sm.params.block,
                  sm.params.metrics)
