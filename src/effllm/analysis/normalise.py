"""Min-max normalisation, the Efficiency Score and ranks, all within comparison groups
(docs/metrics.md §10).

Output columns: ``m__norm`` (in [floor, 1], higher is better), ``m__rank`` (1 = best, on raw
values), ``efficiency_score`` with ``efficiency_score__metrics`` (the metrics it used,
";"-joined), ``__status``, ``__unit`` and ``__method`` (which names the weights). NaN always
means "not available"; it never takes part in a min, a max or a rank.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from effllm.analysis.aggregate import (
    combine_status, companion, derive_compression, metric_columns, read_table,
)
from effllm.io import atomic_file
from effllm.records import CONDITIONS, METRICS
from effllm.specs import AnalysisSpec

log = logging.getLogger(__name__)

GroupCols = str | Sequence[str]


def _metric_values(df: pd.DataFrame, metric: str) -> pd.Series:
    if metric not in METRICS:
        raise KeyError(f"{metric!r} is not a canonical metric in effllm.records.METRICS")
    return df[metric].astype(float) if metric in df else pd.Series(np.nan, index=df.index)


def _keys(group_col: GroupCols) -> list[str]:
    return [group_col] if isinstance(group_col, str) else list(group_col)


def _grouped(values: pd.Series, df: pd.DataFrame, group_col: GroupCols):
    by = [df[k] for k in _keys(group_col)]
    return values.groupby(by[0] if len(by) == 1 else by, dropna=False, sort=False)


def minmax(
    df: pd.DataFrame, metrics: Sequence[str], group_col: GroupCols = "group", floor: float = 0.1
) -> pd.DataFrame:
    """``m__norm`` per metric: min-max within each group, flipped for lower-is-better, in
    [floor, 1].

    The floor (0.1 observed in the paper's figures) keeps the harmonic-mean score finite. A group
    with fewer than two available values, or max == min, has nothing to compare: every available
    member gets 1.0.
    """
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"normalise floor must be in [0, 1), got {floor}")
    out = pd.DataFrame(index=df.index)
    for m in metrics:
        x = _metric_values(df, m)
        grouped = _grouped(x, df, group_col)
        lo, hi = grouped.transform("min"), grouped.transform("max")
        count = grouped.transform("count")
        span = hi - lo
        frac = (x - lo) / span if METRICS[m].higher_is_better else (hi - x) / span
        degenerate = x.notna() & ((count < 2) | (span == 0))
        if degenerate.any():
            bad = df.loc[degenerate, _keys(group_col)].drop_duplicates().to_numpy().tolist()
            log.info("%s: degenerate group(s) %s (one value or max == min) -> 1.0", m, bad)
        frac = frac.mask(degenerate, 1.0).where(x.notna())
        out[companion(m, "norm")] = floor + (1.0 - floor) * frac
    return out


def _score_inputs(df: pd.DataFrame, weights: Mapping[str, float]) -> tuple[pd.DataFrame, dict]:
    """Normalised values of the weighted metrics (NaN where missing) and the positive weights."""
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"efficiency-score weights must be non-negative: {dict(weights)}")
    used = {m: float(w) for m, w in weights.items() if w > 0}
    norms = pd.DataFrame(
        {m: df[companion(m, "norm")] if companion(m, "norm") in df else np.nan for m in used},
        index=df.index, dtype=float,
    )
    return norms, used


def efficiency_score(df: pd.DataFrame, weights: Mapping[str, float]) -> pd.Series:
    """Weighted harmonic mean ES = sum(w) / sum(w / m~) over the available ``m__norm`` values.

    Missing metrics are dropped and the remaining weights renormalised; NaN when none is available.
    """
    norms, used = _score_inputs(df, weights)
    w = pd.Series(used, dtype=float)
    avail = norms.notna()
    num = avail.mul(w, axis=1).sum(axis=1)
    den = (norms.rdiv(1.0).mul(w, axis=1)).where(avail).sum(axis=1)
    return (num / den).where(avail.any(axis=1)).rename("efficiency_score")


def efficiency_inputs(df: pd.DataFrame, weights: Mapping[str, float]) -> pd.Series:
    """Which metrics each row's efficiency score used, ";"-joined (empty when none)."""
    norms, _ = _score_inputs(df, weights)
    return norms.notna().apply(lambda r: ";".join(r.index[r]), axis=1).rename(
        "efficiency_score__metrics"
    )


def ranks(df: pd.DataFrame, metrics: Sequence[str], group_col: GroupCols = "group") -> pd.DataFrame:
    """``m__rank`` per metric within each group: 1 = best on the raw value, ties share the min
    rank."""
    out = pd.DataFrame(index=df.index)
    for m in metrics:
        x = _metric_values(df, m)
        r = _grouped(x, df, group_col).rank(
            method="min", ascending=not METRICS[m].higher_is_better, na_option="keep"
        )
        out[companion(m, "rank")] = r.astype("Int64")
    return out


def normalisable_metrics(df: pd.DataFrame) -> list[str]:
    """Metrics of the table that have a known direction; others are logged and skipped."""
    names = metric_columns(df)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        log.warning("no direction known for %s (not in records.METRICS): not normalised", unknown)
    return [m for m in names if m in METRICS and m not in CONDITIONS]


def exclude_estimates(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every ``estimated`` value turned ``unavailable`` (value NaN, the note
    saying why), for ``analysis.use_estimates: false``: then only measured values are
    normalised, scored, ranked and drawn."""
    out = df.copy()
    for m in metric_columns(out):
        status = companion(m, "status")
        estimated = out[status] == "estimated"
        if not estimated.any():
            continue
        out.loc[estimated, m] = np.nan
        out.loc[estimated, status] = "unavailable"
        note = companion(m, "note")
        old = (out[note] if note in out else pd.Series(np.nan, index=out.index)).astype(object)
        out[note] = old.where(~estimated, "estimate excluded (analysis.use_estimates: false); "
                              + old.fillna("").astype(str))
    return out


def normalise_table(
    runs_csv: str | os.PathLike, analysis: AnalysisSpec | Mapping, out_csv: str | os.PathLike
) -> pd.DataFrame:
    """Runs table -> MCR -> ``__norm`` (per stage and group) -> efficiency score -> ``__rank``.

    ``analysis.efficiency_score`` maps each stage to its {metric: weight}; a stage without
    weights gets an unavailable score. With ``analysis.use_estimates`` false, estimated values
    (e.g. CPU energy from CPU time, MFU) are unavailable from here on; otherwise they are used
    and keep their ``estimated`` status, which the score inherits and the figures mark.
    """
    if not isinstance(analysis, AnalysisSpec):
        analysis = AnalysisSpec.from_json(analysis, "analysis")
    floor = float(analysis.normalise_floor)
    weights_by_stage = analysis.efficiency_score
    groups = ["stage", "group"]  # group ids could repeat across stages (e.g. a served base model)
    df = read_table(runs_csv)
    if not analysis.use_estimates:
        df = exclude_estimates(df)
    df = derive_compression(df)
    metrics = normalisable_metrics(df)
    df = pd.concat([df, minmax(df, metrics, groups, floor)], axis=1)
    df["norm_floor"] = floor
    df["estimates"] = "used" if analysis.use_estimates else "excluded"
    for column in ("efficiency_score", "efficiency_score__metrics", "efficiency_score__status",
                   "efficiency_score__method"):
        df[column] = np.nan if column == "efficiency_score" else ""
    df["efficiency_score__unit"] = "1"
    for stage, rows in df.groupby("stage", sort=False):
        weights = dict(weights_by_stage.get(stage) or {})
        if not weights:
            df.loc[rows.index, "efficiency_score__status"] = "unavailable"
            df.loc[rows.index, "efficiency_score__method"] = f"no weights for stage {stage}"
            continue
        used = efficiency_inputs(rows, weights)
        df.loc[rows.index, "efficiency_score"] = efficiency_score(rows, weights)
        df.loc[rows.index, "efficiency_score__metrics"] = used
        df.loc[rows.index, "efficiency_score__status"] = [
            combine_status([row.get(companion(m, "status")) for m in names.split(";")],
                           [row.get(m) for m in names.split(";")]) if names else "unavailable"
            for names, (_, row) in zip(used, rows.iterrows())
        ]
        df.loc[rows.index, "efficiency_score__method"] = "weighted_harmonic_mean(" + ",".join(
            f"{m}:{w:g}" for m, w in weights.items()) + ")"
    df = pd.concat([df, ranks(df, metrics, groups)], axis=1)
    with atomic_file(out_csv) as handle:
        df.to_csv(handle, index=False)
    return df
