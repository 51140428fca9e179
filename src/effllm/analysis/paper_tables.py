"""The paper's result tables, built from the normalised runs table: one row per variant and
group, seeds averaged (mean, standard deviation and count), every metric with its status.

Tables are named by content (the paper's numbering is inconsistent across its versions,
protocol §7); the number in each name follows the digests (3 attention … 6 attention-free).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from effllm.analysis.aggregate import combine_status, companion, read_table
from effllm.analysis.tables import write_table

_PRETRAIN = ["params_total", "perplexity", "amu", "al", "tt", "tokens_per_s", "aec",
             "flops_per_token", "kv_cache_bytes_per_token", "decode_latency_long"]
TABLES: dict[str, tuple[str, list[str]]] = {
    "table3_attention": ("attention", _PRETRAIN),
    "table4_position": ("position", _PRETRAIN),
    "table5_moe": ("moe", ["params_total", "params_active", *_PRETRAIN[1:]]),
    "table6_attention_free": ("attention_free", _PRETRAIN),
    # Fine-tuning (the paper's tables 7-8: loss, AMU, PCU, AL, ST, AEC), plus what makes the
    # methods comparable: trainable parameters, held-out loss and accuracy, MFU, plain rates.
    "table7_finetune": ("finetune", ["params_trainable", "loss", "val_loss", "exact_match",
                                     "amu", "pcu", "mfu", "al", "st", "samples_per_s", "aec",
                                     "efficiency_score"]),
}


def block_table(df: pd.DataFrame, block: str, metrics: Sequence[str]) -> pd.DataFrame:
    """Rows of ``block`` averaged over seeds per (group, label), in first-appearance order.

    Per metric: ``m`` (mean over the seeds with a value), ``m__std`` (sample standard
    deviation; NaN for fewer than two values), ``m__n`` (how many seeds had a value) and
    ``m__status`` (the weakest status of the averaged values; unavailable when none).
    """
    rows = df[df["block"] == block]
    if rows.empty:
        raise ValueError(f"no runs of block {block!r} in the table")
    out = []
    for (group, label), members in rows.groupby(["group", "label"], sort=False):
        row = {"group": group, "variant": label,
               "size": ",".join(dict.fromkeys(members["model_size"].astype(str))),
               "seeds": int(members["seed"].nunique())}
        for m in metrics:
            if m not in members:
                row[m], row[companion(m, "std")], row[companion(m, "n")] = np.nan, np.nan, 0
                row[companion(m, "status")] = "unavailable"
                continue
            values = members[m].astype(float)
            statuses = members.get(companion(m, "status"), pd.Series("", index=members.index))
            has = values.notna()
            row[m] = values.mean()  # over the seeds with a value; NaN when none has one
            row[companion(m, "std")] = values.std(ddof=1) if has.sum() > 1 else np.nan
            row[companion(m, "n")] = int(has.sum())
            row[companion(m, "status")] = (combine_status(statuses[has], values[has])
                                           if has.any() else "unavailable")
        out.append(row)
    return pd.DataFrame(out)


def write_paper_table(normalised_csv: str | os.PathLike, name: str,
                      out_stem: str | os.PathLike) -> pd.DataFrame:
    """Write one named table as CSV (raw numbers), Markdown and LaTeX."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}")
    block, metrics = TABLES[name]
    table = block_table(read_table(normalised_csv), block, metrics)
    write_table(table, out_stem)
    return table
