"""Train-step time of our decoder vs transformers' LlamaForCausalLM of the same shape, on CPU.

Both models run side by side in one process, interleaved, with the same batches, threads and
optimiser; the script prints per-step medians and their ratio (ours / Llama; target <= 1.0).

    .venv/bin/python benchmarks/train_step.py [--hidden 128 --layers 4 --heads 4 --kv-heads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effllm.models import DecoderConfig, DecoderForCausalLM


def build(args):
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 intermediate_size=args.ffn, max_position_embeddings=args.seq,
                 tie_word_embeddings=True)
    torch.manual_seed(0)
    ours = DecoderForCausalLM(DecoderConfig(**shape))
    llama = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_llama = sum(p.numel() for p in llama.parameters())
    assert n_ours == n_llama, (n_ours, n_llama)
    return {"ours": ours, "llama": llama}, n_ours


def step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 128), ("layers", 4), ("heads", 4), ("kv-heads", 2),
                          ("ffn", 384), ("vocab", 2048), ("seq", 128), ("batch", 16),
                          ("steps", 30), ("warmup", 5), ("threads", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, params = build(args)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    times = {k: [] for k in models}
    gen = torch.Generator().manual_seed(0)
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        for name in (("ours", "llama") if i % 2 else ("llama", "ours")):  # interleave the order
            models[name].train()
            t0 = time.perf_counter()
            step(models[name], opts[name], ids)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/"
          f"{args.kv_heads} kv, ffn {args.ffn}, batch {args.batch}x{args.seq}, {params:,} params, "
          f"{args.threads} threads, {args.steps} timed steps")
    for k, v in med.items():
        print(f"  {k:6s} median train step {v * 1e3:8.2f} ms")
    print(f"ratio ours / llama: {med['ours'] / med['llama']:.3f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
