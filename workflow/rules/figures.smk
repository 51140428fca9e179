# Stage 6: paper figures, each regenerable alone (`snakemake paper_figures/<name>.pdf`).


rule attention_radar:
    """Figure 3a: one radar per model size, one series per attention variant."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.plots.radar"),
    output:
        pdf=report(
            "paper_figures/fig3a_attention_radar.pdf",
            caption="../report/attention_radar.rst",
            category="Pretraining",
        ),
        png="paper_figures/fig3a_attention_radar.png",
    params:
        stage="pretrain",
        metrics=["perplexity", "amu", "al", "tt", "aec"],
    log:
        "logs/figures/attention_radar.log",
    localrule: True
    script:
        "../scripts/figure_radar.py"


rule inference_radar:
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.plots.radar"),
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
