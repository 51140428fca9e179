"""Does weight sparsity buy speed on this CPU? A linear layer's product with dense weights vs the
same weights pruned (2:4 and 50 % unstructured, Wanda's patterns) and held as torch's sparse CSR
tensors, side by side in one run.

The techniques block (`inference.techniques`, `prune`) keeps pruned weights dense: its latency
is that of the dense model. This benchmark says what a sparse kernel would change here, for one
decode step (one token) and one prefill (64 tokens), in fp32 (torch's CPU CSR matmul has no bf16
path everywhere) at the default's width and at a 7B model's (4096 x 11008, Llama-2-7B's MLP).
2:4's fast path (`to_sparse_semi_structured`) exists on CUDA GPUs of sm80 or newer only.

    .venv/bin/python benchmarks/sparse_matmul.py [--repeats 50] [--threads 1]

No target: the printed ratio (dense time / sparse time) is the answer; above 1 sparsity pays.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

SHAPES = {"default small (384 x 128)": (384, 128), "7B MLP (11008 x 4096)": (11008, 4096)}


def pruned(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    from effllm.inference.techniques import sparsity_mask

    score = weight.abs()
    mask = (sparsity_mask(score, pattern="2:4") if pattern == "2:4"
            else sparsity_mask(score, sparsity=0.5))
    return weight * mask


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32, median of {args.repeats}")
    print(f"{'shape':28} {'tokens':>6} {'pattern':>8} {'dense ms':>9} {'CSR ms':>9} "
          f"{'dense/CSR':>9}")
    for name, (out_f, in_f) in SHAPES.items():
        weight = torch.randn(out_f, in_f)
        for tokens in (1, 64):
            x = torch.randn(in_f, tokens)
            for pattern in ("2:4", "50%"):
                w = pruned(weight, pattern)
                csr = w.to_sparse_csr()
                dense, _ = median_seconds(lambda: w @ x, args.repeats)
                sparse, _ = median_seconds(lambda: csr @ x, args.repeats)
                print(f"{name:28} {tokens:>6} {pattern:>8} {dense * 1e3:>9.3f} "
                      f"{sparse * 1e3:>9.3f} {dense / sparse:>9.2f}")


if __name__ == "__main__":
    main()
