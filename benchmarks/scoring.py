"""Blocked vs full-logit scoring: time and the largest tensor, side by side in one run.

Scores the same batches of a decoder twice, with ``effllm.evaluation.logprobs.token_scores``
(the head applied in blocks) and with the plain full-logit cross entropy, and prints the median
time of each and the largest tensor each makes (``tests/invariants.LargestTensor``'s rule).

    .venv/bin/python benchmarks/scoring.py [--vocab 32000 --hidden 256 --batch 8 --seq 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effllm.evaluation.logprobs import token_scores
from effllm.models import DecoderConfig, DecoderForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from invariants import LargestTensor  # noqa: E402


def full(model, ids, mask, targets):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    keep = targets != -100
    return F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * args.hidden,
        max_position_embeddings=args.seq)).eval()
    ids = torch.randint(2, args.vocab, (args.batch, args.seq))
    mask, targets = torch.ones_like(ids), F.pad(ids[:, 1:], (0, 1), value=-100)
    ways = {"blocked": lambda: token_scores(model, ids, mask, targets)[0],
            "full": lambda: full(model, ids, mask, targets)}
    results = {}
    with torch.no_grad():
        for name, run in ways.items():
            with LargestTensor() as probe:
                nll = run()
            seconds = []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - begin)
            results[name] = (statistics.median(seconds), probe.largest, nll)
    print(f"vocab {args.vocab}, hidden {args.hidden}, batch {args.batch} x {args.seq}")
    for name, (seconds, largest, nll) in results.items():
        print(f"{name:8s} {seconds * 1e3:9.1f} ms  largest tensor {largest / 1e6:8.1f} MB  "
              f"nll {nll:.4f}")
    b, f = results["blocked"], results["full"]
    print(f"blocked / full: time {b[0] / f[0]:.2f}x, largest tensor {b[1] / f[1]:.3f}x")


if __name__ == "__main__":
    main()
