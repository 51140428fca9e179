"""Snakemake entry point: link one Hugging Face model from the local cache."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.data.hub import prepare_hub_model  # noqa: E402

p = snakemake.params  # noqa: F821
prepare_hub_model(p.repo_id, p.revision, snakemake.output[0])  # noqa: F821
