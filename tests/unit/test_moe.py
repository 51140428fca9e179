"""The MoE feed-forward: against transformers' Mixtral block, routing, aux loss, wiring, counts."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.models.moe import MoE, moe_param_counts
from invariants import assert_cached_equals_uncached

H, E, I = 32, 8, 16  # hidden, experts, expert intermediate size


def moe_config(k=2, **kw):
    return DecoderConfig(vocab_size=97, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, num_experts=E,
                         num_experts_per_tok=k, moe_intermediate_size=I, eos_token_id=0,
                         bos_token_id=0, pad_token_id=1, **kw)


def layer(k=2):
    torch.manual_seed(0)
    moe = MoE(moe_config(k))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)  # large enough that routing is far from uniform
    return moe


@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_transformers_mixtral_block_and_aux_loss(k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import (
        MixtralSparseMoeBlock,
        load_balancing_loss_func,
    )

    moe = layer(k)
    ref_cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                            num_experts_per_tok=k, router_jitter_noise=0.0,
                            experts_implementation="eager")
    ref = MixtralSparseMoeBlock(ref_cfg).eval()
    with torch.no_grad():  # 5.x stores experts fused: gate_up_proj [E, 2I, H] = [gate; up]
        ref.gate.weight.copy_(moe.router.weight)
        for e, mlp in enumerate(moe.experts):
            ref.experts.gate_up_proj[e].copy_(torch.cat([mlp.gate_proj.weight,
                                                         mlp.up_proj.weight]))
            ref.experts.down_proj[e].copy_(mlp.down_proj.weight)
    x = torch.randn(3, 7, H)
    with torch.no_grad():
        y, aux = moe(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
        logits = moe.route(x.reshape(-1, H))[0]
        torch.testing.assert_close(logits, ref.gate(x.reshape(-1, H))[0])
        # transformers divides assignment counts by tokens, we by tokens·k: theirs = k × ours.
        theirs = load_balancing_loss_func((logits,), E, k)
    torch.testing.assert_close(k * aux, theirs)


def test_each_token_goes_to_exactly_k_distinct_experts():
    k = 2
    moe = layer(k)
    x = torch.randn(4, 9, H)
    n = x.shape[0] * x.shape[1]
    _, _, weights, experts = moe.route(x.reshape(-1, H))
    assert experts.shape == (n, k)
    assert all(len(set(row)) == k for row in experts.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(n))
    seen = {}
    hooks = [m.register_forward_hook(lambda m, inp, out, e=e: seen.__setitem__(e, inp[0].shape[0]))
             for e, m in enumerate(moe.experts)]
    moe(x)
    for hk in hooks:
        hk.remove()
    assert sum(seen.values()) == k * n
    assert seen == {e: c for e, c in enumerate(torch.bincount(experts.reshape(-1), minlength=E)
                                               .tolist()) if c}


def test_an_idle_expert_is_not_run_and_gets_no_gradient():
    moe = layer()
    v = torch.randn(H)
    x = v + 0.01 * torch.randn(2, 5, H)
    with torch.no_grad():
        moe.router.weight[E - 1] = -10 * v  # expert E-1 scores far below the others
    y, aux = moe(x)
    (y.sum() + aux).backward()
    assert all(p.grad is None for p in moe.experts[E - 1].parameters())
    assert moe.router.weight.grad.abs().sum() > 0
    used = [m for m in moe.experts if m.gate_proj.weight.grad is not None]
    assert 2 <= len(used) < E and all(m.down_proj.weight.grad.abs().sum() > 0 for m in used)


def test_aux_loss_is_one_for_a_uniform_router_and_larger_when_skewed():
    moe = layer()
    x = torch.randn(4, 9, H)
    with torch.no_grad():
        moe.router.weight.zero_()
        _, uniform = moe(x)
        moe.router.weight.normal_(std=0.3)
        _, random = moe(x)
        moe.router.weight[0] += 3 * x.reshape(-1, H).mean(0)  # favour expert 0
        _, skewed = moe(x)
    assert uniform.item() == pytest.approx(1.0, abs=1e-6)
    assert uniform < random < skewed
    assert skewed <= E


def tiny_moe():
    torch.manual_seed(0)
    return DecoderForCausalLM(moe_config())


def test_decoder_is_wired_with_moe_and_counts_parameters():
    model = tiny_moe()
    layers = model.model.layers
    assert all(isinstance(b.mlp, MoE) for b in layers)
    assert len(layers[0].mlp.experts) == E and layers[0].mlp.router.weight.shape == (E, H)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    attn = H * H + 2 * H * (2 * 8) + H * H  # q, k+v (2 kv heads × head dim 8), o
    expert = 3 * H * I
    per_layer = attn + 2 * H + H * E  # + two RMSNorms + router
    dense_parts = 97 * H + H + 2 * per_layer  # tied embedding, final norm
    total, active = moe_param_counts(model)
    assert total == dense_parts + 2 * E * expert
    assert active == dense_parts + 2 * 2 * expert
    dense = DecoderForCausalLM(DecoderConfig(vocab_size=97, hidden_size=H, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64))
    assert moe_param_counts(dense)[0] == moe_param_counts(dense)[1]


def test_loss_includes_aux_and_training_updates_router_and_used_experts():
    model = tiny_moe().train()
    ids = torch.randint(2, 97, (4, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97),
                                           ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm + model.config.router_aux_loss_coef * out.aux_loss)

    used = set()
    hooks = [expert.register_forward_hook(lambda m, inp, o, key=(i, e): used.add(key))
             for i, block in enumerate(model.model.layers)
             for e, expert in enumerate(block.mlp.experts)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for hk in hooks:
        hk.remove()
    assert used
    for i, block in enumerate(model.model.layers):
        router = before[f"model.layers.{i}.mlp.router.weight"]
        assert not torch.equal(block.mlp.router.weight, router)
        for e in range(E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"
                changed = not torch.equal(dict(model.named_parameters())[name], before[name])
                assert changed == ((i, e) in used), name


def test_cached_decoding_equals_full_forward():
    assert_cached_equals_uncached(tiny_moe().eval(), torch.randint(2, 97, (2, 12)))


def test_flops_are_the_active_experts_plus_router():
    k = 2
    moe = layer(k)
    x = torch.randn(2, 16, H)
    n = x.shape[0] * x.shape[1]
    with FlopCounterMode(display=False) as counter:
        moe(x)
    assert counter.get_total_flops() == 2 * n * k * (3 * H * I) + 2 * n * H * E
