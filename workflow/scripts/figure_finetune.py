"""Snakemake entry point: fine-tuning figure 4a (kind "mirrored") or 4b ("area"), PDF and PNG."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.plots.finetune import draw_finetune  # noqa: E402

sm = snakemake  # noqa: F821
draw_finetune(sm.input.normalised, sm.output.pdf, sm.output.png, sm.params.kind,
              loss=sm.params.loss, methods=sm.params.get("methods"),
              size_order=sm.params.get("sizes"))
