# Stage 5: one tidy table of every run, then normalisation, efficiency score and ranks.


rule aggregate:
    input:
        records=all_records(),
        code=code("effllm.analysis.aggregate"),
    output:
        csv="results/tables/runs.csv",
    log:
        "logs/analysis/aggregate.log",
    localrule: True
    script:
        "../scripts/aggregate.py"


rule normalise:
    input:
        runs="results/tables/runs.csv",
        code=code("effllm.analysis.normalise"),
    output:
        csv="results/tables/normalised.csv",
    params:
        analysis=config["analysis"],
    log:
        "logs/analysis/normalise.log",
    localrule: True
    script:
        "../scripts/normalise.py"
