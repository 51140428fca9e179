"""Radar charts of normalised metrics (the paper's Fig. 3a; one panel per comparison group).

A metric that is not available is never drawn as 0: the series' polygon has a gap there (and is
not filled), the panel notes which series lack what, and an axis nobody has is labelled "(n/a)".
An estimated value (e.g. CPU energy from CPU time, PCU as MFU) is drawn with a hollow marker,
its axis label carries the table's estimate mark and the legend says what both mean.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from effllm.analysis.aggregate import companion, read_table
from effllm.analysis.seeds import seed_summary
from effllm.analysis.tables import ESTIMATED
from effllm.plots import style
from effllm.plots.style import plt, select_block

R_TICKS = (0.25, 0.5, 0.75, 1.0)
CAPTION = "min-max normalised within group{floor}; higher is better"
ESTIMATED_LABEL = f"hollow marker, {ESTIMATED}: estimated, not measured"


def _norm_matrix(df: pd.DataFrame, metrics: Sequence[str], suffix: str = "") -> np.ndarray:
    """Rows x metrics array of ``m__norm`` (``suffix`` e.g. "__lo": its seed minimum) values;
    NaN where a value or a whole column is missing."""
    names = [companion(m, "norm") + suffix for m in metrics]
    cols = [df[c].astype(float).to_numpy() if c in df else np.full(len(df), np.nan)
            for c in names]
    return np.column_stack(cols) if cols else np.empty((len(df), 0))


def _estimated_matrix(df: pd.DataFrame, metrics: Sequence[str]) -> np.ndarray:
    """Rows x metrics booleans: the value is estimated (a seed summary's ``m__norm__status``,
    or a table row's own ``m__status``)."""
    cols = []
    for m in metrics:
        name = next((c for c in (companion(companion(m, "norm"), "status"),
                                 companion(m, "status")) if c in df), None)
        cols.append(df[name].eq("estimated").to_numpy() if name else np.zeros(len(df), bool))
    return np.column_stack(cols) if cols else np.empty((len(df), 0), bool)


def radar(ax, df: pd.DataFrame, metrics: Sequence[str], series_col: str = "label"):
    """Draw one radar of ``m__norm`` on a polar Axes, one series per row; return the Axes.

    Each series is one Line2D (label and gid = the series name) over the closed polygon, with NaN
    where a metric is missing, so matplotlib breaks the line there instead of drawing a 0.
    """
    if len(metrics) < 3:
        raise ValueError(f"a radar needs at least 3 metrics, got {list(metrics)}")
    theta = np.linspace(0.0, 2.0 * np.pi, len(metrics), endpoint=False)
    values = _norm_matrix(df, metrics)
    absent = np.isnan(values).all(axis=0)
    estimated = _estimated_matrix(df, metrics) & np.isfinite(values)
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    notes = []
    lo, hi = (_norm_matrix(df, metrics, f"__{end}") for end in ("lo", "hi"))
    for name, r, r_lo, r_hi, est in zip(df[series_col].astype(str), values, lo, hi, estimated):
        colour = style.technique_colour(name)
        ax.plot(np.append(theta, theta[0]), np.append(r, r[0]), color=colour, marker="o",
                label=name, gid=name, clip_on=False, zorder=3)
        if est.any():  # hollow markers over the estimated vertices
            ax.plot(theta[est], r[est], linestyle="", marker="o", markersize=4.5,
                    markerfacecolor="white", markeredgecolor=colour, markeredgewidth=1.0,
                    label=f"_estimated:{name}", gid=f"estimated:{name}", clip_on=False,
                    zorder=4)
        spread = np.isfinite(r) & (r_hi - r_lo > 1e-9)
        if spread.any():  # seeds: min-max as a radial whisker at each vertex
            ax.errorbar(theta[spread], r[spread], fmt="none", ecolor=colour, elinewidth=0.7,
                        yerr=[(r - r_lo)[spread], (r_hi - r)[spread]], capsize=0, zorder=3,
                        label=f"_spread:{name}")  # "_": not in a legend
        if np.isfinite(r).all():
            ax.fill(theta, r, color=colour, alpha=0.12, linewidth=0)
        gaps = [style.metric_label(m) for m, v, a in zip(metrics, r, absent)
                if np.isnan(v) and not a]
        if gaps:
            notes.append(f"{name}: {', '.join(gaps)}")
    ax.set_xticks(theta, [style.metric_axis_label(m) + (ESTIMATED if e else "")
                          + ("\n(n/a)" if a else "")
                          for m, a, e in zip(metrics, absent, estimated.any(axis=0))])
    ax.tick_params(axis="x", pad=1)
    ax.tick_params(axis="y", labelsize=5.5)
    ax.set_ylim(0.0, 1.0)
    ax.set_yticks(R_TICKS, [f"{t:g}" if t in (0.5, 1.0) else "" for t in R_TICKS], color="0.4")
    ax.set_rlabel_position(180.0 / len(metrics))  # between the first two spokes, not on one
    if notes:
        ax.text(0.5, -0.08, "n/a: " + "; ".join(notes), transform=ax.transAxes, ha="center",
                va="top", fontsize=6, color="0.3")
    return ax


def draw_radar_figure(
    normalised_csv: str | os.PathLike,
    out_pdf: str | os.PathLike,
    out_png: str | os.PathLike,
    block: str,
    metrics: Sequence[str],
    title: str | None = None,
    series_col: str = "label",
) -> None:
    """One radar per comparison group of ``block`` (seeds averaged per series, min-max as radial
    whiskers), shared legend."""
    df = select_block(read_table(normalised_csv), block, normalised_csv)
    norm_cols = [companion(m, "norm") for m in metrics if companion(m, "norm") in df]
    groups = list(dict.fromkeys(df["group"]))
    ncols = min(len(groups), 3)
    nrows = math.ceil(len(groups) / ncols)
    width = style.ONE_COLUMN if ncols == 1 else style.TWO_COLUMN
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width, nrows * width / ncols + 0.6), squeeze=False,
        subplot_kw={"projection": "polar"}, layout="constrained",
    )
    legend: dict[str, object] = {}
    spread = estimated = False
    for ax, group in zip(axes.flat, groups):
        members = df[df["group"] == group]
        series = seed_summary(members, norm_cols, by=[series_col])
        radar(ax, series, metrics, series_col)
        ax.set_title(str(group), pad=12, fontsize="medium")
        legend.update({line.get_label(): line for line in ax.get_lines()
                       if not line.get_label().startswith("_")})
        estimated |= any(line.get_gid().startswith("estimated:") for line in ax.get_lines()
                         if line.get_gid())
        spread |= bool(ax.containers)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    if estimated:
        legend[ESTIMATED_LABEL] = Line2D([], [], linestyle="", marker="o", markersize=4.5,
                                         markerfacecolor="white", markeredgecolor="0.3")
    floor = style.norm_floor(df)
    caption = CAPTION.format(floor=f", floor {floor:g}" if floor is not None else "") + (
        "\nmean over seeds; whiskers: min\u2013max over seeds" if spread else "") + (
        f"\n{style.estimates_note(df)}" if style.estimates_note(df) else "")
    # The caption is the legend's title: one bottom artist, so constrained layout cannot overlap
    # them.
    fig.legend(legend.values(), legend.keys(), loc="outside lower center",
               ncol=min(len(legend), 6), title=caption,
               title_fontproperties={"style": "italic", "size": "small"})
    fig.suptitle(title or f"{block}: normalised metrics", fontweight="bold")
    style.save_figure(fig, out_pdf, out_png)
