"""The paper's result tables, built from the normalised runs table: one row per variant and
group, seeds averaged (mean, standard deviation and count), every metric with its status.

Tables are named by content (the paper's numbering is inconsistent across its versions,
docs/protocol.md §6); the number in each name follows the digests (3 attention … 6 attention-free,
7 fine-tuning, 9 quantised inference, 16 per-task scores of the quantised models). Table 8 is
table 7 on another fine-tuning set (the paper's Medical-o1): ``table8_finetune_<set>``, one per
set after the primary, read from the runs of block ``finetune_<set>`` (:func:`table_spec`).
``table_pruning`` is ours, not the paper's: the pruning block's routes (issue 21).

The inference tables (9 and 16) have one row per served model and precision: their ``group``
and ``variant`` columns are called ``model`` and ``precision``, and the precisions of a model are
listed widest first (:data:`PRECISION_ORDER`), as in the paper (bfloat16, float16, int4).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import pandas as pd

from effllm.analysis.aggregate import read_table
from effllm.analysis.seeds import seed_summary
from effllm.analysis.tables import write_table
from effllm.records import PAPER_TASK_METRICS, TASK_PREFIX

_PRETRAIN = ["params_total", "perplexity", "amu", "al", "tt", "tokens_per_s", "aec",
             "flops_per_token", "kv_cache_bytes_per_token", "decode_latency_long"]
# Precisions from the widest to the narrowest; the paper's order is bfloat16, float16, int4.
PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8", "int4")
# Offline stand-ins for the task scores: the components of ``performance`` without the harness.
OFFLINE_TASKS = ("exact_match", "token_accuracy")
INFERENCE_RENAME = {"group": "model", "variant": "precision"}


def present(*metrics: str) -> Callable[[pd.DataFrame], list[str]]:
    """A table's metric list: those of ``metrics`` that the table has a column for, in order
    (a metric no record reports at all, e.g. MCR without a reference run, is left out)."""
    return lambda rows: [m for m in metrics if m in rows]


def task_columns(rows: pd.DataFrame) -> list[str]:
    """Task-score metrics of ``rows``, the paper's six first in the paper's order (MMLU-Pro, BBH,
    GPQA, IFEval, MATH, MuSR), then any other ``task_*`` sorted. Without any task score value
    (the offline default: no lm-evaluation-harness), the components of ``performance`` instead:
    exact match and token accuracy."""
    tasks = [c for c in rows.columns
             if c.startswith(TASK_PREFIX) and "__" not in c and c != TASK_PREFIX]
    tasks = ([t for t in PAPER_TASK_METRICS if t in tasks]
             + sorted(t for t in tasks if t not in PAPER_TASK_METRICS))
    if not any(rows[t].notna().any() for t in tasks):
        tasks = [m for m in OFFLINE_TASKS if m in rows]
    return tasks


def _task_table(rows: pd.DataFrame) -> list[str]:
    return [*task_columns(rows), "performance"]


MetricList = Sequence[str] | Callable[[pd.DataFrame], list[str]]
TABLES: dict[str, tuple[str, MetricList]] = {
    "table3_attention": ("attention", _PRETRAIN),
    "table4_position": ("position", _PRETRAIN),
    "table5_moe": ("moe", ["params_total", "params_active", *_PRETRAIN[1:]]),
    "table6_attention_free": ("attention_free", _PRETRAIN),
    # Not in the paper: pruning-aware pretraining vs one-shot pruning and scratch at equal size
    # and tokens (issue 21; Xing et al. 2025, arXiv 2502.06663).
    "table_pruning": ("pruning", _PRETRAIN),
    # Not in the paper: knowledge distillation, the student beside its scratch twin (same shape
    # and tokens) and its teacher (issue 22).
    "table_distillation": ("distillation", ["params_total", "teacher_params", "perplexity",
                                            "loss", "distill_kl", *_PRETRAIN[2:]]),
    # Fine-tuning (the paper's tables 7-8: loss, AMU, PCU, AL, ST, AEC), plus what makes the
    # methods comparable: trainable parameters, held-out loss and accuracy, MFU, plain rates.
    "table7_finetune": ("finetune", ["params_trainable", "loss", "val_loss", "exact_match",
                                     "amu", "pcu", "mfu", "al", "st", "samples_per_s", "aec",
                                     "efficiency_score"]),
    # Table 8 (table 7 on each further fine-tuning set) is named per set: see table_spec.
    # Quantised inference (the paper's table 9: Avg performance, AMU, AL, IT, AEC, MCR), with
    # AL split into time to first token and time per output token, and MCR both nominal (the
    # paper's 16/bits) and from the bytes the weights take.
    "table9_inference": ("inference", present(
        "performance", "amu", "al", "prefill_latency", "decode_latency", "it", "aec",
        "mcr_nominal", "mcr_measured", "weight_bytes")),
    # Per-task scores of each model and precision (the paper's table 16).
    "table16_tasks": ("inference", _task_table),
    # Not in the paper: the survey's serving techniques on one served model (issue 22).
    "table_techniques": ("techniques", present(
        "perplexity", "kv_perplexity", "performance", "amu", "al", "decode_latency", "it",
        "aec", "weight_bytes", "mcr_nominal", "mcr_measured", "kv_cache_bytes_per_token",
        "tokens_per_pass", "draft_acceptance", "identical_output", "quantize_seconds",
        "weight_sparsity", "prune_seconds")),
}


def block_table(df: pd.DataFrame, block: str, metrics: Sequence[str]) -> pd.DataFrame:
    """Rows of ``block`` averaged over seeds per (group, label), in first-appearance order:
    :func:`effllm.analysis.seeds.seed_summary` with ``label`` shown as ``variant`` (per metric
    ``m``, ``m__std``, ``m__lo``, ``m__hi``, ``m__n``, ``m__status``)."""
    rows = df[df["block"] == block]
    if rows.empty:
        raise ValueError(f"no runs of block {block!r} in the table")
    table = seed_summary(rows, metrics, by=("group", "label"))
    return table.drop(columns="runs").rename(columns={"label": "variant"})


def precision_key(precision: str) -> tuple[int, str]:
    """Sort key of a precision label: :data:`PRECISION_ORDER`, unknown ones after, by name."""
    p = str(precision).lower()
    return (PRECISION_ORDER.index(p) if p in PRECISION_ORDER else len(PRECISION_ORDER), p)


def inference_table(table: pd.DataFrame) -> pd.DataFrame:
    """A :func:`block_table` of the inference block as the paper prints it: the precisions of
    each model (models in first-appearance order) widest first, ``model`` and ``precision``
    columns."""
    models = {g: i for i, g in enumerate(dict.fromkeys(table["group"]))}
    order = sorted(table.index, key=lambda i: (models[table.at[i, "group"]],
                                                precision_key(table.at[i, "variant"])))
    return table.loc[order].reset_index(drop=True).rename(columns=INFERENCE_RENAME)


SECOND_FINETUNE = "table8_"


def table_spec(name: str) -> tuple[str, MetricList]:
    """(block, metrics) of a named table: one of :data:`TABLES`, or ``table8_finetune_<set>``,
    table 7's columns for the fine-tuning runs on ``<set>`` (block ``finetune_<set>``)."""
    if name in TABLES:
        return TABLES[name]
    block = name.removeprefix(SECOND_FINETUNE)
    if block != name and block.startswith("finetune_"):
        return block, TABLES["table7_finetune"][1]
    raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)} and "
                   f"{SECOND_FINETUNE}finetune_<set>")


def paper_table(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """One named table (:func:`table_spec`) from a normalised table."""
    block, metrics = table_spec(name)
    if callable(metrics):  # chosen from the block's own columns
        metrics = metrics(df[df["block"] == block])
    table = block_table(df, block, metrics)
    return inference_table(table) if block == "inference" else table


def write_paper_table(normalised_csv: str | os.PathLike, name: str,
                      out_stem: str | os.PathLike) -> pd.DataFrame:
    """Write one named table as CSV (raw numbers), Markdown and LaTeX."""
    table = paper_table(read_table(normalised_csv), name)
    write_table(table, out_stem)
    return table
