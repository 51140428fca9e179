# Stage 2: pretraining sweeps (every block's variants x sizes x seeds; shared runs trained once),
# the distillation block's students (their teacher an input), and the pruning block's routes,
# each from a pretrained source (effllm.training.prune).
import re

PRUNING_RUNS = [name for name, run in RUNS["pretrain"].items() if run.spec.pruning]
_PRUNING = "|".join(re.escape(name) for name in PRUNING_RUNS) or "(?!)"


rule pretrain:
    input:
        tokens="results/data/tokens",
        teacher=teacher_model,
        code=run_code("pretrain", "effllm.training.pretrain"),
    output:
        model=directory("results/pretrain/{run}/model"),
        record="results/pretrain/{run}/record.json",
    wildcard_constraints:
        # Not a pruning run's name (the name is followed by "/" in the output path).
        run=rf"(?!(?:{_PRUNING})(?![A-Za-z0-9_.+-]))[A-Za-z0-9_.+-]+",
    params:
        spec=run_spec("pretrain"),
        # Resumable state lives outside the outputs: Snakemake deletes outputs before a job.
        checkpoints=lambda wildcards: f"results/checkpoints/pretrain/{wildcards.run}",
    threads: config["measure"]["threads"]
    resources:
        **stage_resources("pretrain"),
    log:
        "logs/pretrain/{run}.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/pretrain.py"


rule prune_pretrain:
    """A pretrained source pruned (continuously while it trains, or once), sliced and trained
    on: the pruning block's routes, recorded like every pretraining run."""
    input:
        tokens="results/data/tokens",
        source=upstream_model("pretrain"),
        code=run_code("pretrain", "effllm.training.prune"),
    output:
        model=directory("results/pretrain/{run}/model"),
        record="results/pretrain/{run}/record.json",
    wildcard_constraints:
        run=_PRUNING,
    params:
        spec=run_spec("pretrain"),
    threads: config["measure"]["threads"]
    resources:
        **stage_resources("pretrain"),
    log:
        "logs/pretrain/{run}.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/prune_pretrain.py"
