"""The ranking chart (the paper's Fig. 2, its leaderboard): the rank of every technique within
its comparison group on every metric, 1 = best, as a heat-map with the rank printed in each cell.

Ranks are taken on the seed means (:func:`effllm.analysis.seeds.seed_summary`) with the ranking
rule of the normalisation (:func:`effllm.analysis.normalise.ranks`: raw values, each metric's own
direction, ties share the best rank), so the chart orders what the tables print. The shade is
the rank's place between best and worst of its group, so groups of 2 and of 7 read alike.

A value that is not available has no rank: its cell is hatched grey with "n/a", never a rank
and never 0. A rank whose seed range (min-max) overlaps that of another technique of the group
gets a "~": another seed could reorder them. Pretraining blocks are in the left column,
fine-tuning and inference in the right one, each block a panel with its own metric columns.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Mapping, Sequence

import pandas as pd
from matplotlib.patches import Patch, Rectangle

from effllm.analysis.aggregate import companion, read_table
from effllm.analysis.normalise import ranks
from effllm.analysis.seeds import seed_summary
from effllm.analysis.tables import ESTIMATED, MISSING
from effllm.plots import style
from effllm.plots.style import plt

BLOCK_ORDER = ("attention", "position", "moe", "attention_free", "finetune", "inference")
BLOCK_TITLES = {"attention": "Attention", "position": "Positional encoding", "moe": "MoE vs dense",
                "attention_free": "Attention-free", "finetune": "Fine-tuning",
                "inference": "Quantised inference"}
LEFT_STAGES = ("pretrain",)  # the other stages go to the right-hand column
CMAP = plt.get_cmap("Blues_r")
SHADE = (0.05, 0.8)  # colormap range from best to worst: the worst stays visibly tinted
NA_FACE, NA_HATCH = "0.93", "////"
UNSETTLED = "~"
ROW_H = 0.15  # inches per table row
HEADER_H = 0.62  # panel title + metric names (two lines when marked n/a)
GAP = 0.12  # between stacked panels
LABEL_W = 1.15  # inches for the row labels
CELL_W = 0.36


def rank_table(df: pd.DataFrame, metrics: Mapping[str, Sequence[str]],
               order: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (block, group, technique), seeds averaged, with ``m__rank`` per metric of the
    row's stage (``metrics``: stage -> metric names) and the seed-summary columns; ``unsettled``
    per metric (``m__unsettled``): the seed range overlaps another technique's in the group.
    Blocks follow :data:`BLOCK_ORDER` (other names after their stage's known ones); techniques
    follow ``order`` (e.g. the config's variant, method and precision order), others after."""
    place = {t: i for i, t in enumerate(dict.fromkeys(order))}
    out = []
    for (stage, block, group), rows in df.groupby(["stage", "block", "group"], sort=False):
        names = list(metrics.get(stage, ()))
        if not names:
            continue
        summary = seed_summary(rows, names, by=("technique", "label"))
        summary = summary.iloc[sorted(range(len(summary)), key=lambda i: (
            place.get(summary["technique"].iloc[i], len(place)), i))].reset_index(drop=True)
        summary.insert(0, "group", group)
        summary.insert(0, "block", block)
        summary.insert(0, "stage", stage)
        summary = pd.concat([summary, ranks(summary, names, "group")], axis=1)
        for m in names:
            summary[companion(m, "unsettled")] = _unsettled(summary, m)
        out.append(summary)
    if not out:
        raise ValueError(f"no rows of the stages {sorted(metrics)} in the table: nothing to rank")
    table = pd.concat(out, ignore_index=True)
    order = {b: i for i, b in enumerate(BLOCK_ORDER)}
    stage_order = {s: i for i, s in enumerate(("pretrain", "finetune", "inference"))}
    key = table.apply(lambda r: (stage_order.get(r["stage"], 9),
                                 order.get(r["block"], order.get(r["block"].split("_")[0], 99)),
                                 r["block"]), axis=1)
    return table.loc[sorted(table.index, key=lambda i: (key[i], i))].reset_index(drop=True)


def _unsettled(summary: pd.DataFrame, m: str) -> pd.Series:
    """True where a technique's seed range overlaps another's (both with two or more seeds)."""
    lo, hi, n = (summary[companion(m, k)] for k in ("lo", "hi", "n"))
    flags = []
    for i in summary.index:
        if n[i] < 2 or not math.isfinite(summary.at[i, m]):
            flags.append(False)
            continue
        others = [j for j in summary.index
                  if j != i and n[j] >= 2 and math.isfinite(summary.at[j, m])]
        flags.append(any(lo[i] <= hi[j] and lo[j] <= hi[i] for j in others))
    return pd.Series(flags, index=summary.index)


def _short(group: object) -> str:
    """A served model's or base's name without the stage prefix, the seed suffix and the
    fine-tuning set (which the block's title names)."""
    text = str(group).split("/", 1)[-1].split("+", 1)[0]
    return text[:-3] if text[-3:-1] == "-s" and text[-1].isdigit() else text


def rank_panel(ax, table: pd.DataFrame, metrics: Sequence[str], title: str) -> dict[str, bool]:
    """Draw one block's heat-map on ``ax``: rows = techniques (a header row per group when the
    block has several), columns = metrics. Cells carry gids ``rank:<group>:<label>:<metric>``
    (a Rectangle with the rank as text) or ``n/a:<group>:<label>:<metric>`` (hatched, no rank).
    Returns which marks were used (estimated, unsettled, n/a) for the legend."""
    groups = list(dict.fromkeys(table["group"]))
    lines: list[tuple[str, object]] = []
    for g in groups:
        if len(groups) > 1:
            lines.append(("header", g))
        lines += [("row", i) for i in table.index[table["group"] == g]]
    used = {"estimated": False, "unsettled": False, "n/a": False}
    ylabels = []
    for y, (kind, what) in enumerate(lines):
        if kind == "header":
            ax.text(-0.45, y + 0.1, _short(what), ha="left", va="center", fontsize=5.5,
                    fontweight="bold", color="0.25")
            ylabels.append("")
            continue
        row = table.loc[what]
        ylabels.append(str(row["label"]))
        for x, m in enumerate(metrics):
            _rank_cell(ax, table, row, m, x, y, used)
    _label_panel(ax, table, metrics, ylabels)
    single = "" if len(groups) > 1 else f" ({_short(groups[0])})"
    ax.set_title(title + single, loc="left", fontsize=7, fontweight="bold", pad=12)
    return used


def _rank_cell(ax, table: pd.DataFrame, row: pd.Series, m: str, x: int, y: int,
               used: dict[str, bool]) -> None:
    """One cell at (``x``, ``y``): shaded by the rank's place between best and worst of the
    row's group with the rank printed, or hatched "n/a" without a rank; ``used`` records
    the marks the legend must explain."""
    gid = f"{row['group']}:{row['label']}:{m}"
    rank = row.get(companion(m, "rank"))
    if rank is None or pd.isna(rank):
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=NA_FACE,
                               edgecolor="white", hatch=NA_HATCH, linewidth=0.8,
                               gid=f"n/a:{gid}"))
        ax.text(x, y, MISSING, ha="center", va="center", fontsize=4.5, color="0.4")
        used["n/a"] = True
        return
    ranked = table.loc[table["group"] == row["group"], companion(m, "rank")].notna().sum()
    frac = (int(rank) - 1) / (ranked - 1) if ranked > 1 else 0.0
    colour = CMAP(SHADE[0] + (SHADE[1] - SHADE[0]) * frac)
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=colour, edgecolor="white",
                           linewidth=0.8, gid=f"rank:{gid}"))
    text = str(int(rank))
    if row[companion(m, "status")] == "estimated":
        text += ESTIMATED
        used["estimated"] = True
    if row[companion(m, "unsettled")]:
        text += UNSETTLED
        used["unsettled"] = True
    dark = frac < 0.55
    ax.text(x, y, text, ha="center", va="center", fontsize=6,
            color="white" if dark else "0.1", fontweight="bold" if rank == 1 else None)


def _label_panel(ax, table: pd.DataFrame, metrics: Sequence[str], ylabels: list[str]) -> None:
    """Metric names on top (marked when no technique has the metric), technique names on the
    left, no frame: the cells themselves delimit the table."""
    absent = [table[m].isna().all() if m in table else True for m in metrics]
    ax.set_xlim(-0.5, len(metrics) - 0.5)
    ax.set_ylim(len(ylabels) - 0.5, -0.5)
    ax.set_xticks(range(len(metrics)),
                  [style.metric_label(m) + (f"\n({MISSING})" if a else "")
                   for m, a in zip(metrics, absent)])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.tick_params(length=0, pad=2)
    ax.tick_params(axis="x", labelsize=6)
    ax.tick_params(axis="y", labelsize=6)
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_ranking(
    normalised_csv: str | os.PathLike,
    out_pdf: str | os.PathLike,
    out_png: str | os.PathLike,
    metrics: Mapping[str, Sequence[str]],
    order: Sequence[str] = (),
    title: str | None = None,
) -> pd.DataFrame:
    """The whole chart: one panel per block, pretraining on the left, the rest on the right,
    panel heights in proportion to their rows. Returns the rank table that was drawn."""
    source = read_table(normalised_csv)
    table = rank_table(source, metrics, order)
    blocks = list(dict.fromkeys(table["block"]))
    columns: list[list[str]] = [[b for b in blocks if _stage(table, b) in LEFT_STAGES],
                                [b for b in blocks if _stage(table, b) not in LEFT_STAGES]]
    columns = [c for c in columns if c]
    heights = [[_rows(table, b) * ROW_H + HEADER_H + GAP for b in col] for col in columns]
    width = style.TWO_COLUMN if len(columns) > 1 else style.ONE_COLUMN
    caption_h = 0.75
    height = max(sum(h) for h in heights) + 0.3 + caption_h
    fig = plt.figure(figsize=(width, height))
    col_w = width / len(columns)
    used = {"estimated": False, "unsettled": False, "n/a": False}
    for c, (col, hs) in enumerate(zip(columns, heights)):
        top = height - 0.3
        for block, h in zip(col, hs):
            names = list(metrics[_stage(table, block)])
            ax_w = min(CELL_W * len(names), col_w - LABEL_W - 0.15)
            ax = fig.add_axes(((c * col_w + LABEL_W) / width, (top - h + GAP) / height,
                               ax_w / width, (h - HEADER_H - GAP) / height))
            rows = table[table["block"] == block]
            for k, v in rank_panel(ax, rows, names, _title(block)).items():
                used[k] |= v
            top -= h
    low, high = int(table["seeds"].min()), int(table["seeds"].max())
    seeds = f"{high} seed{'s' if high != 1 else ''}" if low == high else f"{low}\u2013{high} seeds"
    handles = [Patch(facecolor=CMAP(SHADE[0]), label="1 = best"),
               Patch(facecolor=CMAP(SHADE[1]), label="last")]
    if used["n/a"]:
        handles.append(Patch(facecolor=NA_FACE, hatch=NA_HATCH, edgecolor="0.6",
                             label=f"{MISSING}: not available (no rank, not 0)"))
    caption = textwrap.fill(
        "Rank within each comparison group on the seed means "
        f"({seeds}), on raw values in each metric's "
        "direction (lowest PPL, loss, AMU, AL, AEC; highest TT, ST, IT, Perf, MCR); ties share "
        "the best rank"
        + (f"; {ESTIMATED} estimated" if used["estimated"] else "")
        + (f"; {UNSETTLED} seed range overlaps another's" if used["unsettled"] else "")
        + (f"; {style.estimates_note(source)}" if style.estimates_note(source) else ""), 120)
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
               title=caption, title_fontproperties={"style": "italic", "size": 6},
               fontsize=6, handlelength=1.2, borderaxespad=0.3)
    fig.suptitle(title or "Ranking of every technique within its block (1 = best)",
                 fontweight="bold", y=1 - 0.05 / height, va="top")
    style.save_figure(fig, out_pdf, out_png)
    return table


def _stage(table: pd.DataFrame, block: str) -> str:
    return str(table.loc[table["block"] == block, "stage"].iloc[0])


def _rows(table: pd.DataFrame, block: str) -> int:
    rows = table[table["block"] == block]
    groups = rows["group"].nunique()
    return len(rows) + (groups if groups > 1 else 0)


def _title(block: str) -> str:
    base, _, rest = block.partition("_")
    if block in BLOCK_TITLES:
        return BLOCK_TITLES[block]
    return f"{BLOCK_TITLES.get(base, base)} ({rest})" if rest else block
