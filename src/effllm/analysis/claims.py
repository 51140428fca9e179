"""The paper's rank-level claims (docs/protocol.md §7 and the abstract), checked on this run's
numbers.

Each :class:`Claim` says which block, metric and techniques the paper compares and in which
direction; :func:`check_claims` reads the values from the normalised table, averages the seeds
with :func:`effllm.analysis.seeds.seed_summary` and gives one verdict per claim and comparison
group. The claims themselves are the paper's; every number and verdict comes from the table.

Verdicts: ``holds`` / ``does not hold`` on the seed means, or ``not measurable here`` with the
reason (the metric is unavailable, e.g. energy on a CPU; the technique or block is not in the
configuration). The ``margin`` column says how much the verdict is worth: ``beyond seed spread``
(the min-max ranges of the two values compared do not overlap), ``within seed spread`` (they
overlap: the order could flip with another seed), ``tied`` (equal means) or ``1 seed: spread
unknown``. The paper reports agreement per claim, not one pass/fail (docs/protocol.md §7).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from effllm.analysis.aggregate import companion, read_table
from effllm.analysis.seeds import seed_summary
from effllm.analysis.tables import MISSING, format_number
from effllm.io import atomic_file
from effllm.records import METRICS

HOLDS, FAILS, UNMEASURABLE = "holds", "does not hold", "not measurable here"
BEYOND, WITHIN, TIED, ONE_SEED = ("beyond seed spread", "within seed spread", "tied",
                                  "1 seed: spread unknown")
COLUMNS = ["claim", "text", "source", "block", "group", "metric", "subject", "compared",
           "subject_value", "rival", "rival_value", "values", "spread", "seeds", "verdict",
           "margin", "reason"]
PAPER_ATTENTION = ("mqa", "gqa", "mla", "nsa")  # the paper's four (no MHA)
PAPER_POSITION = ("rope", "sinusoidal", "learned", "relative", "none")  # no ALiBi in the paper
FINETUNE = r"finetune(_.+)?"  # the primary fine-tuning set and each further one (table 8)

Pairs = Callable[[pd.DataFrame], list[tuple[str, str | None]]]


@dataclass(frozen=True)
class Claim:
    """One claim: ``subject`` is ``lowest``/``highest`` among ``among`` (None: every technique of
    the group), or ``lower``/``higher`` than ``other``, or within ``bound`` of ``other``
    (``drop``: other - subject <= bound), or ``agree`` (subject's ``metric`` / ``metric2`` >=
    1 - bound). Raw values, so "lowest AMU" reads as written. ``pairs`` replaces subject/other
    for claims whose partners depend on the data (MoE vs the dense model of equal active
    parameters); ``applies`` keeps only the groups a claim is about (the 14B threshold)."""

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
    applies: Callable[[pd.DataFrame], bool] | None = None
    scope: str = ""  # why a group is out of scope, when ``applies`` rejects every group


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


def base_params(rows: pd.DataFrame) -> float:
    """Parameters of a fine-tuning group's base model: its smallest run (adapters only add)."""
    values = rows["params_total"].astype(float) if "params_total" in rows else pd.Series([np.nan])
    return float(values.min()) if values.notna().any() else math.nan


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
    Claim("moe_lower_ppl", "MoE has lower perplexity than a dense model of equal active "
          "parameters",
          "abstract; docs/protocol.md §7 (3); table 5 (MoE 1.5Bx8 7.10 vs dense 1.5B 8.09)",
          "moe", "perplexity", "lower", pairs=moe_vs_dense),
    Claim("moe_higher_amu", "MoE uses more memory (AMU) than a dense model of equal active "
          "parameters (\"+40% VRAM\")",
          "abstract; docs/protocol.md §7 (3); table 5 (76.53 vs 44.82 GB)",
          "moe", "amu", "higher", pairs=moe_vs_dense),
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
    Claim("rslora_below_14b", "Below 14B parameters RSLoRA does not surpass LoRA's efficiency "
          "(Efficiency Score)", "abstract (\"RSLoRA surpasses LoRA efficiency only beyond 14B\")",
          FINETUNE, "efficiency_score", "lower", "rslora", "lora",
          applies=lambda rows: base_params(rows) < 14e9, scope="no base model below 14B"),
    Claim("rslora_from_14b", "From 14B parameters on RSLoRA surpasses LoRA's efficiency "
          "(Efficiency Score)", "abstract (\"RSLoRA surpasses LoRA efficiency only beyond 14B\")",
          FINETUNE, "efficiency_score", "higher", "rslora", "lora",
          applies=lambda rows: base_params(rows) >= 14e9,
          scope="no base model of 14B parameters or more in this configuration"),
    Claim("int4_lower_amu", "int4 uses less memory (AMU) than bf16",
          "docs/protocol.md §7 (6); table 9 (e.g. Qwen2.5-32B 71.33 -> 48.30 GB)", "inference",
          "amu", "lower", "int4", "bf16"),
    Claim("int4_small_drop", "int4 costs at most a few points of average performance against "
          "bf16 (\"3-5% accuracy drop\"; bound: 5 points)",
          "abstract; docs/protocol.md §7 (6); table 9",
          "inference", "performance", "drop", "int4", "bf16", bound=0.05),
    Claim("int4_mcr_4x", "int4 compresses the model about 4x: MCR = 4 x performance retention "
          "(the paper's \"3.9x\", from nominal bits); checked as measured-bytes MCR >= 90% of "
          "the nominal",
          "abstract; docs/protocol.md §7 (6); docs/metrics.md §8 (MCR from nominal bits)",
          "inference", "mcr_measured", "agree", "int4", metric2="mcr_nominal", bound=0.1),
    Claim("bf16_aec_le_fp16", "bf16 draws no more power (AEC) than fp16 (Hopper-specific: not "
          "expected on other hardware)", "docs/protocol.md §7 (7); table 9 (144.39 vs 158.96 W)",
          "inference", "aec", "lower", "bf16", "fp16"),
)


@dataclass
class _Value:
    """A technique's seed summary for one metric, plus why it has no value when it has none."""

    label: str
    mean: float
    lo: float
    hi: float
    n: int
    unit: str
    why: str


def _values(rows: pd.DataFrame, metric: str) -> dict[str, _Value]:
    summary = seed_summary(rows, [metric], by=("technique", "label"))
    units = rows.get(companion(metric, "unit"), pd.Series(dtype=object)).dropna()
    unit = str(units.iloc[0]) if len(units) else (METRICS[metric].unit if metric in METRICS
                                                  else "")
    out = {}
    for _, s in summary.iterrows():
        mine = rows[rows["technique"] == s["technique"]]
        notes = (mine.get(companion(metric, "note"), pd.Series(dtype=object)).dropna()
                 .astype(str).loc[lambda x: x != ""])
        why = (f"{METRICS[metric].label if metric in METRICS else metric} unavailable"
               + (f" ({notes.iloc[0]})" if len(notes) else
                  " (no run reports it)" if metric not in rows else ""))
        out[s["technique"]] = _Value(str(s["label"]), float(s[metric]),
                                     float(s[companion(metric, "lo")]),
                                     float(s[companion(metric, "hi")]),
                                     int(s[companion(metric, "n")]), unit, why)
    return out


def _fmt(v: _Value) -> str:
    if not math.isfinite(v.mean):
        return f"{v.label} {MISSING}"
    unit = f" {v.unit}" if v.unit not in ("", "1", "fraction") else ""
    return f"{v.label} {format_number(v.mean)}{unit}"


def _spread(v: _Value) -> str:
    if not math.isfinite(v.mean):
        return f"{v.label} {MISSING}"
    if v.n < 2:
        return f"{v.label} n=1"
    return f"{v.label} {format_number(v.lo)}\u2013{format_number(v.hi)} (n={v.n})"


def _margin(a: _Value, b: _Value) -> str:
    """How far apart two compared values are, given their seeds."""
    if math.isclose(a.mean, b.mean, rel_tol=1e-9, abs_tol=1e-15):
        return TIED
    if min(a.n, b.n) < 2:
        return ONE_SEED
    return BEYOND if a.hi < b.lo or b.hi < a.lo else WITHIN


def _order(subject: _Value, others: list[_Value], lower: bool) -> tuple[str, str, _Value]:
    """Subject below (``lower``) or above every other, on the means; ties count as holding
    (a shared rank, as the leaderboard's ranks share them). Returns the verdict, the margin
    against the closest rival and that rival."""
    sign = 1.0 if lower else -1.0
    rival = min(others, key=lambda v: sign * v.mean)
    tied = math.isclose(subject.mean, rival.mean, rel_tol=1e-9, abs_tol=1e-15)
    holds = tied or sign * subject.mean < sign * rival.mean
    return (HOLDS if holds else FAILS), _margin(subject, rival), rival


def _row(claim: Claim, group: object, **fields) -> dict:
    """A result row, "not measurable here" until a comparison fills it in."""
    return {"claim": claim.key, "text": claim.text, "source": claim.source, "block": "",
            "group": group, "metric": claim.metric, "subject": claim.subject,
            "compared": claim.other or "", "subject_value": np.nan, "rival": "",
            "rival_value": np.nan, "values": "", "spread": "", "seeds": np.nan,
            "verdict": UNMEASURABLE, "margin": "", "reason": "", **fields}


def _check_pair(claim: Claim, values: dict[str, _Value], subject: str, other: str | None,
                row: dict, second: dict[str, _Value] | None = None) -> dict:
    """Verdict of one comparison in one group (``row`` holds the identity fields; ``second``
    the values of ``metric2`` for an ``agree`` claim)."""
    wanted = ([other] if other else []) if claim.kind not in ("lowest", "highest") else [
        t for t in values if t != subject and (claim.among is None or t in claim.among)]
    if claim.kind in ("lower", "higher", "drop") and other is None:
        return {**row, "reason": "no technique to compare with in this group"}
    missing = [t for t in [subject, *wanted] if t not in values]
    if subject not in values or (claim.kind not in ("lowest", "highest") and missing):
        unavailable = [v.why + f" for {v.label}" for t, v in values.items()
                       if t in (subject, *wanted) and not math.isfinite(v.mean)]
        return {**row, "reason": "; ".join([f"{', '.join(missing)} not in this group (not "
                                            "configured)", *unavailable])}
    s = values[subject]
    others = [values[t] for t in wanted]
    row.update(subject=s.label, compared=", ".join(v.label for v in others),
               values="; ".join(_fmt(v) for v in [s, *others]),
               spread="; ".join(_spread(v) for v in [s, *others]), subject_value=s.mean)
    if claim.kind == "agree":
        return _check_agree(claim, row, s, second[subject])
    unavailable = [v for v in [s, *others] if not math.isfinite(v.mean)]
    if not math.isfinite(s.mean):
        return {**row, "reason": s.why}
    others = [v for v in others if math.isfinite(v.mean)]
    if not others:
        return {**row, "reason": "; ".join(v.why + f" for {v.label}" for v in unavailable)
                or "no other technique to compare with"}
    if claim.kind == "drop":
        verdict, margin, rival = _check_drop(claim, s, others[0])
    else:
        lower = claim.kind in ("lowest", "lower")
        verdict, margin, rival = _order(s, others, lower)
    left_out = [f"{v.label}: {v.why}" for v in unavailable]
    reason = _reason(claim, s, rival) + (
        "; not compared (no value): " + "; ".join(left_out) if left_out else "")
    return {**row, "rival": rival.label, "rival_value": rival.mean,
            "seeds": min(s.n, rival.n), "verdict": verdict, "margin": margin, "reason": reason}


def _check_drop(claim: Claim, s: _Value, ref: _Value) -> tuple[str, str, _Value]:
    """``ref`` - ``s`` <= bound on the means; beyond spread when the worst (best) seed pairing
    agrees with the verdict."""
    drop = ref.mean - s.mean
    holds = drop <= claim.bound + 1e-12
    if min(s.n, ref.n) < 2:
        return (HOLDS if holds else FAILS), ONE_SEED, ref
    worst, best = ref.hi - s.lo, ref.lo - s.hi
    sure = worst <= claim.bound if holds else best > claim.bound
    return (HOLDS if holds else FAILS), (BEYOND if sure else WITHIN), ref


def _check_agree(claim: Claim, row: dict, s: _Value, nominal: _Value) -> dict:
    """Subject's ``metric`` / ``metric2`` >= 1 - bound (e.g. measured vs nominal MCR)."""
    row = {**row, "values": f"{_fmt(s)} ({claim.metric}); {_fmt(nominal)} ({claim.metric2})",
           "spread": f"{_spread(s)}; {_spread(nominal)}"}
    if not (math.isfinite(s.mean) and math.isfinite(nominal.mean)) or nominal.mean == 0:
        why = s.why if not math.isfinite(s.mean) else nominal.why
        return {**row, "reason": why}
    ratio = s.mean / nominal.mean
    holds = ratio >= 1 - claim.bound
    if min(s.n, nominal.n) < 2:
        margin = ONE_SEED
    else:
        low, high = s.lo / nominal.hi, s.hi / nominal.lo
        margin = BEYOND if (low >= 1 - claim.bound if holds else high < 1 - claim.bound) \
            else WITHIN
    reason = (f"{claim.metric} / {claim.metric2} = {format_number(ratio)} "
              f"({'>=' if holds else '<'} {format_number(1 - claim.bound)})")
    return {**row, "rival": f"{s.label} {claim.metric2}", "rival_value": nominal.mean,
            "seeds": min(s.n, nominal.n), "verdict": HOLDS if holds else FAILS,
            "margin": margin, "reason": reason}


def _reason(claim: Claim, s: _Value, rival: _Value) -> str:
    if claim.kind == "drop":
        return (f"drop {rival.label} - {s.label} = {format_number(rival.mean - s.mean)} "
                f"(bound {format_number(claim.bound)})")
    word = {"lowest": "closest rival", "highest": "closest rival"}.get(claim.kind, "against")
    return f"{word}: {_fmt(rival)}"


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
        groups = [(block, group, rows) for (block, group), rows in
                  block_rows.groupby(["block", "group"], sort=False)]
        in_scope = [g for g in groups if claim.applies is None or claim.applies(g[2])]
        if not in_scope:
            out.append(_row(claim, "", block=", ".join(dict.fromkeys(g[0] for g in groups)),
                            reason=claim.scope or "no group in scope"))
            continue
        for block, group, rows in in_scope:
            values = _values(rows, claim.metric)
            base = _row(claim, group, block=block)
            second = _values(rows, claim.metric2) if claim.kind == "agree" else None
            pairs = claim.pairs(rows) if claim.pairs else [(claim.subject, claim.other)]
            if not pairs:
                out.append({**base, "reason": "no such technique in this group"})
            for subject, other in pairs:
                out.append(_check_pair(claim, values, subject, other, dict(base), second))
    table = pd.DataFrame(out)
    return table.reindex(columns=COLUMNS)


def verdict_text(row: pd.Series | dict) -> str:
    """The verdict as printed: e.g. "holds (within seed spread)"."""
    margin = row.get("margin")
    if row["verdict"] == UNMEASURABLE or not isinstance(margin, str) or margin in ("", BEYOND):
        return str(row["verdict"])
    return f"{row['verdict']} ({margin})"


def verdict_summary(rows: pd.DataFrame) -> str:
    """One claim's verdicts over its groups, e.g. "holds in 2 of 3 groups (a, b); does not
    hold in 1 of 3 groups (c)", or "a: holds" for a single group."""
    texts = [verdict_text(r) for _, r in rows.iterrows()]
    groups = [str(g) if isinstance(g, str) and g else "" for g in rows["group"]]
    if len(texts) == 1:
        return (f"{groups[0]}: " if groups[0] else "") + texts[0]
    parts = []
    for text in dict.fromkeys(texts):
        named = [g for g, t in zip(groups, texts) if t == text]
        which = f" ({', '.join(named)})" if len(named) < len(texts) else ""
        parts.append(f"{text} in {len(named)} of {len(texts)} groups{which}")
    return "; ".join(parts)


def claims_markdown(table: pd.DataFrame) -> str:
    """A summary (one line per claim) and the details (one line per claim and group)."""
    esc = lambda s: str(s).replace("|", r"\|")  # noqa: E731
    lines = ["# The paper's rank-level claims, checked on this run", "",
             "Verdicts on the seed means. Margin: *beyond seed spread* = the min\u2013max ranges "
             "over seeds of the two values compared do not overlap; *within seed spread* = they "
             "overlap, so another seed could flip the order; *1 seed: spread unknown* = one run "
             "each, no spread to judge by. Ties count as holding (a shared rank).", "",
             "## Summary", "", "| claim | paper | verdict per group |", "|:---|:---|:---|"]
    for _, rows in table.groupby("claim", sort=False):
        first = rows.iloc[0]
        lines.append(f"| {esc(first['text'])} | {esc(first['source'])} | "
                     f"{esc(verdict_summary(rows))} |")
    lines += ["", "## Details", "",
              "| claim | group | measured (mean over seeds) | spread (min\u2013max, seeds) | "
              "verdict | reason |", "|:---|:---|:---|:---|:---|:---|"]
    for _, r in table.iterrows():
        cells = [r["claim"], r["group"] or MISSING, r["values"] or MISSING,
                 r["spread"] or MISSING, verdict_text(r), r["reason"]]
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
