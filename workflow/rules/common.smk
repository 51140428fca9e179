# Config validation, the run grid, and input/param functions shared by every rule.
import json
import os
import sys
from pathlib import Path

# No network at run time: every job reads models and data from disk only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BASE = Path(workflow.basedir)
# This workflow and every job import the library from this repository's src/: in our venv (an
# editable install of the same folder) and in a cluster's conda environment (envs/effllm.yaml),
# which holds only the library's dependencies.
sys.path.insert(0, str(BASE / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(BASE / "src"), os.environ.get("PYTHONPATH")) if p)

from effllm import outputs
from effllm.codedeps import module_files
from effllm.config import ConfigError, check_config
from effllm.cluster import job_overrides, job_resources
from effllm.sweep import expand_runs, memberships, unused_modules


try:
    check_config(config, BASE / "workflow/schemas/config.schema.yaml")
except ConfigError as err:
    raise ValueError(f"invalid configuration: {err}") from None

RUNS = expand_runs(config)

# The GPU plan while the DAG is built (effllm.plan.check.at_dag_build, docs/plan.md): with
# resources.<stage>.auto, each job's GPUs from its plan; with a device size stated
# (resources.<stage>.gpu_memory_gb), every job that does not fit its GPUs is refused here,
# naming its peak by part and the keys that would make it fit. Without either key nothing
# beyond the check module is imported: torch stays out of a plain DAG build.
from effllm.plan.check import PlanRefusal, at_dag_build

_dag = getattr(workflow, "dag_settings", None)
try:
    _fit = at_dag_build(config, RUNS, getattr(_dag, "targets", None) or (),
                        getattr(_dag, "target_jobs", None) or ())
except PlanRefusal as err:
    raise ValueError(str(err)) from None
if _fit:
    print(_fit, file=sys.stderr)


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
    environment or config); memory and time grow with each retry, for jobs killed for either.
    With per-job overrides (`resources.<stage>.jobs`) each resource is the job's own."""
    threads = config["measure"]["threads"]
    res = job_resources(config, stage, threads)
    if job_overrides(config, stage):

        def own(key, scaled=False):
            def value(wildcards, attempt):
                mine = job_resources(config, stage, threads, run=wildcards.run).get(key, 0)
                return mine * attempt if scaled else mine

            return value

        keys = dict.fromkeys([*res, *(k for name in RUNS.get(stage, {}) for k in
                                      job_resources(config, stage, threads, run=name))])
        return {key: own(key, key in ("mem_mb", "runtime")) for key in keys}
    mem_mb, runtime = res.pop("mem_mb"), res.pop("runtime")
    return {**res, "mem_mb": lambda wildcards, attempt: mem_mb * attempt,
            "runtime": lambda wildcards, attempt: runtime * attempt}


def run_spec(stage):
    """Params function: the run's resolved spec as canonical JSON (stable for rerun checks)."""

    def spec(wildcards):
        return json.dumps(RUNS[stage][wildcards.run].spec.to_json(), sort_keys=True)

    return spec


def upstream_model(stage):
    def path(wildcards):
        return f"results/{RUNS[stage][wildcards.run].upstream}/model"

    return path


def teacher_model(wildcards):
    """Input function: the teacher of a distillation student; none for the other runs."""
    run = RUNS["pretrain"][wildcards.run]
    return f"results/{run.upstream}/model" if run.spec.distill else []


def draft_model(wildcards):
    """Input function: the draft model of a speculative-decoding run; none for the others."""
    speculative = RUNS["inference"][wildcards.run].spec.speculative
    return f"results/{speculative.draft}/model" if speculative and speculative.draft else []


def reasoning_data(stage):
    """Input function: the fine-tuning set a run trains or is scored on."""

    def path(wildcards):
        return f"results/data/reasoning/{RUNS[stage][wildcards.run].spec.dataset}"

    return path


def records(stage):
    return [f"results/{stage}/{name}/record.json" for name in RUNS[stage]]


def all_records():
    return [path for stage in RUNS for path in records(stage)]


def blocks():
    """Pretraining blocks in the config (each has its figure and table only when present)."""
    return {name for name, block in config["pretrain"]["blocks"].items() if block}


# Paper figures and tables (effllm.outputs): the ones of the blocks this configuration has.
# Fine-tuning sets after the primary are blocks "finetune_<set>", each with its table 8.
SET_BLOCKS = [block for block in dict.fromkeys(m.block for run in RUNS["finetune"].values()
                                               for m in run.memberships) if block != "finetune"]
# Inference blocks beyond "inference" itself: the techniques block (inference.techniques).
SERVING_BLOCKS = {m.block for run in RUNS["inference"].values() for m in run.memberships}
PRESENT_BLOCKS = blocks() | {"finetune", "inference", *SET_BLOCKS, *SERVING_BLOCKS}
PAPER_FIGURES = outputs.FIGURES
PAPER_TABLES = outputs.tables(SET_BLOCKS)
PAPER_OUTPUTS = {**PAPER_FIGURES, **PAPER_TABLES}
FIGURE_BLOCKS = {name: o.block for name, o in PAPER_FIGURES.items() if o.block}  # fig. 2: all
TABLE_BLOCKS = {name: o.block for name, o in PAPER_TABLES.items()}
FIGURES = outputs.selected(PAPER_FIGURES, PRESENT_BLOCKS)
TABLES = outputs.selected(PAPER_TABLES, PRESENT_BLOCKS)
CLAIMS = ["results/claims.md", "results/claims.csv"]


def paper_output(wildcards):
    """The registry entry of a figure or table job (wildcard `figure` or `table`)."""
    return PAPER_OUTPUTS[wildcards.get("figure") or wildcards.get("table")]


def paper_output_inputs(wildcards):
    """Input function (unpacked): the files the output reads and the code its function reaches."""
    entry = paper_output(wildcards)
    return {**entry.inputs, "code": code(*entry.code_modules)}


def paper_output_kwargs(wildcards):
    """Params function: the keyword arguments of the output's function under this config."""
    return paper_output(wildcards).kwargs(config)


def paper_output_category(wildcards):
    """The output's report category."""
    return paper_output(wildcards).category
