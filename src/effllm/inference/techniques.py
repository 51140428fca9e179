"""Serving techniques beyond the paper's precisions (issue 22; the survey of seed 002, Ding et
al. 2023, §§ on quantisation, KV-cache compression and speculative decoding), each through the
library made for it:

* weight-only quantisers applied to the loaded bf16 model: HQQ (``hqq``, group-wise with
  optimised zero points, no calibration data) and torchao's int8 weight-only (per row);
* a quantised KV cache: transformers' ``QuantizedCache`` with its ``fp8`` (per-tensor e4m3) or
  ``hqq`` (group-wise, a full-precision residual of the newest tokens) backend;
* speculative decoding: transformers' assisted generation with a draft model of ours (it
  shares the tokenizer) or prompt lookup (candidates copied from the context);
* one-shot post-training pruning: unstructured or n:m (2:4) sparsity by magnitude or by Wanda's
  score (Sun et al. 2023, arXiv 2306.11695: |w| times its input's norm over calibration
  tokens; the norms come from one pass over the dense model, where Wanda's own code passes
  the calibration data layer by layer through the already-pruned layers before), or structured
  heads and FFN channels of our decoder (:func:`oneshot_prune`: the
  pruning block's saliency, compensation and slice, with no training after).

Why the unstructured masks are ours: llmcompressor's Wanda and SparseGPT pin an older
transformers than ours, torch-pruning removes whole channels only, and ``torch.ao.pruning``
scores by magnitude alone; a row-wise top-k of |w| * ||x|| is a few lines. The zeros stay in
dense tensors: they cost the same bytes and the same matmul time on a CPU (the
``benchmarks/sparse_matmul.py`` ratios say what sparse kernels would buy).

The head, MoE routers and layers a family reads directly stay unquantised, as for bitsandbytes
(:func:`effllm.models.quantize.exact_modules`). docs/techniques.md says what each measures.
"""

from __future__ import annotations

import contextlib
import inspect
import time

import numpy as np
import torch
import torch.nn.functional as F

from effllm.evaluation.logprobs import token_scores
from effllm.evaluation.perplexity import safe_exp, token_windows
from effllm.models.hooks import InputStats
from effllm.specs import KVCacheSpec, PruneSpec, SpeculativeSpec, WeightQuant, nm_pattern

KV_BACKENDS = ("fp8", "hqq")
HQQ_GROUP = 64  # HQQ's group size when the config gives none
CALIB_WINDOWS = 16  # calibration windows of the train split when the config gives none
CALIB_BATCH = 8  # calibration windows per forward pass


def prunable(name: str, module: torch.nn.Module, keep: list[str]) -> bool:
    """A linear layer the ``keep`` list does not name (transformers' skip-list rule, as
    bitsandbytes applies it to the same list): what pruning and the quantisers take; the head
    and routers stay dense."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return isinstance(module, torch.nn.Linear) and should_convert_module(name, keep)


def takes(name: str, module: torch.nn.Module, weights: WeightQuant, keep: list[str]) -> bool:
    """Whether the weight-only quantiser takes this layer: :func:`prunable`, and its weight
    splits into HQQ's groups. The GPU plan books layers by this rule too."""
    if not prunable(name, module, keep):
        return False
    return weights.method != "hqq" or not module.weight.numel() % (weights.group_size
                                                                   or HQQ_GROUP)


def quantize_weights(model: torch.nn.Module, weights: WeightQuant, keep: list[str]
                     ) -> tuple[str, float]:
    """Quantise the model's linear layers in place (those :func:`takes` takes); returns (a
    note naming the layers left in high precision, seconds the quantiser took)."""
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    group = weights.group_size or HQQ_GROUP
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = sorted(name for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not takes(name, m, weights, keep))

    start = time.perf_counter()
    if weights.method == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=weights.bits, group_size=group)
        for name, module in list(model.named_modules()):
            if takes(name, module, weights, keep):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        HQQLinear(module, config, compute_dtype=dtype, device=str(device),
                                  del_orig=True))
    elif weights.method == "torchao":
        from torchao.quantization import quantize_

        if weights.bits == 4 and device.type != "cuda":  # tinygemm's layout; int8 runs anywhere
            raise RuntimeError("torchao int4 weight-only quantisation needs a CUDA GPU "
                               "(tinygemm's layout, sm80 or newer); int8 runs on a CPU")
        quantize_(model, _torchao_config(weights),
                  filter_fn=lambda m, fqn: takes(fqn, m, weights, keep))
    else:
        raise ValueError(f"weights.method {weights.method!r}: one of hqq, torchao")
    seconds = time.perf_counter() - start
    note = (f"{len(kept)} of {len(linears)} linear layers kept in "
            f"{str(dtype).removeprefix('torch.')} (the skip list {keep}"
            + (f", or not divisible into HQQ groups of {group}" if weights.method == "hqq"
               else "") + f"): {kept}") if kept else ""
    return note, seconds


def _torchao_config(weights: WeightQuant):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if weights.bits == 8:
        return Int8WeightOnlyConfig()
    # tinygemm's layout (CUDA, sm80+): torchao 0.18's default int4 layout needs the mslk package
    return Int4WeightOnlyConfig(group_size=weights.group_size or 128,
                                int4_packing_format="tile_packed_to_4d")


def sparsity_mask(score: torch.Tensor, sparsity: float | None = None,
                  pattern: str | None = None) -> torch.Tensor:
    """The weights kept (True) of a [out, in] score: per output row the ``sparsity`` fraction
    with the lowest score removed (Wanda's comparison group), or, with ``pattern`` "n:m", the
    ``m - n`` lowest of every ``m`` consecutive inputs (ties: whichever ``topk`` keeps)."""
    rows, cols = score.shape
    keep = torch.zeros_like(score, dtype=torch.bool)
    if pattern:
        n, m = nm_pattern(pattern)
        if cols % m:
            raise ValueError(f"prune.pattern {pattern!r}: {cols} inputs do not split into "
                             f"groups of {m}")
        groups = score.reshape(rows, cols // m, m)
        top = groups.topk(n, dim=-1, sorted=False).indices
        return keep.reshape(rows, cols // m, m).scatter_(-1, top, True).reshape(rows, cols)
    drop = int(cols * (sparsity or 0.0))
    top = score.topk(cols - drop, dim=1, sorted=False).indices
    return keep.scatter_(1, top, True)


@torch.no_grad()
def prune_weights(model: torch.nn.Module, prune: PruneSpec, keep: list[str], batches
                  ) -> tuple[str, int]:
    """Zero the lowest-scoring weights of each linear layer :func:`prunable` takes, in place:
    ``magnitude`` scores |w|, ``wanda`` |w| * ||x|| with the input norms of ``batches``
    (forward passes of the dense model, dicts of model inputs). Returns (a note naming the
    layers kept dense, calibration forward passes)."""
    if prune.method not in ("magnitude", "wanda"):
        raise ValueError(f"prune.method {prune.method!r}: magnitude or wanda here (structured: "
                         "oneshot_prune)")
    layers = {name: m for name, m in model.named_modules() if prunable(name, m, keep)}
    norms, passes = {}, 0
    if prune.method == "wanda":
        hooks = InputStats(layers, lambda x: (x * x).sum(0))  # Wanda's ||x_j||^2
        try:
            for batch in batches:
                model(**batch)
                passes += 1
        finally:
            norms = hooks.close()
        if not passes:
            raise ValueError("Wanda needs calibration batches")
    for name, linear in layers.items():
        w = linear.weight
        score = w.detach().float().abs()
        if name in norms:
            score = score * norms[name].sqrt().to(score.device)
        w.mul_(sparsity_mask(score, prune.sparsity, prune.pattern).to(w.dtype))
    dense = sorted(name for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name not in layers)
    note = (f"{len(dense)} linear layers kept dense (the skip list {keep}): {dense}"
            if dense else "")
    return note, passes


def linear_sparsity(model: torch.nn.Module, keep: list[str]) -> tuple[int, int]:
    """(zero weights, weights) over the linear layers pruning takes."""
    zeros = total = 0
    for name, m in model.named_modules():
        if prunable(name, m, keep):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros, total


def cache_factory(model, kv: KVCacheSpec | None):
    """A function making a fresh decoding cache for one generate(): None (the model's own
    DynamicCache) without ``kv``, else a ``QuantizedCache`` of the backend."""
    if kv is None:
        return lambda: None
    from transformers.cache_utils import QuantizedCache

    if kv.backend not in KV_BACKENDS:
        raise ValueError(f"kv_cache.backend {kv.backend!r}: one of {list(KV_BACKENDS)}")
    options = {} if kv.backend == "fp8" else {
        "nbits": kv.bits or 4, "q_group_size": kv.group_size or 64,
        "residual_length": kv.residual if kv.residual is not None else 128}
    return lambda: QuantizedCache(backend=kv.backend, config=model.config, **options)


def generate_options(model, speculative: SpeculativeSpec | None, draft=None) -> dict:
    """The generate() arguments of speculative decoding: the draft model proposing
    ``tokens`` a round (always that many), or prompt lookup of ``lookup`` tokens."""
    if speculative is None:
        return {}
    if speculative.lookup:
        return {"prompt_lookup_num_tokens": speculative.lookup}
    if draft is None:
        raise ValueError("speculative decoding with a draft model needs the draft loaded")
    # exactly ``tokens`` a round: a constant schedule, and no early stop on the draft's
    # confidence (transformers' default stops below 0.4, which makes the count the draft's)
    draft.generation_config.num_assistant_tokens = speculative.tokens or 4
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    return {"assistant_model": draft}


def check_draft_tokenizer(served, draft, where: str) -> None:
    """Refuse a draft whose tokenizer maps any token to another id than the served model's:
    its proposals would be other tokens. Equal vocabularies may still differ in the models'
    embedding padding (Qwen2.5-0.5B: 151,936 rows, 7B: 152,064), which greedy verification
    ignores."""
    ours, theirs = served.get_vocab(), draft.get_vocab()
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise ValueError(f"{where}: the draft's tokenizer differs from the served model's "
                         f"({len(theirs)} vs {len(ours)} tokens, {differ} entries differ); "
                         "speculative decoding needs a draft sharing the tokenizer")


class PassCounter(contextlib.AbstractContextManager):
    """Counts forward passes of the served model and of the draft during generate(): tokens per
    served-model pass is speculative decoding's gain; accepted draft tokens are the new tokens
    beyond one per pass, proposed ones are the draft's passes (one token each)."""

    def __init__(self, model, draft=None):
        self.models = {"target": model, "draft": draft}
        self.calls = {"target": 0, "draft": 0}
        self._hooks = []

    def __enter__(self):
        for key, module in self.models.items():
            if module is not None:
                self._hooks.append(module.register_forward_pre_hook(
                    lambda *_, key=key: self.calls.__setitem__(key, self.calls[key] + 1)))
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return False


class NoCache(TypeError):
    """A model without a key/value cache to read text back through."""


@torch.no_grad()
def cached_perplexity(model, tokens: np.ndarray, length: int, max_tokens: int, make_cache,
                      batch_size: int = 8) -> tuple[float, int]:
    """exp(mean NLL) of the second half of each ``length``-token window, predicted with the
    first half read from the decoding cache (``make_cache()``: the technique's KV cache):
    quality as a quantised cache serves it, where :func:`perplexity` sees no cache at all.
    The second half is scored with the head applied in blocks (never the batch's full logits).
    Raises :class:`NoCache` for a model whose decoding state is not a transformers ``Cache``
    (Mamba's and RWKV's recurrent states)."""
    from transformers.cache_utils import Cache

    if "past_key_values" not in inspect.signature(model.forward).parameters:
        raise NoCache(f"{type(model).__name__} keeps a recurrent state, not a key/value cache")
    half = length // 2
    if half < 2:
        raise ValueError(f"cached perplexity needs windows of at least 4 tokens ({length})")
    windows = token_windows(tokens, length, max_tokens)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = torch.from_numpy(np.stack(windows[i:i + batch_size]).astype(np.int64))
        ids = ids.to(model.device)
        cache = make_cache()
        kwargs = {} if cache is None else {"past_key_values": cache}
        out = model(input_ids=ids[:, :half], attention_mask=torch.ones_like(ids[:, :half]),
                    use_cache=True, logits_to_keep=1, **kwargs)
        state = getattr(out, "past_key_values", None)
        if not isinstance(state, Cache):
            raise NoCache(f"{type(model).__name__} keeps no transformers Cache "
                          f"({type(state).__name__ if state is not None else 'none'})")
        rest = ids[:, half:]
        # the prefix's last position predicts the second half's first token ...
        nll += F.cross_entropy(out.logits[:, -1].float(), rest[:, 0], reduction="sum").item()
        # ... and each position of the second half the next one
        targets = F.pad(rest[:, 1:], (0, 1), value=-100)
        part, _, scored = token_scores(model, rest, torch.ones_like(ids), targets,
                                       forward={"past_key_values": state, "use_cache": True})
        nll += part
        count += scored + rest.shape[0]
    return safe_exp(nll / count), count
