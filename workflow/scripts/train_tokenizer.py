"""Snakemake entry point: train (or take) the tokenizer and write each split's tokens."""
import os
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
# The workflow turns tokenizers' threads off for every job (common.smk); this one forks nothing,
# so encode_batch may encode each batch's documents in parallel.
os.environ["TOKENIZERS_PARALLELISM"] = "true"
# As in prepare_corpus.py: the system allocator returns a streamed read's freed pages.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from effllm.data.tokenizer import build_tokenizer  # noqa: E402

p = snakemake.params  # noqa: F821
build_tokenizer(snakemake.input.corpus, p.tokenizer, snakemake.output[0],  # noqa: F821
                budget=p.tokens, corpus=p.corpus, split_spec=p.split, seed=p.seed, hub=p.hub)
