"""Snakemake entry point: the pruning block's trajectory and per-layer widths tables."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.analysis.pruning import write_pruning_tables  # noqa: E402

sm = snakemake  # noqa: F821
write_pruning_tables(sm.input.records, sm.output.trajectory, sm.output.widths)
