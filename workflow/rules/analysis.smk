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


def pruned_records():
    """The records of the pruning block's pruned runs (not its scratch baseline: it has no
    pruning series), so that no other run reruns the pruning tables."""
    return [f"results/pretrain/{name}/record.json" for name in PRUNING_RUNS]


rule pruning_tables:
    """The pruning block's schedule and per-layer widths, from its pruned runs' series (the
    tables the pruning figures draw; effllm.analysis.pruning)."""
    input:
        records=pruned_records(),
        code=code("effllm.analysis.pruning"),
    output:
        trajectory=outputs.PRUNING_TRAJECTORY,
        widths=outputs.PRUNING_WIDTHS,
    log:
        "logs/analysis/pruning_tables.log",
    conda:
        "../../envs/effllm.yaml"
    localrule: True
    script:
        "../scripts/pruning_tables.py"
