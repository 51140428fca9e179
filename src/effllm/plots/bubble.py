"""Bubble grid of normalised metrics (the paper's Fig. 3c: dense vs MoE; one panel per group).

Columns are variants and rows metrics; a bubble's AREA is proportional to ``m__norm`` (min-max
within group, higher is better), so a value twice as good looks twice as big, and the number is
printed too because areas are hard to compare exactly. A faint full-size circle (value 1) behind
each bubble gives the scale. A value that is not available is never a zero-size bubble: its
cell has a dashed empty circle with "n/a". Total and active parameters go under each column,
because the MoE comparison is about spending memory on parameters a token does not use.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D

from effllm.analysis.aggregate import companion, read_table
from effllm.analysis.seeds import seed_summary
from effllm.analysis.tables import ESTIMATED, MISSING
from effllm.plots import style
from effllm.plots.style import plt, select_block

CAPTION = ("bubble area \u221d value, min-max normalised within group{floor};\n"
           "higher is better; number = mean over seeds{spread};\n{missing} = not available, not 0")
SPREAD = (",\ndotted rings = min\u2013max over seeds; small print = the same, or how many\n"
          "seeds have a value")
# Layout in inches: fixed, so that the largest bubble is known to fit its cell.
ROW_LABELS = 0.72
RIGHT = 0.12
MAX_ROW = 0.42
HEADER = 0.42  # group title + variant names
FOOTER_PARAMS = 0.36  # two lines of parameter counts
FOOTER = 0.1
TITLE = 0.26
CAPTION_SPACE = 0.95
BUBBLE_FILL = 0.82  # largest bubble diameter / smaller side of a cell
SMALL = 0.3  # below this value the number goes beside the bubble, not on it
SIZE_KEY = (0.25, 0.5, 1.0)


def params_caption(row: pd.Series) -> str:
    """The text under a column: total and active parameters, each when the table has it."""
    lines = []
    for col, word in (("params_total", "total"), ("params_active", "active")):
        value = row.get(col, np.nan)
        if value is not None and math.isfinite(value):
            lines.append(f"{style.si_count(value)} {word}")
    return "\n".join(lines)


def bubble_grid(ax, members: pd.DataFrame, metrics: Sequence[str], s_max: float,
                series_col: str = "label"):
    """Draw one group's bubble grid on ``ax`` (x = variants, y = metrics, first metric on top).

    Artists carry gids: one scatter ``bubble:<variant>`` per variant holding only its available
    values (sizes = ``s_max`` x value, never 0), one ``spread:<variant>`` scatter of dotted
    rings at the seed minimum and maximum of each value whose seeds differ, one ``n/a`` scatter
    of empty circles and one ``n/a:<variant>:<metric>`` Text per missing value, the scale
    circles as ``scale``.
    Returns the seed summary that was drawn.
    """
    params = [c for c in ("params_total", "params_active") if c in members]
    summary = seed_summary(members, [*(c for m in metrics for c in (m, companion(m, "norm"))),
                                     *params], by=[series_col])
    names = summary[series_col].astype(str).tolist()
    missing_xy, scale_xy = [], []
    spread_any = False
    for i, row in summary.iterrows():
        spread_any |= _draw_column(ax, row, i, names[i], metrics, s_max, missing_xy, scale_xy)
    if scale_xy:
        ax.scatter(*zip(*scale_xy), s=s_max, facecolors="none", edgecolors="0.85",
                   linewidths=0.5, zorder=2, gid="scale")
    if missing_xy:
        ax.scatter(*zip(*missing_xy), s=s_max, facecolors="none", edgecolors="0.45",
                   linewidths=0.6, linestyles="--", zorder=2, gid="n/a")
    _label_grid(ax, summary, names, metrics)
    summary.attrs["spread"] = spread_any
    return summary


def _draw_column(ax, row: pd.Series, i: int, name: str, metrics: Sequence[str], s_max: float,
                 missing_xy: list, scale_xy: list) -> bool:
    """One variant's column: a single scatter of its available values (one legend entry per
    variant), their numbers, an "n/a" text per missing value. Appends the cells that get a
    scale circle or a missing-value circle; returns whether any value has a seed spread."""
    colour = style.technique_colour(name)
    xs, ys, sizes = [], [], []
    ring_xy, ring_sizes = [], []  # the seed range: bubbles of the min and max values
    spread_any = False
    for j, m in enumerate(metrics):
        value = row[companion(m, "norm")]
        if not math.isfinite(value):
            missing_xy.append((i, j))
            ax.text(i, j, MISSING, ha="center", va="center", fontsize=6, color="0.35",
                    gid=f"n/a:{name}:{m}")
            continue
        xs.append(i), ys.append(j), sizes.append(s_max * value)
        scale_xy.append((i, j))
        spread_any |= _annotate_value(ax, row, m, (i, j), s_max, name)
        lo, hi = row[f"{companion(m, 'norm')}__lo"], row[f"{companion(m, 'norm')}__hi"]
        if hi - lo > 1e-9:  # two seeds or more that differ
            ring_xy += [(i, j), (i, j)]
            ring_sizes += [s_max * lo, s_max * hi]
    if xs:
        ax.scatter(xs, ys, s=sizes, facecolors=[to_rgba(colour, 0.5)], edgecolors=[colour],
                   linewidths=0.8, zorder=3, gid=f"bubble:{name}", label=name)
    if ring_xy:
        ax.scatter(*zip(*ring_xy), s=ring_sizes, facecolors="none", edgecolors=[colour],
                   linewidths=0.6, linestyles=":", zorder=3, gid=f"spread:{name}")
    return spread_any


def _annotate_value(ax, row: pd.Series, m: str, xy: tuple[int, int], s_max: float,
                    name: str) -> bool:
    """Print a bubble's value (areas are hard to compare exactly) and, below it in small print,
    its seed range or how many seeds have it; return whether that small print was needed."""
    norm = companion(m, "norm")
    value = row[norm]
    estimated = row[companion(m, "status")] == "estimated"
    text = f"{value:.2f}" + (ESTIMATED if estimated else "")
    lo, hi = row[f"{norm}__lo"], row[f"{norm}__hi"]
    n, runs = row[companion(m, "n")], row["runs"]
    spread = (f"{lo:.2f}\u2013{hi:.2f}" if hi - lo >= 0.005 else
              f"{n}/{runs} seeds" if n < runs else None)
    # A small bubble would be hidden under its number: put the number to its right.
    dx = 0.0 if value >= SMALL else math.sqrt(s_max * value) / 2 + 2.0
    ha = "center" if dx == 0 else "left"
    ax.annotate(text, xy, xytext=(dx, 2.6 if spread else 0), textcoords="offset points",
                ha=ha, va="center", fontsize=6, color="0.1", zorder=4,
                gid=f"value:{name}:{m}")
    if spread:
        ax.annotate(spread, xy, xytext=(dx, -3.6), textcoords="offset points",
                    ha=ha, va="center", fontsize=4.5, color="0.25", zorder=4)
    return spread is not None


def _label_grid(ax, summary: pd.DataFrame, names: list[str], metrics: Sequence[str]) -> None:
    """Metric names on the left (marked when no variant has the metric), variant names on top,
    their parameter counts below, light row separators instead of a grid."""
    absent = [summary[companion(m, "norm")].isna().all() for m in metrics]
    ax.set_yticks(range(len(metrics)), [style.metric_axis_label(m) + (f" ({MISSING})" if a else "")
                                        for m, a in zip(metrics, absent)])
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(len(metrics) - 0.5, -0.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(len(names)), names)
    top.tick_params(length=0, pad=2, labelsize=7)
    top.spines["top"].set_visible(False)
    captions = [params_caption(row) for _, row in summary.iterrows()]
    ax.set_xticks(range(len(names)), captions if any(captions) else [""] * len(names))
    ax.tick_params(axis="both", length=0, pad=2)
    ax.tick_params(axis="x", labelsize=6, labelcolor="0.3")
    ax.tick_params(axis="y", labelsize=7)
    for spine in ax.spines.values():
        spine.set_color("0.8")
    for y in np.arange(0.5, len(metrics) - 1):
        ax.axhline(y, color="0.92", linewidth=0.5, zorder=0)


def draw_bubbles(
    normalised_csv: str | os.PathLike,
    out_pdf: str | os.PathLike,
    out_png: str | os.PathLike,
    block: str,
    metrics: Sequence[str],
    title: str | None = None,
) -> None:
    """One bubble grid per comparison group of ``block`` (stacked), size key and caption below.

    The layout is computed in inches rather than left to a layout engine, because bubble sizes
    are in points: the largest bubble must fit its cell, which needs the cell size up front.
    """
    df = select_block(read_table(normalised_csv), block, normalised_csv)
    groups = list(dict.fromkeys(df["group"]))
    n_variants = int(df.groupby("group")["label"].nunique().max())
    width = style.ONE_COLUMN if n_variants <= 4 else style.TWO_COLUMN
    cell_w = (width - ROW_LABELS - RIGHT) / n_variants
    row_h = min(cell_w, MAX_ROW)
    s_max = (BUBBLE_FILL * min(cell_w, row_h) * 72.0) ** 2  # points^2
    has_params = any(c in df for c in ("params_total", "params_active"))
    footer = FOOTER_PARAMS if has_params else FOOTER
    panel = HEADER + len(metrics) * row_h + footer
    height = TITLE + len(groups) * panel + CAPTION_SPACE
    fig = plt.figure(figsize=(width, height))
    estimated = spread = False
    for k, group in enumerate(groups):
        bottom = CAPTION_SPACE + (len(groups) - 1 - k) * panel + footer
        ax = fig.add_axes((ROW_LABELS / width, bottom / height,
                           (width - ROW_LABELS - RIGHT) / width, len(metrics) * row_h / height))
        members = df[df["group"] == group]
        summary = bubble_grid(ax, members, metrics, s_max)
        ax.set_title(str(group), loc="left", fontsize="medium", pad=14)
        spread |= summary.attrs["spread"]
        estimated |= any(ESTIMATED in t.get_text() for t in ax.texts)
    handles = [Line2D([], [], linestyle="", marker="o", markersize=math.sqrt(s_max * v),
                      markerfacecolor=to_rgba("0.5", 0.5), markeredgecolor="0.4",
                      markeredgewidth=0.6, label=f"{v:g}") for v in SIZE_KEY]
    handles.append(Line2D([], [], linestyle="", marker="o", markersize=math.sqrt(s_max),
                          markerfacecolor="none", markeredgecolor="0.45", markeredgewidth=0.6,
                          label=MISSING))
    if estimated:
        handles.append(Line2D([], [], linestyle="", label=f"{ESTIMATED} estimated"))
    floor = style.norm_floor(df)
    caption = CAPTION.format(
        floor=f", floor {floor:g}" if floor is not None else "",
        spread=SPREAD if spread else "",
        missing=MISSING)
    key = math.sqrt(s_max) / plt.rcParams["legend.fontsize"]  # largest key bubble, in font sizes
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.01),
               ncol=len(handles), title=caption, borderaxespad=0.2, handletextpad=0.3,
               handlelength=key, handleheight=key, columnspacing=0.8,
               title_fontproperties={"style": "italic", "size": "small"})
    fig.suptitle(title or f"{block}: normalised metrics", fontweight="bold",
                 y=1 - 0.06 / height, va="top")
    style.save_figure(fig, out_pdf, out_png)
