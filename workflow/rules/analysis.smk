# Stage 5: one tidy table of every run, then normalisation, efficiency score and ranks.


rule aggregate:
    input:
        records=all_records(),
        code=code("effllm.analysis.aggregate"),
    output:
        csv="results/tables/runs.csv",
    params:
        # Which comparison groups each run belongs to (not part of any training job's params).
        memberships=json.dumps(memberships(RUNS), sort_keys=True),
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


rule paper_table:
    """One of the paper's tables (seeds averaged, mean ± std) as CSV, Markdown and LaTeX."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.analysis.paper_tables"),
    output:
        multiext("results/tables/{table}", ".csv", ".md", ".tex"),
    log:
        "logs/analysis/{table}.log",
    localrule: True
    script:
        "../scripts/paper_table.py"
