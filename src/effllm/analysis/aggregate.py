"""Run records -> one flat runs table (one row per run), plus the derived compression ratio.

Column conventions (shared by every analysis and plot module):

* identity columns :data:`ID_COLUMNS`;
* per metric ``m``: ``m`` (float; NaN when not a number), ``m__unit``, ``m__status``
  (measured | estimated | unavailable; empty when the run's stage does not report ``m`` at all),
  ``m__method`` and ``m__note`` (the record's note, e.g. why a value is unavailable, which the
  claims check quotes). A missing value is NaN, never 0.

CSV round trips go through :func:`read_table`, because pandas' default NA parsing would turn a
technique labelled "None" (no positional encoding) or "NA" into a missing value.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from effllm.io import atomic_file
from effllm.records import METRICS, TASK_PREFIX, Metric, iter_records

log = logging.getLogger(__name__)

ID_COLUMNS = (
    "run_id", "stage", "block", "technique", "label", "group", "upstream", "model_size", "seed",
    "config_hash", "git_commit", "start_time", "end_time",
)
COMPANIONS = ("unit", "status", "method", "note")
_TEXT_SUFFIXES = tuple(f"__{c}" for c in COMPANIONS) + ("__metrics",)


def companion(metric: str, what: str) -> str:
    """Name of a metric's companion column, e.g. ``companion("aec", "status") == "aec__status"``."""
    return f"{metric}__{what}"


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Metric names in a table: the columns that have a ``__status`` companion."""
    return [c for c in df.columns if companion(c, "status") in df.columns]


def runs_table(record_paths: Iterable[str | os.PathLike],
               memberships: Mapping[str, list[Mapping[str, str]]] | None = None) -> pd.DataFrame:
    """One row per run and comparison group it belongs to (records validated on load), identity
    columns first, then each metric.

    ``memberships`` (from :func:`effllm.sweep.memberships`) lists the groups a run appears in:
    a pretraining run shared by several blocks (GQA is also "RoPE" and "Dense") gets one row
    per block, each with that block's group and label. Without it, one row per record.
    """
    rows = []
    records = iter_records(record_paths)
    diverged = {rec.run_id: rec.metrics["diverged"].note for rec in records
                if "diverged" in rec.metrics and rec.metrics["diverged"].value}
    for rec in records:
        for key in ("group", "label"):
            if not isinstance(rec.params.get(key), str):
                raise ValueError(f"record {rec.run_id}: params[{key!r}] must be a string")
        places = (memberships or {}).get(rec.run_id) or [
            {"block": rec.stage, "group": rec.params["group"], "technique": rec.technique,
             "label": rec.params["label"]}]
        upstream = rec.params.get("upstream")
        for place in places:
            rows.append(_row(rec, place, upstream if upstream in diverged else None,
                             diverged.get(upstream)))
    names = sorted({c for r in rows for c in r if c not in ID_COLUMNS and "__" not in c})
    columns = list(ID_COLUMNS) + [
        col for m in names for col in (m, *(companion(m, w) for w in COMPANIONS))
    ]
    df = pd.DataFrame(rows, columns=columns)
    for m in names:
        df[m] = df[m].astype(float)
    if not df.empty:
        df = df.sort_values(["stage", "group", "run_id"], kind="stable", ignore_index=True)
    return df


# What judges a model's output: a model served from a diverged fine-tuning run (its quality is
# unavailable in its own record, effllm.training.finetune) reports none of it either.
QUALITY = ("perplexity", "completion_perplexity", "val_loss", "token_accuracy", "exact_match",
           "performance")


def _row(rec, place: Mapping[str, str], diverged_upstream: str | None = None,
         reason: str | None = None) -> dict:
    row = {
        "run_id": rec.run_id, "stage": rec.stage, "block": place["block"],
        "technique": place["technique"], "label": place["label"], "group": place["group"],
        "upstream": rec.params.get("upstream"), "model_size": rec.model_size, "seed": rec.seed,
        "config_hash": rec.config_hash, "git_commit": rec.provenance.get("git_commit"),
        "start_time": rec.provenance.get("start_time"),
        "end_time": rec.provenance.get("end_time"),
    }
    for name, metric in rec.metrics.items():
        if diverged_upstream and (name in QUALITY or name.startswith(TASK_PREFIX)):
            metric = Metric.unavailable(metric.unit, metric.method,
                                        f"{diverged_upstream} diverged: {reason}")
        row[name] = np.nan if metric.value is None else float(metric.value)
        for what in COMPANIONS:
            row[companion(name, what)] = getattr(metric, what)
    return row


def combine_status(statuses: Iterable[object], values: Iterable[float]) -> str:
    """Status of a quantity derived from inputs: unavailable < estimated < measured (weakest
    wins); a configured input (exact, from the settings) counts as measured."""
    statuses, values = list(statuses), list(values)
    if any(v is None or not math.isfinite(float(v)) for v in values):
        return "unavailable"
    if any(s == "unavailable" for s in statuses):
        return "unavailable"
    if any(s == "estimated" for s in statuses):
        return "estimated"
    return "configured" if statuses and all(s == "configured" for s in statuses) else "measured"


def _get(row: pd.Series, metric: str) -> tuple[float, object]:
    """(value, status) of a metric in a row; NaN/None when the table lacks the metric."""
    value = row.get(metric, np.nan)
    return (np.nan if pd.isna(value) else float(value)), row.get(companion(metric, "status"))


def _reference_rows(group: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Reference candidates: the `reference` technique, else the widest nominal bit width."""
    ref = group[group["technique"] == reference]
    if ref.empty and "bits_nominal" in group and group["bits_nominal"].notna().any():
        ref = group[group["bits_nominal"] == group["bits_nominal"].max()]
    return ref


_MCR = {  # derived metric -> (size metric, method)
    "mcr_nominal": ("bits_nominal", "nominal_bits_x_retention"),
    "mcr_measured": ("weight_bytes", "measured_bytes_x_retention"),
}


def derive_compression(df: pd.DataFrame, reference: str = "bf16") -> pd.DataFrame:
    """Add MCR = (ref size / size) x (performance / ref performance) to inference rows, per group.

    The paper's quoted MCR values use nominal bits (docs/metrics.md §8), so both the nominal and the
    measured-bytes form are kept. The reference is the same-seed reference run when there is one.
    """
    out = df.copy()
    for name, (_, method) in _MCR.items():
        out[name] = np.nan
        for what in COMPANIONS:
            out[companion(name, what)] = pd.Series(pd.NA, index=out.index, dtype="object")
    inference = out[out["stage"] == "inference"]
    for group, members in inference.groupby("group", dropna=False, sort=False):
        refs = _reference_rows(members, reference)
        if refs.empty:
            log.warning("group %s: no reference run for MCR; MCR unavailable", group)
        for idx, row in members.iterrows():
            same_seed = refs[refs["seed"] == row["seed"]]
            ref = (same_seed if not same_seed.empty else refs).iloc[0] if not refs.empty else None
            for name, (size, method) in _MCR.items():
                value, status = _derived_mcr(row, ref, size)
                out.loc[idx, name] = value
                out.loc[idx, companion(name, "status")] = status
                out.loc[idx, companion(name, "unit")] = METRICS[name].unit
                out.loc[idx, companion(name, "method")] = method
    return out


def _derived_mcr(row: pd.Series, ref: pd.Series | None, size: str) -> tuple[float, str]:
    if ref is None:
        return np.nan, "unavailable"
    (s, s_st), (rs, rs_st) = _get(row, size), _get(ref, size)
    (p, p_st), (rp, rp_st) = _get(row, "performance"), _get(ref, "performance")
    status = combine_status([s_st, rs_st, p_st, rp_st], [s, rs, p, rp])
    if status == "unavailable" or s == 0 or rp == 0:
        return np.nan, "unavailable"
    return (rs / s) * (p / rp), status


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by this package: only empty cells are missing; text stays text."""
    header = pd.read_csv(path, nrows=0).columns
    text = {c: "str" for c in header
            if (c in ID_COLUMNS and c != "seed") or c.endswith(_TEXT_SUFFIXES)}
    return pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])


def write_runs_table(
    record_paths: Iterable[str | os.PathLike],
    out_csv: str | os.PathLike,
    out_parquet: str | os.PathLike | None = None,
    memberships: Mapping[str, list[Mapping[str, str]]] | None = None,
) -> pd.DataFrame:
    """Build the runs table and write it as CSV (and Parquet), each file atomically."""
    df = runs_table(record_paths, memberships)
    with atomic_file(out_csv) as handle:
        df.to_csv(handle, index=False)
    if out_parquet is not None:
        with atomic_file(out_parquet, "wb") as handle:
            df.to_parquet(handle, index=False)
    return df
