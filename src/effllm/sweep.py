"""The one sweep-expansion function: config → every run of every stage, with its settings.

Snakemake's rules, the tests and the analysis all take the grid from :func:`expand_runs`; nothing
else builds run ids. A run's ``settings`` hold everything its job needs, so a change to a setting
changes that run's params (and reruns it) and nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from effllm.training.methods import ADAPTER_METHODS, LABELS as METHOD_LABELS

LABELS = {
    "mha": "MHA", "mqa": "MQA", "gqa": "GQA",
    **METHOD_LABELS,
    "fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "int8", "int4": "int4",
}
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}


@dataclasses.dataclass(frozen=True)
class Run:
    stage: str
    name: str  # the {run} wildcard: unique within a stage
    technique: str
    size: str
    seed: int
    group: str  # comparison group for normalisation and ranks
    upstream: str | None  # run id of the model this run starts from
    settings: dict[str, Any]

    @property
    def run_id(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def label(self) -> str:
        return LABELS.get(self.technique, self.technique)

    def spec(self) -> dict[str, Any]:
        """What the job receives (JSON-able)."""
        return {
            "run_id": self.run_id, "stage": self.stage, "technique": self.technique,
            "label": self.label, "size": self.size, "seed": self.seed, "group": self.group,
            "upstream": self.upstream, "settings": self.settings,
        }


def model_shape(config: dict, size: str, attention: str) -> dict[str, Any]:
    from_size = config["sizes"][size]
    heads = from_size["num_heads"]
    kv = {"mha": heads, "mqa": 1, "gqa": config["pretrain"]["kv_heads"]}[attention]
    return {
        "hidden_size": from_size["hidden_size"],
        "num_hidden_layers": from_size["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": from_size["intermediate_size"],
        "max_position_embeddings": max(config["pretrain"]["seq_len"],
                                       config["finetune"]["max_length"],
                                       config["inference"]["eval_max_length"],
                                       config["inference"]["prompt_tokens"]
                                       + config["inference"]["new_tokens"]),
        "rope_theta": config["pretrain"]["rope_theta"],
        "attention": attention,
        "position_encoding": config["pretrain"]["position_encoding"],
    }


def expand_runs(config: dict) -> dict[str, dict[str, Run]]:
    """Every run of the grid, by stage and name, in a deterministic order."""
    pre, ft, inf = config["pretrain"], config["finetune"], config["inference"]
    train_keys = ("seq_len", "batch_size", "steps", "lr", "min_lr_ratio", "warmup_steps",
                  "weight_decay", "grad_clip", "eval_tokens")
    runs: dict[str, dict[str, Run]] = {"pretrain": {}, "finetune": {}, "inference": {}}
    for seed in config["seeds"]:
        for size in pre["sizes"]:
            for attention in pre["attention"]:
                name = f"{attention}-{size}-s{seed}"
                runs["pretrain"][name] = Run(
                    "pretrain", name, attention, size, seed, group=f"attention-{size}",
                    upstream=None,
                    settings={"model": model_shape(config, size, attention),
                              "train": {k: pre[k] for k in train_keys},
                              "measure": config["measure"]},
                )
        for base in ft["bases"]:
            upstream = runs["pretrain"][f"{base}-s{seed}"]
            for method in ft["methods"]:
                name = f"{method}-{base}-s{seed}"
                train = {k: v for k, v in ft.items()
                         if k not in ("bases", "methods") and not isinstance(v, dict)}
                shared = ft["lora"] if method in ADAPTER_METHODS else {}
                runs["finetune"][name] = Run(
                    "finetune", name, method, upstream.size, seed, group=base,
                    upstream=upstream.run_id,
                    settings={"method": {"name": method, **shared, **ft.get(method, {})},
                              "train": train,
                              "measure": config["measure"]},
                )
        served = [r for stage in inf["sources"] for r in runs[stage].values() if r.seed == seed]
        for source in served:
            for precision in inf["precisions"]:
                name = f"{precision}-{source.name}"
                quant = inf.get(precision, {}) if precision in ("int4", "int8") else {}
                eval_keys = ("batch_size", "prompt_tokens", "new_tokens", "warmup_runs",
                             "min_runs", "min_seconds", "eval_problems", "eval_max_new_tokens",
                             "eval_max_length", "ppl_tokens")
                runs["inference"][name] = Run(
                    "inference", name, precision, source.size, seed, group=source.run_id,
                    upstream=source.run_id,
                    settings={"precision": precision, "bits": BITS[precision], "quant": quant,
                              "eval": {k: inf[k] for k in eval_keys},
                              "measure": config["measure"]},
                )
    return runs
