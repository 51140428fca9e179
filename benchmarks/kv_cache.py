"""KV-cache bytes per token of every attention variant: measured from the cache vs the formula.

Builds each variant of our decoder at one shape, measures how many bytes the decoding cache grows
per token (`effllm.measure.cache.cache_bytes_per_token`: every tensor the cache holds) and prints
it next to the closed form. The two must agree exactly.

    .venv/bin/python benchmarks/kv_cache.py [--hidden 896 --layers 4 --heads 14 --kv-heads 2]

The defaults are Qwen2.5-0.5B's attention shape (hidden 896, 14 heads, 2 KV heads) with fewer
layers; bytes per token scale linearly with layers.
"""

from __future__ import annotations

import argparse

import torch

from effllm.measure.cache import cache_bytes_per_token
from effllm.models import DecoderConfig, DecoderForCausalLM


def formula(cfg: DecoderConfig, bytes_per_value: int) -> float:
    """Bytes per token the cache must hold, from the shapes alone."""
    layers, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    if cfg.attention == "mla":  # the normalised latent and one shared RoPE key
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    elif cfg.attention == "nsa":  # raw K and V, plus one compressed K and V per stride tokens
        per_layer = 2 * kv * hd * (1 + 1 / cfg.nsa_compress_stride)
    else:  # mha, mqa, gqa: K and V of every KV head
        per_layer = 2 * kv * hd
    return layers * per_layer * bytes_per_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    kv = {"mha": args.heads, "mqa": 1, "gqa": args.kv_heads, "mla": args.heads,
          "nsa": args.kv_heads}
    print(f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, fp32, "
          f"{args.tokens} tokens")
    print(f"{'variant':8} {'measured B/tok':>15} {'formula B/tok':>15} {'vs MHA':>8}  exact")
    mha = None
    for attention, n_kv in kv.items():
        cfg = DecoderConfig(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=n_kv,
                            intermediate_size=4 * args.hidden, attention=attention,
                            max_position_embeddings=args.tokens,
                            nsa_compress_block=32, nsa_compress_stride=16, nsa_select_block=64,
                            nsa_num_selected=4, nsa_window=128)
        model = DecoderForCausalLM(cfg).eval()
        ids = torch.randint(0, 256, (1, args.tokens))
        measured = cache_bytes_per_token(model, ids)
        expected = formula(cfg, 4)
        mha = mha or measured
        print(f"{attention:8} {measured:15.1f} {expected:15.1f} {measured / mha:8.3f}  "
              f"{'yes' if measured == expected else 'NO'}")


if __name__ == "__main__":
    main()
