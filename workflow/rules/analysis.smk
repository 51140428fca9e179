# Stage 5: one tidy table of every run, then normalisation, efficiency score and ranks.


rule aggregate:
    input:
        records=all_records(),
        code=code("effllm.analysis.aggregate"),
    output:
        csv="results/tables/runs.csv",
        parquet="results/tables/runs.parquet",
    params:
        # Which comparison groups each run belongs to (not part of any training job's params).
        memberships=json.dumps(memberships(RUNS), sort_keys=True),
    log:
        "logs/analysis/aggregate.log",
    conda:
        "../../envs/effllm.yaml"
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
    conda:
        "../../envs/effllm.yaml"
    localrule: True
    script:
        "../scripts/normalise.py"


rule paper_table:
    """A paper table of the registry (effllm.outputs), seeds averaged, as CSV, Markdown, LaTeX."""
    input:
        unpack(paper_output_inputs),
    output:
        csv="results/tables/{table}.csv",
        md=report(
            "results/tables/{table}.md",
            caption="../report/table.rst",
            category=paper_output_category,
            labels={"table": "{table}"},
        ),
        tex="results/tables/{table}.tex",
    wildcard_constraints:
        table="|".join(PAPER_TABLES),
    log:
        "logs/analysis/{table}.log",
    conda:
        "../../envs/effllm.yaml"
    localrule: True
    script:
        "../scripts/paper_table.py"


rule claims:
    """The paper's rank-level claims checked on this run: verdict, numbers and seed spread."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.analysis.claims"),
    output:
        md=report("results/claims.md", caption="../report/claims.rst", category="Claims"),
        csv=report("results/claims.csv", caption="../report/claims.rst", category="Claims"),
    log:
        "logs/analysis/claims.log",
    conda:
        "../../envs/effllm.yaml"
    localrule: True
    script:
        "../scripts/claims.py"
