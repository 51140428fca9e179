# Config validation, the run grid, and input/param functions shared by every rule.
import json
import os
from pathlib import Path

# No network at run time: every job reads models and data from disk only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from effllm.codedeps import module_files
from effllm.config import ConfigError, check_config
from effllm.cluster import job_resources
from effllm.sweep import expand_runs, memberships, unused_modules

BASE = Path(workflow.basedir)

try:
    check_config(config, BASE / "workflow/schemas/config.schema.yaml")
except ConfigError as err:
    raise ValueError(f"invalid configuration: {err}") from None

RUNS = expand_runs(config)


wildcard_constraints:
    run=r"[A-Za-z0-9_.+-]+",


def code(*modules):
    """The library files a rule's code reaches (its imports, transitively), declared as inputs
    so that editing one reruns exactly the jobs that use it: Snakemake does not track modules a
    script imports. tests/test_workflow.py checks the job sets."""
    return module_files(*modules, root=BASE / "src/effllm")


def run_code(stage, *modules):
    """Input function: :func:`code` of ``modules``, without entering the variant modules (MLA,
    NSA, MoE, baselines) that this run's model does not use."""

    def files(wildcards):
        skip = unused_modules(RUNS, RUNS[stage][wildcards.run])
        return module_files(*modules, root=BASE / "src/effllm", exclude=skip)

    return files


def stage_resources(stage):
    """Scheduler resources of a stage's jobs (config `resources`, partition and account from the
    environment or config); memory and time grow with each retry, for jobs killed for either."""
    res = job_resources(config, stage, config["measure"]["threads"])
    mem_mb, runtime = res.pop("mem_mb"), res.pop("runtime")
    return {**res, "mem_mb": lambda wildcards, attempt: mem_mb * attempt,
            "runtime": lambda wildcards, attempt: runtime * attempt}


def run_spec(stage):
    """Params function: the run's resolved spec as canonical JSON (stable for rerun checks)."""

    def spec(wildcards):
        return json.dumps(RUNS[stage][wildcards.run].spec(), sort_keys=True)

    return spec


def upstream_model(stage):
    def path(wildcards):
        return f"results/{RUNS[stage][wildcards.run].upstream}/model"

    return path


def reasoning_data(stage):
    """Input function: the fine-tuning set a run trains or is scored on."""

    def path(wildcards):
        return f"results/data/reasoning/{RUNS[stage][wildcards.run].settings['dataset']}"

    return path


def records(stage):
    return [f"results/{stage}/{name}/record.json" for name in RUNS[stage]]


def all_records():
    return [path for stage in RUNS for path in records(stage)]


def blocks():
    """Pretraining blocks in the config (each has its figure and table only when present)."""
    return {name for name, block in config["pretrain"]["blocks"].items() if block}


FIGURE_BLOCKS = {  # figure → the block it draws
    "fig3a_attention_radar": "attention",
    "fig3b_position_bars": "position",
    "fig3c_moe_bubbles": "moe",
    "fig4a_finetune_mirrored": "finetune",
    "fig4b_finetune_area": "finetune",
    "fig5_inference_rose": "inference",
    "inference_radar": "inference",
}
FIGURES = [
    f"paper_figures/{name}.{ext}"
    for name, block in FIGURE_BLOCKS.items()
    if block in blocks() or block in ("finetune", "inference")
    for ext in ("pdf", "png")
] + [f"paper_figures/fig2_ranking.{ext}" for ext in ("pdf", "png")]  # every block: fig. 2
CLAIMS = ["results/claims.md", "results/claims.csv"]
TABLE_BLOCKS = {
    "table3_attention": "attention",
    "table4_position": "position",
    "table5_moe": "moe",
    "table6_attention_free": "attention_free",
    "table7_finetune": "finetune",
    "table9_inference": "inference",
    "table16_tasks": "inference",
    # Table 8: one per fine-tuning set after the primary, named after its block
    # (effllm.sweep.finetune_group, effllm.analysis.paper_tables.table_spec).
    **{f"table8_{block}": block
       for block in dict.fromkeys(m.block for run in RUNS["finetune"].values()
                                  for m in run.memberships) if block != "finetune"},
}
TABLES = [
    f"results/tables/{name}.{ext}"
    for name, block in TABLE_BLOCKS.items()
    if block in blocks() or block.startswith(("finetune", "inference"))
    for ext in ("csv", "md", "tex")
]


wildcard_constraints:
    table="|".join(TABLE_BLOCKS),
