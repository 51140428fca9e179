"""Quality of a model on held-out data: completion loss, token accuracy, exact match, perplexity.

Shared by fine-tuning (to score the trained adapter) and inference (to score each precision), so
that "accuracy" means the same thing at both stages.

Under torchrun (fine-tuning on several ranks) every rank scores its share of the problems and the
counts are summed: a sharded (ZeRO-3) model is never gathered whole onto one device to be
scored. Its forward passes are collectives, so every rank runs the same number of batches (the
shares are padded, the padding not counted) and generation steps (``synced_gpus``).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from effllm.data.sft import collate, encode_example
from effllm.distributed import is_distributed, is_main, rank_share, summed
from effllm.evaluation.logprobs import token_scores
from effllm.evaluation.perplexity import finite_metric, safe_exp
from effllm.records import Metric


@torch.no_grad()
def completion_scores(model, tokenizer, problems: list[dict], max_length: int,
                      batch_size: int = 16, device=None) -> dict[str, float]:
    """Teacher-forced mean NLL and next-token accuracy on the completions (prompts excluded),
    never holding a batch's full logits. Inputs go to ``device`` (by default the model's)."""
    model.eval()
    device = device or model.device
    share, counted = rank_share(problems)
    nll, correct, count = 0.0, 0, 0
    for i in range(0, len(share), batch_size):
        chunk = share[i:i + batch_size]
        batch = collate([encode_example(tokenizer, p["prompt"], p["completion"], max_length)
                         for p in chunk], tokenizer.pad_token_id)
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        targets[max(0, counted - i):] = -100  # padding rows of this rank's share
        part, hits, scored = token_scores(model, batch["input_ids"].to(device),
                                          batch["attention_mask"].to(device), targets.to(device))
        nll, correct, count = nll + part, correct + hits, count + scored
    nll, correct, count = summed(nll, correct, count)
    return {"loss": nll / count, "token_accuracy": correct / count, "tokens": int(count)}


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int,
                     batch_size: int = 16, desc: str = "generate", device=None) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches), stopping at end-of-sequence.
    Under torchrun each rank passes its own prompts and the ranks step together until all stop."""
    model.eval()
    tokenizer.padding_side = "left"
    outputs = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, mininterval=2.0,
                  disable=not is_main()):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device or model.device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, synced_gpus=is_distributed())
        outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
    return outputs


def exact_match_rate(model, tokenizer, problems: list[dict], max_new_tokens: int,
                     budget_key: str, desc: str = "exact match", device=None
                     ) -> tuple[float, int] | None:
    """Share of problems whose generated final answer equals the reference; None without answers.

    Refuses a generation budget shorter than a reference completion: that would score 0 by
    construction, not by the model's fault.
    """
    from effllm.data.reasoning import exact_match

    scored = [p for p in problems if p.get("answer") is not None]
    if not scored:
        return None
    longest = max(len(tokenizer(p["completion"], add_special_tokens=False)["input_ids"]) + 1
                  for p in scored)
    if longest > max_new_tokens:
        raise ValueError(f"config key '{budget_key}': {max_new_tokens} new tokens cannot hold the "
                         f"longest reference completion ({longest} tokens with end-of-text)")
    share, counted = rank_share(scored)
    texts = generate_answers(model, tokenizer, [p["prompt"] for p in share], max_new_tokens,
                             desc=desc, device=device)
    hits, = summed(sum(exact_match(t, p["answer"]) for t, p in zip(texts[:counted], share)))
    return hits / len(scored), len(scored)


def reasoning_metrics(model, tokenizer, problems: list[dict], max_length: int,
                      max_new_tokens: int, budget_key: str, desc: str, device=None
                      ) -> dict[str, Metric]:
    """Quality on held-out reasoning problems, as Metrics: completion perplexity, token accuracy,
    exact match (unavailable without reference answers) and ``performance``, their mean."""
    scores = completion_scores(model, tokenizer, problems, max_length, device=device)
    em = exact_match_rate(model, tokenizer, problems, max_new_tokens, budget_key, desc, device)
    n = f"{len(problems)} held-out problems"
    out = {
        "completion_perplexity": finite_metric(safe_exp(scores["loss"]), "1",
                                               "exp_mean_nll_completions",
                                               f"{scores['tokens']} completion tokens, {n}"),
        "token_accuracy": Metric.measured(scores["token_accuracy"], "fraction",
                                          "teacher_forced_argmax_completions", n),
    }
    if em is None:
        out["exact_match"] = Metric.unavailable("fraction", "greedy_final_answer_match",
                                                "the data set has no reference answers")
        out["performance"] = Metric.measured(scores["token_accuracy"], "fraction",
                                             "token_accuracy (no reference answers)")
    else:
        out["exact_match"] = Metric.measured(em[0], "fraction", "greedy_final_answer_match",
                                             f"{em[1]} held-out problems")
        out["performance"] = Metric.measured((em[0] + scores["token_accuracy"]) / 2, "fraction",
                                             "mean(exact_match, token_accuracy)")
    return out
