"""The one plotting style: headless backend, paper-size fonts and widths, stable technique colours.

Importing this module selects the Agg backend (pipeline jobs have no display) and applies
:data:`RC`, so every figure module starts with ``from effllm.plots import style``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from effllm.io import atomic_file  # noqa: E402
from effllm.records import METRICS  # noqa: E402

ONE_COLUMN = 3.4  # inches: one column of a two-column paper
TWO_COLUMN = 7.0  # inches: full text width

RC = {
    "font.family": "DejaVu Sans",  # has the arrow glyphs used in axis labels
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 6,
    "legend.fontsize": 7,
    "figure.titlesize": 9,
    "figure.labelsize": 7,
    "axes.linewidth": 0.6,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.6,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
    "legend.frameon": False,
    "pdf.fonttype": 42,  # embed TrueType: text stays editable and searchable in the PDF
    "ps.fonttype": 42,
    "savefig.dpi": 200,
}
matplotlib.rcParams.update(RC)
# PDF font subsetting logs every glyph at INFO; keep pipeline logs readable.
logging.getLogger("fontTools").setLevel(logging.WARNING)

# One colour per technique label; colour-blind-safe (Okabe-Ito) and distinct within each sweep.
_BLUE, _SKY, _GREEN, _ORANGE, _VERMILION, _PURPLE = (
    "#0072B2", "#56B4E9", "#009E73", "#E69F00", "#D55E00", "#CC79A7")
_BLACK, _GREY = "#000000", "#7F7F7F"
TECHNIQUE_COLOURS = {
    # attention (pretraining)
    "MHA": _GREY, "MQA": _ORANGE, "GQA": _BLUE, "MLA": _GREEN, "NSA": _VERMILION,
    # positional encoding
    "RoPE": _BLUE, "Absolute": _ORANGE, "Learnable Absolute": _GREEN, "Relate": _PURPLE,
    "Relative": _PURPLE, "ALiBi": _SKY, "None": _GREY,
    # architectures
    "Dense": _BLUE, "Dense 2x": _SKY, "MoE": _VERMILION, "MoE S/3x8": _ORANGE,
    "MoE Sx8": _VERMILION, "Transformer": _BLUE, "Mamba": _VERMILION,
    "Pythia": _GREEN, "RWKV": _PURPLE,
    # pruning routes
    "Pruning-aware": _VERMILION, "One-shot": _ORANGE, "One-shot + OBS": _PURPLE,
    "Scratch": _BLUE,
    # fine-tuning
    "LoRA": _BLUE, "LoRA+": _SKY, "RSLoRA": _GREEN, "DoRA": _ORANGE, "PiSSA": _PURPLE,
    "Freeze": _VERMILION, "Full": _BLACK,
    # precision
    "fp32": _BLACK, "bf16": _BLUE, "fp16": _SKY, "int8": _ORANGE, "int4": _VERMILION,
}
_ALIASES = {
    "lora-plus": "LoRA+", "loraplus": "LoRA+", "lora_plus": "LoRA+", "rslora": "RSLoRA",
    "full*": "Full", "full_ft": "Full", "bfloat16": "bf16", "float16": "fp16",
    "float32": "fp32", "absolute pe": "Absolute", "learnable": "Learnable Absolute",
}
_BY_KEY = {k.lower(): v for k, v in TECHNIQUE_COLOURS.items()} | {
    k: TECHNIQUE_COLOURS[v] for k, v in _ALIASES.items()
}
_FALLBACK = plt.get_cmap("tab20").colors


def technique_colour(label: str) -> str | tuple:
    """Stable colour of a technique label (case-insensitive); unknown labels hash into tab20."""
    key = str(label).strip().lower()
    if key in _BY_KEY:
        return _BY_KEY[key]
    digest = hashlib.sha256(key.encode()).digest()  # not hash(): that changes per process
    return _FALLBACK[digest[0] % len(_FALLBACK)]


def si_count(n: float) -> str:
    """A count such as a parameter number as 12.3M / 1.50B; empty when not finite."""
    if not math.isfinite(n):
        return ""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def metric_label(name: str) -> str:
    """The paper abbreviation of a metric (records.METRICS), or the name itself when unknown."""
    info = METRICS.get(name)
    return info.label if info else name


def metric_axis_label(name: str) -> str:
    """Axis label of a normalised metric, e.g. "AMU↑" (normalised values are higher-is-better)."""
    return f"{metric_label(name)}\u2191"


def select_block(df, block: str, source: object = "table"):
    """Rows of one block (``attention``, ``position``, ``moe``, ``inference`` …); a table without
    a ``block`` column (older records) falls back to the stage. Empty → a clear error."""
    column = "block" if "block" in df else "stage"
    rows = df[df[column] == block]
    if rows.empty:
        raise ValueError(f"no rows for block {block!r} in {source}: nothing to draw")
    return rows


def norm_floor(df) -> float | None:
    """The normalisation floor the table was made with (None if absent or mixed)."""
    floors = df["norm_floor"].dropna().unique() if "norm_floor" in df else []
    return float(floors[0]) if len(floors) == 1 else None


def estimates_note(df) -> str:
    """A caption line when the table was normalised without estimated values (the
    ``estimates`` column, ``analysis.use_estimates: false``), else ""."""
    if "estimates" in df and (df["estimates"] == "excluded").any():
        return "estimated values excluded (analysis.use_estimates: false): shown as n/a"
    return ""


def save_figure(fig, out_pdf: str | os.PathLike, out_png: str | os.PathLike,
                dpi: int = 200) -> None:
    """Write the figure as PDF and PNG, each atomically and without timestamps, then close it."""
    try:
        with atomic_file(out_pdf, "wb") as handle:
            fig.savefig(handle, format="pdf", metadata={"CreationDate": None})
        with atomic_file(out_png, "wb") as handle:
            fig.savefig(handle, format="png", dpi=dpi, metadata={"Software": None})
    finally:
        plt.close(fig)
