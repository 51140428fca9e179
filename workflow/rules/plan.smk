# The GPU plan, `snakemake plan` (not part of `all`): every job's per-GPU peak by part, fit,
# FLOPs and GPU-hours, simulated on fake tensors (docs/plan.md). Nothing else depends on it, so
# a changed plan reruns nothing.


rule make_plan:
    input:
        code=code("effllm.plan.report"),
    output:
        tsv="results/plan/plan.tsv",
        md="results/plan/plan.md",
    params:
        # what the plan reads: every run's spec, the resources and the plan's own settings
        grid=lambda wildcards: json.dumps(
            {"runs": {stage: {name: run.spec.to_json() for name, run in runs.items()}
                      for stage, runs in RUNS.items()},
             "resources": config.get("resources"), "plan": config.get("plan")},
            sort_keys=True),
        # the results folder: a prepared fine-tuning set's card gives its size
        results=lambda wildcards, output: str(Path(output.tsv).parents[1]),
    resources:
        **stage_resources("data"),
    log:
        "logs/plan/plan.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/plan.py"
