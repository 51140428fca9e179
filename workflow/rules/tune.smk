# Learning-rate tuning, `snakemake tune` (not part of `all`): per fine-tuning method, short runs
# over a grid of rates (finetune.tune) on one base, the primary set and the first seed; then the
# pick: per method the rate of lowest validation loss among the runs that did not diverge.
from effllm.sweep import tune_runs, tune_settings

TUNE_RUNS = tune_runs(config, RUNS)
TUNE = tune_settings(config, RUNS)


def tune_spec(wildcards):
    """Params function: the tune run's spec as canonical JSON."""
    return json.dumps(TUNE_RUNS[wildcards.run].spec.to_json(), sort_keys=True)


def tune_code(wildcards):
    """Input function: the library files the run's code reaches (as `run_code`)."""
    skip = unused_modules(RUNS, TUNE_RUNS[wildcards.run])
    return module_files("effllm.training.finetune", root=BASE / "src/effllm", exclude=skip)


rule tune_finetune:
    """One grid point: the fine-tuning job's code, its record under results/tune/, no model."""
    input:
        base=lambda wildcards: f"results/{TUNE_RUNS[wildcards.run].upstream}/model",
        reasoning=lambda wildcards: f"results/data/reasoning/{TUNE_RUNS[wildcards.run].spec.dataset}",
        code=tune_code,
    output:
        record="results/tune/{run}/record.json",
    params:
        spec=tune_spec,
    threads: config["measure"]["threads"]
    resources:
        **stage_resources("finetune"),
    log:
        "logs/tune/{run}.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/tune_finetune.py"


rule tune_pick:
    """Per method the chosen rate, with every grid point's loss as provenance. Copy the file to
    config/tuned_lr.yaml (finetune.lr_file) to use the rates."""
    input:
        records=[f"results/tune/{name}/record.json" for name in TUNE_RUNS],
        code=code("effllm.training.tune"),
    output:
        rates="results/tune/tuned_lr.yaml",
    params:
        settings=TUNE,
    log:
        "logs/tune/pick.log",
    conda:
        "../../envs/effllm.yaml"
    localrule: True
    script:
        "../scripts/tune_pick.py"
