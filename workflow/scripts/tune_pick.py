"""Snakemake entry point: per method the learning rate of lowest validation loss among the tune
runs that did not diverge, written with every grid point as provenance."""
import sys

sys.stderr = sys.stdout = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from effllm.records import iter_records  # noqa: E402
from effllm.training.tune import choose, write_rates  # noqa: E402

sm = snakemake  # noqa: F821
records = iter_records(sm.input.records)
settings = {**dict(sm.params.settings),
            "base_run": sorted({r.params["upstream"] for r in records})}
written = write_rates(sm.output.rates, choose(records), settings)
for method, rate in written["lr_by_method"].items():
    print(f"{method}: {rate:g}")
