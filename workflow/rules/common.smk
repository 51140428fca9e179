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

# GPU fit, before anything runs (effllm.plan.check, docs/plan.md): with a device size stated
# (resources.<stage>.gpu_memory_gb), every job that does not fit its GPUs is refused here,
# naming the job, its peak by part and the keys that would make it fit: by its plan when
# `snakemake plan` simulated it, else by its weights, gradients and optimiser state (seconds). Not for
# the plan target itself (it reports the fit), nor inside a cluster job (the job's own first
# act checks it), nor without the key (nothing imported: torch stays out of a plain DAG build).
PLAN_TARGETS = {"plan", "results/plan/plan.tsv", "results/plan/plan.md"}
_dag = getattr(workflow, "dag_settings", None)
_targets = set(getattr(_dag, "targets", None) or ())
# resources.<stage>.auto: each job's GPUs (and host memory) from its plan, written into the
# config as per-job resources. A cluster job's own Snakemake resolves its own run only (the
# simulations are cached by the DAG build that submitted it).
from effllm.plan.check import auto_stages

if auto_stages(config) and not (_targets and _targets <= {"plan", "results/plan/plan.tsv",
                                                         "results/plan/plan.md"}):
    from effllm.plan.check import auto_resources, with_auto_resources

    _own = {f"{t.rulename}/{t.wildcards_dict['run']}" for t in
            (getattr(_dag, "target_jobs", None) or ()) if "run" in t.wildcards_dict}
    with_auto_resources(config, auto_resources(
        config, RUNS, only=_own if getattr(_dag, "target_jobs", None) else None))
if not getattr(_dag, "target_jobs", None) and not (_targets and _targets <= PLAN_TARGETS):
    from effllm.plan.check import enforced

    if enforced(config):
        from effllm.plan.check import PlanRefusal, refuse_unfit

        try:
            _planned, _floors = refuse_unfit(config, RUNS)
        except PlanRefusal as err:
            raise ValueError(str(err)) from None
        if _floors:
            print(f"GPU fit: {_planned} jobs checked by their plan, {_floors} by their weights, "
                  "gradients and optimiser state alone; each of those checks its activations "
                  "as its first act (snakemake plan checks them all now)", file=sys.stderr)


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
PRESENT_BLOCKS = blocks() | {"finetune", "inference", *SET_BLOCKS}
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
