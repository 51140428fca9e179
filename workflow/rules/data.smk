# Stage 1: corpus, tokenizer and the fine-tuning (reasoning) set, each with a JSON card, and
# Hugging Face models linked from the local cache.
from effllm.data.plan import hub_tokenizer, token_budget


rule prepare_corpus:
    """Small sources: the whole corpus, split. A streamed source (hf): its head, up to the
    tokenizer's sample of train documents."""
    input:
        code=code("effllm.data.corpus"),
    output:
        directory("results/data/corpus"),
    params:
        corpus=config["data"]["corpus"],
        split=config["data"]["split"],
        seed=config["data"]["seed"],
        sample=config["data"]["tokenizer"].get("sample_documents"),
    resources:
        **stage_resources("data"),
    log:
        "logs/data/prepare_corpus.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/prepare_corpus.py"


rule train_tokenizer:
    """The tokenizer, and each split's tokens up to its budget (data.tokens): a streamed source
    is read again from its shards until every budget is filled."""
    input:
        corpus="results/data/corpus",
        code=code("effllm.data.tokenizer"),
    output:
        directory("results/data/tokens"),
    params:
        tokenizer=config["data"]["tokenizer"],
        tokens=token_budget(config),
        hub=hub_tokenizer(config),
        corpus=config["data"]["corpus"],
        split=config["data"]["split"],
        seed=config["data"]["seed"],
    resources:
        **stage_resources("data"),
    log:
        "logs/data/train_tokenizer.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/train_tokenizer.py"


rule prepare_reasoning:
    """One fine-tuning set of data.reasoning, by name."""
    input:
        code=code("effllm.data.reasoning"),
    output:
        directory("results/data/reasoning/{dataset}"),
    wildcard_constraints:
        dataset="|".join(config["finetune"]["datasets"]),
    params:
        reasoning=lambda wc: config["data"]["reasoning"][wc.dataset],
        key=lambda wc: f"data.reasoning.{wc.dataset}",
        seed=config["data"]["seed"],
    resources:
        **stage_resources("data"),
    log:
        "logs/data/prepare_reasoning_{dataset}.log",
    conda:
        "../../envs/effllm.yaml"
    script:
        "../scripts/prepare_reasoning.py"


rule hub_model:
    """A Hugging Face model from the local cache, as links (weights are not copied)."""
    input:
        code=code("effllm.data.hub"),
    output:
        directory("results/hub/{model}/model"),
    params:
        repo_id=lambda wc: config["hub_models"][wc.model]["repo_id"],
        revision=lambda wc: config["hub_models"][wc.model].get("revision"),
    log:
        "logs/data/hub_{model}.log",
    conda:
        "../../envs/effllm.yaml"
    localrule: True
    script:
        "../scripts/hub_model.py"
