"""The serving techniques' figure (issue 22): what each technique trades, in its own units.

Four panels per served model (a row per group of the ``techniques`` block):

* weights: the bytes the weights take against perplexity, marker area by latency (AL): plain
  bf16, bitsandbytes NF4 and the weight-only quantisers;
* KV cache: bytes per cached token against perplexity of text read back through the cache;
* decoding: latency speed-up over plain decoding (bf16 AL / AL) of the speculative variants,
  annotated with tokens per served-model pass and the share of outputs identical to plain
  decoding;
* pruning: perplexity against the latency speed-up over bf16, each point labelled with the
  share of weights removed: does sparsity buy speed on this hardware?

A technique's panel follows from what its runs recorded (weights quantised: fewer bits than
16; a KV technique: fewer KV bytes than the reference; speculative: tokens per pass; pruned: a
weight sparsity), so the figure needs no settings beyond the table. Values are seed means;
whiskers the min-max.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from effllm.analysis.aggregate import read_table
from effllm.analysis.seeds import seed_summary
from effllm.plots import style
from effllm.plots.style import plt

REFERENCE = "bf16"  # the technique every panel compares with
COLUMNS = ("perplexity", "kv_perplexity", "al", "weight_bytes", "kv_cache_bytes_per_token",
           "bits_nominal", "tokens_per_pass", "identical_output", "weight_sparsity")
MB = 1e6


def panels(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows of one group's seed summary each panel draws (the reference in all three)."""
    ref = summary[summary["technique"] == REFERENCE]
    if ref.empty:
        raise ValueError(f"group {summary['group'].iloc[0]!r} has no {REFERENCE!r} reference "
                         "variant to compare with")
    kv_ref = float(ref["kv_cache_bytes_per_token"].iloc[0])
    is_ref = summary["technique"] == REFERENCE
    speculative = summary["tokens_per_pass"].notna()
    pruned = summary["weight_sparsity"].notna()
    kv = summary["kv_cache_bytes_per_token"] < kv_ref * 0.99
    weights = ~speculative & ~kv & ~pruned
    return {"weights": summary[weights], "kv": summary[~speculative & ~pruned & (kv | is_ref)],
            "decoding": summary[speculative | is_ref], "pruning": summary[pruned | is_ref]}


def _whiskers(rows: pd.DataFrame, column: str) -> np.ndarray | None:
    lo, hi = rows[f"{column}__lo"].to_numpy(float), rows[f"{column}__hi"].to_numpy(float)
    mean = rows[column].to_numpy(float)
    if not np.any(hi - lo > 0):
        return None
    return np.vstack([mean - lo, hi - mean])


def colours(labels) -> dict[str, tuple]:
    """One tab10 colour per variant, in the block's order: distinct within the figure (hashed
    technique colours can meet among eight variants)."""
    palette = plt.get_cmap("tab10").colors
    return {label: palette[i % len(palette)] for i, label in enumerate(dict.fromkeys(labels))}


def _scatter(ax, rows: pd.DataFrame, x: str, y: str, scale: float, size: np.ndarray | None,
             xlabel: str, ylabel: str, colour_of: dict) -> None:
    rows = rows.dropna(subset=[x, y])
    xs, ys = rows[x].to_numpy(float) / scale, rows[y].to_numpy(float)
    for i, (_, row) in enumerate(rows.iterrows()):
        colour = colour_of[row["label"]]
        area = 30 if size is None else float(size[i])
        ax.scatter(xs[i], ys[i], s=area, color=colour, alpha=0.8, edgecolor="0.2",
                   linewidth=0.4, zorder=3)
        ax.annotate(str(row["label"]), (xs[i], ys[i]), xytext=(4, 3),
                    textcoords="offset points", fontsize=6)
    err = _whiskers(rows, y)
    if err is not None:
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor="0.4", elinewidth=0.6, zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.margins(x=0.2, y=0.12)  # room for the labels beside the outermost points
    ax.grid(True)


def draw_techniques(normalised_csv: str | os.PathLike, out_pdf: str | os.PathLike,
                    out_png: str | os.PathLike, block: str, title: str | None = None) -> None:
    """One row of the four panels per served model of the ``block``."""
    df = style.select_block(read_table(normalised_csv), block, normalised_csv)
    present = [c for c in COLUMNS if c in df]
    groups = list(dict.fromkeys(df["group"]))
    fig, axes = plt.subplots(len(groups), 4, figsize=(style.TWO_COLUMN * 1.3,
                                                      2.4 * len(groups) + 0.6),
                             squeeze=False, layout="constrained")
    most = int(df.groupby(["group", "technique"])["seed"].nunique().max())
    for row_axes, group in zip(axes, groups):
        rows = df[df["group"] == group]
        summary = seed_summary(rows, present, by=("group", "technique", "label"))
        for column in COLUMNS:  # a column no run recorded: drawn as absent
            summary[column] = summary[column] if column in summary else np.nan
        parts = panels(summary)
        colour_of = colours(summary["label"])
        al = parts["weights"]["al"].to_numpy(float)
        size = 20 + 160 * al / np.nanmax(al) if np.isfinite(al).any() else None
        served = f"{group}\n" if len(groups) > 1 else ""
        _scatter(row_axes[0], parts["weights"], "weight_bytes", "perplexity", MB, size,
                 "weights (MB)", f"{served}perplexity \u2193", colour_of)
        row_axes[0].set_title("weights (area: AL)", loc="left")
        _scatter(row_axes[1], parts["kv"], "kv_cache_bytes_per_token", "kv_perplexity", 1, None,
                 "KV cache (B / cached token)", "perplexity through the cache \u2193", colour_of)
        row_axes[1].set_title("KV cache", loc="left")
        _draw_decoding(row_axes[2], parts["decoding"], colour_of)
        _draw_pruning(row_axes[3], parts["pruning"], colour_of)
    seeds = f"mean over {most} seeds, whiskers min\u2013max" if most > 1 else "1 seed"
    fig.suptitle(title or "Serving techniques: what each costs and gains"
                 + (f" ({groups[0]})" if len(groups) == 1 else ""), fontweight="bold")
    fig.supxlabel(seeds, style="italic")
    style.save_figure(fig, out_pdf, out_png)


def _draw_decoding(ax, rows: pd.DataFrame, colour_of: dict) -> None:
    """Speed-up over plain decoding per speculative variant, with tokens per pass and the
    share of identical outputs over each bar."""
    ref = rows[rows["technique"] == REFERENCE]
    ref_al = float(ref["al"].iloc[0]) if len(ref) else math.nan
    rows = rows[rows["technique"] != REFERENCE]
    ax.axhline(1.0, color="0.3", linewidth=0.8, linestyle="--", label="plain decoding")
    if rows.empty or not math.isfinite(ref_al):
        ax.text(0.5, 0.5, "no speculative variant", ha="center", va="center",
                transform=ax.transAxes)
    else:
        speed = ref_al / rows["al"].to_numpy(float)
        labels = [str(label) for label in rows["label"]]
        bars = ax.bar(labels, speed, color=[colour_of[x] for x in labels])
        for bar, (_, row) in zip(bars, rows.iterrows()):
            same = row.get("identical_output", math.nan)
            text = f"{row['tokens_per_pass']:.2f} tok/pass"
            if math.isfinite(same):
                text += f"\n{same:.0%} identical"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6)
        ax.set_ylim(0, max(1.2, float(np.nanmax(speed)) * 1.35))
        ax.tick_params(axis="x", labelrotation=15)
    ax.set_ylabel("speed-up (bf16 AL / AL) \u2191")
    ax.set_title("speculative decoding", loc="left")
    ax.grid(True, axis="y")


def _draw_pruning(ax, rows: pd.DataFrame, colour_of: dict) -> None:
    """Perplexity against the speed-up over bf16 (bf16 AL / AL) of the pruned variants, each
    labelled with its share of weights removed; the reference at 1."""
    ref = rows[rows["technique"] == REFERENCE]
    ref_al = float(ref["al"].iloc[0]) if len(ref) else math.nan
    ax.axvline(1.0, color="0.3", linewidth=0.8, linestyle="--")
    ax.set_title("pruning (share removed)", loc="left")
    if len(rows) == len(ref) or not math.isfinite(ref_al):
        ax.text(0.5, 0.5, "no pruned variant", ha="center", va="center", transform=ax.transAxes)
        return
    rows = rows.assign(speed_up=ref_al / rows["al"].to_numpy(float))
    names = [str(row["label"]) + (f" ({row['weight_sparsity']:.0%})"
                                  if math.isfinite(row["weight_sparsity"]) else "")
             for _, row in rows.iterrows()]
    colours = {**colour_of, **dict(zip(names, (colour_of[x] for x in rows["label"])))}
    _scatter(ax, rows.assign(label=names), "speed_up", "perplexity", 1, None,
             "speed-up (bf16 AL / AL) \u2191", "perplexity \u2193", colours)
