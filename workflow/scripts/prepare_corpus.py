"""Snakemake entry point: clean, deduplicate and split the pretraining corpus."""
import os
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
# A streamed parquet source is decoded a batch at a time; pyarrow's default pool (mimalloc)
# keeps the freed pages (+25 MB resident per 20,000 documents read before it levels off),
# the system allocator hands them back. Must be set before pyarrow is first used.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from effllm.data.corpus import prepare_corpus  # noqa: E402

p = snakemake.params  # noqa: F821
prepare_corpus(p.corpus, p.split, p.seed, snakemake.output[0], p.sample)  # noqa: F821
