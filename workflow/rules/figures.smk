# Stage 6: paper figures, each regenerable alone (`snakemake paper_figures/<name>.pdf`).


rule inference_radar:
    input:
        normalised="results/tables/normalised.csv",
        code=code("plots"),
    output:
        pdf=report(
            "paper_figures/inference_radar.pdf",
            caption="../report/inference_radar.rst",
            category="Inference",
        ),
        png="paper_figures/inference_radar.png",
    params:
        stage="inference",
        metrics=["performance", "amu", "al", "it", "aec", "mcr_nominal"],
    log:
        "logs/figures/inference_radar.log",
    localrule: True
    script:
        "../scripts/figure_radar.py"
