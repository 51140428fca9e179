"""The paper's rank-level claims (docs/protocol.md §7 and the abstract), checked on this run's
numbers, with verdicts that take the seed spread into account.

Each :class:`Claim` says which block, metric and techniques the paper compares and in which
direction; :func:`check_claims` reads the values from the normalised table, summarises the
seeds with :func:`effllm.analysis.seeds.seed_summary` (mean, sample standard deviation ``s``,
number of seeds with a value ``n``) and gives one verdict per claim and comparison group. The
claims are the paper's; every number and verdict comes from the table.

Verdict rule (docs/protocol.md §7). For one comparison, ``d`` is the difference of the two seed
means signed so that ``d > 0`` is the way the paper claims, and ``SE = sqrt(s1²/n1 + s2²/n2)``
its standard error (Welch's: the two techniques' runs are independent samples, each with its
own variance). The verdict is ``holds`` when ``d > 2 SE``, ``does not hold`` when ``d < -2 SE``
and ``inconclusive`` otherwise (an exact tie included). A value over one seed has no ``s``, so a
comparison that involves one is ``inconclusive (1 seed)`` -- unless the metric is *exact*: fixed
by the configuration, its seed standard deviation is 0 by construction and any difference
decides. Exact are the metrics of :data:`DETERMINISTIC` (sizes and shapes: exact wherever they
are recorded) and, per claim, ``Claim.exact`` where a quantity is exact only in that comparison:
FLOPs per token are fixed for a pretraining step on a full batch but vary with padding in
fine-tuning, so a per-metric flag in ``records.METRICS`` would say too much. Two standard errors
is a rule of thumb, not a test at a fixed level: with three seeds a side the Welch statistic has
two to four degrees of freedom, and two techniques that do not differ pass it, either way, in
about 12-18 % of comparisons.

Claims over more than two values:

* ``lowest``/``highest`` among techniques: the subject against each rival in turn. It holds
  when the subject beats every rival by more than 2 SE and does not hold when some rival beats
  it by more than 2 SE; otherwise inconclusive (``(1 seed)`` when a comparison lacks a spread).
  The row shows the deciding rival: the one that beats the subject most (in SE) when it does not
  hold, else the closest one. Rivals of ``among`` that the configuration lacks are not compared,
  unless the claim names each of them (``Claim.every``: pruning-aware pretraining against
  one-shot pruning with and without compensation): then a missing one makes the claim not
  measurable.
* ``drop`` (within a bound of a reference): ``d = bound - loss``, the loss ``reference -
  subject`` for a metric where higher is better (performance), ``subject - reference`` where
  lower is (perplexity); with ``Claim.relative`` the bound is a fraction of the reference.
* ``at_least`` (a value of the subject alone, e.g. the share of outputs identical to plain
  decoding): ``d = subject - bound``, ``SE = s / sqrt(n)``.
* ``agree`` (a ratio of two metrics of the same runs at least ``1 - bound``): the ratio per
  run, ``d = mean ratio - (1 - bound)``, ``SE = s / sqrt(n)``.
* ``trade_off`` ("no single method is best on every metric"): a technique is *beaten* when some
  other technique is better than it on some metric by more than 2 SE, and *best everywhere* when
  it is better than every other technique on every metric by more than 2 SE. The claim holds
  when every technique is beaten, does not hold when one is best everywhere, else inconclusive.

Inference groups are served runs, one per seed (``finetune/lora-gqa-small-s0``); the check
pools a served configuration's seeds (:func:`comparison_groups`). Values that are estimated, not
measured (e.g. CPU energy from CPU time), are compared like the others and named in the reason.

A verdict can also be ``not measurable here``, with the reason (the metric is unavailable,
e.g. energy on a CPU; the technique or block is not in the configuration). The table keeps the
numbers behind each verdict: ``difference`` (``d``) and ``std_error`` (``SE``; empty when a
value has one seed). The paper reports agreement per claim, not one pass/fail (docs/protocol.md
§7).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from effllm.analysis.aggregate import companion, read_table
from effllm.analysis.seeds import seed_summary
from effllm.analysis.tables import MISSING, format_number
from effllm.io import atomic_file
from effllm.records import METRICS

HOLDS, FAILS, INCONCLUSIVE, ONE_SEED, UNMEASURABLE = (
    "holds", "does not hold", "inconclusive", "inconclusive (1 seed)", "not measurable here")
Z = 2.0  # a verdict needs the difference to exceed this many standard errors
COLUMNS = ["claim", "text", "source", "block", "group", "metric", "subject", "compared",
           "subject_value", "rival", "rival_value", "difference", "std_error", "values",
           "spread", "seeds", "verdict", "reason"]
# Metrics fixed by the configuration: every seed gives the same value (sizes and shapes are not
# drawn at random), so one seed is enough and the standard error is 0.
DETERMINISTIC = frozenset({"params_total", "params_active", "params_trainable", "weight_bytes",
                           "linear_weight_bytes", "bits_nominal", "flops_per_token_6n",
                           "kv_cache_bytes_per_token"})
PAPER_ATTENTION = ("mqa", "gqa", "mla", "nsa")  # the paper's four (no MHA)
PAPER_POSITION = ("rope", "sinusoidal", "learned", "relative", "none")  # no ALiBi in the paper
OUR_ADDITIONS = ("mha", "alibi", "int8", "fp32")  # not in the paper's comparisons
FINETUNE = r"finetune(_.+)?"  # the primary fine-tuning set and each further one (table 8)
# The leaderboard's (Fig. 2) columns per stage, as effllm.outputs draws them (which analysis
# cannot import: it sits above).
STAGE_METRICS = {"pretrain": ("perplexity", "amu", "al", "tt", "aec"),
                 "finetune": ("val_loss", "amu", "pcu", "al", "st", "aec"),
                 "inference": ("performance", "amu", "al", "it", "aec", "mcr_nominal")}
PAPER_SCALE = 1e9  # fine-tuning bases below this many parameters are CPU-scale stand-ins
# Pruning-aware pretraining (issue 21), not the EfficientLLM benchmark paper's claim.
XING = "Xing et al. 2025, arXiv 2502.06663"
# The serving techniques (issue 22): the survey of seed 002.
DING = "Ding et al. 2023, The Efficiency Spectrum of LLMs (seed 002)"
WANDA = "Sun et al. 2023, arXiv 2306.11695"
HINTON = "Hinton et al. 2015, arXiv 1503.02531"
TECHNIQUES = "techniques"

Pairs = Callable[[pd.DataFrame], list[tuple[str, str | None]]]
Applies = Callable[[pd.DataFrame, pd.DataFrame], bool]


@dataclass(frozen=True)
class Claim:
    """One claim: ``subject`` is ``lowest``/``highest`` among ``among`` (None: every technique of
    the group), or ``lower``/``higher`` than ``other``, or within ``bound`` of ``other``
    (``drop``: other - subject <= bound), or ``agree`` (subject's ``metric`` / ``metric2`` >=
    1 - bound), or ``trade_off`` (no technique best on every metric of the stage's leaderboard
    columns). Raw values, so "lowest AMU" reads as written. ``pairs`` replaces subject/other
    for claims whose partners depend on the data (MoE vs the dense model of equal active
    parameters); ``applies(group_rows, block_rows)`` keeps only the groups a claim is about (the
    14B threshold); ``exact``: the compared quantity has no seed spread in this claim;
    ``exclude``: techniques left out (our additions to the paper's grid); ``every``: a
    ``lowest``/``highest`` claim about each rival of ``among`` by name, so that one the group
    lacks makes it not measurable instead of leaving it out."""

    key: str
    text: str
    source: str
    block: str  # regex on the table's ``block`` column
    metric: str
    kind: str
    subject: str = ""
    other: str | None = None
    among: tuple[str, ...] | None = None
    bound: float = 0.0
    metric2: str | None = None
    pairs: Pairs | None = None
    applies: Applies | None = None
    scope: str = ""  # why a group is out of scope, when ``applies`` rejects every group
    exact: bool = False
    exclude: tuple[str, ...] = ()
    every: bool = False
    relative: bool = False  # ``drop``: the bound is this fraction of the reference's value


def moe_vs_dense(rows: pd.DataFrame) -> list[tuple[str, str | None]]:
    """Each MoE technique (active < total parameters) with the dense technique whose total
    parameters are closest to its active ones: the paper's "equal active parameters"."""
    if not {"params_total", "params_active"} <= set(rows):
        return []
    params = seed_summary(rows, ["params_total", "params_active"], by=["technique"]).set_index(
        "technique")
    moe = params[params["params_active"] < params["params_total"]]
    dense = params[params["params_active"] >= params["params_total"]]
    if dense.empty:
        return [(t, None) for t in moe.index]
    return [(t, (dense["params_total"] - active).abs().idxmin())
            for t, active in moe["params_active"].items()]


def moe_vs_dense_quality(rows: pd.DataFrame) -> list[tuple[str, str | None]]:
    """Each MoE technique with the dense technique whose perplexity (seed mean) is closest to
    its own: the abstract's "MoE reduces FLOPs" read as "at equal quality"."""
    if not {"params_total", "params_active"} <= set(rows):
        return []
    s = seed_summary(rows, ["params_total", "params_active", "perplexity"],
                     by=["technique"]).set_index("technique")
    moe = s[s["params_active"] < s["params_total"]]
    dense = s[(s["params_active"] >= s["params_total"]) & s["perplexity"].notna()]
    return [(t, (dense["perplexity"] - ppl).abs().idxmin()
             if len(dense) and math.isfinite(ppl) else None)
            for t, ppl in moe["perplexity"].items()]


def base_params(rows: pd.DataFrame) -> float:
    """Parameters of a fine-tuning group's base model: its smallest run (adapters only add)."""
    values = rows["params_total"].astype(float) if "params_total" in rows else pd.Series([np.nan])
    return float(values.min()) if values.notna().any() else math.nan


def _base_sizes(block_rows: pd.DataFrame) -> list[float]:
    sizes = [base_params(g) for _, g in block_rows.groupby("group", sort=False)]
    return [s for s in sizes if math.isfinite(s)]


def small_base(rows: pd.DataFrame, block_rows: pd.DataFrame) -> bool:
    """The paper's "<= 3B" (its 1B-3B group). At the paper's scale, literally (<= 3.5e9
    parameters: Llama-3.2-3B has 3.2B); when every configured base is below 1B (our CPU scale)
    the sizes do not compare, so by size order: the smallest configured base."""
    mine, sizes = base_params(rows), _base_sizes(block_rows)
    if not math.isfinite(mine):
        return False
    return mine <= 3.5e9 if max(sizes) >= PAPER_SCALE else mine == min(sizes)


def largest_base(rows: pd.DataFrame, block_rows: pd.DataFrame) -> bool:
    """The paper's largest base (its 14B-24B group): by size order, the largest configured one."""
    mine = base_params(rows)
    return math.isfinite(mine) and mine == max(_base_sizes(block_rows))


CLAIMS: tuple[Claim, ...] = (
    Claim("mqa_lowest_amu", "MQA has the lowest memory (AMU) of the attention variants",
          "abstract; docs/protocol.md §7 (1); Fig. 2 attention AMU rank 1", "attention", "amu",
          "lowest", "mqa", among=PAPER_ATTENTION),
    Claim("mqa_lowest_al", "MQA has the lowest latency (AL) of the attention variants "
          "(\"optimal memory-latency trade-off\")", "abstract; Fig. 2 attention AL rank 1",
          "attention", "al", "lowest", "mqa", among=PAPER_ATTENTION),
    Claim("mla_lowest_ppl", "MLA has the lowest perplexity of the attention variants",
          "abstract; docs/protocol.md §7 (1); table 3 (1.5B: MLA 7.79 vs GQA 8.09, MQA 8.23)",
          "attention", "perplexity", "lowest", "mla", among=PAPER_ATTENTION),
    Claim("nsa_highest_al", "NSA has the highest latency (AL) of the attention variants",
          "docs/protocol.md §7 (1); Fig. 2 attention AL rank 4; table 3 (1.5B: NSA 0.596 s/iter)",
          "attention", "al", "highest", "nsa", among=PAPER_ATTENTION),
    Claim("nsa_lowest_aec", "NSA has the lowest average power (AEC) of the attention variants "
          "(probably an artefact of slow kernels)",
          "docs/protocol.md §7 (1); Fig. 2 attention AEC rank 1",
          "attention", "aec", "lowest", "nsa", among=PAPER_ATTENTION),
    Claim("rope_lowest_ppl", "RoPE has the lowest perplexity of the positional encodings",
          "docs/protocol.md §7 (2); table 4 (1.5B: RoPE 8.09); Fig. 2 PE Perf rank 1", "position",
          "perplexity", "lowest", "rope", among=PAPER_POSITION),
    Claim("none_highest_ppl", "No positional encoding has the highest perplexity",
          "docs/protocol.md §7 (2); Fig. 3b (None at the floor)", "position", "perplexity",
          "highest", "none", among=PAPER_POSITION),
    Claim("relative_most_efficient", "Relative-bias position encoding is the most efficient "
          "(highest Efficiency Score over the resource metrics AMU, AL, TT, AEC)",
          "docs/protocol.md §7 (2); Fig. 2 PE block (\"Relate\" rank 1 on AMU, AL, TT and AEC, "
          "Perf rank 3); table 4 (1.5B: Relate AL 0.1246 s, AMU 43.94 GB)", "position",
          "efficiency_score", "highest", "relative", among=PAPER_POSITION),
    Claim("moe_lower_ppl", "MoE has lower perplexity than a dense model of equal active "
          "parameters",
          "abstract; docs/protocol.md §7 (3); table 5 (MoE 1.5Bx8 7.10 vs dense 1.5B 8.09)",
          "moe", "perplexity", "lower", pairs=moe_vs_dense),
    Claim("moe_higher_amu", "MoE uses more memory (AMU) than a dense model of equal active "
          "parameters (\"+40% VRAM\")",
          "abstract; docs/protocol.md §7 (3); table 5 (76.53 vs 44.82 GB)",
          "moe", "amu", "higher", pairs=moe_vs_dense),
    # Counted on one full-length batch (no padding): top-k routing moves tokens between experts
    # but every token still passes k of them, so the count is fixed by the configuration.
    Claim("moe_fewer_flops", "MoE needs fewer FLOPs per token than the dense model of equal "
          "quality (the dense model whose perplexity is closest)",
          "abstract (\"MoE reduces FLOPs and improves accuracy\"); docs/protocol.md §7 (3)",
          "moe", "flops_per_token", "lower", pairs=moe_vs_dense_quality, exact=True),
    Claim("mamba_lower_amu", "Mamba uses less memory (AMU) than a Transformer of equal size",
          "docs/protocol.md §7 (4); table 6 (30.25 vs 44.82 GB)", "attention_free", "amu", "lower",
          "mamba", "transformer"),
    Claim("mamba_lower_al", "Mamba has lower latency (AL) than a Transformer of equal size",
          "docs/protocol.md §7 (4); table 6 (0.1025 vs 0.1280 s)", "attention_free", "al", "lower",
          "mamba", "transformer"),
    Claim("mamba_higher_ppl", "Mamba has higher perplexity than a Transformer of equal size",
          "docs/protocol.md §7 (4); table 6 (9.48 vs 8.09)", "attention_free", "perplexity",
          "higher", "mamba", "transformer"),
    Claim("freeze_lowest_al", "Freeze has the lowest latency (AL) of the fine-tuning methods",
          "docs/protocol.md §7 (5); Fig. 2 AL rank 1 in all three size groups; table 7", FINETUNE,
          "al", "lowest", "freeze"),
    Claim("dora_highest_al", "DoRA has the highest latency (AL) of the fine-tuning methods",
          "docs/protocol.md §7 (5); Fig. 2 AL rank 7 in all three size groups; table 7", FINETUNE,
          "al", "highest", "dora"),
    Claim("lora_plus_lowest_loss_small", "LoRA+ reaches the lowest (validation) loss of the "
          "fine-tuning methods at <= 3B (here: the smallest configured base)",
          "issue 20 (the paper's text, not in our sources); docs/protocol.md §7 (5); "
          "contradicted by Fig. 2 1B-3B Perf ranks (LoRA-Plus 4, Freeze 1) and table 7 "
          "(Llama-3.2-1B: LoRA-plus 0.7442 vs Freeze 0.6425)", FINETUNE, "val_loss", "lowest",
          "lora_plus", applies=small_base, scope="no base model of 3B parameters or fewer"),
    Claim("full_worst_loss_largest", "Full fine-tuning has the highest (validation) loss at the "
          "largest base (here: the largest configured base)",
          "docs/protocol.md §7 (5); Fig. 2 14B-24B Perf rank 7 (also 7B-8B); table 7 "
          "(Mistral-Small-24B: Full* 1.2805 vs PEFT 0.3757-0.3975)", FINETUNE, "val_loss",
          "highest", "full", applies=largest_base, scope="base sizes unknown"),
    Claim("rslora_below_14b", "Below 14B parameters RSLoRA does not surpass LoRA's efficiency "
          "(Efficiency Score)", "abstract (\"RSLoRA surpasses LoRA efficiency only beyond 14B\")",
          FINETUNE, "efficiency_score", "lower", "rslora", "lora",
          applies=lambda rows, _: base_params(rows) < 14e9, scope="no base model below 14B"),
    Claim("rslora_from_14b", "From 14B parameters on RSLoRA surpasses LoRA's efficiency "
          "(Efficiency Score)", "abstract (\"RSLoRA surpasses LoRA efficiency only beyond 14B\")",
          FINETUNE, "efficiency_score", "higher", "rslora", "lora",
          applies=lambda rows, _: base_params(rows) >= 14e9,
          scope="no base model of 14B parameters or more in this configuration"),
    Claim("int4_lower_amu", "int4 uses less memory (AMU) than bf16",
          "docs/protocol.md §7 (6); table 9 (e.g. Qwen2.5-32B 71.33 -> 48.30 GB)", "inference",
          "amu", "lower", "int4", "bf16"),
    Claim("int4_small_drop", "int4 costs at most a few points of average performance against "
          "bf16 (\"3-5% accuracy drop\"; bound: 5 points)",
          "abstract; docs/protocol.md §7 (6); table 9",
          "inference", "performance", "drop", "int4", "bf16", bound=0.05),
    # Both MCRs multiply the same run's performance retention, which cancels in the ratio: what
    # is left (reference bytes / bytes over 16 / bits) is fixed by the configuration.
    Claim("int4_mcr_4x", "int4 compresses the model about 4x: MCR = 4 x performance retention "
          "(the paper's \"3.9x\", from nominal bits); checked as measured-bytes MCR >= 90% of "
          "the nominal",
          "abstract; docs/protocol.md §7 (6); docs/metrics.md §8 (MCR from nominal bits)",
          "inference", "mcr_measured", "agree", "int4", metric2="mcr_nominal", bound=0.1,
          exact=True),
    Claim("bf16_aec_le_fp16", "bf16 draws no more power (AEC) than fp16 (Hopper-specific: not "
          "expected on other hardware)", "docs/protocol.md §7 (7); table 9 (144.39 vs 158.96 W)",
          "inference", "aec", "lower", "bf16", "fp16"),
    # Issue 21: the pruning block's routes, at equal final size and training tokens.
    Claim("pruning_beats_scratch", "Pruning-aware pretraining reaches lower perplexity than "
          "pretraining from scratch at equal size and tokens",
          f"{XING} (abstract: pruning-aware pretraining retains the performance of a larger "
          "model, beyond direct pretraining bounded by the scaling law); issue 21", "pruning",
          "perplexity", "lower", "pruning_aware", "scratch"),
    Claim("pruning_beats_oneshot", "Pruning-aware pretraining reaches lower perplexity than "
          "one-shot pruning (with or without OBS compensation) followed by the same training",
          f"{XING} (abstract: continuous structural pruning extends post-training pruning, "
          "LLM-Pruner and SparseGPT, into pretraining); issue 21", "pruning", "perplexity",
          "lowest", "pruning_aware", among=("pruning_aware", "oneshot", "oneshot_obs"),
          every=True),
    # Issue 22: knowledge distillation in pretraining, at equal student size and tokens.
    Claim("distilled_beats_scratch", "A student distilled from a larger teacher reaches lower "
          "perplexity than its twin pretrained from scratch on the same tokens",
          f"{HINTON}; {DING} (knowledge distillation); issue 22", "distillation",
          "perplexity", "lower", "distilled", "scratch"),
    Claim("distillation_costs_time", "Distillation's teacher forward makes a training step "
          "slower (AL) than the scratch twin's", f"{DING} (distillation's training cost); "
          "issue 22", "distillation", "al", "lower", "scratch", "distilled"),
    # Issue 22: the serving techniques on one served model (the default's variant names).
    Claim("hqq4_beats_nf4", "HQQ int4 (optimised zero points) keeps lower perplexity than "
          "bitsandbytes NF4 at the same 4 bits", f"{DING} (weight-only quantisation); issue 22 "
          "(GPTQ/AWQ, the calibrated quantisers, have no CPU path with our pins)",
          TECHNIQUES, "perplexity", "lower", "hqq4", "nf4"),
    Claim("kv_fp8_less_kv", "An fp8 KV cache holds fewer bytes per cached token than the "
          "bf16 cache (half, plus one scale per tensor)", f"{DING} (KV-cache compression); "
          "issue 22", TECHNIQUES, "kv_cache_bytes_per_token", "lower", "kv-fp8", "bf16"),
    Claim("kv_fp8_small_ppl_cost", "An fp8 KV cache costs at most 2% perplexity on text read "
          "back through the cache", f"{DING}; issue 22", TECHNIQUES, "kv_perplexity", "drop",
          "kv-fp8", "bf16", bound=0.02, relative=True),
    Claim("speculative_faster", "Speculative decoding with a small draft lowers latency (AL) "
          "against plain decoding", f"{DING} (speculative decoding); issue 22", TECHNIQUES,
          "al", "lower", "draft", "bf16"),
    Claim("speculative_identical", "Speculative decoding returns plain greedy decoding's tokens "
          "(at least 99% of prompts identical; bf16 verification in one pass may flip a "
          "near-tie)", f"{DING}; issue 22", TECHNIQUES, "identical_output", "at_least",
          "draft", bound=0.99, exact=True),
    Claim("wanda_beats_magnitude", "Wanda's score (|w| x input norm) keeps lower perplexity "
          "than magnitude alone at the same 2:4 sparsity, with no retraining",
          f"{WANDA} (its 2:4 results against magnitude); {DING} (pruning)", TECHNIQUES,
          "perplexity", "lower", "wanda-2of4", "magnitude-2of4"),
    Claim("structured_prune_faster", "Structured pruning (heads and FFN channels sliced away) "
          "lowers latency (AL), where 2:4 zeros in dense tensors do not",
          f"{DING} (structured vs unstructured pruning); issue 22", TECHNIQUES, "al", "lower",
          "structured-25", "bf16"),
    Claim("no_single_best", "No single technique is best on every metric (each block's "
          "leaderboard columns, the metrics every technique of the group has)",
          "abstract (\"no single method is universally optimal\"); Fig. 2 (no row ranks 1 in "
          "every column)", r".+", "", "trade_off", exclude=OUR_ADDITIONS),
)


@dataclass
class _Value:
    """A technique's seed summary for one metric, plus why it has no value when it has none."""

    label: str
    mean: float
    std: float
    lo: float
    hi: float
    n: int
    unit: str
    why: str
    exact: bool = False
    status: str = "measured"  # the weakest status of the values averaged (seed_summary)

    def var_of_mean(self) -> float | None:
        """s² / n, the squared standard error of the mean; 0 for an exact metric, None when one
        seed leaves the spread unknown."""
        if self.n >= 2 and math.isfinite(self.std):
            return self.std ** 2 / self.n
        return 0.0 if self.exact else None


@dataclass(frozen=True)
class _Comparison:
    """``first`` against ``second`` on ``metric``: ``d`` > 0 when ``first`` is better (the
    claimed way), ``se`` its standard error (None: unknown, one seed), ``verdict`` by
    :func:`judge`."""

    first: _Value
    second: _Value
    d: float
    se: float | None
    verdict: str
    metric: str = ""

    @property
    def z(self) -> float:
        """d in standard errors (±inf when SE is 0); with SE unknown, d relative to the larger
        value, so that comparisons on different metrics still order."""
        if self.se is None:
            scale = max(abs(self.first.mean), abs(self.second.mean))
            return self.d / scale if scale else 0.0
        if self.se > 0:
            return self.d / self.se
        return math.copysign(math.inf, self.d) if self.d else 0.0


def judge(d: float, se: float | None) -> str:
    """The verdict rule: ``d`` (claimed way positive) against two standard errors ``se``."""
    if se is None:
        return ONE_SEED
    if d > 0 and d > Z * se:
        return HOLDS
    if d < 0 and d < -Z * se:
        return FAILS
    return INCONCLUSIVE


def welch_se(a: _Value, b: _Value) -> float | None:
    """sqrt(s1²/n1 + s2²/n2); None when either side's spread is unknown."""
    va, vb = a.var_of_mean(), b.var_of_mean()
    return None if va is None or vb is None else math.sqrt(va + vb)


def _compare(first: _Value, second: _Value, lower: bool, metric: str = "") -> _Comparison:
    """How much better ``first`` is than ``second`` (``lower``: lower is better); an exact tie
    is d = 0."""
    a, b = first.mean, second.mean
    d = 0.0 if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) else (b - a if lower else a - b)
    se = welch_se(first, second)
    return _Comparison(first, second, d, se, judge(d, se), metric)


_RANK = {FAILS: 0, ONE_SEED: 1, INCONCLUSIVE: 2, HOLDS: 3}


def _all(items: list[tuple[str, _Comparison]]) -> tuple[str, _Comparison]:
    """Every part must hold, one that fails decides: (verdict, deciding comparison), the
    comparison most against the claim (the closest one when all hold)."""
    verdicts = {v for v, _ in items}
    verdict = (FAILS if FAILS in verdicts else HOLDS if verdicts == {HOLDS}
               else ONE_SEED if ONE_SEED in verdicts else INCONCLUSIVE)
    return verdict, min(items, key=lambda item: (_RANK[item[0]], item[1].z))[1]


def _any(comps: list[_Comparison]) -> tuple[str, _Comparison]:
    """One part that holds is enough, all must fail for a failure: (verdict, the clearest
    holding comparison, else the closest one)."""
    verdicts = {c.verdict for c in comps}
    if HOLDS in verdicts:
        return HOLDS, max((c for c in comps if c.verdict == HOLDS), key=lambda c: c.z)
    if verdicts == {FAILS}:
        return FAILS, max(comps, key=lambda c: c.z)
    open_ = [c for c in comps if c.verdict != FAILS]
    return (ONE_SEED if ONE_SEED in verdicts else INCONCLUSIVE), max(open_, key=lambda c: c.z)


def _values(rows: pd.DataFrame, metric: str, exact: bool = False) -> dict[str, _Value]:
    summary = seed_summary(rows, [metric], by=("technique", "label"))
    units = rows.get(companion(metric, "unit"), pd.Series(dtype=object)).dropna()
    unit = str(units.iloc[0]) if len(units) else (METRICS[metric].unit if metric in METRICS
                                                  else "")
    exact = exact or metric in DETERMINISTIC
    out = {}
    for _, s in summary.iterrows():
        mine = rows[rows["technique"] == s["technique"]]
        notes = (mine.get(companion(metric, "note"), pd.Series(dtype=object)).dropna()
                 .astype(str).loc[lambda x: x != ""])
        why = (f"{_label(metric)} unavailable"
               + (f" ({notes.iloc[0]})" if len(notes) else
                  " (no run reports it)" if metric not in rows else ""))
        out[s["technique"]] = _Value(str(s["label"]), float(s[metric]),
                                     float(s[companion(metric, "std")]),
                                     float(s[companion(metric, "lo")]),
                                     float(s[companion(metric, "hi")]),
                                     int(s[companion(metric, "n")]), unit, why, exact,
                                     str(s[companion(metric, "status")]))
    return out


def _label(metric: str) -> str:
    return METRICS[metric].label if metric in METRICS else metric


def _fmt(v: _Value) -> str:
    if not math.isfinite(v.mean):
        return f"{v.label} {MISSING}"
    unit = f" {v.unit}" if v.unit not in ("", "1", "fraction") else ""
    return f"{v.label} {format_number(v.mean)}{unit}"


def _spread(v: _Value) -> str:
    """Seed standard deviation and count, as the verdict uses them."""
    if not math.isfinite(v.mean):
        return f"{v.label} {MISSING}"
    if v.n < 2:
        return f"{v.label} n=1" + (" (exact)" if v.exact else "")
    return f"{v.label} sd {format_number(v.std)} (n={v.n})"


def difference_text(d: float, se: float | None) -> str:
    """e.g. "0.500 (SE 0.0707, 7.07 SE)"; "SE unknown" with one seed, "exact" when SE is 0."""
    if not math.isfinite(d):
        return MISSING
    if se is None:
        return f"{format_number(d)} (SE unknown: 1 seed)"
    if se == 0:
        return f"{format_number(d)} (exact)"
    return f"{format_number(d)} (SE {format_number(se)}, {format_number(d / se)} SE)"


def _row(claim: Claim, group: object, **fields) -> dict:
    """A result row, "not measurable here" until a comparison fills it in."""
    return {"claim": claim.key, "text": claim.text, "source": claim.source, "block": "",
            "group": group, "metric": claim.metric, "subject": claim.subject,
            "compared": claim.other or "", "subject_value": np.nan, "rival": "",
            "rival_value": np.nan, "difference": np.nan, "std_error": np.nan, "values": "",
            "spread": "", "seeds": np.nan, "verdict": UNMEASURABLE, "reason": "", **fields}


def _result(row: dict, verdict: str, c: _Comparison, seeds: int, reason: str) -> dict:
    return {**row, "verdict": verdict, "difference": c.d,
            "std_error": np.nan if c.se is None else c.se, "seeds": seeds, "reason": reason}


def _check_pair(claim: Claim, values: dict[str, _Value], subject: str, other: str | None,
                row: dict, second: dict[str, _Value] | None = None,
                ratio: _Value | None = None) -> dict:
    """Verdict of one comparison in one group (``row`` holds the identity fields; for an
    ``agree`` claim ``second`` the values of ``metric2`` and ``ratio`` the subject's per-run
    ``metric`` / ``metric2``)."""
    ranked = claim.kind in ("lowest", "highest")
    wanted = [t for t in values if t != subject and (claim.among is None or t in claim.among)
              ] if ranked else ([other] if other else [])
    if ranked and claim.every:  # each rival by name, configured or not
        wanted = [t for t in claim.among if t != subject]
    if claim.kind in ("lower", "higher", "drop") and other is None:
        return {**row, "reason": "no technique to compare with in this group"}
    missing = [t for t in [subject, *wanted] if t not in values]
    if subject not in values or ((not ranked or claim.every) and missing):
        unavailable = [v.why + f" for {v.label}" for t, v in values.items()
                       if t in (subject, *wanted) and not math.isfinite(v.mean)]
        absent = f"{', '.join(missing)} not in this group (not configured)"
        return {**row, "reason": "; ".join([absent, *unavailable])}
    s = values[subject]
    others = [values[t] for t in wanted]
    row.update(subject=s.label, compared=", ".join(v.label for v in others),
               values="; ".join(_fmt(v) for v in [s, *others]),
               spread="; ".join(_spread(v) for v in [s, *others]), subject_value=s.mean)
    if claim.kind == "agree":
        return _check_agree(claim, row, s, second[subject], ratio)
    if claim.kind == "at_least":
        if not math.isfinite(s.mean):
            return {**row, "reason": s.why}
        var = s.var_of_mean()
        se = None if var is None else math.sqrt(var)
        c = _Comparison(s, s, s.mean - claim.bound, se, judge(s.mean - claim.bound, se))
        return _result({**row, "rival": f"bound {format_number(claim.bound)}",
                        "rival_value": claim.bound}, c.verdict, c, s.n,
                       f"{_fmt(s)} (needs >= {format_number(claim.bound)})"
                       + _estimated([s]))
    unavailable = [v for v in [s, *others] if not math.isfinite(v.mean)]
    if not math.isfinite(s.mean):
        return {**row, "reason": s.why}
    others = [v for v in others if math.isfinite(v.mean)]
    if not others:
        return {**row, "reason": "; ".join(v.why + f" for {v.label}" for v in unavailable)
                or "no other technique to compare with"}
    if claim.kind == "drop":
        ref = others[0]
        d = _bound(claim, ref) - _loss(claim, s, ref)
        se = welch_se(s, ref)
        verdict, c = judge(d, se), _Comparison(s, ref, d, se, judge(d, se))
    else:
        lower = claim.kind in ("lowest", "lower")
        verdict, c = _all([(c.verdict, c) for c in (_compare(s, v, lower) for v in others)])
    left_out = [f"{v.label}: {v.why}" for v in unavailable]
    reason = _reason(claim, s, c) + (
        "; not compared (no value): " + "; ".join(left_out) if left_out else "") + _estimated(
        [s, *others])
    return _result({**row, "rival": c.second.label, "rival_value": c.second.mean}, verdict, c,
                   min(s.n, c.second.n), reason)


def _higher(claim: Claim) -> bool:
    return METRICS[claim.metric].higher_is_better if claim.metric in METRICS else True


def _loss(claim: Claim, s: _Value, ref: _Value) -> float:
    """How much worse the subject is than the reference (``drop``), in the metric's units."""
    return ref.mean - s.mean if _higher(claim) else s.mean - ref.mean


def _bound(claim: Claim, ref: _Value) -> float:
    return claim.bound * abs(ref.mean) if claim.relative else claim.bound


def _ratio(claim: Claim, rows: pd.DataFrame) -> _Value:
    """The subject's per-run ``metric`` / ``metric2`` over its seeds (``agree`` claims)."""
    mine = rows[rows["technique"] == claim.subject]
    num, den = (mine[m].astype(float) if m in mine else pd.Series(np.nan, index=mine.index)
                for m in (claim.metric, claim.metric2))
    ratio = (num / den.where(den != 0)).dropna()
    label = mine["label"].iloc[0] if len(mine) else claim.subject
    return _Value(str(label), float(ratio.mean()) if len(ratio) else math.nan,
                  float(ratio.std(ddof=1)) if len(ratio) > 1 else math.nan,
                  float(ratio.min()) if len(ratio) else math.nan,
                  float(ratio.max()) if len(ratio) else math.nan, len(ratio), "1", "",
                  claim.exact)


def _check_agree(claim: Claim, row: dict, s: _Value, nominal: _Value, ratio: _Value) -> dict:
    """Subject's ``metric`` / ``metric2`` >= 1 - bound (e.g. measured vs nominal MCR), judged on
    the per-run ratio."""
    row = {**row, "values": f"{_fmt(s)} ({claim.metric}); {_fmt(nominal)} ({claim.metric2})",
           "spread": f"{_spread(s)}; {_spread(nominal)}; ratio {_spread(ratio).split(' ', 1)[1]}"}
    if not (math.isfinite(s.mean) and math.isfinite(nominal.mean) and math.isfinite(ratio.mean)):
        return {**row, "reason": s.why if not math.isfinite(s.mean) else nominal.why
                if not math.isfinite(nominal.mean) else "no run has both values"}
    target = 1 - claim.bound
    var = ratio.var_of_mean()
    se = None if var is None else math.sqrt(var)
    c = _Comparison(ratio, nominal, ratio.mean - target, se, judge(ratio.mean - target, se))
    reason = (f"{claim.metric} / {claim.metric2} = {format_number(ratio.mean)} per run "
              f"(needs >= {format_number(target)})") + _estimated([s, nominal])
    return _result({**row, "rival": f"{s.label} {claim.metric2}", "rival_value": nominal.mean},
                   c.verdict, c, ratio.n, reason)


def _estimated(values: list[_Value]) -> str:
    """A note naming the compared values that are estimated, not measured (e.g. CPU energy)."""
    names = [v.label for v in values if v.status == "estimated"]
    return f"; estimated, not measured: {', '.join(names)}" if names else ""


def _reason(claim: Claim, s: _Value, c: _Comparison) -> str:
    if claim.kind == "drop":
        first, second = ((c.second, s) if _higher(claim) else (s, c.second))
        return (f"drop {first.label} - {second.label} = {format_number(_loss(claim, s, c.second))}"
                f" (bound {format_number(_bound(claim, c.second))}"
                + (f" = {format_number(claim.bound)} x {c.second.label})" if claim.relative
                   else ")"))
    word = {"lowest": "deciding rival", "highest": "deciding rival"}.get(claim.kind, "against")
    return f"{word}: {_fmt(c.second)}"


def _check_trade_off(claim: Claim, rows: pd.DataFrame, row: dict) -> dict:
    """No technique best on every metric of the stage's leaderboard columns (see the module
    docstring); compared on the metrics every technique of the group has."""
    rows = rows[~rows["technique"].isin(claim.exclude)]
    stage = str(rows["stage"].iloc[0]) if "stage" in rows and len(rows) else ""
    candidates = STAGE_METRICS.get(stage, ())
    values = {m: _values(rows, m) for m in candidates}
    techniques = list(dict.fromkeys(rows["technique"]))
    used = [m for m in candidates
            if all(t in values[m] and math.isfinite(values[m][t].mean) for t in techniques)]
    skipped = [_label(m) for m in candidates if m not in used]
    row["metric"] = ", ".join(used)
    note = f"; not every technique has {', '.join(skipped)}" if skipped else ""
    if len(techniques) < 2 or not used:
        return {**row, "reason": ("fewer than two techniques" if len(techniques) < 2 else
                                  "no metric every technique has") + note}
    best = {m: min(values[m].values(), key=lambda v: -v.mean if METRICS[m].higher_is_better
                   else v.mean) for m in used}
    row.update(values="; ".join(f"{_label(m)}: {_fmt(best[m])}" for m in used),
               spread="; ".join(f"{_label(m)}: {_spread(best[m])}" for m in used),
               compared=", ".join(values[used[0]][t].label for t in techniques))
    # Per technique T, each challenger R and metric m: d > 0 when R is better than T on m.
    status = {t: _any([_compare(values[m][r], values[m][t], not METRICS[m].higher_is_better, m)
                       for m in used for r in techniques if r != t]) for t in techniques}
    verdict, c = _all(list(status.values()))
    subject, challenger = c.second, c.first
    contest = f"{_label(c.metric)} against {challenger.label}"
    what = {HOLDS: f"every technique is beaten on some metric by more than {Z:g} SE; the "
                   f"least clearly beaten, {subject.label}, loses {contest}",
            FAILS: f"{subject.label} is best on every metric by more than {Z:g} SE; its "
                   f"closest contest: {contest}",
            INCONCLUSIVE: f"{subject.label} is neither beaten on a metric nor best on all by "
                          f"more than {Z:g} SE; its closest contest: {contest}",
            ONE_SEED: f"spread unknown (1 seed); by the means {subject.label} "
                      + (f"is first on every metric (closest: {contest})" if c.d <= 0 else
                         f"comes closest to first on every metric, its largest gap {contest}"),
            }[verdict]
    row.update(subject=subject.label, subject_value=subject.mean,
               rival=f"{challenger.label} ({_label(c.metric)})", rival_value=challenger.mean)
    parts = []  # the estimated (not measured) values, per metric
    for m in used:
        names = [v.label for v in values[m].values() if v.status == "estimated"]
        if names:
            every = len(names) == len(values[m])
            parts.append(_label(m) + ("" if every else f" of {', '.join(names)}"))
    estimated = f"; estimated, not measured: {'; '.join(parts)}" if parts else ""
    return _result(row, verdict, c, min(v.n for m in used for v in values[m].values()),
                   what + note + estimated)


def comparison_groups(block_rows: pd.DataFrame) -> pd.Series:
    """The group each row is compared in: its table group, except that an inference group named
    after one seed's served run (``finetune/lora-gqa-small-s0``) pools the seeds of that served
    configuration (``finetune/lora-gqa-small``), so that its seeds give a spread."""
    groups = block_rows["group"].astype(str)
    if "stage" not in block_rows or "seed" not in block_rows:
        return groups
    served = block_rows["stage"].astype(str).eq("inference")
    return pd.Series([re.sub(rf"-s{int(seed)}$", "", g) if s and pd.notna(seed) else g
                      for g, s, seed in zip(groups, served, block_rows["seed"])],
                     index=block_rows.index)


def check_claims(df: pd.DataFrame, claims: Sequence[Claim] = CLAIMS) -> pd.DataFrame:
    """One row per claim and comparison group (:data:`COLUMNS`); a claim whose block, technique
    or groups are not in the table gets one ``not measurable here`` row saying so."""
    out = []
    for claim in claims:
        block_rows = df[df["block"].astype(str).str.fullmatch(claim.block)]
        if block_rows.empty:
            name = claim.block.split("(")[0]  # the block's name, without its regex suffix
            out.append(_row(claim, "", reason=f"block {name!r} not in this configuration"))
            continue
        block_rows = block_rows.assign(group=comparison_groups(block_rows))
        groups = [(block, group, rows) for (block, group), rows in
                  block_rows.groupby(["block", "group"], sort=False)]
        in_scope = [g for g in groups if claim.applies is None
                    or claim.applies(g[2], block_rows[block_rows["block"] == g[0]])]
        if not in_scope:
            out.append(_row(claim, "", block=", ".join(dict.fromkeys(g[0] for g in groups)),
                            reason=claim.scope or "no group in scope"))
            continue
        for block, group, rows in in_scope:
            base = _row(claim, group, block=block)
            if claim.kind == "trade_off":
                out.append(_check_trade_off(claim, rows, base))
                continue
            agree = claim.kind == "agree"  # there ``exact`` is about the ratio, not the metrics
            values = _values(rows, claim.metric, claim.exact and not agree)
            second = _values(rows, claim.metric2) if agree else None
            ratio = _ratio(claim, rows) if agree else None
            pairs = claim.pairs(rows) if claim.pairs else [(claim.subject, claim.other)]
            if not pairs:
                out.append({**base, "reason": "no such technique in this group"})
            for subject, other in pairs:
                out.append(_check_pair(claim, values, subject, other, dict(base), second,
                                       ratio))
    table = pd.DataFrame(out)
    return table.reindex(columns=COLUMNS)


def verdict_summary(rows: pd.DataFrame) -> str:
    """One claim's verdicts over its groups, e.g. "holds in 2 of 3 groups (a, b); does not
    hold in 1 of 3 groups (c)", or "a: holds" for a single group."""
    texts = [str(v) for v in rows["verdict"]]
    groups = [str(g) if isinstance(g, str) and g else "" for g in rows["group"]]
    if len(texts) == 1:
        return (f"{groups[0]}: " if groups[0] else "") + texts[0]
    parts = []
    for text in dict.fromkeys(texts):
        named = [g for g, t in zip(groups, texts) if t == text]
        which = f" ({', '.join(named)})" if len(named) < len(texts) else ""
        parts.append(f"{text} in {len(named)} of {len(texts)} groups{which}")
    return "; ".join(parts)


RULE = ("Verdicts take the seed spread into account. *d* is the difference of the two seed means, "
        "signed so that *d* > 0 is the way the paper claims; *SE* = sqrt(s1\u00b2/n1 + "
        "s2\u00b2/n2) is its standard error (s: sample standard deviation over the seeds, n: "
        "seeds with a value). **holds**: *d* > 2 SE; **does not hold**: *d* < \u22122 SE; "
        "**inconclusive**: in between (an exact tie included); **inconclusive (1 seed)**: a "
        "value has one seed, so its spread is unknown, and the metric is not fixed by the "
        "configuration (parameter counts, weight bytes, FLOPs counted on a full batch, KV bytes "
        "per token are, so their SE is 0). \"Lowest\"/\"highest\" claims compare the subject "
        "with every rival and need each comparison to hold; the rival shown decides. \"No "
        "single technique is best\" holds when every technique is beaten by more than 2 SE on "
        "some metric. Two standard errors is a rule of thumb, not a significance test.")


def claims_markdown(table: pd.DataFrame) -> str:
    """A summary (one line per claim) and the details (one line per claim and group)."""
    def esc(text: object) -> str:
        return str(text).replace("|", r"\|")

    lines = ["# The paper's rank-level claims, checked on this run", "", RULE, "",
             "## Summary", "", "| claim | paper | verdict per group |", "|:---|:---|:---|"]
    for _, rows in table.groupby("claim", sort=False):
        first = rows.iloc[0]
        lines.append(f"| {esc(first['text'])} | {esc(first['source'])} | "
                     f"{esc(verdict_summary(rows))} |")
    lines += ["", "## Details", "",
              ("| claim | group | measured (mean over seeds) | seed spread (sd, n) | d (SE) | "
               "verdict | reason |"), "|:---|:---|:---|:---|:---|:---|:---|"]
    for _, r in table.iterrows():
        se = r["std_error"]
        diff = (difference_text(r["difference"], None if pd.isna(se) else float(se))
                if pd.notna(r["difference"]) else MISSING)
        cells = [r["claim"], r["group"] or MISSING, r["values"] or MISSING,
                 r["spread"] or MISSING, diff, r["verdict"], r["reason"]]
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_claims(normalised_csv: str | os.PathLike, out_md: str | os.PathLike,
                 out_csv: str | os.PathLike) -> pd.DataFrame:
    """Check every claim against the normalised table; write the Markdown report and the CSV."""
    table = check_claims(read_table(normalised_csv))
    with atomic_file(out_csv) as handle:
        table.to_csv(handle, index=False)
    with atomic_file(out_md) as handle:
        handle.write(claims_markdown(table))
    return table
