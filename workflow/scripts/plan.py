"""Snakemake entry point: the GPU plan of the configuration (results/plan/plan.{tsv,md})."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.plan.report import write_plan  # noqa: E402

sm = snakemake  # noqa: F821
write_plan(sm.config, sm.output.tsv, sm.output.md, sm.params.results)
