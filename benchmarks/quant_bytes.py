"""Stored weight bytes and decode speed of bf16 vs bitsandbytes int8 and int4 (NF4, FP4; double
quantisation on and off).

Builds our decoder at a realistic width (or takes a saved model of any family with --model-dir),
saves it, and serves it at each precision in a fresh process through the pipeline's own
`load_model` and `time_generation`. Printed side by side:

- bytes of the linear layers' weights (output head excluded: it is tied to the embeddings and
  never quantised) as `linear_weight_bytes` counts them: packed 4-bit or int8 data plus absmax,
  codebooks, nested double-quant state and int8 row scales. At load, and while serving: on CPUs
  with AVX512-BF16 the first eval forward repacks 4-bit weights and stores absmax as bf16, which
  undoes double quantisation (bitsandbytes 0.50);
- whole-model bytes (`weight_bytes`: all parameters and buffers with quantisation state, tied
  tensors once) while serving;
- end-to-end throughput of fixed-length greedy decoding (EOS disabled), warm-up then repeats, and
  the repeats' coefficient of variation.

    .venv/bin/python benchmarks/quant_bytes.py [--hidden 512 --layers 4 --intermediate 1536]

Targets: int4 linear bytes ≤ 0.30 × bf16 (while serving); CV < 10 %.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor

import torch
from effllm.specs import QuantSpec

CONFIGS = {  # label -> (precision, quant settings as the pipeline passes them)
    "bf16": ("bf16", {}),
    "int8": ("int8", {}),
    "nf4 dq": ("int4", {"quant_type": "nf4", "double_quant": True}),
    "nf4": ("int4", {"quant_type": "nf4", "double_quant": False}),
    "fp4 dq": ("int4", {"quant_type": "fp4", "double_quant": True}),
    "fp4": ("int4", {"quant_type": "fp4", "double_quant": False}),
}


def measure(model_dir: str, precision: str, quant: dict, args: argparse.Namespace) -> dict:
    """One configuration, in its own process: bytes at load, then timing, then bytes serving."""
    from effllm.inference.run import linear_weight_bytes, load_model, time_generation, weight_bytes
    from effllm.measure import Window, latency_summary

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_model(model_dir, precision, QuantSpec.from_json(quant))
    model.eval()
    head = model.get_output_embeddings()
    layers = [n for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not head]
    kept = sum(type(model.get_submodule(n)) is torch.nn.Linear for n in layers)  # not quantised

    def linear_bytes() -> int:
        held = linear_weight_bytes(model)
        return sum(held[n] for n in layers)

    at_load = linear_bytes()
    prompt = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    times = time_generation(model, prompt, args.new_tokens, pad, args.warmup, args.repeats,
                            args.min_seconds, Window(0.1))
    e2e = latency_summary(times["e2e"])
    return {"linear_load": at_load, "linear_served": linear_bytes(), "model": weight_bytes(model),
            "kept": kept, "layers": len(layers), "runs": e2e["count"], "cv": e2e["cv"],
            "tok_s": args.batch * args.new_tokens / e2e["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a saved model (any family) instead of a new decoder")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="minimum timed repeats")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="minimum timed seconds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from effllm.models import DecoderConfig, DecoderForCausalLM

            torch.manual_seed(0)
            config = DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads,
                                   intermediate_size=args.intermediate,
                                   max_position_embeddings=args.prompt + args.new_tokens,
                                   eos_token_id=1, pad_token_id=0, bos_token_id=2)
            DecoderForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
            model_dir = tmp
            print(f"decoder: hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
                  f"({args.kv_heads} KV), intermediate {args.intermediate}, vocab {args.vocab}")
        else:
            print(f"model: {model_dir}")
        import bitsandbytes

        print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
              f"{args.threads} threads; batch {args.batch}, prompt {args.prompt}, exactly "
              f"{args.new_tokens} new tokens, {args.warmup} warm-up, >= {args.repeats} repeats "
              f"and >= {args.min_seconds} s; one fresh process per row")
        results = {}
        spawn = multiprocessing.get_context("spawn")
        for label, (precision, quant) in CONFIGS.items():
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                results[label] = pool.submit(measure, model_dir, precision, quant, args).result()

    ref = results["bf16"]
    print(f"\n{'config':7} {'linear B load':>14} {'linear B serve':>15} {'vs bf16':>8} "
          f"{'kept':>6} {'model B':>11} {'vs bf16':>8} {'tok/s':>7} {'runs':>5} {'CV':>6}")
    for label, r in results.items():
        kept = f"{r['kept']}/{r['layers']}" if CONFIGS[label][0] != "bf16" else "-"
        print(f"{label:7} {r['linear_load']:14,d} {r['linear_served']:15,d} "
              f"{r['linear_served'] / ref['linear_served']:8.3f} {kept:>6} "
              f"{r['model']:11,d} {r['model'] / ref['model']:8.3f} {r['tok_s']:7.1f} "
              f"{r['runs']:5d} {r['cv']:6.1%}")
    print()
    for label, r in results.items():
        checks = [f"CV < 10 %: {'yes' if r['cv'] < 0.10 else 'NO'}"]
        if CONFIGS[label][0] == "int4":
            fits = all(r[k] <= 0.30 * ref[k] for k in ("linear_load", "linear_served"))
            checks.insert(0, f"linear bytes <= 0.30 x bf16: {'yes' if fits else 'NO'}")
        print(f"{label:7} " + "; ".join(checks))


if __name__ == "__main__":
    main()
