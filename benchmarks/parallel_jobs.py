"""Throughput of the default grid's training steps: one job with every core vs one job per core.

The local profile can run a job at a time with ``measure.threads`` = all cores, or as many jobs as
cores with one thread each. At the default's model sizes a step is too small to keep two threads
busy, so the second layout should train more steps per second in total. This script measures
both on the same step (our decoder, the default's ``small`` shape and batch): one process with
``--cores`` threads, ``--cores`` processes with one thread each started together, and one process
with one thread alone; it prints steps/s of each layout, their ratio (target > 1: parallel jobs
win) and how much a neighbour slows a one-thread job's step (what parallel jobs cost the timings
they record).

    .venv/bin/python benchmarks/parallel_jobs.py [--cores 2 --steps 60 --hidden 128 --layers 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def worker(args, threads: int, start, out) -> None:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    from effllm.models import DecoderConfig, DecoderForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=3 * args.hidden, max_position_embeddings=args.seq))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):  # warm-up
        step()
    start.wait()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    out.put(time.perf_counter() - t0)


def layout(args, jobs: int, threads: int) -> float:
    """Total steps/s of ``jobs`` processes with ``threads`` threads each, timed together."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(args, threads, start, out)) for _ in range(jobs)]
    for p in procs:
        p.start()
    seconds = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return jobs * args.steps / max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("cores", 2), ("steps", 60), ("hidden", 128), ("layers", 4),
                          ("heads", 4), ("kv-heads", 2), ("vocab", 2048), ("seq", 128),
                          ("batch", 16)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    one = layout(args, 1, args.cores)
    many = layout(args, args.cores, 1)
    alone = layout(args, 1, 1)
    print(f"shape: hidden {args.hidden}, layers {args.layers}, batch {args.batch}x{args.seq}, "
          f"{args.steps} timed steps per process")
    print(f"  1 job  x {args.cores} threads: {one:7.2f} steps/s")
    print(f"  {args.cores} jobs x 1 thread : {many:7.2f} steps/s in total")
    print(f"  1 job  x 1 thread alone: {alone:7.2f} steps/s")
    print(f"ratio parallel / single: {many / one:.2f}  (target > 1)")
    print(f"a one-thread step beside {args.cores - 1} neighbour(s) takes "
          f"{alone / (many / args.cores):.2f}x its time alone")


if __name__ == "__main__":
    main()
