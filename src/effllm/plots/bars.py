"""Grouped bars of normalised metrics with a raw-metric line (the paper's Fig. 3b; one panel per
comparison group).

Bars show ``m__norm`` (min-max within group, higher is better) so that metrics of different units
share one axis; the line shows one metric RAW (validation perplexity by default) on a secondary
axis, because the paper reads the quality trade-off off the real number, not its rank.
A value that is not available is never drawn as a 0-height bar: its slot stays empty and carries
an "n/a" mark, and the panel says what is missing. Seeds are averaged
(:func:`effllm.analysis.seeds.seed_summary`); whiskers span min-max.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.container import ErrorbarContainer
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from effllm.analysis.aggregate import companion, read_table
from effllm.analysis.seeds import seed_summary
from effllm.analysis.tables import ESTIMATED, MISSING
from effllm.plots import style
from effllm.plots.style import plt, select_block
from effllm.records import METRICS

CAPTION = "min-max normalised within group{floor}; higher is better"
# Metric colours: Okabe-Ito without vermilion/red, which belongs to the raw-metric line.
METRIC_PALETTE = ("#0072B2", "#56B4E9", "#009E73", "#E69F00", "#CC79A7", "#7F7F7F", "#000000")
LINE_COLOUR = "#C00000"
ESTIMATED_HATCH = "////"
PANEL_HEIGHT = 2.1  # inches per group panel
BAR_FILL = 0.8  # fraction of a variant's x slot taken by its bars


def metric_colour(index: int) -> str:
    """Colour of the ``index``-th metric of a bar chart (bars are coloured per metric)."""
    return METRIC_PALETTE[index % len(METRIC_PALETTE)]


def line_axis_label(metric: str, unit: object = None) -> str:
    """Secondary-axis label of a raw metric: label, direction arrow, unit unless dimensionless."""
    info = METRICS.get(metric)
    arrow = "" if info is None else ("\u2191" if info.higher_is_better else "\u2193")
    unit = unit if isinstance(unit, str) and unit else (info.unit if info else "")
    suffix = f" [{unit}]" if unit not in ("", "1") else ""
    return f"{style.metric_label(metric)}{arrow} (raw){suffix}"


def _wrap(label: str) -> str:
    return "\n".join(textwrap.wrap(str(label), 11, break_long_words=False)) or str(label)


def bars_with_line(ax, members: pd.DataFrame, metrics: Sequence[str],
                   line_metric: str = "perplexity", series_col: str = "label"):
    """Draw one group's bars and raw line on ``ax``; return the secondary (line) Axes.

    Artists carry gids for inspection: each bar ``bar:<variant>:<metric>``, each missing-value
    mark ``n/a:<variant>:<metric>`` (a Text, no patch), the line ``line:<metric>`` with the
    seed-mean raw values (NaN where a variant has none, so the line breaks instead of dropping).
    """
    wanted = dict.fromkeys([*metrics, line_metric])
    summary = seed_summary(members, [c for m in wanted for c in (m, companion(m, "norm"))],
                           by=[series_col])
    names = summary[series_col].astype(str).tolist()
    x = np.arange(len(names), dtype=float)
    notes = _draw_bars(ax, summary, metrics, names, x)
    _style_bar_axis(ax, x, names, style.norm_floor(members))
    ax2 = ax.twinx()
    notes += _draw_raw_line(ax2, summary, members, line_metric, names, x)
    if notes:
        _title_notes(ax, notes)
    return ax2


def _draw_bars(ax, summary: pd.DataFrame, metrics: Sequence[str], names: list[str],
               x: np.ndarray) -> list[str]:
    """The bars, metric by metric (so each metric's colour sits at the same offset in every
    slot), with an "n/a" mark where a value is missing; return the notes for the panel title:
    what is missing, and which means stand on fewer seeds than the variant ran."""
    width = BAR_FILL / max(len(metrics), 1)
    notes: list[str] = []
    for j, m in enumerate(metrics):
        offset = (j - (len(metrics) - 1) / 2) * width
        missing_for = []
        for i, row in summary.iterrows():
            xi = x[i] + offset
            if not math.isfinite(row[companion(m, "norm")]):
                ax.text(xi, 0.015, MISSING, rotation=90, ha="center", va="bottom", fontsize=5,
                        color="0.35", gid=f"n/a:{names[i]}:{m}")
                missing_for.append(names[i])
                continue
            _draw_bar(ax, row, m, xi, width, metric_colour(j), names[i])
            if 0 < row[companion(m, "n")] < row["runs"]:
                notes.append(f"{names[i]} {style.metric_label(m)}: "
                             f"{row[companion(m, 'n')]}/{row['runs']} seeds")
        if missing_for and len(missing_for) == len(names):
            notes.insert(0, f"{style.metric_label(m)} for all")
        elif missing_for:
            notes.append(f"{', '.join(missing_for)}: {style.metric_label(m)}")
    return notes


def _draw_bar(ax, row: pd.Series, m: str, xi: float, width: float, colour: str,
              name: str) -> None:
    """One available value: its seed-mean bar (hatched when estimated) and, when the seeds
    disagree, a min-max whisker."""
    norm = companion(m, "norm")
    value = row[norm]
    estimated = row[companion(m, "status")] == "estimated"
    ax.bar(xi, value, width * 0.9, color=colour, edgecolor="white",
           linewidth=0.3, hatch=ESTIMATED_HATCH if estimated else None,
           gid=f"bar:{name}:{m}", zorder=2)
    lo, hi = row[f"{norm}__lo"], row[f"{norm}__hi"]
    if hi - lo > 1e-9:
        ax.errorbar(xi, value, yerr=[[value - lo], [hi - value]], fmt="none",
                    ecolor="0.15", elinewidth=0.6, capsize=1.2, capthick=0.6, zorder=3)


def _style_bar_axis(ax, x: np.ndarray, names: list[str], floor: float | None) -> None:
    """The normalised axis: variant names below, a fixed 0-1 range so that panels compare,
    and the normalisation floor as a dotted line (values below it were clipped up to it)."""
    ax.set_xticks(x, [_wrap(n) for n in names])
    ax.tick_params(axis="x", length=0, pad=2)
    ax.set_xlim(x[0] - 0.5, x[-1] + 0.5)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("normalised value\u2191")
    ax.yaxis.grid(True, zorder=0)
    ax.set_axisbelow(True)
    if floor is not None:
        ax.axhline(floor, color="0.5", linewidth=0.5, linestyle=":", zorder=1)


def _draw_raw_line(ax2, summary: pd.DataFrame, members: pd.DataFrame, line_metric: str,
                   names: list[str], x: np.ndarray) -> list[str]:
    """The raw metric's seed means as a line on the secondary axis ``ax2``, in the line colour
    so the axis it belongs to is plain; return the note naming variants without a value."""
    raw, lo, hi = (summary[c].astype(float).to_numpy()
                   for c in (line_metric, f"{line_metric}__lo", f"{line_metric}__hi"))
    ax2.plot(x, raw, color=LINE_COLOUR, marker="o", markersize=3.5, linewidth=1.2, zorder=4,
             gid=f"line:{line_metric}", label=line_axis_label(line_metric))
    spread = np.isfinite(raw) & (hi - lo > 0)
    if spread.any():
        ax2.errorbar(x[spread], raw[spread], yerr=[(raw - lo)[spread], (hi - raw)[spread]],
                     fmt="none", ecolor=LINE_COLOUR, elinewidth=0.7, capsize=2, capthick=0.7,
                     zorder=4)
    no_line = [n for n, v in zip(names, raw) if not math.isfinite(v)]
    notes = [f"{', '.join(no_line)}: raw {style.metric_label(line_metric)}"] if no_line else []
    unit = members.get(companion(line_metric, "unit"))
    unit = unit.dropna().iloc[0] if unit is not None and unit.notna().any() else None
    ax2.set_ylabel(line_axis_label(line_metric, unit), color=LINE_COLOUR)
    ax2.tick_params(axis="y", colors=LINE_COLOUR)
    ax2.spines["right"].set_color(LINE_COLOUR)
    if np.isfinite(raw).any():  # whiskers included, padded so markers clear the frame
        top, bottom = np.nanmax(np.where(spread, hi, raw)), np.nanmin(np.where(spread, lo, raw))
        pad = max(top - bottom, abs(top) * 0.01, 1e-12) * 0.15
        ax2.set_ylim(bottom - pad, top + pad)
    return notes


def _title_notes(ax, notes: list[str]) -> None:
    """What was not drawn, as a small title right of the group title, wrapped to about 60% of
    the figure's width so that it never runs into the group name."""
    chars = max(30, int(ax.figure.get_figwidth() * 72 * 0.6 / 3.4))
    ax.set_title(textwrap.fill(f"{MISSING} (not drawn): " + "; ".join(notes), chars),
                 loc="right", fontsize=6, color="0.3", ha="right")


def draw_bars_with_line(
    normalised_csv: str | os.PathLike,
    out_pdf: str | os.PathLike,
    out_png: str | os.PathLike,
    block: str,
    metrics: Sequence[str],
    line_metric: str = "perplexity",
    title: str | None = None,
) -> None:
    """One bar panel per comparison group of ``block`` (stacked, so variant labels stay legible
    at paper width), one shared legend whose title carries the caption."""
    df = select_block(read_table(normalised_csv), block, normalised_csv)
    groups = list(dict.fromkeys(df["group"]))
    slots = df.groupby("group")["label"].nunique().max() * max(len(metrics), 1)
    width = style.ONE_COLUMN if slots <= 12 else style.TWO_COLUMN
    fig, axes = plt.subplots(len(groups), 1, figsize=(width, len(groups) * PANEL_HEIGHT + 0.8),
                             squeeze=False, layout="constrained")
    estimated = spread = False
    line_label = None
    for ax, group in zip(axes.flat, groups):
        members = df[df["group"] == group]
        ax2 = bars_with_line(ax, members, metrics, line_metric)
        line_label = ax2.get_lines()[0].get_label()
        ax.set_title(str(group), loc="left", fontsize="medium")
        estimated |= any(p.get_hatch() for p in ax.patches)
        spread |= any(isinstance(c, ErrorbarContainer) for c in ax.containers + ax2.containers)
    absent = {m for m in metrics
              if companion(m, "norm") not in df or df[companion(m, "norm")].isna().all()}
    handles = [Patch(facecolor=metric_colour(j), label=style.metric_axis_label(m)
                     + (f" ({MISSING})" if m in absent else "")) for j, m in enumerate(metrics)]
    handles.append(Line2D([], [], color=LINE_COLOUR, marker="o", markersize=3.5, label=line_label))
    if estimated:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch=ESTIMATED_HATCH,
                             label=f"estimated ({ESTIMATED})"))
    floor = style.norm_floor(df)
    caption = (CAPTION.format(floor=f", floor {floor:g} (dotted)" if floor is not None else "")
               + ("\nwhiskers: min\u2013max over seeds; " if spread else "\n")
               + f"{MISSING} = not available, not 0"
               + (f"\n{style.estimates_note(df)}" if style.estimates_note(df) else ""))
    ncol = len(handles) if width == style.TWO_COLUMN and len(handles) <= 8 else 4
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol,
               title=caption, title_fontproperties={"style": "italic", "size": "small"})
    fig.suptitle(title or f"{block}: normalised metrics and raw {style.metric_label(line_metric)}",
                 fontweight="bold")
    style.save_figure(fig, out_pdf, out_png)
