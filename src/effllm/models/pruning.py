"""Structured pruning of the decoder: coupled parameter groups, first-order saliency, masks,
second-order compensation, and the slice into a smaller model with per-layer widths.

The three minimal groups of Xing et al. (2025, arXiv 2502.06663, §3):

* **head** (layer l, group g): the Q/K/V output channels and the matching O input channels of
  one KV head and the query heads that share it (MHA: one head; GQA: a KV head with its
  ``heads / kv_heads`` query heads, so every layer keeps equal groups, which SDPA's GQA needs).
  Under MQA (one KV head) a group is one query head: the shared KV head stays;
* **ffn** (layer l, channel c): output channel c of ``gate_proj`` and ``up_proj``, input channel
  c of ``down_proj``;
* **hidden** (dimension j): column j of the embedding (and of the LM head and learned positions),
  every norm's weight j, input column j of every Q/K/V/gate/up and output row j of every O/down.

A pruned group is *masked* (its weights zeroed, and zeroed again after every optimiser step) while
training goes on; at the end :func:`slice_model` cuts the kept weights into a
:class:`~effllm.models.DecoderForCausalLM` whose config records its per-layer widths. The masked
and sliced models compute the same function: a masked hidden dimension is 0 in the residual
stream, but the masked model's RMSNorm still divides by the full width, so the slice folds
``sqrt(d / d_kept)`` into every norm weight and scales ``rms_norm_eps`` by ``d / d_kept``.

Why not torch-pruning's dependency graph: it removes channels in place (we mask for hundreds of
steps before removing), it neither folds the norm width nor writes a per-layer config that
``from_pretrained`` rebuilds, and our three groups are the whole coupling of this decoder.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from effllm.models.config import BIAS_ENCODINGS
from effllm.models.decoder import DecoderConfig, DecoderForCausalLM
from effllm.models.hooks import InputStats
from effllm.specs import decoder_mismatch, decoder_params

GROUP_TYPES = ("heads", "ffn", "hidden")
SALIENCIES = ("taylor", "taylor_elementwise")


def check_prunable(config: DecoderConfig, groups=GROUP_TYPES) -> None:
    """Raise ValueError when the decoder cannot be pruned by ``groups`` (say which key)."""
    if getattr(config, "model_type", None) != DecoderConfig.model_type:
        raise ValueError(f"pruning needs our decoder, not {type(config).__name__}")
    if config.attention not in ("mha", "mqa", "gqa") or config.num_experts:
        raise ValueError(f"pruning needs mha/mqa/gqa attention and a dense FFN, not attention "
                         f"{config.attention!r} with {config.num_experts} experts")
    if "heads" in groups and config.position_encoding in BIAS_ENCODINGS:
        raise ValueError(f"head groups cannot be pruned under position_encoding "
                         f"{config.position_encoding!r}: its score bias is per head index")
    if "hidden" in groups and config.position_encoding == "sinusoidal":
        raise ValueError("hidden groups cannot be pruned under sinusoidal positions: the fixed "
                         "table is built for the full hidden size")


def as_decoder(model) -> DecoderForCausalLM:
    """``model`` as our decoder, for a hub source: a Llama-architecture model (no attention or
    MLP biases, SiLU, plain RoPE, no sliding window) maps onto it weight for weight, so the
    groups, masks and slice apply unchanged. Anything else raises ValueError saying why."""
    if isinstance(model, DecoderForCausalLM):
        return model
    c = model.config
    why = decoder_mismatch(c.to_dict())
    if why:
        raise ValueError(f"a hub source must be a Llama-architecture decoder to be pruned: "
                         f"{'; '.join(why)}")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    config = DecoderConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=rope.get("rope_theta", getattr(c, "rope_theta", None) or 10000.0),
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        attention="mha" if kv == heads else "mqa" if kv == 1 else "gqa", position_encoding="rope",
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    ours = DecoderForCausalLM(config).to(model.dtype)
    ours.load_state_dict(model.state_dict(), strict=True)
    ours.tie_weights()
    return ours.to(next(model.parameters()).device)


# ------------------------------------------------------------------------------------ the groups


def head_layout(config: DecoderConfig, layer: int) -> tuple[int, int, int]:
    """(groups, query heads per group, KV heads per group) of one layer."""
    heads, kv = config.heads_at(layer), config.kv_heads_at(layer)
    if kv == 1 and heads > 1:  # MQA: prune query heads; the one KV head stays
        return heads, 1, 0
    return kv, heads // kv, 1


@dataclasses.dataclass
class Masks:
    """Which groups are kept (True): per layer for heads and FFN channels, one for hidden."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    hidden: torch.Tensor

    @classmethod
    def full(cls, config: DecoderConfig) -> Masks:
        layers = range(config.num_hidden_layers)
        return cls([torch.ones(head_layout(config, i)[0], dtype=torch.bool) for i in layers],
                   [torch.ones(config.ffn_at(i), dtype=torch.bool) for i in layers],
                   torch.ones(config.hidden_size, dtype=torch.bool))

    def widths(self, config: DecoderConfig) -> dict[str, list[int] | int]:
        """Per-layer query heads, KV heads and FFN widths, and the hidden size, if sliced now."""
        heads, kv = [], []
        for i, mask in enumerate(self.heads):
            _, q_per, kv_per = head_layout(config, i)
            kept = int(mask.sum())
            heads.append(kept * q_per)
            kv.append(kept * kv_per if kv_per else config.kv_heads_at(i))
        return {"heads": heads, "kv_heads": kv, "ffn": [int(m.sum()) for m in self.ffn],
                "hidden": int(self.hidden.sum())}


def params_of(config: DecoderConfig, widths: dict) -> int:
    """Parameters of the model ``widths`` describe (exactly what the slice will count)."""
    learned = config.position_encoding == "learned"
    bias = (config.relative_num_buckets * config.num_attention_heads
            if config.position_encoding == "relative" else 0)
    return decoder_params(config.vocab_size, widths["hidden"], config.head_dim, widths["heads"],
                          widths["kv_heads"], widths["ffn"], config.tie_word_embeddings,
                          config.max_position_embeddings if learned else 0, bias)


def _layers(model: DecoderForCausalLM):
    return model.model.layers


def _hidden_parts(model: DecoderForCausalLM):
    """(weight, dim) of every tensor with a hidden-size axis, and that axis."""
    inner = model.model
    parts = [(inner.embed_tokens.weight, 1), (inner.norm.weight, 0)]
    if hasattr(inner, "embed_positions"):
        parts.append((inner.embed_positions.weight, 1))
    if not model.config.tie_word_embeddings:
        parts.append((model.lm_head.weight, 1))
    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        parts += [(layer.input_layernorm.weight, 0), (layer.post_attention_layernorm.weight, 0),
                  (attn.q_proj.weight, 1), (attn.k_proj.weight, 1), (attn.v_proj.weight, 1),
                  (attn.o_proj.weight, 0), (mlp.gate_proj.weight, 1), (mlp.up_proj.weight, 1),
                  (mlp.down_proj.weight, 0)]
    return parts


def _head_parts(model: DecoderForCausalLM, layer: int):
    """(weight, dim, channels per group) of the head groups of ``layer``: Q/K/V rows, O cols."""
    config, attn = model.config, _layers(model)[layer].self_attn
    _, q_per, kv_per = head_layout(config, layer)
    hd = config.head_dim
    parts = [(attn.q_proj.weight, 0, q_per * hd), (attn.o_proj.weight, 1, q_per * hd)]
    if kv_per:
        parts += [(attn.k_proj.weight, 0, kv_per * hd), (attn.v_proj.weight, 0, kv_per * hd)]
    return parts


def _ffn_parts(model: DecoderForCausalLM, layer: int):
    mlp = _layers(model)[layer].mlp
    return [(mlp.gate_proj.weight, 0, 1), (mlp.up_proj.weight, 0, 1), (mlp.down_proj.weight, 1, 1)]


def _per_group(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Sum of ``t`` over every axis but ``dim``, in consecutive runs of ``size`` along it."""
    along = t.sum(dim=1 - dim) if t.dim() == 2 else t
    return along.reshape(-1, size).sum(-1)


@torch.no_grad()
def group_saliency(model: DecoderForCausalLM, how: str = "taylor") -> Masks:
    """First-order (Taylor) saliency of every group from the weights' current ``.grad``: the
    loss change of removing a group is about ``|sum over its weights of w * dL/dw|`` (LLM-Pruner's
    vector-wise importance, Ma et al. 2023); ``taylor_elementwise`` sums ``|w * dL/dw|`` instead.
    A zeroed group scores 0. Returned in the shape of :class:`Masks`, as float scores."""
    if how not in SALIENCIES:
        raise ValueError(f"saliency {how!r} is not one of {SALIENCIES}")

    def term(w: torch.Tensor) -> torch.Tensor:
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        prod = (w.float() * g.float())
        return prod.abs() if how == "taylor_elementwise" else prod

    def score(parts) -> torch.Tensor:
        total = sum(_per_group(term(w), dim, size) for w, dim, size in parts)
        return total.abs()

    n = len(_layers(model))
    return Masks([score(_head_parts(model, i)) for i in range(n)],
                 [score(_ffn_parts(model, i)) for i in range(n)],
                 score([(w, dim, 1) for w, dim in _hidden_parts(model)]))


@torch.no_grad()
def apply_masks(model: DecoderForCausalLM, masks: Masks) -> None:
    """Zero every pruned group's weights (idempotent: called after each optimiser step)."""
    def zero(parts, keep: torch.Tensor) -> None:
        for w, dim, size in parts:
            drop = (~keep).repeat_interleave(size).nonzero().squeeze(1).to(w.device)
            if len(drop):
                w.index_fill_(dim, drop, 0.0)

    for i in range(len(_layers(model))):
        zero(_head_parts(model, i), masks.heads[i])
        zero(_ffn_parts(model, i), masks.ffn[i])
    zero([(w, dim, 1) for w, dim in _hidden_parts(model)], masks.hidden)


def select(config: DecoderConfig, masks: Masks, scores: Masks, target_params: int,
           groups=GROUP_TYPES) -> tuple[Masks, dict[str, int]]:
    """Mask the least salient groups, globally across layers and group types, until the model
    has at most ``target_params`` parameters. Groups are ranked by saliency per parameter they
    remove (a hidden dimension removes far more parameters than a head: by raw saliency one
    would never be chosen), at the widths the event starts from; every layer keeps at least one
    head group and one FFN channel, and the model one hidden dimension. Returns the new masks
    and how many groups of each type were removed."""
    masks = Masks([m.clone() for m in masks.heads], [m.clone() for m in masks.ffn],
                  masks.hidden.clone())
    w = masks.widths(config)
    d, hd = w["hidden"], config.head_dim
    keys, values = [], []  # (kind, layer, index) and saliency per parameter
    for kind in groups:
        if kind == "hidden":
            per = [(None, masks.hidden, scores.hidden,
                    params_of(config, w) - params_of(config, {**w, "hidden": d - 1}))]
        elif kind == "heads":
            per = [(i, keep, score, d * hd * 2 * sum(head_layout(config, i)[1:]))
                   for i, (keep, score) in enumerate(zip(masks.heads, scores.heads))]
        else:
            per = [(i, keep, score, 3 * d) for i, (keep, score) in
                   enumerate(zip(masks.ffn, scores.ffn))]
        for layer, keep, score, cost in per:
            index = keep.nonzero().squeeze(1)
            keys += [(kind, layer, int(j)) for j in index]
            values.append(score[index].double() / cost)
    removed = dict.fromkeys(GROUP_TYPES, 0)
    order = torch.cat(values).argsort(stable=True).tolist() if values else []
    left = {"heads": [int(m.sum()) for m in masks.heads], "ffn": [int(m.sum()) for m in masks.ffn],
            "hidden": [int(masks.hidden.sum())]}
    for position in order:
        if params_of(config, w) <= target_params:
            break
        kind, layer, index = keys[position]
        if left[kind][layer or 0] <= 1:
            continue
        left[kind][layer or 0] -= 1
        removed[kind] += 1
        if kind == "hidden":
            masks.hidden[index] = False
            w["hidden"] -= 1
        elif kind == "ffn":
            masks.ffn[layer][index] = False
            w["ffn"][layer] -= 1
        else:
            masks.heads[layer][index] = False
            _, q_per, kv_per = head_layout(config, layer)
            w["heads"][layer] -= q_per
            w["kv_heads"][layer] -= kv_per
    if params_of(config, w) > target_params:
        raise ValueError(f"cannot reach {target_params} parameters with groups {list(groups)}: "
                         f"{params_of(config, w)} are left at one group of each kind per layer")
    return masks, removed


# ------------------------------------------------------------------ second-order compensation


def compensate(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
               damp: float = 0.01) -> torch.Tensor:
    """The weight over the kept input columns that best reproduces the full layer's output on
    the calibration inputs: ``argmin ||W X - W' X_S||`` is ``W H[:, S] (H[S, S] + lambda I)^-1``
    with ``H = X X^T`` (the OBS / SparseGPT update for removed columns, solved for all of them at
    once; ``lambda`` is ``damp`` times the mean diagonal, SparseGPT's dampening). Pruned columns
    come back as 0."""
    keep = keep.to(weight.device)
    h = hessian.to(weight.device, torch.float64)
    h_ss = h[keep][:, keep]
    h_ss = h_ss + damp * h_ss.diagonal().mean().clamp(min=1e-12) * torch.eye(
        len(h_ss), dtype=h.dtype, device=h.device)
    rhs = weight.double() @ h[:, keep]  # [out, kept]
    solved = torch.linalg.solve(h_ss, rhs.T).T
    out = torch.zeros_like(weight)
    out[:, keep] = solved.to(weight.dtype)
    return out


class InputGram(InputStats):
    """``sum X X^T`` (fp32) of the inputs of chosen linear layers over calibration forwards;
    layers that read the same tensor (Q/K/V, gate/up) share one matrix."""

    def __init__(self, modules: dict[str, nn.Linear]):
        super().__init__(modules, lambda x: x.T @ x)


def affected_linears(model: DecoderForCausalLM, old: Masks, new: Masks
                     ) -> dict[str, tuple[nn.Linear, torch.Tensor, str]]:
    """The linear layers whose input columns the step from ``old`` to ``new`` masks, each with
    the column keep-mask it ends with and the name of its input (shared by Q/K/V and by
    gate/up). The LM head is left out when tied to the embedding."""
    config, out = model.config, {}
    hidden_change = bool((old.hidden & ~new.hidden).any())
    for i, layer in enumerate(_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        _, q_per, _ = head_layout(config, i)
        if bool((old.heads[i] & ~new.heads[i]).any()):
            keep = new.heads[i].repeat_interleave(q_per * config.head_dim)
            out[f"{i}.o_proj"] = (attn.o_proj, keep, f"{i}.o_proj")
        if bool((old.ffn[i] & ~new.ffn[i]).any()):
            out[f"{i}.down_proj"] = (mlp.down_proj, new.ffn[i].clone(), f"{i}.down_proj")
        if hidden_change:
            for name in ("q_proj", "k_proj", "v_proj"):
                out[f"{i}.{name}"] = (getattr(attn, name), new.hidden.clone(), f"{i}.q_proj")
            for name in ("gate_proj", "up_proj"):
                out[f"{i}.{name}"] = (getattr(mlp, name), new.hidden.clone(), f"{i}.gate_proj")
    if hidden_change and not config.tie_word_embeddings:
        out["lm_head"] = (model.lm_head, new.hidden.clone(), "lm_head")
    return out


@torch.no_grad()
def compensate_model(model: DecoderForCausalLM, old: Masks, new: Masks, batches,
                     damp: float = 0.01, reduce=None) -> int:
    """Second-order compensation of the layers the new masks cut, from the inputs of
    ``batches`` (forward passes of the model before the new masks). ``reduce`` sums the Gram
    matrices over ranks (DDP). Returns the number of layers compensated."""
    targets = affected_linears(model, old, new)
    if not targets:
        return 0
    inputs = {source: targets[source][0] for _, _, source in targets.values()}
    gram = InputGram(inputs)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        grams = gram.close()
        model.train(was_training)
    if reduce is not None:
        for h in grams.values():
            reduce(h)
    for linear, keep, source in targets.values():
        linear.weight.copy_(compensate(linear.weight.data, grams[source], keep, damp))
    return len(targets)


# ------------------------------------------------------------------------------------- the slice


@torch.no_grad()
def slice_model(model: DecoderForCausalLM, masks: Masks) -> DecoderForCausalLM:
    """A smaller decoder holding only the kept weights, computing what the masked model does."""
    config = model.config
    widths = masks.widths(config)
    d, d_kept = config.hidden_size, widths["hidden"]
    keep_h = masks.hidden.nonzero().squeeze(1)
    settings = config.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "_name_or_path",
                "torch_dtype", "dtype"):
        settings.pop(key, None)
    def per_layer(values: list[int]) -> list[int] | None:
        return values if len(set(values)) > 1 else None  # uniform: the plain key says it

    settings.update(
        hidden_size=d_kept, head_dim=config.head_dim,
        num_attention_heads=max(widths["heads"]), num_key_value_heads=max(widths["kv_heads"]),
        intermediate_size=max(widths["ffn"]),
        layer_num_attention_heads=per_layer(widths["heads"]),
        layer_num_key_value_heads=per_layer(widths["kv_heads"]),
        layer_intermediate_sizes=per_layer(widths["ffn"]),
        rms_norm_eps=config.rms_norm_eps * d / d_kept)
    small = DecoderForCausalLM(DecoderConfig(**settings)).to(model.dtype)
    scale = math.sqrt(d / d_kept)

    def rows(w, keep, size):
        return keep.repeat_interleave(size).nonzero().squeeze(1).to(w.device)

    src, dst = model.model, small.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight[:, keep_h])
    dst.norm.weight.copy_(src.norm.weight[keep_h] * scale)
    if hasattr(src, "embed_positions"):
        dst.embed_positions.weight.copy_(src.embed_positions.weight[:, keep_h])
    if not config.tie_word_embeddings:
        small.lm_head.weight.copy_(model.lm_head.weight[:, keep_h])
    hd = config.head_dim
    for i, (a, b) in enumerate(zip(src.layers, dst.layers)):
        b.input_layernorm.weight.copy_(a.input_layernorm.weight[keep_h] * scale)
        b.post_attention_layernorm.weight.copy_(a.post_attention_layernorm.weight[keep_h] * scale)
        _, q_per, kv_per = head_layout(config, i)
        q_rows = rows(a.self_attn.q_proj.weight, masks.heads[i], q_per * hd)
        kv_rows = (rows(a.self_attn.k_proj.weight, masks.heads[i], kv_per * hd) if kv_per
                   else torch.arange(a.self_attn.k_proj.weight.shape[0]))
        b.self_attn.q_proj.weight.copy_(a.self_attn.q_proj.weight[q_rows][:, keep_h])
        b.self_attn.k_proj.weight.copy_(a.self_attn.k_proj.weight[kv_rows][:, keep_h])
        b.self_attn.v_proj.weight.copy_(a.self_attn.v_proj.weight[kv_rows][:, keep_h])
        b.self_attn.o_proj.weight.copy_(a.self_attn.o_proj.weight[keep_h][:, q_rows])
        f = masks.ffn[i].nonzero().squeeze(1)
        b.mlp.gate_proj.weight.copy_(a.mlp.gate_proj.weight[f][:, keep_h])
        b.mlp.up_proj.weight.copy_(a.mlp.up_proj.weight[f][:, keep_h])
        b.mlp.down_proj.weight.copy_(a.mlp.down_proj.weight[keep_h][:, f])
    if config.position_encoding == "relative":  # refused by check_prunable for head pruning
        dst.relative_bias.weight.copy_(src.relative_bias.weight)
    small.tie_weights()
    return small.to(next(model.parameters()).device)


# ------------------------------------------------------------- one-shot post-training pruning


def oneshot_prune(model: DecoderForCausalLM, batches, target_params: int,
                  groups=("heads", "ffn"), saliency: str = "taylor", compensation: bool = True,
                  damp: float = 0.01) -> tuple[DecoderForCausalLM, dict[str, int]]:
    """A trained model pruned once to at most ``target_params`` parameters, with no training
    after (the survey's post-training structured pruning): saliency from the gradients of
    ``batches`` (dicts with ``input_ids`` and ``labels``; no update), the least salient
    ``groups`` masked, the layers they cut compensated from the same batches' inputs, and the
    slice. Works in fp32 and returns the small model in ``model``'s dtype, with the groups
    removed of each kind. ``model`` is left masked (its weights changed)."""
    check_prunable(model.config, groups)
    dtype = model.dtype
    model.float().train()
    full = Masks.full(model.config)
    scores = None
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        s = group_saliency(model, saliency)
        scores = s if scores is None else Masks(
            [a + b for a, b in zip(scores.heads, s.heads)],
            [a + b for a, b in zip(scores.ffn, s.ffn)], scores.hidden + s.hidden)
    model.zero_grad(set_to_none=True)
    if scores is None:
        raise ValueError("one-shot pruning needs at least one calibration batch")
    masks, removed = select(model.config, full, scores, target_params, groups)
    if compensation:
        compensate_model(model, full, masks, batches, damp)
    apply_masks(model, masks)
    model.eval()
    return slice_model(model, masks).to(dtype).eval(), removed
