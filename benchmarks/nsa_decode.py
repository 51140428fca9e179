"""Decode latency per token: native sparse attention vs multi-head attention, on CPU.

Two decoders of the same shape (one with ``attention="mha"``, one with ``attention="nsa"``, same
KV-head count by default) prefill the same random context in chunks, then decode single tokens
with the KV cache. The timed steps of the two models are interleaved, so a change in machine load
hits both. Prints ms/token (median) per context length and the ratio NSA / MHA (target < 1 from
8k on: an NSA step reads O(S/d + n l' + w) keys, an MHA step all S).

    .venv/bin/python benchmarks/nsa_decode.py [--contexts 2048 8192 16384 --steps 24 --threads 1]

``DynamicCache`` (what the pipeline and ``generate`` use) concatenates the whole cache at every
step, an O(S) copy that both models pay and that dominates at long context. So each context is
also run with ``GrowableCache`` below (capacity doubles, appends are amortised O(1)), which shows
the attention cost itself.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from effllm.models import DecoderConfig, DecoderForCausalLM


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers that double when full."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.k_buf = self.v_buf = None
        n, new = self.get_seq_length(), key_states.shape[-2]
        if self.k_buf is None or n + new > self.k_buf.shape[-2]:
            shape = (*key_states.shape[:-2], max(2 * (n + new), 256), key_states.shape[-1])
            k_buf, v_buf = key_states.new_empty(shape), value_states.new_empty(shape)
            if n:
                k_buf[..., :n, :], v_buf[..., :n, :] = self.keys, self.values
            self.k_buf, self.v_buf = k_buf, v_buf
        self.k_buf[..., n:n + new, :] = key_states
        self.v_buf[..., n:n + new, :] = value_states
        self.keys, self.values = self.k_buf[..., :n + new, :], self.v_buf[..., :n + new, :]
        return self.keys, self.values


class GrowableCache(DynamicCache):
    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = GrowableLayer


def build(args, attention: str) -> DecoderForCausalLM:
    kv = args.heads if attention == "mha" else (args.kv_heads or args.heads)
    config = DecoderConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=kv,
        intermediate_size=3 * args.hidden, max_position_embeddings=max(args.contexts) + 64,
        attention=attention, nsa_compress_block=args.l, nsa_compress_stride=args.d,
        nsa_select_block=args.l_sel, nsa_num_selected=args.n, nsa_window=args.w)
    torch.manual_seed(0)
    return DecoderForCausalLM(config).eval()


def cache_bytes(cache) -> int:
    """Every tensor held by every DynamicCache layer (NSA's compressed keys/values included)."""
    return sum(v.numel() * v.element_size() for layer in cache.layers
               for v in vars(layer).values() if torch.is_tensor(v))


@torch.no_grad()
def prefill(model, ids, chunk: int, cache):
    out = None
    for i in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, i:i + chunk], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache = out.past_key_values
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def step(model, state):
    """One greedy decode step; returns its wall time."""
    cache, token = state
    t0 = time.perf_counter()
    out = model(input_ids=token, past_key_values=cache, use_cache=True)
    elapsed = time.perf_counter() - t0
    state[1] = out.logits[:, -1].argmax(-1, keepdim=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 16384])
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 8), ("kv-heads", 0),
                          ("vocab", 2048), ("steps", 24), ("warmup", 4), ("prefill-chunk", 1024),
                          # one thread: a batch-1 decode step is many small ops, and with two
                          # OpenMP threads any other process on the 2 cores stalls every op
                          ("threads", 1),
                          # the toolkit's intended NSA hyper-parameters (docs/protocol.md §3)
                          ("l", 64), ("d", 32), ("l-sel", 64), ("n", 4), ("w", 128)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"mha": build(args, "mha"), "nsa": build(args, "nsa")}
    cfg = models["nsa"].config
    print(f"shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, KV heads "
          f"mha {args.heads} / nsa {cfg.num_key_value_heads}; NSA l={args.l} d={args.d} "
          f"l'={args.l_sel} n={args.n} w={args.w}; batch 1, {args.threads} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up; params " + " / ".join(
              f"{k} {sum(p.numel() for p in m.parameters()):,}" for k, m in models.items()))
    print(f"{'context':>8} {'cache':>9} {'mha ms/tok':>11} {'nsa ms/tok':>11} {'nsa/mha':>8} "
          f"{'mha MB':>7} {'nsa MB':>7} {'prefill s mha/nsa':>18}")
    gen = torch.Generator().manual_seed(0)
    for context in args.contexts:
        ids = torch.randint(0, args.vocab, (1, context), generator=gen)
        for cache_name, cache_class in (("dynamic", DynamicCache), ("growable", GrowableCache)):
            states, prefill_s, mb = {}, {}, {}
            for name, model in models.items():
                t0 = time.perf_counter()
                states[name] = list(prefill(model, ids, args.prefill_chunk, cache_class()))
                prefill_s[name] = time.perf_counter() - t0
                mb[name] = cache_bytes(states[name][0]) / 2**20
            times = {name: [] for name in models}
            for i in range(args.warmup + args.steps):
                for name in (("mha", "nsa") if i % 2 else ("nsa", "mha")):  # interleaved
                    elapsed = step(models[name], states[name])
                    if i >= args.warmup:
                        times[name].append(elapsed)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            size = (f"{mb['mha']:>7.1f} {mb['nsa']:>7.1f}" if cache_name == "dynamic"
                    else f"{'':>7} {'':>7}")  # the growable buffers hold spare capacity
            print(f"{context:>8} {cache_name:>9} {med['mha']:>11.2f} {med['nsa']:>11.2f} "
                  f"{med['nsa'] / med['mha']:>8.2f} {size} "
                  f"{prefill_s['mha']:>8.1f} / {prefill_s['nsa']:<7.1f}", flush=True)
            del states


if __name__ == "__main__":
    main()
