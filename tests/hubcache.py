"""A Hugging Face hub cache built on disk, laid out as huggingface_hub lays it out
(``models--org--name/snapshots/<commit>``, ``refs/main``), holding a tiny transformers Llama and
the stdlib tokenizer: the reading path of a cluster's cache, without a network."""

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effllm.data.tokenizer import load_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-llama"


def llama(vocab: int, tokenizer=None) -> LlamaForCausalLM:
    """A tiny Llama whose linear widths suit the CPU 4-bit kernels (multiples of 64)."""
    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id) if tokenizer else {}
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, **ids))


def fake_cache(root: Path, stdlib_tokens: Path, repo: str = REPO, *, weights=True,
               config_extra: dict | None = None) -> Path:
    """A hub cache at ``root`` holding ``repo`` at COMMIT; returns the snapshot folder."""
    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    snapshot = root / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    model = llama(len(tokenizer), tokenizer)
    model.save_pretrained(snapshot, safe_serialization=True)
    tokenizer.save_pretrained(snapshot)
    if not weights:
        for path in snapshot.glob("*.safetensors"):
            path.unlink()
    if config_extra:
        config = json.loads((snapshot / "config.json").read_text())
        (snapshot / "config.json").write_text(json.dumps({**config, **config_extra}))
    refs = snapshot.parents[1] / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(COMMIT)
    return snapshot


def stub_cache(root: Path, config: dict) -> Path:
    """A hub cache at ``root`` with a placeholder of every model and data set ``config`` reads
    from the hub: enough for the checks and the DAG of a dry run, nothing loadable (the paper
    scale's DAG, built here without its terabytes)."""
    from effllm.config import used_hub_models

    def snapshot(kind: str, repo: str) -> Path:
        folder = root / f"{kind}--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        return folder / "snapshots" / COMMIT

    for name in used_hub_models(config):
        snap = snapshot("models", config["hub_models"][name]["repo_id"])
        snap.mkdir(parents=True, exist_ok=True)
        (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (snap / "model.safetensors").write_bytes(b"")
    sources = [config["data"]["corpus"], *config["data"]["reasoning"].values()]
    for source in sources:
        if not isinstance(source, dict) or source.get("source") != "hf":
            continue
        hf = source["hf"]
        for pattern in [hf["files"]] if isinstance(hf["files"], str) else hf["files"]:
            name = pattern.replace("**/", "").replace("*", "000_00000")
            if not name.endswith((".jsonl", ".json", ".parquet")):
                name += ".jsonl"
            path = snapshot("datasets", hf["repo_id"]) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    return root
