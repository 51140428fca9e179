"""Figure 5: the quantised-inference rose (the paper's polar bar chart per precision).

One polar panel per precision (widest first, :data:`~effllm.analysis.paper_tables.PRECISION_ORDER`).
Each served model is an angular sector, named around the circle; inside a sector, one petal per
metric (performance, IT, AMU, AL, AEC, MCR by default), its radius the metric's ``__norm`` value:
min-max normalised within the model's comparison group, i.e. across the precisions that model was
served at, and flipped so that higher is better. A petal therefore says how this precision does
against the same model's other precisions, not how models compare with each other.

**Petals side by side, not a radial stack.** The paper stacks the metrics radially. We draw
adjacent petals that all start at the centre, because a stack misleads here:

* a segment's start depends on every segment below it, so a value that is not available (AEC
  without an energy counter, the usual case on CPU) either collapses to nothing, which reads
  as 0 and shifts every segment above it, or needs a placeholder of made-up height;
* in polar coordinates a segment's area grows with its distance from the centre, so the same
  normalised value looks larger in an outer ring than in an inner one;
* the stack's total (a plain sum of normalised metrics) suggests a composite score that the
  paper does not define (its Efficiency Score is a weighted harmonic mean);
* the seed spread of one metric has no clear place on a stacked segment; on a petal it is a
  radial error bar.

With petals every value is read against the same radial grid, from 0. A metric that is not
available gets its slot hatched in grey over the full radius (an "unknown", not a short bar),
and a model not served at a precision has its whole sector hatched and labelled "no run". An
estimated value is dotted. Seeds are averaged by :func:`effllm.analysis.seeds.seed_summary`
(the numbers table 9 prints); where a model has more than one seed, ±1 standard deviation is a
radial error bar, otherwise the legend says that there is one run per cell.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from effllm.analysis.aggregate import companion, read_table
from effllm.analysis.paper_tables import precision_key
from effllm.analysis.seeds import seed_summary
from effllm.analysis.tables import ESTIMATED, MISSING
from effllm.plots import style
from effllm.plots.style import plt, select_block
from effllm.records import METRICS as CATALOGUE

BLOCK = "inference"
# The paper's Fig. 5 metrics: Avg performance, IT, AMU, Sum AL, AEC, MCR (nominal bits, as the
# paper's quoted values).
METRICS = ("performance", "it", "amu", "al", "aec", "mcr_nominal")
# One colour per metric (Okabe-Ito, colour-blind safe); metrics not listed fall back to tab10.
METRIC_COLOURS = {
    "performance": "#0072B2", "it": "#009E73", "amu": "#E69F00", "al": "#D55E00",
    "aec": "#CC79A7", "mcr_nominal": "#56B4E9", "mcr_measured": "#000000",
}
NA_HATCH = "////"
NA_COLOUR = "0.72"
ESTIMATED_HATCH = "...."
SECTOR_FILL = 0.84  # fraction of a model's sector taken by its petals
R_TICKS = (0.25, 0.5, 0.75, 1.0)
R_ORIGIN = -0.12  # an empty disc at the centre, so that the thin inner ends of petals stay visible
ERR_KW = {"ecolor": "0.15", "elinewidth": 0.6, "capsize": 0}
LABEL_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "linewidth": 0}


def metric_colour(metric: str, metrics: Sequence[str] = METRICS):
    """The colour of a metric's petals: fixed for the paper's metrics, tab10 by position else."""
    if metric in METRIC_COLOURS:
        return METRIC_COLOURS[metric]
    return plt.get_cmap("tab10").colors[list(metrics).index(metric) % 10]


# ----------------------------------------------------------------------------------- data


def rose_summary(df: pd.DataFrame, metrics: Sequence[str] = METRICS, block: str = BLOCK,
                 source: object = "table") -> pd.DataFrame:
    """One row per (model, precision) cell of ``block``, seeds averaged; pure pandas.

    The grid is complete: a model that was not served at a precision still gets a row (seeds
    0, values NaN). Columns: ``model`` (the comparison group, i.e. the served model's run id),
    ``precision``, ``bits`` (mean nominal bits, NaN if unknown), ``seeds``, and per metric ``m``
    (mean of ``m__norm`` over the seeds with a value), ``m__std``, ``m__n`` and ``m__status``
    (the status of the raw metric: measured, estimated or unavailable). Models keep their
    first-appearance order; precisions are ordered widest first.
    """
    for m in metrics:
        if m not in CATALOGUE:
            raise KeyError(f"metric {m!r} is not a canonical metric in effllm.records.METRICS")
    rows = select_block(df, block, source)
    norm = [companion(m, "norm") for m in metrics]
    means = seed_summary(rows, [*norm, "bits_nominal"]).set_index(["group", "label"])
    models = list(dict.fromkeys(rows["group"]))
    precisions = sorted(dict.fromkeys(rows["label"]), key=precision_key)
    out = []
    for model in models:
        for precision in precisions:
            key = (model, precision)
            found = key in means.index
            row = {"model": model, "precision": precision,
                   "bits": means.at[key, "bits_nominal"] if found else np.nan,
                   "seeds": int(means.at[key, "seeds"]) if found else 0}
            for m, n in zip(metrics, norm):
                row[m] = means.at[key, n] if found else np.nan
                row[companion(m, "std")] = means.at[key, companion(n, "std")] if found else np.nan
                row[companion(m, "n")] = int(means.at[key, companion(n, "n")]) if found else 0
                row[companion(m, "status")] = (means.at[key, companion(n, "status")] if found
                                               else "unavailable")
            out.append(row)
    summary = pd.DataFrame(out)
    summary.attrs["metrics"] = list(metrics)
    return summary


def model_names(models: Sequence[str]) -> list[str]:
    """Display names around the circle: the run id without its source prefix ("hub/",
    "finetune/") when that keeps the names distinct, wrapped at hyphens to ~14 characters."""
    short = [str(m).split("/", 1)[-1] for m in models]
    names = short if len(set(short)) == len(short) else [str(m) for m in models]
    return [textwrap.fill(n.replace("-", "- "), 15).replace("- ", "-") for n in names]


# ------------------------------------------------------------------------------- drawing


def rose(ax, cells: pd.DataFrame, metrics: Sequence[str] | None = None,
         top: float = 1.0) -> dict[str, bool]:
    """Draw one precision's rose on a polar Axes: a sector per row of ``cells`` (one model each,
    in order, the first at the top, clockwise), a petal per metric.

    Artists carry gids: ``<metric>:<model>`` per petal (a bar whose height is the seed mean of
    ``metric__norm``), ``sd:<metric>:<model>`` per error bar (a radial line collection from
    mean - s.d. to mean + s.d.), ``n/a:<model>:<metric>`` per missing value (a hatched, unfilled
    bar over the full radius, never a short bar), ``no run:<model>`` for a model without a run
    at this precision and ``model:<model>`` for its name around the circle. Returns which
    optional legend entries are needed (estimated, spread, n/a)."""
    metrics = list(metrics or cells.attrs.get("metrics", METRICS))
    n_models, n_metrics = len(cells), len(metrics)
    sector = 2.0 * np.pi / n_models
    width = sector * SECTOR_FILL / n_metrics
    flags = {"estimated": False, "spread": False, "n/a": False}
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    for i, (_, cell) in enumerate(cells.iterrows()):
        centre = i * sector
        if cell["seeds"] == 0:
            ax.bar(centre, top, sector * SECTOR_FILL, fill=False, hatch=NA_HATCH,
                   edgecolor=NA_COLOUR, linewidth=0, zorder=1, gid=f"no run:{cell['model']}")
            ax.text(centre, top * 0.55, "no run", ha="center", va="center", fontsize=6,
                    color="0.2", zorder=4, bbox=LABEL_BOX)
            flags["n/a"] = True
            continue
        for j, m in enumerate(metrics):
            theta = centre + (j - (n_metrics - 1) / 2) * width
            _petal(ax, cell, m, metrics, theta, width, top, flags)
    _label_sectors(ax, cells, sector, top)
    _radial_scale(ax, sector, top)
    return flags


def _petal(ax, cell: pd.Series, m: str, metrics: Sequence[str], theta: float, width: float,
           top: float, flags: dict[str, bool]) -> None:
    """One metric's petal of a model at angle ``theta`` (hatched when estimated) with its s.d.
    as a radial line, or a hatched full-radius outline when the value is missing (a short bar
    would read as a bad value); ``flags`` records what the legend must explain."""
    model = cell["model"]
    value, std = float(cell[m]), float(cell[companion(m, "std")])
    if not math.isfinite(value):
        flags["n/a"] = True
        ax.bar(theta, top, width, fill=False, hatch=NA_HATCH, edgecolor=NA_COLOUR,
               linewidth=0, zorder=1, gid=f"n/a:{model}:{m}")
        return
    estimated = cell[companion(m, "status")] == "estimated"
    flags["estimated"] |= estimated
    ax.bar(theta, value, width * 0.92, color=metric_colour(m, metrics),
           edgecolor="white", linewidth=0.3, hatch=ESTIMATED_HATCH if estimated else None,
           zorder=2, gid=f"{m}:{model}")
    if math.isfinite(std) and std > 0:
        flags["spread"] = True
        bars = ax.errorbar(theta, value, yerr=std, fmt="none", zorder=3, **ERR_KW)
        bars.lines[2][0].set_gid(f"sd:{m}:{model}")


def _label_sectors(ax, cells: pd.DataFrame, sector: float, top: float) -> None:
    """Sector boundaries as angular grid lines and each model's name outside its sector."""
    centres = np.arange(len(cells)) * sector
    ax.set_xticks(centres + sector / 2)  # sector boundaries, as grid lines
    ax.xaxis.grid(True, color="0.6", linewidth=0.5)
    ax.tick_params(axis="x", length=0, labelbottom=False)
    for theta, model, name in zip(centres, cells["model"], model_names(list(cells["model"]))):
        # Outside the circle, aligned away from it (a centred tick label overlaps the rim
        # at the sides); screen angle = pi/2 - theta with the offset and direction above.
        x, y = math.cos(np.pi / 2 - theta), math.sin(np.pi / 2 - theta)
        ax.text(theta, top * 1.05, name, fontsize=6, clip_on=False, gid=f"model:{model}",
                ha="left" if x > 0.25 else "right" if x < -0.25 else "center",
                va="bottom" if y > 0.25 else "top" if y < -0.25 else "center")


def _radial_scale(ax, sector: float, top: float) -> None:
    """The radius from 0 to ``top`` over an empty centre disc, with ring grid lines and two
    labelled rings."""
    ax.set_ylim(0.0, top)
    ax.set_rorigin(R_ORIGIN * top)
    ax.set_yticks(R_TICKS, [])
    for t in (0.5, 1.0):  # above the petals (tick labels would sit below them), on a boundary
        ax.text(sector / 2, t, f"{t:g}", fontsize=5.5, color="0.3", ha="center", va="center",
                zorder=6, bbox=LABEL_BOX)
    ax.yaxis.grid(True, color="0.8", linewidth=0.4)
    ax.set_axisbelow(True)


def panel_columns(n_panels: int, n_models: int) -> int:
    """Panels per row: up to three for a few models; two when there are many sectors (each
    panel then gets half the text width, enough for nine models' names and 54 petals)."""
    if n_panels <= 2:
        return n_panels
    return 3 if n_panels != 4 and n_models <= 4 else 2


def _title(precision: str, bits: float) -> str:
    return f"{precision}" + (f" ({bits:g}-bit)" if math.isfinite(bits) else "")


def draw_inference_rose(
    normalised_csv: str | os.PathLike,
    out_pdf: str | os.PathLike,
    out_png: str | os.PathLike,
    metrics: Sequence[str] = METRICS,
    block: str = BLOCK,
    title: str | None = None,
) -> pd.DataFrame:
    """Figure 5: one rose per precision of ``block``, a sector per served model, a petal per
    metric. Returns the summary that was drawn (:func:`rose_summary`)."""
    df = select_block(read_table(normalised_csv), block, normalised_csv)
    summary = rose_summary(df, metrics, block, normalised_csv)
    precisions = list(dict.fromkeys(summary["precision"]))
    n, n_models = len(precisions), summary["model"].nunique()
    ncols = panel_columns(n, n_models)
    nrows = math.ceil(n / ncols)
    width = style.ONE_COLUMN if n == 1 else style.TWO_COLUMN
    hi = summary[list(metrics)].to_numpy(float) + np.nan_to_num(
        summary[[companion(m, "std") for m in metrics]].to_numpy(float))
    top = max(1.0, float(np.nanmax(hi)) if np.isfinite(hi).any() else 1.0)
    fig = plt.figure(figsize=(width, nrows * (width / ncols) * 0.98 + 1.1), layout="constrained")
    # Each panel spans two grid columns, so that a short last row can sit centred.
    grid = fig.add_gridspec(nrows, 2 * ncols)
    flags = {"estimated": False, "spread": False, "n/a": False}
    for k, precision in enumerate(precisions):
        row, col = divmod(k, ncols)
        in_row = min(ncols, n - row * ncols)
        start = (ncols - in_row) + 2 * col
        ax = fig.add_subplot(grid[row, start:start + 2], projection="polar")
        cells = summary[summary["precision"] == precision]
        cells.attrs["metrics"] = list(metrics)
        for key, v in rose(ax, cells, metrics, top).items():
            flags[key] |= v
        bits = cells["bits"].astype(float)
        # Axes titles ignore texts: clear the name of the top sector (lines of 6 pt, 5% out).
        lines = model_names(cells["model"].iloc[:1])[0].count("\n") + 1
        ax.set_title(_title(precision, float(bits.mean()) if bits.notna().any() else math.nan),
                     pad=10 + 7.5 * lines, fontweight="bold", fontsize="medium")
    _legend(fig, df, summary, list(metrics), flags, width)
    fig.suptitle(title or "Quantised inference per precision: normalised metrics per model",
                 fontweight="bold")
    style.save_figure(fig, out_pdf, out_png)
    return summary


def _legend(fig, df, summary, metrics, flags, width) -> None:
    """Metric key plus a caption: normalisation, what AL and MCR are, seeds, n/a."""
    absent = [m for m in metrics if summary[m].isna().all()]
    handles = [Patch(facecolor=metric_colour(m, metrics),
                     label=style.metric_axis_label(m) + (f" ({MISSING})" if m in absent else ""))
               for m in metrics]
    if flags["n/a"]:
        handles.append(Patch(facecolor="white", edgecolor=NA_COLOUR, hatch=NA_HATCH,
                             label=f"{MISSING}: not available"))
    if flags["estimated"]:
        handles.append(Patch(facecolor="0.6", edgecolor="white", hatch=ESTIMATED_HATCH,
                             label=f"estimated ({ESTIMATED})"))
    if flags["spread"]:
        handles.append(Line2D([], [], color=ERR_KW["ecolor"], linewidth=0.8, label="\u00b11 s.d."))
    floor = style.norm_floor(df)
    seeds = int(summary["seeds"].max())
    lines = [
        "Petal radius: min-max normalised within each model across its precisions"
        + (f" (floor {floor:g})" if floor is not None else "")
        + ", higher is better; a petal compares this precision with the same model's others.",
        f"{style.metric_label('al')} = end-to-end request latency (the paper's Sum AL); "
        f"{style.metric_label('mcr_nominal')} = (16 / bits) \u00d7 performance retained.",
        ("Mean over seeds, error bars \u00b11 s.d. " if flags["spread"] else
         f"{seeds} run{'s' if seeds != 1 else ''} per model and precision (no seed spread). ")
        + f"Hatched = {MISSING} (not measured here), never 0.",
    ]
    if absent:
        lines.append(f"{', '.join(style.metric_label(m) for m in absent)}: {MISSING} for every "
                     "run"
                     + (" (no energy counter on this machine)." if absent == ["aec"] else "."))
    chars = int(width * 72 / 4.3)
    caption = "\n".join(textwrap.fill(line, chars) for line in lines)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9),
               title=caption, handlelength=1.4, columnspacing=1.2,
               title_fontproperties={"style": "italic", "size": "small"})
