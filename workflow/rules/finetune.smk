# Stage 3: fine-tuning sweeps (method x base model x fine-tuning set x seed).


rule finetune:
    input:
        base=upstream_model("finetune"),
        reasoning=reasoning_data("finetune"),
        code=run_code("finetune", "effllm.training.finetune"),
    output:
        model=directory("results/finetune/{run}/model"),
        record="results/finetune/{run}/record.json",
    params:
        spec=run_spec("finetune"),
    threads: config["measure"]["threads"]
    resources:
        **stage_resources("finetune"),
    log:
        "logs/finetune/{run}.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/finetune.py"
