"""Seed averaging: the one place where runs repeated over seeds become one value with a spread.

Tables, figures, the claims check and the ranking chart all read their numbers from
:func:`seed_summary`, so that a table cell, a bar, a bubble, a radar vertex and a claim verdict
say the same thing about the same runs, including which status the mean carries.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from effllm.analysis.aggregate import combine_status, companion

SPREAD = ("std", "lo", "hi", "n", "status")  # companions written per averaged column


def status_column(column: str) -> str:
    """The status companion that governs ``column``: a derived column such as ``amu__norm`` or
    ``amu__rank`` has no status of its own, it inherits the raw metric's (``amu__status``)."""
    return companion(column.split("__", 1)[0], "status")


def seed_summary(rows: pd.DataFrame, columns: Sequence[str],
                 by: Sequence[str] = ("group", "label")) -> pd.DataFrame:
    """One row per ``by`` key (first-appearance order) of ``rows``, each column averaged over
    the runs that have a value.

    Identity columns: the ``by`` keys, ``size`` (the model sizes, ","-joined), ``seeds``
    (distinct seeds) and ``runs`` (rows). Per column ``c``: ``c`` (mean), ``c__std`` (sample
    standard deviation, NaN below two values), ``c__lo`` / ``c__hi`` (min / max), ``c__n``
    (runs with a value) and ``c__status``: the weakest status (unavailable < estimated <
    measured) of the values averaged, "unavailable" when none has one. A run without a value is
    left out of the mean, never counted as 0. A column the table lacks is all-unavailable.
    """
    by = list(by)
    out = []
    for key, members in rows.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, object] = dict(zip(by, key))
        if "model_size" in members:
            row["size"] = ",".join(dict.fromkeys(members["model_size"].astype(str)))
        row["seeds"] = int(members["seed"].nunique()) if "seed" in members else len(members)
        row["runs"] = len(members)
        for c in columns:
            values = (members[c].astype(float) if c in members
                      else pd.Series(np.nan, index=members.index))
            has = values.notna()
            used = values[has]
            statuses = members.get(status_column(c), pd.Series("", index=members.index))[has]
            row[c] = used.mean() if len(used) else np.nan
            row[companion(c, "std")] = used.std(ddof=1) if len(used) > 1 else np.nan
            row[companion(c, "lo")] = used.min() if len(used) else np.nan
            row[companion(c, "hi")] = used.max() if len(used) else np.nan
            row[companion(c, "n")] = int(has.sum())
            row[companion(c, "status")] = (combine_status(statuses, used) if len(used)
                                           else "unavailable")
        out.append(row)
    columns_out = [*by, *(["size"] if "model_size" in rows else []), "seeds", "runs"]
    columns_out += [f for c in columns for f in (c, *(companion(c, s) for s in SPREAD))]
    return pd.DataFrame(out, columns=columns_out)
