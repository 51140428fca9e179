"""Attention-free baselines (the paper's Transformer vs Mamba / RWKV / Pythia table), size-matched.

Each family is a stock transformers class built from a config (random init, no weights), so
``save_pretrained``, ``AutoModelForCausalLM.from_pretrained`` and ``generate`` work unchanged:

* ``mamba``: ``MambaForCausalLM`` (expand 2, state 16, conv 4, dt rank hidden/16: the Mamba
  paper's defaults). Depth is the free size: the Mamba paper uses two Mamba blocks per
  transformer layer because one block (≈ 6·d²) is half a 12·d² layer. We apply that rule to
  *counted* parameters: blocks = round(decoder non-embedding params / params per Mamba block).
  With our decoder's usual shape (GQA, intermediate 3·hidden ≈ 12·d² per layer) this tends to
  2 per layer at large width; at small widths the per-block extras (dt, B, C projections, A,
  conv) weigh more, so there are fewer (7 blocks for 4 layers at hidden 128).
* ``rwkv``: ``RwkvForCausalLM`` (RWKV-4), same depth as the decoder; its channel-mix width is
  solved so that a layer has the decoder layer's parameter count.
* ``gpt_neox``: ``GPTNeoXForCausalLM``, Pythia-style (rotary on 25 % of each head, parallel
  residual, GELU MLP, biases, full multi-head attention), same depth and heads as the decoder; its
  MLP width is solved to match parameters. At our standard shape (intermediate 3·hidden) that
  gives ≈ 4·hidden, Pythia's own ratio; a fixed 4·hidden would miss by +32 % at intermediate
  2·hidden, our intermediate size by −12 % at 3·hidden.

All tie the LM head to the input embedding, like our decoder. Sizes are reported as counted
parameters (docs/protocol.md §8, defect 7: the toolkit mislabelled Mamba sizes).

Only the pure-PyTorch paths exist on this machine. On a GPU, Mamba runs ``mamba_ssm``'s fused
selective scan and ``causal_conv1d`` when they are installed (``envs/kernels.txt``), RWKV its wkv
kernel when transformers can load it; otherwise the reference loop runs, and every record says
which ran (:func:`sequence_kernel`, ``provenance.execution.sequence_kernel``).

Three transformers (5.23) defects are worked around here, details where they are handled:

* Mamba's ``rescale_prenorm_residual`` corrupts reloaded weights: we scale at build time instead;
* Mamba's pure-PyTorch scan has an O(T²) backward (a training step at 16 x 128 tokens, hidden
  128: 32 s instead of 1.5 s);
* RWKV's one-token decoding step is wrong for batches > 1.

The last two are patched **on import of this module**: import it before training or decoding a
loaded Mamba/RWKV model. RWKV also ignores ``attention_mask``: left-padded batches let pad tokens
into its state, so decode RWKV with unpadded (equal-length) prompts.

``effllm.measure.cache.cache_bytes_per_token`` measures how the decoding state grows per token for
any of these and for our ``DecoderForCausalLM``: KV bytes for attention models, 0 for constant-size
recurrent states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
    RwkvConfig,
    RwkvForCausalLM,
)
from transformers.models.mamba import modeling_mamba as mamba_modeling
from transformers.models.rwkv import modeling_rwkv as rwkv_modeling

from effllm.models.config import DecoderConfig
from effllm.models.decoder import DecoderForCausalLM
from effllm.models.params import count_params

FAMILIES = ("mamba", "rwkv", "gpt_neox")
MODEL_CLASSES = {"mamba": MambaForCausalLM, "rwkv": RwkvForCausalLM,
                 "gpt_neox": GPTNeoXForCausalLM}
# Counted parameters of a baseline vs our GQA decoder of the same shape, relative. RWKV and
# GPT-NeoX match to a rounding of their MLP width; Mamba only to one block (its depth is the
# free size), ≤ 7 % at our test and config shapes.
PARAM_TOLERANCE = {"mamba": 0.15, "rwkv": 0.02, "gpt_neox": 0.02}
INIT_STD = 0.02  # our decoder's; also mamba_ssm's own default (transformers' MambaConfig has 0.1)


def _meta_count(cls, config) -> int:
    """Parameter count without allocating or initialising weights."""
    with torch.device("meta"):
        return count_params(cls(config))[0]


def reference_decoder_config(shape: dict, vocab_size: int) -> DecoderConfig:
    """Our GQA decoder of this shape: the model the baselines are size-matched to."""
    return DecoderConfig(
        vocab_size=vocab_size, hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape.get("num_key_value_heads", 2),
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=shape.get("max_position_embeddings", 2048),
        attention="gqa", position_encoding="rope",
    )


def _solve_size(make_config, cls, target: int, start: int) -> int:
    """The integer size x (a width or a depth) whose model has ~``target`` parameters.

    Parameter counts are affine in each of these sizes, so two counts give the exact slope.
    """
    p0 = _meta_count(cls, make_config(start))
    slope = _meta_count(cls, make_config(start + 1)) - p0
    return max(1, round(start + (target - p0) / slope))


def build_baseline(family: str, shape: dict, vocab_size: int, eos_token_id, bos_token_id,
                   pad_token_id) -> PreTrainedModel:
    """A randomly initialised ``family`` model with our decoder's parameter count at ``shape``.

    ``shape`` holds our decoder's size keys (hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, max_position_embeddings; optional num_key_value_heads, default 2, for the
    reference, and rope_theta). Other keys (attention or position variants) do not apply here and
    are ignored.
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    max_positions = shape.get("max_position_embeddings", 2048)
    target = _meta_count(DecoderForCausalLM, reference_decoder_config(shape, vocab_size))
    common = dict(vocab_size=vocab_size, hidden_size=hidden, eos_token_id=eos_token_id,
                  bos_token_id=bos_token_id, pad_token_id=pad_token_id,
                  tie_word_embeddings=True, initializer_range=INIT_STD)

    if family == "mamba":
        def make(blocks):
            return MambaConfig(num_hidden_layers=blocks, use_mambapy=False, **common)
        config = make(_solve_size(make, MambaForCausalLM, target, 2 * layers))
        model = MambaForCausalLM(config)
        # mamba_ssm's default init scales out_proj by 1/sqrt(depth). Done here, not through
        # rescale_prenorm_residual=True: transformers re-applies that division to the weights
        # loaded by from_pretrained, so a saved model would not reload as saved.
        with torch.no_grad():
            for block in model.backbone.layers:
                block.mixer.out_proj.weight.div_(math.sqrt(config.num_hidden_layers))
        return model
    elif family == "rwkv":
        def make(width):
            # rescale_every=0: the default halves weights *in place* when switching to eval
            # (an fp16 overflow guard), so an eval-mode save would store altered weights.
            return RwkvConfig(num_hidden_layers=layers, intermediate_size=width,
                              context_length=max_positions, rescale_every=0, **common)
        config = make(_solve_size(make, RwkvForCausalLM, target, shape["intermediate_size"]))
    else:
        def make(width):
            return GPTNeoXConfig(
                num_hidden_layers=layers, num_attention_heads=shape["num_attention_heads"],
                intermediate_size=width, hidden_act="gelu", use_parallel_residual=True,
                rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25,
                                 "rope_theta": shape.get("rope_theta", 10000.0)},
                max_position_embeddings=max_positions, attention_bias=True, **common)
        config = make(_solve_size(make, GPTNeoXForCausalLM, target, 4 * hidden))
    return MODEL_CLASSES[family](config)


# --- Mamba: the sequential scan's backward -------------------------------------------------------
# Without mamba_ssm, transformers' scan loops over time indexing ``discrete_A[:, :, t]``; each
# index's backward writes a zero tensor of the whole [B, E, T, N] size, so backward is O(T²):
# 6 s vs 0.08 s per block at 16 x 128 tokens, hidden 128. Same recurrence, same operation order,
# over unbound time slices (backward O(T)). torch.compile keeps upstream's associative scan.
# Still a Python loop over time: Mamba trains ~13x slower than our decoder on this CPU.

def _mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False, **kwargs):
    if torch.compiler.is_compiling() or (hidden_states.is_cuda and MAMBA_KERNELS):
        # upstream's, which runs mamba_ssm's fused kernel when it is installed
        return UPSTREAM_MAMBA_SCAN(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                   delta_softplus=delta_softplus,
                                   return_last_state=return_last_state, **kwargs)
    batch, intermediate, _ = hidden_states.shape
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B, C = B.transpose(1, 2), C.transpose(1, 2)  # [batch, T, N]
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    deltaB_u = dt[:, :, :, None] * B[:, None, :, :].float() * hidden_states[:, :, :, None].float()
    state = torch.zeros(batch, intermediate, A.shape[-1], dtype=input_dtype,
                        device=hidden_states.device)
    states = []
    for decay, update in zip(discrete_A.unbind(2), deltaB_u.unbind(2)):
        state = decay * state + update
        states.append(state)
    scan_output = torch.einsum("bdtn,btn->bdt", torch.stack(states, 2).to(input_dtype), C)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    return (scan_output, state) if return_last_state else scan_output


def _importable(*packages: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in packages)


# The CUDA kernels of envs/kernels.txt: the selective scan and the causal convolution.
MAMBA_KERNELS = _importable("mamba_ssm", "causal_conv1d")


def sequence_kernel(model, device: str) -> dict:
    """``{"sequence_kernel": what ran}`` for a Mamba or RWKV model on ``device`` ({} for other
    models), for the record's execution: the fused CUDA kernel, or the reference loop over
    time, whose latency and memory measure that loop rather than the architecture."""
    family = getattr(model.config, "model_type", None)
    cuda = str(device).startswith("cuda")
    if family == "mamba":
        if cuda and MAMBA_KERNELS:
            return {"sequence_kernel": "mamba_ssm selective scan + causal_conv1d (CUDA)"}
        why = ("not on a GPU" if not cuda
               else "mamba_ssm/causal_conv1d not installed (envs/kernels.txt)")
    elif family == "rwkv":
        if cuda and rwkv_modeling.rwkv_cuda_kernel is not None:
            return {"sequence_kernel": "RWKV wkv CUDA kernel"}
        why = "not on a GPU" if not cuda else "the wkv kernel is not in the local kernels cache"
    else:
        return {}
    return {"sequence_kernel": f"reference implementation: a PyTorch loop over time ({why}); "
                               "its latency and memory are the loop's, not the architecture's"}


if mamba_modeling.mamba_selective_scan.__module__ != __name__:  # not patched yet
    UPSTREAM_MAMBA_SCAN = mamba_modeling.mamba_selective_scan
    mamba_modeling.mamba_selective_scan = _mamba_selective_scan


# --- RWKV: batched one-token steps ----------------------------------------------------------------
# transformers' RWKV (checked on 5.23) takes the previous token's input from the state as [B, d]
# in a one-token step and mixes it with the [B, 1, d] input: with batch B > 1 this broadcasts to
# [B, B, d], so every row but one decodes from another row's state (and does B times the work).
# The general branch (time shift, then the state into position 0) is right for any length, so
# these replacements simply always take it. Applied on import: a model loaded with
# AutoModelForCausalLM is fixed as long as this module has been imported in the process.

def _rwkv_time_mix_inputs(self, hidden, state=None):
    shifted = self.time_shift(hidden)
    if state is not None:
        shifted[:, 0] = state[1][:, :, self.layer_id]
    key = hidden * self.time_mix_key + shifted * (1 - self.time_mix_key)
    value = hidden * self.time_mix_value + shifted * (1 - self.time_mix_value)
    receptance = hidden * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
    key, value = self.key(key), self.value(value)
    receptance = torch.sigmoid(self.receptance(receptance))
    if state is not None:
        state[1][:, :, self.layer_id] = hidden[:, -1]
    return receptance, key, value, state


def _rwkv_channel_mix(self, hidden, state=None):
    shifted = self.time_shift(hidden)
    if state is not None:
        shifted[:, 0] = state[0][:, :, self.layer_id]
    key = hidden * self.time_mix_key + shifted * (1 - self.time_mix_key)
    receptance = hidden * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
    value = self.value(torch.square(torch.relu(self.key(key))))
    receptance = torch.sigmoid(self.receptance(receptance))
    if state is not None:
        state[0][:, :, self.layer_id] = hidden[:, -1]
    return receptance * value, state


if rwkv_modeling.RwkvFeedForward.forward.__module__ != __name__:  # not patched yet
    UPSTREAM_RWKV_METHODS = (rwkv_modeling.RwkvSelfAttention.extract_key_value,
                             rwkv_modeling.RwkvFeedForward.forward)
    rwkv_modeling.RwkvSelfAttention.extract_key_value = _rwkv_time_mix_inputs
    rwkv_modeling.RwkvFeedForward.forward = _rwkv_channel_mix
