"""Snakemake entry point: one paper figure (PDF and PNG), drawn by its registry entry's function
(effllm.outputs) with the rule's keyword arguments."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.outputs import FIGURES  # noqa: E402

sm = snakemake  # noqa: F821
figure = FIGURES[sm.wildcards.figure]
figure.load()(**{name: sm.input[name] for name in figure.inputs}, out_pdf=sm.output.pdf,
              out_png=sm.output.png, **sm.params.kwargs)
