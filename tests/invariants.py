"""Invariants shared by the tests: what every decoder variant must keep, and what a drawn
figure must be."""

from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@torch.no_grad()
def assert_cached_equals_uncached(model, ids: torch.Tensor, prefill: int = 5,
                                  rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Prefill, then one token at a time with the cache: the logits of a full forward."""
    full = model(input_ids=ids, use_cache=False).logits
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for i in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=rtol, atol=atol)


@torch.no_grad()
def assert_causal(model, length: int = 12, at: int = 7, vocab: int = 97) -> None:
    """Changing token ``at`` changes no logit before it, and some logit from it on."""
    ids = torch.randint(2, vocab, (1, length))
    changed = ids.clone()
    changed[0, at] = (ids[0, at] + 5) % (vocab - 2) + 2
    a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :at], b[:, :at])
    assert not torch.allclose(a[:, at:], b[:, at:])


def assert_left_padding_is_invisible(model, vocab: int = 97, new_tokens: int = 6) -> None:
    """A left-padded batch generates exactly what each prompt generates alone (pad id 1)."""
    a, b = torch.randint(2, vocab, (1, 7)), torch.randint(2, vocab, (1, 4))
    batch = torch.cat([a, torch.cat([torch.ones(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=1, eos_token_id=None)
    together = model.generate(input_ids=batch, attention_mask=mask, **kw)
    alone_a = model.generate(input_ids=a, **kw)
    alone_b = model.generate(input_ids=b, **kw)
    assert torch.equal(together[0, 7:], alone_a[0, 7:])
    assert torch.equal(together[1, 7:], alone_b[0, 4:])


def assert_real_figure(pdf, png, min_width: int) -> None:
    """A PDF and a PNG with content (not blank, not all white), and no temporary files left."""
    import matplotlib.image as mpimg

    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5000
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] >= min_width
    rgb = img[..., :3]
    assert rgb.std() > 0.05 and (rgb < 0.9).any()
    assert sorted(p.name for p in pdf.parent.iterdir()) == sorted([pdf.name, png.name])


def assert_served_tokens_are_the_pipelines(tokenizer, stdlib_tokens):
    """The corpus test split in a served tokenizer's ids is the tokenizer stage's ``test.npy``,
    without a pad id, and so are the timing prompts drawn from it (issue 16)."""
    from effllm.inference.run import corpus_test_tokens, timing_prompts

    ours = corpus_test_tokens(tokenizer, stdlib_tokens.parent / "corpus")
    np.testing.assert_array_equal(ours, np.load(stdlib_tokens / "test.npy"))
    assert tokenizer.pad_token_id not in set(ours.tolist())
    prompts = timing_prompts(ours, 64, 4, seed=0)
    assert prompts.shape == (4, 64) and not (prompts == tokenizer.pad_token_id).any()


class LargestTensor(TorchDispatchMode):
    """Bytes of the largest tensor any op produces while the mode is on (a zero-strided view,
    which holds nothing, is not counted): a dense T x S score matrix or a batch's full logits
    would show here."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and 0 not in t.stride():
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def train_steps(model, optimizer, vocab: int, length: int, steps: int = 3) -> None:
    """A few optimiser steps on fixed random tokens (seeded), as a method would train."""
    torch.manual_seed(1)
    ids = torch.randint(2, vocab, (4, length))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def technique_findings(results: Path) -> list[str]:
    """What a finished run's records must show because the techniques are what they are (issue
    20's acceptance), as a list of failures (empty: all hold). Memory comes from the tensor
    account, so these hold in every seed, on any machine, at any load:

    - every served model: int4 weights and AMU below bf16's;
    - KV bytes per token MLA < MQA < GQA < MHA at every pretraining size;
    - MoE AMU above its dense model's (the "dense" variant of the moe block).
    """
    import json

    def records(stage):
        return {p.parent.name: json.loads(p.read_text())["metrics"]
                for p in (results / stage).glob("*/record.json")}

    def value(metrics, name):
        m = metrics.get(name) or {}
        return m.get("value")

    failures = []
    served = records("inference")
    for name, m in served.items():
        if not name.startswith("int4-"):
            continue
        ref = served.get("bf16-" + name[len("int4-"):])
        if ref is None:
            continue
        for metric in ("memory_weights", "amu"):
            lo, hi = value(m, metric), value(ref, metric)
            if lo is None or hi is None or not lo < hi:
                failures.append(f"{name}: {metric} {lo} is not below bf16's {hi}")
    pre = records("pretrain")
    sizes = {n.split("-")[1] for n in pre if n.startswith("gqa-")}
    for size in sorted(sizes):
        kv = {v: value(pre.get(f"{v}-{size}-s0", {}), "kv_cache_bytes_per_token")
              for v in ("mla", "mqa", "gqa", "mha")}
        present = [v for v in ("mla", "mqa", "gqa", "mha") if kv[v] is not None]
        ordered = [kv[v] for v in present]
        if ordered != sorted(ordered) or len(set(ordered)) != len(ordered):
            failures.append(f"{size}: KV bytes/token not increasing over {present}: {ordered}")
    for name, m in pre.items():
        if name.startswith("moe-"):
            size, seed = name.split("-")[-2:]
            dense = pre.get(f"gqa-{size}-{seed}") or pre.get(f"dense-{size}-{seed}")
            if dense is None:
                continue
            if not value(m, "amu") > value(dense, "amu"):
                failures.append(f"{name}: AMU {value(m, 'amu')} not above dense "
                                f"{value(dense, 'amu')}")
    return failures
