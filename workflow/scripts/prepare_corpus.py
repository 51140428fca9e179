"""Snakemake entry point: clean, deduplicate and split the pretraining corpus."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.data.corpus import prepare_corpus  # noqa: E402

p = snakemake.params  # noqa: F821
prepare_corpus(p.corpus, p.split, p.seed, snakemake.output[0])  # noqa: F821
