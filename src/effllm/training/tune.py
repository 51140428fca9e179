"""Learning rates chosen per fine-tuning method: the rule that picks them from the ``tune``
target's short runs, and the rates file that records them with their provenance.

One shared rate ranks the methods by how well that rate suits each (LoRA+ moves B ``lr_ratio``
times faster, RSLoRA scales the update by alpha / sqrt(r)): a method is compared at the rate of
its own grid that gave the lowest validation loss, among the runs that did not diverge
(:mod:`effllm.training.divergence`). The file's ``lr_by_method`` is read by the sweep
(``finetune.lr_file``); its ``provenance`` says how each rate was chosen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import yaml

from effllm.io import atomic_file
from effllm.records import RunRecord
from effllm.training.methods import METHODS

RATES = "lr_by_method"
RULE = "lowest validation loss among the grid's runs that did not diverge"


def read_rates(path: str | os.PathLike) -> dict[str, float]:
    """``lr_by_method`` of a rates file, checked: method names of METHODS, positive rates.
    Raises ValueError naming the problem (the config check turns it into a ConfigError)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist (write it with `snakemake tune`)")
    data = yaml.safe_load(path.read_text()) or {}
    rates = data.get(RATES) if isinstance(data, dict) else None
    if not isinstance(rates, dict):
        raise ValueError(f"{path}: no {RATES} mapping")
    for method, rate in rates.items():
        if method not in METHODS:
            raise ValueError(f"{path}: {RATES}.{method} is not a method of {METHODS}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"{path}: {RATES}.{method} = {rate!r} is not a positive rate")
    return {method: float(rate) for method, rate in rates.items()}


def grid_point(record: RunRecord) -> dict:
    """One tune run as the provenance lists it: its rate, validation loss, and why it is out
    when it diverged."""
    metrics = record.metrics
    diverged = metrics.get("diverged")
    val = metrics.get("val_loss")
    point = {"lr": float(record.params["settings"]["train"]["lr"]),
             "val_loss": val.value if val is not None else None}
    if diverged is None:
        raise ValueError(f"record {record.run_id}: no 'diverged' metric (not a tune run of this "
                         "version)")
    if diverged.value:
        point["diverged"] = diverged.note or "diverged"
    return point


def pick(points: list[dict]) -> dict:
    """The chosen rate of one method's grid: the lowest validation loss among the points that
    did not diverge (ties: the smaller rate), with ``edge`` set when it sits at the end of the
    grid (the best rate may lie beyond it). ``lr`` is None when every point diverged."""
    rates = sorted(p["lr"] for p in points)
    usable = [p for p in points if not p.get("diverged") and p["val_loss"] is not None
              and math.isfinite(p["val_loss"])]
    if not usable:
        return {"lr": None, "reason": "every rate of the grid diverged"}
    best = min(usable, key=lambda p: (p["val_loss"], p["lr"]))
    chosen = {"lr": best["lr"], "val_loss": best["val_loss"]}
    if len(rates) > 1 and best["lr"] in (rates[0], rates[-1]):
        chosen["edge"] = "lowest rate of the grid" if best["lr"] == rates[0] else \
            "highest rate of the grid"
    return chosen


def choose(records: Iterable[RunRecord]) -> dict[str, dict]:
    """Per method (in METHODS order): its grid (sorted by rate) and the chosen point."""
    grids: dict[str, list[dict]] = {}
    for record in records:
        grids.setdefault(record.technique, []).append(grid_point(record))
    out = {}
    for method in sorted(grids, key=METHODS.index):
        grid = sorted(grids[method], key=lambda p: p["lr"])
        out[method] = {"chosen": pick(grid), "grid": grid}
    return out


def write_rates(path: str | os.PathLike, chosen: dict[str, dict], settings: dict) -> dict:
    """Write the rates file: ``lr_by_method`` (methods whose whole grid diverged are left out,
    so they keep their configured rate) and ``provenance`` (``settings``: how the grid ran;
    every method's grid and losses). Returns what was written."""
    from effllm.records import now_iso, provenance

    rates = {m: c["chosen"]["lr"] for m, c in chosen.items() if c["chosen"]["lr"] is not None}
    run = provenance(now_iso())
    data = {RATES: rates,
            "provenance": {"rule": RULE, **settings, "methods": chosen,
                           "git_commit": run["git_commit"], "git_dirty": run["git_dirty"],
                           "written": run["end_time"]}}
    header = ("# Learning rate per fine-tuning method, chosen by the tune target "
              "(docs/protocol.md, fine-tuning).\n"
              "# finetune.lr_file names the file the sweep reads; provenance: how each rate "
              "was chosen.\n")
    with atomic_file(path) as handle:  # the rates a line each; the grid points a line each
        handle.write(header)
        yaml.safe_dump({RATES: rates}, handle, sort_keys=False)
        yaml.safe_dump({"provenance": data["provenance"]}, handle, sort_keys=False,
                       default_flow_style=None, width=100)
    return data
