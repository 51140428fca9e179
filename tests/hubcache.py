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


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _arch(model_type, hidden, layers, heads, kv, intermediate, vocab, tied, positions, theta,
          **extra) -> dict:
    return {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv,
            "intermediate_size": intermediate, "vocab_size": vocab, "tie_word_embeddings": tied,
            "max_position_embeddings": positions, "rope_theta": theta, **extra}


# The architecture fields of the config.json of every hub model config/paper.yaml reads, as
# published on the Hugging Face Hub (https://huggingface.co/<repo>/blob/main/config.json): model
# type, hidden size, layers, attention and KV heads, MLP width, vocabulary, tied head, positions
# and RoPE. The placeholder cache carries them so that the plan simulates the real shapes.
# Phi-3.5-mini's rope_scaling (LongRoPE: two lists of 48 factors) is left out: it changes no
# tensor's shape.
HUB_ARCHITECTURES = {
    "meta-llama/Llama-3.2-1B": _arch("llama", 2048, 16, 32, 8, 8192, 128256, True, 131072,
                                     500000.0, head_dim=64, rope_scaling=_llama3_rope(32.0)),
    "meta-llama/Llama-3.2-3B": _arch("llama", 3072, 28, 24, 8, 8192, 128256, True, 131072,
                                     500000.0, head_dim=128, rope_scaling=_llama3_rope(32.0)),
    "meta-llama/Llama-3.1-8B": _arch("llama", 4096, 32, 32, 8, 14336, 128256, False, 131072,
                                     500000.0, rope_scaling=_llama3_rope(8.0)),
    "Qwen/Qwen2.5-0.5B": _arch("qwen2", 896, 24, 14, 2, 4864, 151936, True, 32768, 1e6),
    "Qwen/Qwen2.5-7B": _arch("qwen2", 3584, 28, 28, 4, 18944, 152064, False, 131072, 1e6),
    "Qwen/Qwen2.5-14B": _arch("qwen2", 5120, 48, 40, 8, 13824, 152064, False, 131072, 1e6),
    "mistralai/Mistral-7B-v0.3": _arch("mistral", 4096, 32, 32, 8, 14336, 32768, False, 32768,
                                       1e6, sliding_window=None),
    "mistralai/Mistral-Small-24B-Base-2501": _arch("mistral", 5120, 40, 32, 8, 32768, 131072,
                                                   False, 32768, 1e8, head_dim=128,
                                                   sliding_window=None),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _arch("qwen2", 1536, 28, 12, 2, 8960, 151936,
                                                       False, 131072, 10000.0),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": _arch("llama", 4096, 32, 32, 8, 14336, 128256,
                                                      False, 131072, 500000.0,
                                                      rope_scaling=_llama3_rope(8.0)),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": _arch("qwen2", 5120, 48, 40, 8, 13824, 152064,
                                                      False, 131072, 1e6),
    "Qwen/Qwen2.5-32B": _arch("qwen2", 5120, 64, 40, 8, 27648, 152064, False, 131072, 1e6),
    "microsoft/Phi-3.5-mini-instruct": _arch("phi3", 3072, 32, 32, 32, 8192, 32064, False,
                                             131072, 10000.0,
                                             original_max_position_embeddings=4096),
    "microsoft/phi-4": _arch("phi3", 5120, 40, 40, 10, 17920, 100352, False, 16384, 250000.0),
    "01-ai/Yi-34B": _arch("llama", 7168, 60, 56, 8, 20480, 64000, False, 4096, 5000000.0),
}


def stub_cache(root: Path, config: dict) -> Path:
    """A hub cache at ``root`` with a placeholder of every model and data set ``config`` reads
    from the hub: enough for the checks and the DAG of a dry run, nothing loadable (the paper
    scale's DAG, built here without its terabytes). A model's config.json carries its real
    architecture (:data:`HUB_ARCHITECTURES`) where it is known, so the plan simulates it."""
    from effllm.config import used_hub_models

    def snapshot(kind: str, repo: str) -> Path:
        folder = root / f"{kind}--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(COMMIT)
        return folder / "snapshots" / COMMIT

    for name in used_hub_models(config):
        snap = snapshot("models", config["hub_models"][name]["repo_id"])
        snap.mkdir(parents=True, exist_ok=True)
        repo = config["hub_models"][name]["repo_id"]
        (snap / "config.json").write_text(json.dumps(HUB_ARCHITECTURES.get(
            repo, {"model_type": "llama"})))
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
