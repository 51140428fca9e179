"""Fine-tuning figures: 4a mirrored bars and 4b area + line across model sizes (paper Fig. 4).

Both read the ``finetune`` block of the normalised table, one comparison group per base model.
Seeds are averaged by :func:`effllm.analysis.paper_tables.block_table` (mean over the seeds that
have a value, sample standard deviation for the error bars), the same numbers the result tables
print. A value that is not available is never drawn as 0: its slot carries an "n/a" mark.

* 4a (:func:`draw_finetune` kind "mirrored"): one cluster per base model, one bar per method. The
  Efficiency Score goes UP from the zero line, the loss goes DOWN from it, each on its own scale
  (two axes joined at zero: the score is dimensionless, the loss is in nats/token).
* 4b (:func:`draw_finetune` kind "area"): x = base models ordered by parameter count, one series per
  method: the Efficiency Score as a line with a filled area (top panel), the raw loss as a line
  (bottom panel). See :func:`area_lines` for why the loss has its own panel.

The Efficiency Score is normalised within each base model (docs/metrics.md §10), so it ranks the
methods of one base; comparing its height across bases compares ranks, not resources.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from effllm.analysis.aggregate import companion, read_table
from effllm.analysis.paper_tables import block_table
from effllm.analysis.tables import ESTIMATED, MISSING
from effllm.plots import style
from effllm.plots.style import plt, select_block
from effllm.records import METRICS

BLOCK = "finetune"
SCORE = "efficiency_score"
DEFAULT_LOSS = "val_loss"

ESTIMATED_HATCH = "////"
BAR_FILL = 0.84  # fraction of a base model's x slot taken by its bars
AREA_ALPHA = 0.1
ERR_KW = {"ecolor": "0.15", "elinewidth": 0.6, "capsize": 1.2, "capthick": 0.6}


# ----------------------------------------------------------------------------------- data


def _check_metric(name: str, what: str) -> None:
    if name not in METRICS:
        raise KeyError(f"{what} metric {name!r} is not a canonical metric in "
                       f"effllm.records.METRICS (e.g. {DEFAULT_LOSS!r})")


def finetune_summary(
    df: pd.DataFrame,
    loss: str = DEFAULT_LOSS,
    score: str = SCORE,
    methods: Sequence[str] | None = None,
    size_order: Sequence[str] | None = None,
    block: str = BLOCK,
    source: object = "table",
) -> pd.DataFrame:
    """One row per (base model, method) of ``block``, seeds averaged; pure pandas.

    The grid is complete: a method with no run for a base still gets a row (``seeds`` 0, values
    NaN, status "unavailable"), so the figures can mark it "n/a" instead of leaving it out
    silently. Columns: ``group``, ``size``, ``base_params``, ``x`` (the base's position),
    ``technique``, ``label``, ``seeds``, and per metric (``score``, ``loss``) the
    :func:`block_table` columns ``m``, ``m__std``, ``m__n``, ``m__status``.

    Bases are ordered by parameter count (``base_params``: the smallest ``params_total`` of a
    base's runs, i.e. the base itself, since adapters only add parameters), then by
    ``size_order`` (e.g. the config's size names), then by first appearance. Methods follow
    ``methods`` (technique names, e.g. the config's ``finetune.methods``), any others after them
    in first-appearance order. A table without rows of ``block`` is an error naming the block.
    """
    _check_metric(loss, "loss")
    _check_metric(score, "score")
    rows = select_block(df, block, source)
    if "block" not in rows:
        rows = rows.assign(block=block)
    table = block_table(rows, block, [score, loss])
    bases, sizes, params = _ordered_bases(rows, size_order)
    techniques = list(dict.fromkeys([*(methods or []), *rows["technique"]]))
    labels = dict(zip(rows["technique"], rows["label"]))

    out = []
    for x, group in enumerate(bases):
        for technique in techniques:
            label = labels.get(technique, technique)
            found = table[(table["group"] == group) & (table["variant"] == label)]
            row = {"group": group, "size": sizes[group], "base_params": params.get(group, np.nan),
                   "x": x, "technique": technique, "label": label,
                   "seeds": int(found["seeds"].iloc[0]) if len(found) else 0}
            out.append(row | _cell_values(found, (score, loss)))
    summary = pd.DataFrame(out)
    summary.attrs.update(score=score, loss=loss)
    return summary


def _ordered_bases(rows: pd.DataFrame, size_order: Sequence[str] | None):
    """The base models (groups) in x order, with each one's size name(s) and parameter count:
    by parameters first, because the x axis of 4b reads as model scale."""
    bases = list(dict.fromkeys(rows["group"]))
    sizes = {g: ",".join(dict.fromkeys(rows.loc[rows["group"] == g, "model_size"].astype(str)))
             for g in bases}
    params = (rows.groupby("group", sort=False)["params_total"].min().astype(float)
              if "params_total" in rows else pd.Series(np.nan, index=bases))
    rank = {s: i for i, s in enumerate(size_order or [])}
    seen = {g: i for i, g in enumerate(bases)}

    def base_key(g):
        p = params.get(g, np.nan)
        return (p if math.isfinite(p) else math.inf, rank.get(sizes[g], len(rank)), seen[g])

    return sorted(bases, key=base_key), sizes, params


def _cell_values(found: pd.DataFrame, metrics: Sequence[str]) -> dict:
    """The block-table columns of one (base, method) cell; a cell without a run gets NaN, 0
    seeds and "unavailable", so that it is marked rather than dropped."""
    row = {}
    for m in metrics:
        for col in (m, companion(m, "std"), companion(m, "n"), companion(m, "status")):
            row[col] = found[col].iloc[0] if len(found) else (
                0 if col.endswith("__n") else
                "unavailable" if col.endswith("__status") else np.nan)
    return row


def score_definition(df: pd.DataFrame, score: str = SCORE) -> str:
    """What the score is made of, from the table itself: the weights (``__method``) and, for
    weighted metrics no run had (e.g. AEC without an energy counter), that they were left out."""
    methods = sorted(set(df.get(companion(score, "method"), pd.Series(dtype=str)).dropna()) - {""})
    parsed = [re.fullmatch(r"weighted_harmonic_mean\((.*)\)", m) for m in methods]
    if len(methods) != 1 or not parsed[0]:
        return "; ".join(methods) or f"{style.metric_label(score)}: no definition in the table"
    weights = dict(part.split(":", 1) for part in parsed[0].group(1).split(",") if ":" in part)
    used = {m for cell in df.get(companion(score, "metrics"), pd.Series(dtype=str)).dropna()
            for m in str(cell).split(";") if m}
    names = ", ".join(style.metric_label(m) for m in weights)
    text = (f"{style.metric_label(score)} = weighted harmonic mean of normalised {names} "
            f"(weights {':'.join(weights.values())})")
    unused = [style.metric_label(m) for m in weights if m not in used]
    if unused:
        text += f"; {', '.join(unused)} {MISSING} for every run (not measurable here): left out"
    return text


def base_labels(summary: pd.DataFrame) -> list[str]:
    """Display name of each base model in x order: its group name, then size and parameters."""
    bases = summary.drop_duplicates("x").sort_values("x")
    out = []
    for _, row in bases.iterrows():
        detail = ", ".join(t for t in (row["size"] if row["size"] not in row["group"] else "",
                                       f"{style.si_count(row['base_params'])} params"
                                       if math.isfinite(row["base_params"]) else "") if t)
        out.append(f"{row['group']}\n{detail}" if detail else str(row["group"]))
    return out


def _unit(df: pd.DataFrame, metric: str) -> str:
    col = df.get(companion(metric, "unit"))
    unit = col.dropna().iloc[0] if col is not None and col.notna().any() else None
    unit = unit if isinstance(unit, str) and unit else METRICS[metric].unit
    return "" if unit in ("", "1") else f" [{unit}]"


def metric_axis(metric: str, df: pd.DataFrame | None = None) -> str:
    """Axis label with the direction arrow of the raw metric and, on a second line, its unit
    (from the table's ``__unit`` column when ``df`` is given): "Val loss↓" over "[nats/token]"."""
    arrow = "\u2191" if METRICS[metric].higher_is_better else "\u2193"
    unit = _unit(df, metric).strip() if df is not None else ""
    return f"{style.metric_label(metric)}{arrow}" + (f"\n{unit}" if unit else "")


def seed_notes(summary: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Entries averaged over fewer seeds than their method ran with, e.g. "gqa-small DoRA Val
    loss: 1/2 seeds" (a seed without a value is left out of the mean, never counted as 0)."""
    notes = []
    for _, row in summary.iterrows():
        for m in metrics:
            n = int(row[companion(m, "n")])
            if 0 < n < row["seeds"]:
                notes.append(f"{row['group']} {row['label']} {style.metric_label(m)}: "
                             f"{n}/{row['seeds']} seeds")
    return notes


# -------------------------------------------------------------------------------- 4a bars


def mirrored_bars(ax_score, ax_loss, summary: pd.DataFrame) -> dict[str, bool]:
    """Draw 4a on two axes joined at zero: score bars up on ``ax_score``, loss bars down
    (negative heights) on ``ax_loss``.

    Artists carry gids: ``score:<group>:<label>`` and ``loss:<group>:<label>`` per bar (height =
    seed mean, negated for the loss), ``n/a:<group>:<label>:<metric>`` per missing value (a Text,
    no patch). Returns which optional legend entries are needed (estimated, error bars).
    """
    score, loss = summary.attrs["score"], summary.attrs["loss"]
    techniques = list(dict.fromkeys(summary["technique"]))
    width = BAR_FILL / len(techniques)
    flags = {"estimated": False, "spread": False}
    ticks, tick_labels = [], []
    for _, row in summary.iterrows():
        j = techniques.index(row["technique"])
        xi = row["x"] + (j - (len(techniques) - 1) / 2) * width
        ticks.append(xi), tick_labels.append(row["label"])
        colour = style.technique_colour(row["label"])
        for ax, m, sign in ((ax_score, score, 1.0), (ax_loss, loss, -1.0)):
            _mirrored_bar(ax, row, m, "score" if m == score else "loss", sign, xi, width, colour,
                          flags)
    _join_at_zero(ax_score, ax_loss, summary)
    _mirrored_frame(ax_score, ax_loss, summary, ticks, tick_labels)
    return flags


def _mirrored_bar(ax, row: pd.Series, m: str, name: str, sign: float, xi: float, width: float,
                  colour, flags: dict[str, bool]) -> None:
    """One method's bar of metric ``m`` (pointing up for ``sign`` 1, down for -1) with its s.d.
    whisker, or an "n/a" mark at the zero line; ``flags`` records what the legend must explain."""
    value, std = float(row[m]), float(row[companion(m, "std")])
    if not math.isfinite(value):
        ax.annotate(MISSING, (xi, 0.0), xytext=(0, 2 * sign), textcoords="offset points",
                    rotation=90, ha="center", va="bottom" if sign > 0 else "top",
                    fontsize=5, color="0.35", gid=f"n/a:{row['group']}:{row['label']}:{m}")
        return
    estimated = row[companion(m, "status")] == "estimated"
    flags["estimated"] |= estimated
    ax.bar(xi, sign * value, width * 0.9, color=colour, edgecolor="white", linewidth=0.3,
           hatch=ESTIMATED_HATCH if estimated else None, zorder=2,
           gid=f"{name}:{row['group']}:{row['label']}")
    if math.isfinite(std) and std > 0:
        flags["spread"] = True
        ax.errorbar(xi, sign * value, yerr=std, fmt="none", zorder=3, **ERR_KW)


def _bar_top(summary: pd.DataFrame, m: str) -> float:
    """The highest bar end of metric ``m`` including its whisker (1 when nothing is drawn)."""
    hi = (summary[m].astype(float) + summary[companion(m, "std")].astype(float).fillna(0.0))
    return float(np.nanmax(hi)) if hi.notna().any() else 1.0


def _join_at_zero(ax_score, ax_loss, summary: pd.DataFrame) -> None:
    """Scale both axes from the shared zero line, each to its own metric's range."""
    score, loss = summary.attrs["score"], summary.attrs["loss"]
    ax_score.set_ylim(0.0, max(_bar_top(summary, score), 1.0 if score == SCORE else 0.0) * 1.08)
    ax_loss.set_ylim(-_bar_top(summary, loss) * 1.12, 0.0)
    # The loss axis reads in loss units (no minus sign). The shared 0 is one label outside the
    # layout: tick labels at the joint would make the layout engine open a gap there.
    ax_score.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "" if v == 0 else f"{v:g}"))
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "" if v == 0 else f"{-v:g}"))
    zero = ax_loss.annotate("0", (0.0, 0.0), xycoords=("axes fraction", "data"),
                            xytext=(-3.5, 0), textcoords="offset points", ha="right",
                            va="center", fontsize=plt.rcParams["ytick.labelsize"])
    zero.set_in_layout(False)


def _mirrored_frame(ax_score, ax_loss, summary: pd.DataFrame, ticks: list[float],
                    tick_labels: list[str]) -> None:
    """Make the two axes read as one: no spines at the joint, the zero line, method names
    below, base-model names on top, a separator between base models."""
    n_bases = int(summary["x"].max()) + 1
    for ax in (ax_score, ax_loss):
        ax.set_xlim(-0.5, n_bases - 0.5)
        ax.yaxis.grid(True, zorder=0)
        ax.set_axisbelow(True)
    ax_score.spines["bottom"].set_visible(False)
    ax_loss.spines["top"].set_visible(False)
    ax_loss.axhline(0.0, color="0.2", linewidth=0.6, zorder=4)
    ax_score.tick_params(axis="x", bottom=False, labelbottom=False)
    ax_loss.set_xticks(ticks, tick_labels, rotation=90, fontsize=6)
    ax_loss.tick_params(axis="x", length=0, pad=2)
    for b in range(1, n_bases):
        for ax in (ax_score, ax_loss):
            ax.axvline(b - 0.5, color="0.85", linewidth=0.5, zorder=0)
    names = ax_score.secondary_xaxis("top")
    names.set_xticks(range(n_bases), base_labels(summary))
    names.tick_params(length=0, pad=2, labelsize=7)
    ax_score.set_ylabel(metric_axis(summary.attrs["score"]))


def _mirrored_figure(df: pd.DataFrame, summary: pd.DataFrame, loss: str,
                     title: str | None):
    """Figure 4a: mirrored bars, score up and loss down, one cluster per base model."""
    slots = len(summary)
    width = style.ONE_COLUMN if slots <= 16 else style.TWO_COLUMN
    fig, (ax_score, ax_loss) = plt.subplots(
        2, 1, sharex=True, figsize=(width, 4.4), layout="constrained",
        gridspec_kw={"height_ratios": (1, 1)})
    fig.get_layout_engine().set(h_pad=0.0, hspace=0.0)
    flags = mirrored_bars(ax_score, ax_loss, summary)
    ax_loss.set_ylabel(metric_axis(loss, df))
    floor = style.norm_floor(df)
    if floor is not None:
        ax_score.axhline(floor, color="0.5", linewidth=0.5, linestyle=":", zorder=1)
    _legend(fig, df, summary, flags, floor, width, bars=True)
    fig.suptitle(title or f"Fine-tuning per method\n{style.metric_label(SCORE)}\u2191 (up), "
                 f"{style.metric_label(loss)}\u2193 (down)", fontweight="bold")
    return fig


# ------------------------------------------------------------------------------- 4b areas


def area_lines(ax_score, ax_loss, summary: pd.DataFrame) -> dict[str, bool]:
    """Draw 4b: per method, the score as a line over a filled area (``ax_score``) and the raw
    loss as a line (``ax_loss``), x = base models in ``summary["x"]`` order.

    The loss has its own panel, sharing x, instead of a secondary axis: the two quantities have
    different units and scales, and with seven methods a twin axis would leave fourteen lines
    whose axis a reader must guess; stacked panels keep every line against its own scale.

    With one base model there is nothing to join: each method is a point (spread sideways so
    that equal values stay visible), no area. Missing values break the line and area (NaN) and
    get an ``n/a:<group>:<label>:<metric>`` Text at the bottom of the panel; an estimated value
    gets a hollow marker. Gids: lines ``score:<label>`` / ``loss:<label>`` (y = seed means in x
    order), areas ``area:<label>``, hollow markers ``estimated:<score|loss>:<label>``.
    """
    score, loss = summary.attrs["score"], summary.attrs["loss"]
    techniques = list(dict.fromkeys(summary["technique"]))
    n_bases = int(summary["x"].max()) + 1
    single = n_bases == 1
    flags = {"estimated": False, "spread": False}
    missing: dict[tuple[int, str], int] = {}
    for j, technique in enumerate(techniques):
        rows = summary[summary["technique"] == technique].sort_values("x")
        x = rows["x"].to_numpy(float)
        if single:
            x = x + (j - (len(techniques) - 1) / 2) * (0.8 / len(techniques))
        for ax, m, name in ((ax_score, score, "score"), (ax_loss, loss, "loss")):
            _area_series(ax, rows, x, m, name, single, flags, missing)
    ax_score.set_ylim(0.0, max(1.0 if score == SCORE else 0.0,
                               np.nanmax(np.append(summary[score].to_numpy(float), 0.0))) * 1.1)
    ax_loss.margins(y=0.2)
    for ax in (ax_score, ax_loss):
        ax.set_xlim(-0.5, n_bases - 0.5)
        ax.grid(True, zorder=0)
        ax.set_axisbelow(True)
    ax_loss.set_xticks(range(n_bases), base_labels(summary))
    ax_score.tick_params(axis="x", labelbottom=False)
    ax_score.set_ylabel(metric_axis(score))
    return flags


def _area_series(ax, rows: pd.DataFrame, x: np.ndarray, m: str, name: str, single: bool,
                 flags: dict[str, bool], missing: dict[tuple[int, str], int]) -> None:
    """One method's series of metric ``m`` on ``ax``: the line (points when ``single``), the
    area under the score, s.d. whiskers, hollow markers over estimated values and stacked
    "n/a" labels (``missing`` counts the labels already at each base, so they do not overlap)."""
    label = rows["label"].iloc[0]
    colour = style.technique_colour(label)
    y = rows[m].to_numpy(float)
    std = rows[companion(m, "std")].to_numpy(float)
    ok = np.isfinite(y)
    ax.plot(x, y, color=colour, marker="o", markersize=3.5,
            linestyle="none" if single else "-", zorder=3, gid=f"{name}:{label}", label=label)
    if name == "score" and not single and ok.any():
        ax.fill_between(x, 0.0, np.where(ok, y, 0.0), where=ok, color=colour,
                        alpha=AREA_ALPHA, linewidth=0, zorder=1, gid=f"area:{label}")
    spread = ok & np.isfinite(std) & (std > 0)
    if spread.any():
        flags["spread"] = True
        ax.errorbar(x[spread], y[spread], yerr=std[spread], fmt="none", zorder=3,
                    **(ERR_KW | {"ecolor": colour}))
    estimated = ok & (rows[companion(m, "status")] == "estimated").to_numpy()
    if estimated.any():  # hollow marker over the filled one
        flags["estimated"] = True
        ax.plot(x[estimated], y[estimated], linestyle="none", marker="o",
                markersize=3.5, markerfacecolor="white", markeredgecolor=colour,
                zorder=4, gid=f"estimated:{name}:{label}")
    for xi, (_, row) in zip(x[~ok], rows[~ok].iterrows()):
        k = missing.get((row["x"], m), 0)
        missing[(row["x"], m)] = k + 1
        ax.annotate(f"{label} {MISSING}", (xi, 0.0), xycoords=("data", "axes fraction"),
                    xytext=(0, 2 + 6.5 * k), textcoords="offset points", ha="center",
                    va="bottom", fontsize=5, color=colour,
                    gid=f"n/a:{row['group']}:{label}:{m}")


def _area_figure(df: pd.DataFrame, summary: pd.DataFrame, loss: str, title: str | None):
    """Figure 4b: score (line + area) and loss (line) across base models ordered by parameter
    count, one series per method."""
    n_bases = int(summary["x"].max()) + 1
    width = style.ONE_COLUMN if n_bases <= 4 else style.TWO_COLUMN
    fig, (ax_score, ax_loss) = plt.subplots(
        2, 1, sharex=True, figsize=(width, 4.2), layout="constrained",
        gridspec_kw={"height_ratios": (3, 2)})
    flags = area_lines(ax_score, ax_loss, summary)
    ax_loss.set_ylabel(metric_axis(loss, df))
    floor = style.norm_floor(df)
    if floor is not None:
        ax_score.axhline(floor, color="0.5", linewidth=0.5, linestyle=":", zorder=1)
    ax_loss.set_xlabel("base model (by parameter count)")
    _legend(fig, df, summary, flags, floor, width, bars=False)
    fig.suptitle(title or f"Fine-tuning across model sizes\n{style.metric_label(SCORE)}\u2191 "
                 f"(line + area), {style.metric_label(loss)}\u2193 (line)", fontweight="bold")
    return fig


# ------------------------------------------------------------------------------ shared


def _legend(fig, df, summary, flags, floor, width, bars: bool) -> None:
    """Method key plus a caption: what the score is, how it is normalised, bars/lines, n/a."""
    score, loss = summary.attrs["score"], summary.attrs["loss"]
    handles = []
    for _, rows in summary.groupby("technique", sort=False):
        label = rows["label"].iloc[0]
        text = label + (f" ({MISSING})" if rows["seeds"].eq(0).all() else "")  # no run at all
        colour = style.technique_colour(label)
        handles.append(Patch(facecolor=colour, label=text) if bars else
                       Line2D([], [], color=colour, marker="o", markersize=3.5, label=text))
    if flags["estimated"]:
        handles.append(
            Patch(facecolor="white", edgecolor="0.3", hatch=ESTIMATED_HATCH,
                  label=f"estimated ({ESTIMATED})") if bars else
            Line2D([], [], linestyle="none", marker="o", markersize=3.5, markerfacecolor="white",
                   markeredgecolor="0.3", label=f"estimated ({ESTIMATED})"))
    norm = ("min-max normalised within each base model"
            + (f", floor {floor:g} (dotted)" if floor is not None else ""))
    seeds = int(summary["seeds"].max())
    lines = [
        score_definition(df, score) + ";",
        f"{norm}; {style.metric_label(loss)}: raw{_unit(df, loss)}, lower is better;",
        ("error bars: \u00b11 s.d. over seeds; " if flags["spread"] else
         f"{seeds} seed{'s' if seeds != 1 else ''}; ")
        + f"{MISSING} = not available, not 0",
    ]
    notes = seed_notes(summary, [score, loss])
    if notes:
        lines.append("means over fewer seeds: " + "; ".join(notes))
    chars = int(width * 72 / 4.2)
    caption = "\n".join(textwrap.fill(line, chars) for line in lines)
    ncol = min(len(handles), 8 if width == style.TWO_COLUMN else 4)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, title=caption,
               borderpad=1.2,  # the layout runs without padding (axes joined at 0)
               title_fontproperties={"style": "italic", "size": "small"})


FIGURES = {"mirrored": _mirrored_figure, "area": _area_figure}


def draw_finetune(
    normalised_csv: str | os.PathLike,
    out_pdf: str | os.PathLike,
    out_png: str | os.PathLike,
    kind: str,
    loss: str | None = None,
    methods: Sequence[str] | None = None,
    size_order: Sequence[str] | None = None,
    block: str = BLOCK,
    title: str | None = None,
) -> pd.DataFrame:
    """Draw figure 4a (``kind`` "mirrored") or 4b ("area") from the normalised table; return the
    summary that was drawn."""
    figure = FIGURES.get(kind)
    if figure is None:
        raise ValueError(f"unknown fine-tuning figure kind {kind!r}; known: {sorted(FIGURES)}")
    loss = loss or DEFAULT_LOSS
    df = select_block(read_table(normalised_csv), block, normalised_csv)
    summary = finetune_summary(df, loss, SCORE, methods, size_order, block, normalised_csv)
    style.save_figure(figure(df, summary, loss, title), out_pdf, out_png)
    return summary
