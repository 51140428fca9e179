"""Snakemake entry point: bars of normalised metrics with a raw-metric line (PDF and PNG)."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.plots.bars import draw_bars_with_line  # noqa: E402

sm = snakemake  # noqa: F821
draw_bars_with_line(sm.input.normalised, sm.output.pdf, sm.output.png, sm.params.block,
                    sm.params.metrics, line_metric=sm.params.line)
