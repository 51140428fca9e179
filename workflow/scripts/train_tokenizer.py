"""Snakemake entry point: train the byte-level BPE tokenizer and tokenize every split."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.data.tokenizer import build_tokenizer  # noqa: E402

build_tokenizer(snakemake.input.corpus, snakemake.params.tokenizer, snakemake.output[0])  # noqa: F821
