"""Snakemake entry point: figure 5, the quantised-inference rose per precision, PDF and PNG."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.plots.rose import draw_inference_rose  # noqa: E402

sm = snakemake  # noqa: F821
draw_inference_rose(sm.input.normalised, sm.output.pdf, sm.output.png, metrics=sm.params.metrics,
                    block=sm.params.block)
