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
        block="attention",
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
        block="inference",
        metrics=["performance", "amu", "al", "it", "aec", "mcr_nominal"],
    log:
        "logs/figures/inference_radar.log",
    localrule: True
    script:
        "../scripts/figure_radar.py"


rule inference_rose:
    """Figure 5: one rose per precision, a sector per served model, a petal per metric."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.plots.rose"),
    output:
        pdf=report(
            "paper_figures/fig5_inference_rose.pdf",
            caption="../report/inference_rose.rst",
            category="Inference",
        ),
        png="paper_figures/fig5_inference_rose.png",
    params:
        block="inference",
        metrics=["performance", "it", "amu", "al", "aec", "mcr_nominal"],
    log:
        "logs/figures/inference_rose.log",
    localrule: True
    script:
        "../scripts/figure_rose.py"


rule position_bars:
    """Figure 3b: normalised metrics per positional encoding, raw perplexity as a line."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.plots.bars"),
    output:
        pdf=report(
            "paper_figures/fig3b_position_bars.pdf",
            caption="../report/position_bars.rst",
            category="Pretraining",
        ),
        png="paper_figures/fig3b_position_bars.png",
    params:
        block="position",
        metrics=["perplexity", "amu", "al", "tt", "aec"],
        line="perplexity",
    log:
        "logs/figures/position_bars.log",
    localrule: True
    script:
        "../scripts/figure_bars.py"


rule moe_bubbles:
    """Figure 3c: dense vs MoE as bubbles (area = normalised value)."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.plots.bubble"),
    output:
        pdf=report(
            "paper_figures/fig3c_moe_bubbles.pdf",
            caption="../report/moe_bubbles.rst",
            category="Pretraining",
        ),
        png="paper_figures/fig3c_moe_bubbles.png",
    params:
        block="moe",
        metrics=["aec", "tt", "al", "amu", "perplexity"],
    log:
        "logs/figures/moe_bubbles.log",
    localrule: True
    script:
        "../scripts/figure_bubble.py"


rule finetune_mirrored:
    """Figure 4a: per base model and method, Efficiency Score up, loss down."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.plots.finetune"),
    output:
        pdf=report(
            "paper_figures/fig4a_finetune_mirrored.pdf",
            caption="../report/finetune_mirrored.rst",
            category="Fine-tuning",
        ),
        png="paper_figures/fig4a_finetune_mirrored.png",
    params:
        kind="mirrored",
        loss="val_loss",
        methods=config["finetune"]["methods"],
        sizes=list(config["sizes"]),
    log:
        "logs/figures/finetune_mirrored.log",
    localrule: True
    script:
        "../scripts/figure_finetune.py"


rule finetune_area:
    """Figure 4b: Efficiency Score (area) and loss (line) across base-model sizes."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.plots.finetune"),
    output:
        pdf=report(
            "paper_figures/fig4b_finetune_area.pdf",
            caption="../report/finetune_area.rst",
            category="Fine-tuning",
        ),
        png="paper_figures/fig4b_finetune_area.png",
    params:
        kind="area",
        loss="val_loss",
        methods=config["finetune"]["methods"],
        sizes=list(config["sizes"]),
    log:
        "logs/figures/finetune_area.log",
    localrule: True
    script:
        "../scripts/figure_finetune.py"


rule ranking_chart:
    """Figure 2 (the leaderboard): the rank of every technique within its group on each metric."""
    input:
        normalised="results/tables/normalised.csv",
        code=code("effllm.plots.ranking"),
    output:
        pdf=report(
            "paper_figures/fig2_ranking.pdf",
            caption="../report/ranking_chart.rst",
            category="Overview",
        ),
        png="paper_figures/fig2_ranking.png",
    params:
        # The leaderboard's columns per stage (protocol §7.1); Perf is the quality metric.
        metrics={
            "pretrain": ["perplexity", "amu", "al", "tt", "aec"],
            "finetune": ["val_loss", "amu", "pcu", "al", "st", "aec"],
            "inference": ["performance", "amu", "al", "it", "aec", "mcr_nominal"],
        },
        # Rows in the config's order: variants of each block, methods, precisions.
        order=[v["name"] for b in config["pretrain"]["blocks"].values() if b
               for v in b["variants"]]
        + config["finetune"]["methods"]
        + config["inference"]["precisions"],
    log:
        "logs/figures/ranking_chart.log",
    localrule: True
    script:
        "../scripts/figure_ranking.py"
