# Stage 3: fine-tuning sweeps (method x base model x fine-tuning set x seed).
#
# The model folder is always the output; what it holds follows the run's `served` setting
# (part of its params, set by effllm.sweep when an inference run loads the model): the merged
# model in the training precision's dtype when served, else the adapter (adapter methods) and a
# README only. A config change that makes a run served changes its params, so it reruns and
# writes the merged model before the inference jobs that read it (docs/protocol.md §4).


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
