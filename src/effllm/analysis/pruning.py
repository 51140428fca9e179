"""The pruning block's own tables (issue 21; Xing et al. 2025, arXiv 2502.06663): how a pruned run
shrank while it trained, and the per-layer widths it ended with.

The normalised table holds one row per run, which compares the routes (pruning-aware, one-shot,
one-shot + OBS, scratch) on the pretraining metrics. What it cannot hold is a run's pruning
schedule and the architecture the saliency chose, which a pruned run's record keeps in its
``series``. Two tidy CSVs carry them to the figures (:mod:`effllm.plots.pruning`):

* trajectory, one row per run and pruning event: :data:`TRAJECTORY_COLUMNS`. Event 0 is the
  source before pruning, so a width divided by its event-0 value is the fraction kept;
* widths, one row per run and layer of the final model, beside the source's:
  :data:`WIDTH_COLUMNS`.

A record without the pruning series (the scratch model, or any run of another block) is left
out; a record with them but of uneven lengths is an error, not a silently shortened table.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import pandas as pd

from effllm.io import atomic_file
from effllm.records import RunRecord, iter_records

PRUNING_AWARE = "pruning_aware"  # the route whose schedule the dynamics figure draws
IDENTITY = ["run_id", "technique", "label", "seed", "group"]
# column -> record series, one value per pruning event
EVENTS = {"tokens": "prune_tokens", "params": "prune_params", "heads": "prune_heads",
          "ffn_channels": "prune_ffn_channels", "hidden": "prune_hidden"}
# column -> record series, one value per layer
LAYERS = {"heads": "layer_heads", "kv_heads": "layer_kv_heads", "ffn": "layer_ffn",
          "source_heads": "source_layer_heads", "source_ffn": "source_layer_ffn"}
# column -> record metric (one value per run)
HIDDEN = {"hidden": "hidden_size", "source_hidden": "source_hidden_size"}
TRAJECTORY_COLUMNS = [*IDENTITY, "event", *EVENTS]
WIDTH_COLUMNS = [*IDENTITY, "layer", *LAYERS, *HIDDEN]


def _identity(rec: RunRecord) -> dict:
    return {"run_id": rec.run_id, "technique": rec.technique, "label": rec.params.get("label"),
            "seed": rec.seed, "group": rec.params.get("group")}


def _columns(rec: RunRecord, names: dict[str, str], what: str) -> dict[str, list[float]]:
    """The record's series ``names`` (column -> series), checked to be of one length."""
    missing = [s for s in names.values() if s not in rec.series]
    if missing:
        raise ValueError(f"record {rec.run_id}: has pruning series but lacks {missing}")
    lengths = {s: len(rec.series[s]) for s in names.values()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"record {rec.run_id}: {what} series of different lengths: {lengths}")
    return {column: rec.series[s] for column, s in names.items()}


def _metric(rec: RunRecord, name: str) -> float:
    metric = rec.metrics.get(name)
    return np.nan if metric is None or metric.value is None else float(metric.value)


def pruning_tables(records: Iterable[RunRecord]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trajectory, widths) of the records that carry pruning series; see the module docstring."""
    events, layers = [], []
    for rec in records:
        if EVENTS["tokens"] not in rec.series:
            continue
        ident = _identity(rec)
        trajectory = _columns(rec, EVENTS, "pruning-event")
        widths = _columns(rec, LAYERS, "per-layer")
        hidden = {column: _metric(rec, name) for column, name in HIDDEN.items()}
        for i in range(len(trajectory["tokens"])):
            events.append({**ident, "event": i, **{c: v[i] for c, v in trajectory.items()}})
        for i in range(len(widths["heads"])):
            layers.append({**ident, "layer": i, **{c: v[i] for c, v in widths.items()}, **hidden})
    return (pd.DataFrame(events, columns=TRAJECTORY_COLUMNS),
            pd.DataFrame(layers, columns=WIDTH_COLUMNS))


def write_pruning_tables(records: list[str | os.PathLike], out_trajectory: str | os.PathLike,
                         out_widths: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the run records (validated on load), write the trajectory and widths CSVs, each
    atomically: a failed job leaves neither half-written."""
    trajectory, widths = pruning_tables(iter_records(records))
    for table, path in ((trajectory, out_trajectory), (widths, out_widths)):
        with atomic_file(path) as handle:
            table.to_csv(handle, index=False)
    return trajectory, widths
