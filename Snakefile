# EfficientLLM benchmark pipeline: includes and target rules only. See README.md.
from snakemake.utils import min_version

min_version("9.19")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/inference.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/plan.smk"


rule all:
    default_target: True
    input:
        all_records(),
        "results/tables/runs.csv",
        "results/tables/runs.parquet",
        "results/tables/normalised.csv",
        TABLES,
        FIGURES,
        CLAIMS,


rule records:
    """Every run of the grid, without analysis."""
    input:
        all_records(),


rule tables:
    """Every paper table (CSV, Markdown, LaTeX) and the claims check."""
    input:
        TABLES,
        CLAIMS,


rule tune:
    """Learning rates per fine-tuning method (results/tune/tuned_lr.yaml); not part of all."""
    input:
        "results/tune/tuned_lr.yaml",


rule figures:
    """Every paper figure (and what it needs)."""
    input:
        FIGURES,


rule plan:
    """The GPU plan (docs/plan.md): per job, per-GPU peak memory by part, fit, FLOPs and
    GPU-hours, simulated before anything runs; not part of all."""
    input:
        "results/plan/plan.tsv",
        "results/plan/plan.md",
