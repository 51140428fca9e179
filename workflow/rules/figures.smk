# Stage 6: paper figures, one job each, from the registry effllm.outputs (function, inputs,
# parameters, report category, code); each regenerable alone (`snakemake paper_figures/<name>.pdf`).


rule figure:
    """A paper figure (PDF and PNG) drawn by its registry entry's function."""
    input:
        unpack(paper_output_inputs),
    output:
        pdf=report(
            "paper_figures/{figure}.pdf",
            caption="../report/figure.rst",
            category=paper_output_category,
        ),
        png="paper_figures/{figure}.png",
    wildcard_constraints:
        figure="|".join(PAPER_FIGURES),
    params:
        kwargs=paper_output_kwargs,
    log:
        "logs/figures/{figure}.log",
    conda:
        "../../envs/effllm.yaml"
    localrule: True
    script:
        "../scripts/figure.py"
