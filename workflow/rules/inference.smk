# Stage 4: inference at each precision (post-training quantisation) of each served model.


rule inference:
    input:
        model=upstream_model("inference"),
        corpus="results/data/corpus",
        # the test split as the pipeline tokenised it: read instead of re-encoding whenever the
        # served model's tokenizer is the pipeline's (a hub model's too, via data.tokenizer.hub)
        tokens="results/data/tokens",
        reasoning=reasoning_data("inference"),
        # speculative decoding's draft model (inference.techniques), for the runs that have one
        draft=draft_model,
        code=run_code("inference", "effllm.inference.run"),
    output:
        record="results/inference/{run}/record.json",
    params:
        spec=run_spec("inference"),
    threads: config["measure"]["threads"]
    resources:
        **stage_resources("inference"),
    log:
        "logs/inference/{run}.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/inference.py"
