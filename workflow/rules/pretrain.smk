# Stage 2: pretraining sweeps (attention variant x size x seed).


rule pretrain:
    input:
        tokens="results/data/tokens",
        code=code("effllm.training.pretrain"),
    output:
        model=directory("results/pretrain/{run}/model"),
        record="results/pretrain/{run}/record.json",
    params:
        spec=run_spec("pretrain"),
    threads: config["measure"]["threads"]
    log:
        "logs/pretrain/{run}.log",
    script:
        "../scripts/pretrain.py"
