"""The pruning block's figures (issue 21; Xing et al. 2025, arXiv 2502.06663), from the tables of
:mod:`effllm.analysis.pruning`. The routes' metrics are Fig. 3b's bars
(:func:`effllm.plots.bars.draw_bars_with_line` on block ``pruning``); these two draw what only
pruned runs have:

* :func:`draw_pruning_dynamics`: how the pruning-aware model shrank while it trained (the
  paper's appendix figure of remaining widths and parameters against tokens);
* :func:`draw_pruning_architecture`: the per-layer widths the saliency chose, against the
  source's uniform ones (the "auto-designed" architecture), one-shot routes beside it.

Seeds are averaged by :func:`effllm.analysis.seeds.seed_summary`, as in every other figure: a
line is the mean, a band or whisker the min-max over seeds where there are several.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from effllm.analysis.aggregate import read_table
from effllm.analysis.pruning import PRUNING_AWARE
from effllm.analysis.seeds import seed_summary
from effllm.plots import style
from effllm.plots.bars import metric_colour
from effllm.plots.style import plt

# Widths drawn as the fraction of the source kept: trajectory column -> legend label.
KEPT = {"heads": "attention heads", "ffn_channels": "FFN channels", "hidden": "hidden dims"}
# Per-layer panels of the architecture figure: widths column -> (source column, axis label).
LAYER_PANELS = {"heads": ("source_heads", "query heads"), "ffn": ("source_ffn", "FFN width")}
SOURCE_COLOUR = "0.35"
MARKERS = ("o", "s", "^", "D", "v", "P")  # per route: routes stay apart where colours meet
BAND_ALPHA = 0.2
ROW_HEIGHT = 1.9  # inches per group row
SI = FuncFormatter(lambda value, _: style.si_count(value))


def _read(path: str | os.PathLike, what: str) -> pd.DataFrame:
    df = read_table(path)
    if df.empty:
        raise ValueError(f"no pruned runs in {path}: no {what} to draw")
    return df


def _grid(groups: list[str]):
    """One row of two panels per group (target size), at full text width."""
    return plt.subplots(len(groups), 2, figsize=(style.TWO_COLUMN, len(groups) * ROW_HEIGHT + 1.0),
                        squeeze=False, layout="constrained")


def _finish(fig, handles: list, caption: str, title: str, out_pdf, out_png) -> None:
    """The shared legend (its title carries the caption), the figure title, the files."""
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5),
               title=caption, title_fontproperties={"style": "italic", "size": "small"})
    fig.suptitle(title, fontweight="bold")
    style.save_figure(fig, out_pdf, out_png)


def _seeds_note(rows: pd.DataFrame, spread: bool, shape: str) -> str:
    """What a line stands on: the most seeds any series has, and what the spread marks show."""
    most = int(rows.groupby(["group", "label"])["seed"].nunique().max())
    return (f"mean over {most} seeds, {shape}: min\u2013max" if spread
            else f"{most} seed" + ("s (no spread)" if most > 1 else ""))


def _spread(summary: pd.DataFrame, column: str) -> np.ndarray:
    return (summary[f"{column}__hi"] - summary[f"{column}__lo"]).to_numpy(float) > 0


def draw_pruning_dynamics(trajectory_csv: str | os.PathLike, out_pdf: str | os.PathLike,
                          out_png: str | os.PathLike, block: str,
                          title: str | None = None) -> None:
    """Per target size: the fraction of the source's heads, FFN channels and hidden dims the
    pruning-aware model keeps (left) and its parameters (right) against training tokens, as
    steps (widths hold between pruning events)."""
    df = _read(trajectory_csv, "pruning schedule")
    runs = df[df["technique"] == PRUNING_AWARE].sort_values(["run_id", "event"])
    if runs.empty:
        raise ValueError(f"no {PRUNING_AWARE} runs in {trajectory_csv}: nothing to draw")
    # Each run against its own source (event 0), then averaged: seeds may start differently.
    runs = runs.assign(**{f"{c}_kept": runs[c] / runs.groupby("run_id")[c].transform("first")
                          for c in KEPT})
    groups = list(dict.fromkeys(runs["group"]))
    fig, axes = _grid(groups)
    spread = False
    columns = ["tokens", "params", *(f"{c}_kept" for c in KEPT)]
    for (ax_kept, ax_params), group in zip(axes, groups):
        s = seed_summary(runs[runs["group"] == group], columns, by=["event"])
        x = s["tokens"].to_numpy(float)
        lines = [(ax_kept, f"{c}_kept", metric_colour(j)) for j, c in enumerate(KEPT)]
        lines.append((ax_params, "params", style.technique_colour(runs["label"].iloc[0])))
        for ax, column, colour in lines:
            ax.step(x, s[column], where="post", color=colour, marker="o", gid=f"line:{column}")
            if _spread(s, column).any():
                spread = True
                ax.fill_between(x, s[f"{column}__lo"], s[f"{column}__hi"], step="post",
                                color=colour, alpha=BAND_ALPHA, linewidth=0)
        ax_kept.set_ylim(0, 1.05)
        ax_kept.set_ylabel("fraction of source kept")
        ax_kept.set_title(str(group), loc="left", fontsize="medium")
        ax_params.set_ylabel(style.metric_label("params_total"))
        ax_params.yaxis.set_major_formatter(SI)
        for ax in (ax_kept, ax_params):
            ax.xaxis.set_major_formatter(SI)
            ax.set_xlabel("training tokens")
            ax.grid(True)
    handles = [Line2D([], [], color=metric_colour(j), marker="o", label=f"{label} (left)")
               for j, label in enumerate(KEPT.values())]
    handles.append(Line2D([], [], color=style.technique_colour(runs["label"].iloc[0]),
                          marker="o", label=f"{style.metric_label('params_total')} (right)"))
    caption = (f"{runs['label'].iloc[0]} runs; first point = the source before pruning; "
               + _seeds_note(runs, spread, "bands"))
    _finish(fig, handles, caption,
            title or f"{block}: pruning-aware pretraining, widths and parameters over tokens",
            out_pdf, out_png)


def draw_pruning_architecture(widths_csv: str | os.PathLike, out_pdf: str | os.PathLike,
                              out_png: str | os.PathLike, block: str,
                              title: str | None = None) -> None:
    """Per target size: each pruned model's query heads (left) and FFN width (right) per layer,
    one series per route, against the source's widths (dashed); hidden sizes in the title."""
    df = _read(widths_csv, "per-layer widths")
    groups = list(dict.fromkeys(df["group"]))
    labels = list(dict.fromkeys(df["label"]))
    offsets = {label: (i - (len(labels) - 1) / 2) * 0.08 for i, label in enumerate(labels)}
    markers = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(labels)}
    fig, axes = _grid(groups)
    spread = False
    columns = [*LAYER_PANELS, *(source for source, _ in LAYER_PANELS.values()), "hidden",
               "source_hidden"]
    for row, group in zip(axes, groups):
        members = df[df["group"] == group]
        source = seed_summary(members, columns, by=["layer"])
        routes = seed_summary(members, columns, by=["label", "layer"])
        for ax, (column, (source_column, axis)) in zip(row, LAYER_PANELS.items()):
            ax.plot(source["layer"], source[source_column], color=SOURCE_COLOUR, linestyle="--",
                    gid=f"source:{column}")
            for label in labels:
                s = routes[routes["label"] == label]
                x = s["layer"].to_numpy(float) + offsets[label]
                colour = style.technique_colour(label)
                ax.plot(x, s[column], color=colour, marker=markers[label],
                        gid=f"route:{label}:{column}")
                wide = _spread(s, column)
                if wide.any():
                    spread = True
                    mean = s[column].to_numpy(float)
                    ax.errorbar(x[wide], mean[wide],
                                yerr=[(mean - s[f"{column}__lo"])[wide],
                                      (s[f"{column}__hi"] - mean)[wide]],
                                fmt="none", ecolor=colour, elinewidth=0.7, capsize=1.5)
            ax.set_ylim(0, None)
            ax.set_xlabel("layer")
            ax.set_ylabel(axis)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True)
        hidden = routes.groupby("label", sort=False)["hidden"].first()
        kept = ", ".join(f"{label} {style.si_count(h)}" for label, h in hidden.items()
                         if np.isfinite(h))
        row[0].set_title(str(group), loc="left", fontsize="medium")
        row[1].set_title(f"hidden: {kept or 'n/a'}; source "
                         f"{style.si_count(source['source_hidden'].iloc[0]) or 'n/a'}",
                         loc="right", fontsize="small", color="0.3")
    handles = [Line2D([], [], color=style.technique_colour(label), marker=markers[label],
                      label=label) for label in labels]
    handles.append(Line2D([], [], color=SOURCE_COLOUR, linestyle="--", label="source (before "
                          "pruning)"))
    caption = ("widths of the final model per layer; "
               + _seeds_note(df, spread, "whiskers"))
    _finish(fig, handles, caption,
            title or f"{block}: per-layer widths chosen by pruning, against the source",
            out_pdf, out_png)
