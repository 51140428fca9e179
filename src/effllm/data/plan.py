"""What the data stage must provide for the configured runs: each split's token budget and the
hub tokenizer to use instead of training one. Read by the workflow (no heavy imports)."""

from __future__ import annotations

from effllm.data.splits import SPLITS
from effllm.specs import TokenBudget


def tokens_read(config: dict) -> dict[str, int]:
    """Tokens of each split the runs read at most: pretraining draws ``steps`` batches of
    ``batch_size`` windows of ``seq_len`` train tokens (the paper's token budget) and scores
    ``eval_tokens`` validation tokens, plus a ``long_context`` prompt; serving scores
    ``ppl_tokens`` test tokens in windows of ``eval_max_length`` and draws prompts from them."""
    pre, inf = config["pretrain"], config["inference"]
    long_context = (pre.get("long_context") or {}).get("tokens") or 0
    return {
        "train": pre["steps"] * pre["batch_size"] * pre["seq_len"],
        "validation": max(pre["eval_tokens"], pre["seq_len"], long_context),
        "test": max(inf["ppl_tokens"], inf["eval_max_length"], inf["prompt_tokens"] + 1),
    }


def token_budget(config: dict) -> dict[str, int | None]:
    """``data.tokens`` with ``auto`` replaced by :func:`tokens_read`; None means all."""
    spec = TokenBudget.of(config["data"].get("tokens") or {}, "data.tokens").filled()
    needed = tokens_read(config)
    budget = {}
    for split in SPLITS:
        value = getattr(spec, split)
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"data.tokens.{split} must be a count, auto or null, got {value!r}")
        budget[split] = needed[split] if value == "auto" else value
    return budget


def hub_tokenizer(config: dict) -> dict | None:
    """``data.tokenizer.hub`` as ``{repo_id, revision}``: a ``hub_models`` entry by name, or a
    repo id read at its newest cached revision; None when the pipeline trains its own."""
    name = config["data"]["tokenizer"].get("hub")
    if not name:
        return None
    entry = (config.get("hub_models") or {}).get(name)
    if entry:
        return {"repo_id": entry["repo_id"], "revision": entry.get("revision")}
    return {"repo_id": name, "revision": None}
