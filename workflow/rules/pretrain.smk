# Stage 2: pretraining sweeps (every block's variants x sizes x seeds; shared runs trained once).


rule pretrain:
    input:
        tokens="results/data/tokens",
        code=run_code("pretrain", "effllm.training.pretrain"),
    output:
        model=directory("results/pretrain/{run}/model"),
        record="results/pretrain/{run}/record.json",
    params:
        spec=run_spec("pretrain"),
        # Resumable state lives outside the outputs: Snakemake deletes outputs before a job.
        checkpoints=lambda wildcards: f"results/checkpoints/pretrain/{wildcards.run}",
    threads: config["measure"]["threads"]
    resources:
        **stage_resources("pretrain"),
    log:
        "logs/pretrain/{run}.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/pretrain.py"
