"""The paper's figures and tables: one registry entry each.

An entry names the output, the block it draws (``None`` for every block: figure 2), the function
that draws it (``"module:function"``, imported only when the job runs: the Snakefile reads this
registry at parse time and must not import matplotlib or torch), the files it reads, its
parameters, its report category and the library modules its code starts from. The workflow builds
everything else from it (``workflow/rules/common.smk``): the targets a configuration has, the
generic ``figure`` and ``paper_table`` rules' inputs, parameters and report categories, and each
job's code inputs (:func:`effllm.codedeps.module_files` of :attr:`Output.code_modules`: editing
``plots/radar.py`` reruns the radar figures only, ``plots/style.py`` every figure).

A figure's function is called as ``function(**inputs, out_pdf=..., out_png=..., **kwargs)``
and a table's as ``function(**inputs, name=..., out_stem=...)``, where ``kwargs`` are
:meth:`Output.kwargs`: the entry's parameters, plus ``block`` for a figure of one block.

Captions: ``workflow/report/figure.rst`` holds one section per figure, chosen by the figure's
name, and ``workflow/report/table.rst`` one per table (Snakemake's ``report()`` takes one caption
file per rule output, rendered with the job's wildcards). Adding a figure: an entry here, its
plot function, its caption section.

This module itself is not a code input of the jobs: what an entry changes in an output is its
parameters (a rerun trigger) or its function's module (a change of the job's code inputs).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

FIGURE, TABLE = "figure", "table"
NORMALISED = "results/tables/normalised.csv"
# The pruning block's own tables (effllm.analysis.pruning; rule pruning_tables writes them).
PRUNING_TRAJECTORY = "results/tables/pruning_trajectory.csv"
PRUNING_WIDTHS = "results/tables/pruning_widths.csv"
EXTENSIONS = {FIGURE: ("pdf", "png"), TABLE: ("csv", "md", "tex")}
FOLDERS = {FIGURE: "paper_figures", TABLE: "results/tables"}

Params = Mapping[str, Any] | Callable[[Mapping], Mapping[str, Any]]


def _normalised() -> dict[str, str]:
    return {"normalised_csv": NORMALISED}


@dataclass(frozen=True)
class Output:
    """One paper figure or table."""

    name: str
    kind: str  # FIGURE or TABLE
    block: str | None  # the block it draws; None: every block
    function: str  # "module:function"
    category: str  # report category
    # Keyword arguments of the function: a mapping, or a function of the config returning one.
    params: Params = field(default_factory=dict)
    # Files it reads, by the function's argument name.
    inputs: Mapping[str, str] = field(default_factory=_normalised)
    # Library modules its code starts from; () is the function's own module.
    modules: tuple[str, ...] = ()

    @property
    def code_modules(self) -> tuple[str, ...]:
        return self.modules or (self.function.partition(":")[0],)

    @property
    def paths(self) -> list[str]:
        return [f"{FOLDERS[self.kind]}/{self.name}.{ext}" for ext in EXTENSIONS[self.kind]]

    def load(self) -> Callable:
        """The function that draws or writes the output (imports its module)."""
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)

    def kwargs(self, config: Mapping) -> dict[str, Any]:
        """The function's keyword arguments under ``config``."""
        params = self.params(config) if callable(self.params) else self.params
        block = {"block": self.block} if self.kind == FIGURE and self.block else {}
        return {**block, **copy.deepcopy(dict(params))}

    def drawn(self, blocks: Iterable[str]) -> bool:
        """Whether a configuration with ``blocks`` has this output."""
        return self.block is None or self.block in set(blocks)


def _figure(name: str, block: str | None, function: str, category: str,
            params: Params | None = None, inputs: Mapping[str, str] | None = None) -> Output:
    return Output(name, FIGURE, block, function, category, params or {},
                  inputs or _normalised())


def _table(name: str, block: str) -> Output:
    return Output(name, TABLE, block, "effllm.analysis.paper_tables:write_paper_table", "Tables")


# The leaderboard's columns per stage (docs/protocol.md §6); Perf is the quality metric.
PRETRAIN_METRICS = ["perplexity", "amu", "al", "tt", "aec"]
FINETUNE_METRICS = ["val_loss", "amu", "pcu", "al", "st", "aec"]
INFERENCE_METRICS = ["performance", "amu", "al", "it", "aec", "mcr_nominal"]


def _ranking_params(config: Mapping) -> dict[str, Any]:
    from effllm.sweep import grid_order  # at DAG time, where the sweep is loaded anyway

    order = grid_order(config)
    return {
        "metrics": {"pretrain": PRETRAIN_METRICS, "finetune": FINETUNE_METRICS,
                    "inference": INFERENCE_METRICS},
        # Rows in the config's order: variants of each block, methods, precisions.
        "order": [*order.variants, *order.methods, *order.precisions],
    }


def _finetune_params(kind: str) -> Callable[[Mapping], dict[str, Any]]:
    def params(config: Mapping) -> dict[str, Any]:
        from effllm.sweep import grid_order

        order = grid_order(config)
        return {"kind": kind, "loss": "val_loss", "methods": list(order.methods),
                "size_order": list(order.sizes)}

    return params


FIGURES: dict[str, Output] = {o.name: o for o in (
    # Figure 2 (the leaderboard): the rank of every technique within its group on each metric.
    _figure("fig2_ranking", None, "effllm.plots.ranking:draw_ranking", "Overview",
            _ranking_params),
    # Figure 3a: one radar per model size, one series per attention variant.
    _figure("fig3a_attention_radar", "attention", "effllm.plots.radar:draw_radar_figure",
            "Pretraining", {"metrics": PRETRAIN_METRICS}),
    # Figure 3b: normalised metrics per positional encoding, raw perplexity as a line.
    _figure("fig3b_position_bars", "position", "effllm.plots.bars:draw_bars_with_line",
            "Pretraining", {"metrics": PRETRAIN_METRICS, "line_metric": "perplexity"}),
    # Figure 3c: dense vs MoE as bubbles (area = normalised value).
    _figure("fig3c_moe_bubbles", "moe", "effllm.plots.bubble:draw_bubbles", "Pretraining",
            {"metrics": ["aec", "tt", "al", "amu", "perplexity"]}),
    # Figure 4a: per base model and method, Efficiency Score up, loss down.
    _figure("fig4a_finetune_mirrored", "finetune", "effllm.plots.finetune:draw_finetune",
            "Fine-tuning", _finetune_params("mirrored")),
    # Figure 4b: Efficiency Score (area) and loss (line) across base-model sizes.
    _figure("fig4b_finetune_area", "finetune", "effllm.plots.finetune:draw_finetune",
            "Fine-tuning", _finetune_params("area")),
    # Figure 5: one rose per precision, a sector per served model, a petal per metric.
    _figure("fig5_inference_rose", "inference", "effllm.plots.rose:draw_inference_rose",
            "Inference", {"metrics": ["performance", "it", "amu", "al", "aec", "mcr_nominal"]}),
    # One radar per served model, one series per precision.
    _figure("inference_radar", "inference", "effllm.plots.radar:draw_radar_figure",
            "Inference", {"metrics": INFERENCE_METRICS}),
    # Pruning-aware pretraining vs one-shot pruning and scratch (issue 21; Xing et al. 2025,
    # arXiv 2502.06663): the routes as Fig. 3b, then what only pruned runs have, from their
    # records' series.
    _figure("fig_pruning_routes", "pruning", "effllm.plots.bars:draw_bars_with_line",
            "Pretraining", {"metrics": PRETRAIN_METRICS, "line_metric": "perplexity"}),
    _figure("fig_pruning_dynamics", "pruning", "effllm.plots.pruning:draw_pruning_dynamics",
            "Pretraining", inputs={"trajectory_csv": PRUNING_TRAJECTORY}),
    _figure("fig_pruning_architecture", "pruning",
            "effllm.plots.pruning:draw_pruning_architecture", "Pretraining",
            inputs={"widths_csv": PRUNING_WIDTHS}),
    # Knowledge distillation (issue 22): student, scratch twin and teacher as Fig. 3b.
    _figure("fig_distillation", "distillation", "effllm.plots.bars:draw_bars_with_line",
            "Pretraining", {"metrics": PRETRAIN_METRICS, "line_metric": "perplexity"}),
    # The survey's serving techniques on one served model (issue 22): weights, KV cache and
    # speculative decoding, each in its own units.
    _figure("fig_techniques", "techniques", "effllm.plots.techniques:draw_techniques",
            "Inference"),
)}

# The tables' contents are effllm.analysis.paper_tables.TABLES (by name); the blocks here select
# which tables a configuration has (tests/test_outputs.py checks that both agree).
TABLES: dict[str, Output] = {o.name: o for o in (
    _table("table3_attention", "attention"),
    _table("table4_position", "position"),
    _table("table5_moe", "moe"),
    _table("table6_attention_free", "attention_free"),
    _table("table_pruning", "pruning"),
    _table("table_distillation", "distillation"),
    _table("table7_finetune", "finetune"),
    _table("table9_inference", "inference"),
    _table("table16_tasks", "inference"),
    _table("table_techniques", "techniques"),
)}
# Table 8: table 7 on each fine-tuning set after the primary, whose runs form the block
# "finetune_<set>" (effllm.sweep.finetune_group), named "table8_finetune_<set>".
TABLE8_PREFIX = "table8_"
SET_BLOCK_PREFIX = "finetune_"


def tables(set_blocks: Iterable[str] = ()) -> dict[str, Output]:
    """Every table, with a table 8 for each of ``set_blocks`` (``finetune_<set>``)."""
    extra = [table(f"{TABLE8_PREFIX}{block}") for block in set_blocks]
    return {**TABLES, **{o.name: o for o in extra}}


def table(name: str) -> Output:
    """The table called ``name``: one of :data:`TABLES` or ``table8_finetune_<set>``."""
    if name in TABLES:
        return TABLES[name]
    block = name.removeprefix(TABLE8_PREFIX)
    if block != name and block.startswith(SET_BLOCK_PREFIX):
        return _table(name, block)
    raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)} and "
                   f"{TABLE8_PREFIX}{SET_BLOCK_PREFIX}<set>")


def selected(entries: Mapping[str, Output], blocks: Iterable[str]) -> list[str]:
    """The files of the ``entries`` that a configuration with ``blocks`` has."""
    blocks = set(blocks)
    return [path for entry in entries.values() if entry.drawn(blocks) for path in entry.paths]
