"""Result tables as CSV (raw numbers), GitHub Markdown and LaTeX booktabs (formatted for reading).

Hand-written writers: the formatting rules below (``n/a`` for anything not available, never 0;
a dagger on estimated values) must hold in both formats, which one cell formatter guarantees.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import numpy as np
import pandas as pd

from effllm.analysis.aggregate import COMPANIONS, companion
from effllm.io import atomic_file
from effllm.records import METRICS

MISSING = "n/a"
ESTIMATED = "\u2020"  # dagger
_HIDDEN = tuple(f"__{c}" for c in COMPANIONS) + ("__std", "__lo", "__hi", "__n")
PLUS_MINUS = "\u00b1"
_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "\u2020": r"$^{\dagger}$", "\u00b1": r"$\pm$", "\u2191": r"$\uparrow$",
    "\u2193": r"$\downarrow$",
}


def format_number(x: float) -> str:
    """3 significant digits; scientific notation below 1e-3 or from 1e5 on."""
    if isinstance(x, numbers.Integral):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return MISSING if math.isnan(x) else str(x)
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e5:
        mantissa, exponent = f"{x:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    x = float(f"{x:.3g}")
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def format_cell(value: object, status: object = None) -> str:
    """One display cell: missing or unavailable -> "n/a"; estimated -> value plus a dagger."""
    if status == "unavailable" or value is None or (not isinstance(value, str) and pd.isna(value)):
        return MISSING
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Number):
        return str(value)
    return format_number(value) + (ESTIMATED if status == "estimated" else "")


def header(column: str) -> str:
    """Display header: paper label and unit for canonical metrics, the column name otherwise."""
    base, _, kind = column.partition("__")
    info = METRICS.get(base)
    if info is None:
        return column
    if kind == "norm":
        return f"{info.label} (norm)"
    if kind == "rank":
        return f"{info.label} rank"
    return info.label if info.unit == "1" else f"{info.label} [{info.unit}]"


def display_grid(df: pd.DataFrame) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, formatted rows and which columns are numeric; companion columns are hidden."""
    shown = [c for c in df.columns if not str(c).endswith(_HIDDEN)]
    status = {c: df[companion(c, "status")] if companion(c, "status") in df else None
              for c in shown}

    def cell(i, c):
        text = format_cell(df.at[i, c], None if status[c] is None else status[c].at[i])
        std = df.at[i, companion(c, "std")] if companion(c, "std") in df else np.nan
        if text != MISSING and pd.notna(std):  # seeds averaged: mean ± standard deviation
            text += f" {PLUS_MINUS} {format_number(std)}"
        return text

    rows = [[cell(i, c) for c in shown] for i in df.index]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in shown]
    return [header(c) for c in shown], rows, numeric


def to_markdown(df: pd.DataFrame) -> str:
    heads, rows, numeric = display_grid(df)
    esc = lambda s: s.replace("|", r"\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, heads)) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    if any(ESTIMATED in cell for r in rows for cell in r):
        lines += ["", f"{ESTIMATED} estimated, not measured; {MISSING}: not available."]
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def to_latex(df: pd.DataFrame) -> str:
    heads, rows, numeric = display_grid(df)
    line = lambda cells: " & ".join(map(latex_escape, cells)) + r" \\"  # noqa: E731
    out = [r"\begin{tabular}{" + "".join("r" if n else "l" for n in numeric) + "}", r"\toprule",
           line(heads), r"\midrule", *map(line, rows), r"\bottomrule"]
    if any(ESTIMATED in cell for r in rows for cell in r):
        out.append(rf"\multicolumn{{{len(heads)}}}{{l}}{{\footnotesize $^{{\dagger}}$ estimated, "
                   rf"not measured; {MISSING}: not available.}} \\")
    out.append(r"\end{tabular}")
    return "\n".join(out) + "\n"


def write_table(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.csv`` (all columns, raw), ``stem.md`` and ``stem.tex``, each atomically."""
    stem = Path(stem)
    paths = [stem.with_name(stem.name + ext) for ext in (".csv", ".md", ".tex")]
    with atomic_file(paths[0]) as handle:
        df.to_csv(handle, index=False)
    for path, text in zip(paths[1:], (to_markdown(df), to_latex(df))):
        with atomic_file(path) as handle:
            handle.write(text)
    return paths
