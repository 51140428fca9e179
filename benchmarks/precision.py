"""Training-step time at fp32 vs bf16 mixed precision (``precision: bf16``), on this machine.

The same model shape trains side by side in one process, steps interleaved, with the same
batches and threads, once as Full (every weight trained) and once as LoRA (frozen base stored in
bf16 under bf16 precision, as ``effllm.training.methods.prepare`` does). Prints per-step medians
and the bf16 / fp32 ratio. On a CPU without native bf16 instructions (AVX2 only) autocast pays
for conversions and expect a ratio above 1; on GPUs and AVX512-BF16/AMX CPUs, below.

    .venv/bin/python benchmarks/precision.py [--hidden 128 --layers 4 --steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.precision import autocast
from effllm.specs import MethodSpec
from effllm.training.methods import prepare

LORA = MethodSpec("lora", r=32, alpha=64, dropout=0.0,
                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"))


def build(args, method, precision):
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=3 * args.hidden, max_position_embeddings=args.seq))
    return prepare(model, method, lr=1e-4, precision=precision)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, CPU capability {cpu}, {args.threads} threads; "
          f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq}")

    for label, method in (("full", MethodSpec("full")), ("lora r=32", LORA)):
        runs = {p: build(args, method, p) for p in ("fp32", "bf16")}
        times = {p: [] for p in runs}
        for step in range(args.warmup + args.steps):
            ids = torch.randint(0, args.vocab, (args.batch, args.seq),
                                generator=torch.Generator().manual_seed(step))
            for precision, (model, optimizer) in runs.items():
                start = time.perf_counter()
                with autocast("cpu", precision):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step >= args.warmup:
                    times[precision].append(time.perf_counter() - start)
        fp32, bf16 = (statistics.median(times[p]) for p in ("fp32", "bf16"))
        print(f"{label:10s} step median fp32 {fp32 * 1e3:7.1f} ms   bf16 {bf16 * 1e3:7.1f} ms"
              f"   bf16/fp32 {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
