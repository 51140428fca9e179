"""Structured pruning (effllm.models.pruning, effllm.training.prune) and the config's pruning
block: the slice computes what the masked model computes and counts exactly what the widths
say, saliency, selection and compensation do what they claim, the cubic schedule ends where it
should, the block expands and is checked, and both routes run end to end on a tiny model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import effllm.models  # noqa: F401  (registers our decoder with the Auto classes)
from effllm.models import DecoderConfig, DecoderForCausalLM
from effllm.models.params import count_params
from effllm.models.pruning import (
    InputGram, Masks, affected_linears, apply_masks, check_prunable, compensate,
    compensate_model, group_saliency, head_layout, params_of, select, slice_model,
)
from invariants import assert_cached_equals_uncached, assert_left_padding_is_invisible

VOCAB = 61
LAYERS = 3
# (attention, KV heads, position encoding, tied): GQA + RoPE + tied, MQA + learned positions +
# an untied LM head, MHA + no position encoding + tied
SHAPES = {
    "gqa-rope-tied": ("gqa", 2, "rope", True),
    "mqa-learned-untied": ("mqa", 1, "learned", False),
    "mha-none-tied": ("mha", 4, "none", True),
}
# the widths some_masks leaves: per-layer query heads, KV heads, FFN, and the hidden size
EXPECTED_WIDTHS = {
    "gqa-rope-tied": {"heads": [4, 2, 4], "kv_heads": [2, 1, 2]},
    "mqa-learned-untied": {"heads": [4, 3, 4], "kv_heads": [1, 1, 1]},
    "mha-none-tied": {"heads": [4, 3, 4], "kv_heads": [4, 3, 4]},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and two threads on busy shared cores make
    each matmul wait for the other (a run's job sets one thread itself, from measure.threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def decoder_config(shape: str, **kw) -> DecoderConfig:
    attention, kv, pe, tied = SHAPES[shape]
    settings = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                    num_attention_heads=4, num_key_value_heads=kv, intermediate_size=48,
                    max_position_embeddings=64, attention=attention, position_encoding=pe,
                    tie_word_embeddings=tied, eos_token_id=0, bos_token_id=0, pad_token_id=1)
    return DecoderConfig(**{**settings, **kw})


def random_model(shape: str, seed: int = 0, std: float = 0.3, **kw) -> DecoderForCausalLM:
    """A decoder with large random weights (norm weights around 1, all different), so that a
    wrongly sliced or wrongly scaled weight shows in the logits."""
    torch.manual_seed(seed)
    model = DecoderForCausalLM(decoder_config(shape, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model


def some_masks(config: DecoderConfig) -> Masks:
    """One head group of layer 1, FFN channels of layers 0 and 2, two hidden dimensions."""
    masks = Masks.full(config)
    masks.heads[1][0] = False
    masks.ffn[0][[2, 5, 11]] = False
    masks.ffn[2][[0, 47]] = False
    masks.hidden[[3, 17]] = False
    return masks


def random_ids(batch: int = 2, length: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding(ids: torch.Tensor, pad: int = 4) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[-1, :pad] = 0
    return mask


# ------------------------------------------------------------------------------- slice and count


@pytest.fixture
def fp64_norm(monkeypatch):
    """RMSNorm in the input's dtype (the decoder's computes in fp32), so that a float64 model
    is float64 throughout and the slice can be checked to 1e-10, beyond fp32 rounding."""
    from effllm.models.layers import RMSNorm

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    monkeypatch.setattr(RMSNorm, "forward", forward)


@pytest.mark.parametrize("shape, eps", [*((s, 1e-6) for s in SHAPES), ("gqa-rope-tied", 0.1)])
def test_sliced_model_computes_what_the_masked_model_computes(shape, eps, fp64_norm):
    """Logits of the slice equal the masked model's, with and without left padding, also at
    a large rms_norm_eps (its fold shows): in float64 to 1e-10, in fp32 to its rounding
    (through std-0.3 weights about 5e-5). The masking really changed the function."""
    model = random_model(shape, rms_norm_eps=eps)
    unmasked = copy.deepcopy(model)
    masks = some_masks(model.config)
    apply_masks(model, masks)
    small = slice_model(model, masks).eval()
    assert small.dtype == torch.float32
    ids = random_ids()
    with torch.no_grad():
        for kw in ({}, {"attention_mask": left_padding(ids)}):
            masked = model(input_ids=ids, **kw).logits
            torch.testing.assert_close(small(input_ids=ids, **kw).logits, masked, rtol=0,
                                       atol=2e-4)
            assert (unmasked(input_ids=ids, **kw).logits - masked).abs().max() > 1e-2
        model64 = model.double()
        small64 = slice_model(model64, masks).eval()
        assert small64.dtype == torch.float64
        for kw in ({}, {"attention_mask": left_padding(ids)}):
            torch.testing.assert_close(small64(input_ids=ids, **kw).logits,
                                       model64(input_ids=ids, **kw).logits, rtol=0, atol=1e-10)
    assert small.config.hidden_size == 30
    assert small.model.embed_tokens.weight.shape == (VOCAB, 30)


@pytest.mark.parametrize("shape", SHAPES)
def test_sliced_model_round_trips_with_its_widths_and_exact_parameter_count(shape, tmp_path):
    """count_params equals params_of for the full model and for the slice; the saved slice
    reloads through AutoModelForCausalLM with the per-layer widths of Masks.widths and the
    same logits (bit for bit)."""
    model = random_model(shape)
    config = model.config
    assert count_params(model)[0] == params_of(config, Masks.full(config).widths(config))
    masks = some_masks(config)
    widths = masks.widths(config)
    assert widths == {**EXPECTED_WIDTHS[shape], "ffn": [45, 48, 46], "hidden": 30}
    apply_masks(model, masks)
    small = slice_model(model, masks).eval()
    assert count_params(small)[0] == params_of(config, widths)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DecoderForCausalLM
    c = loaded.config
    assert c.hidden_size == widths["hidden"] and c.head_dim == config.head_dim == 8
    for key, values in (("layer_num_attention_heads", widths["heads"]),
                        ("layer_num_key_value_heads", widths["kv_heads"]),
                        ("layer_intermediate_sizes", widths["ffn"])):
        # a per-layer list only where layers differ (uniform widths: the plain key)
        assert getattr(c, key) == (values if len(set(values)) > 1 else None), key
    assert [c.heads_at(i) for i in range(LAYERS)] == widths["heads"]
    assert [c.kv_heads_at(i) for i in range(LAYERS)] == widths["kv_heads"]
    assert [c.ffn_at(i) for i in range(LAYERS)] == widths["ffn"]
    for i, layer in enumerate(loaded.model.layers):
        assert layer.self_attn.q_proj.weight.shape == (widths["heads"][i] * 8, 30)
        assert layer.self_attn.k_proj.weight.shape == (widths["kv_heads"][i] * 8, 30)
        assert layer.mlp.down_proj.weight.shape == (30, widths["ffn"][i])
    assert count_params(loaded)[0] == params_of(config, widths)
    tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tied == config.tie_word_embeddings
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, small(input_ids=ids).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_sliced_model_decodes_the_same_with_and_without_the_cache(shape):
    """Non-uniform widths: cached incremental logits equal the full forward's, greedy
    generation is the same with and without the cache, and left padding is invisible."""
    model = random_model(shape, std=0.1)
    masks = some_masks(model.config)
    apply_masks(model, masks)
    small = slice_model(model, masks).eval()
    assert len(set(small.config.layer_intermediate_sizes)) > 1
    ids = random_ids(length=14)
    with torch.no_grad():
        assert_cached_equals_uncached(small, ids)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=1, eos_token_id=None)
        kw["attention_mask"] = torch.ones_like(ids)
        cached = small.generate(input_ids=ids, use_cache=True, **kw)
        uncached = small.generate(input_ids=ids, use_cache=False, **kw)
    assert cached.shape == (2, 22)
    assert torch.equal(cached, uncached)
    assert_left_padding_is_invisible(small, vocab=VOCAB)


def test_sinusoidal_model_slices_exactly_without_hidden_groups():
    """Sinusoidal positions (hidden groups refused): heads and FFN channels slice exactly and
    the count is params_of's."""
    model = random_model("gqa-rope-tied", position_encoding="sinusoidal")
    config = model.config
    check_prunable(config, ("heads", "ffn"))
    masks = some_masks(config)
    masks.hidden[:] = True
    apply_masks(model, masks)
    small = slice_model(model, masks).eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=2e-4)
    assert count_params(small)[0] == params_of(config, masks.widths(config))


@pytest.mark.parametrize("pe", ["alibi", "relative"])
def test_score_bias_models_prune_ffn_and_hidden_groups(pe):
    """ALiBi / relative: allowed FFN and hidden groups count as params_of says and slice into
    a model computing what the masked one does."""
    model = random_model("gqa-rope-tied", position_encoding=pe)
    config = model.config
    check_prunable(config, ("ffn", "hidden"))
    assert count_params(model)[0] == params_of(config, Masks.full(config).widths(config))
    masks = some_masks(config)
    masks.heads[1][:] = True
    apply_masks(model, masks)
    small = slice_model(model, masks).eval()
    assert count_params(small)[0] == params_of(config, masks.widths(config))
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=2e-4)


# ------------------------------------------------------------------------------------- saliency


def _axis(name: str) -> int:
    """The hidden-size axis of a parameter by its name (0: rows, 1: columns)."""
    if name.endswith("norm.weight") or ".o_proj." in name or ".down_proj." in name:
        return 0
    return 1


def hidden_saliency_by_hand(model, j: int, elementwise: bool) -> float:
    """|sum of w * dL/dw| (or the sum of |w * dL/dw|) over every weight of hidden dim j."""
    total = 0.0
    for name, p in model.named_parameters():
        prod = (p * p.grad).double()
        part = prod[j] if _axis(name) == 0 else prod[:, j]
        total += float(part.abs().sum() if elementwise else part.sum())
    return abs(total)


@pytest.mark.parametrize("shape", SHAPES)
def test_saliency_is_zero_for_pruned_groups_and_matches_its_definition(shape):
    """After apply_masks and a backward pass a zeroed group scores exactly 0 and every kept
    one > 0; taylor_elementwise >= |taylor| group by group (and > somewhere); a head group, an
    FFN channel and a hidden dimension score what their definition says."""
    model = random_model(shape).train()
    masks = some_masks(model.config)
    apply_masks(model, masks)
    ids = random_ids(batch=3)
    model(input_ids=ids, labels=ids).loss.backward()
    model.requires_grad_(False)  # the .grad stay; the checks by hand below build no graph
    taylor = group_saliency(model, "taylor")
    elem = group_saliency(model, "taylor_elementwise")
    for scores in (taylor, elem):
        pairs = [*zip(scores.heads, masks.heads), *zip(scores.ffn, masks.ffn),
                 (scores.hidden, masks.hidden)]
        for score, keep in pairs:
            assert score.shape == keep.shape
            assert (score[~keep] == 0).all()
            assert (score[keep] > 0).all()
    flat_t = torch.cat([*taylor.heads, *taylor.ffn, taylor.hidden])
    flat_e = torch.cat([*elem.heads, *elem.ffn, elem.hidden])
    assert (flat_e >= flat_t * (1 - 1e-5)).all()
    assert (flat_e > flat_t * 1.01).any()

    mlp = model.model.layers[0].mlp
    c = 0  # a kept channel of layer 0
    ffn = sum(float((w * w.grad)[c].sum()) for w in (mlp.gate_proj.weight, mlp.up_proj.weight))
    ffn += float((mlp.down_proj.weight * mlp.down_proj.weight.grad)[:, c].sum())
    assert float(taylor.ffn[0][c]) == pytest.approx(abs(ffn), rel=1e-4)

    attn, layer = model.model.layers[2].self_attn, 2
    groups, q_per, kv_per = head_layout(model.config, layer)
    g, hd = groups - 1, model.config.head_dim  # the last group
    q = slice(g * q_per * hd, (g + 1) * q_per * hd)
    head = float((attn.q_proj.weight * attn.q_proj.weight.grad)[q].sum())
    head += float((attn.o_proj.weight * attn.o_proj.weight.grad)[:, q].sum())
    if kv_per:
        kv = slice(g * kv_per * hd, (g + 1) * kv_per * hd)
        for w in (attn.k_proj.weight, attn.v_proj.weight):
            head += float((w * w.grad)[kv].sum())
    assert float(taylor.heads[layer][g]) == pytest.approx(abs(head), rel=1e-4)

    for j in (0, 20):
        assert float(taylor.hidden[j]) == pytest.approx(
            hidden_saliency_by_hand(model, j, False), rel=1e-4)
        assert float(elem.hidden[j]) == pytest.approx(
            hidden_saliency_by_hand(model, j, True), rel=1e-4)
    with pytest.raises(ValueError, match="saliency 'fisher'"):
        group_saliency(model, "fisher")


# ------------------------------------------------------------------------------------ selection


def uniform_scores(config: DecoderConfig, value: float = 1.0) -> Masks:
    full = Masks.full(config)
    return Masks([m.double() * value for m in full.heads], [m.double() * value for m in full.ffn],
                 full.hidden.double() * value)


def random_scores(config: DecoderConfig, seed: int = 0) -> Masks:
    g = torch.Generator().manual_seed(seed)
    full = Masks.full(config)
    return Masks([torch.rand(len(m), generator=g, dtype=torch.float64) for m in full.heads],
                 [torch.rand(len(m), generator=g, dtype=torch.float64) for m in full.ffn],
                 torch.rand(len(full.hidden), generator=g, dtype=torch.float64))


def count_of(config: DecoderConfig, masks: Masks) -> int:
    return params_of(config, masks.widths(config))


def hidden_cost(config: DecoderConfig, masks: Masks) -> int:
    w = masks.widths(config)
    return params_of(config, w) - params_of(config, {**w, "hidden": w["hidden"] - 1})


def largest_cost(config: DecoderConfig) -> int:
    """Parameters the costliest single group of the full model removes."""
    full = Masks.full(config)
    d, hd = config.hidden_size, config.head_dim
    heads = max(d * hd * 2 * sum(head_layout(config, i)[1:]) for i in range(LAYERS))
    return max(hidden_cost(config, full), heads, 3 * d)


def smallest_masks(config: DecoderConfig) -> Masks:
    masks = Masks.full(config)
    for m in (*masks.heads, *masks.ffn, masks.hidden):
        m[1:] = False
    return masks


@pytest.mark.parametrize("shape", SHAPES)
def test_select_reaches_the_target_without_overshooting_much(shape):
    """The selected masks count <= target, and more than target minus the costliest group;
    the returned removals are the masks' difference; the input masks are not changed."""
    config = decoder_config(shape)
    full = Masks.full(config)
    source = count_of(config, full)
    for fraction in (0.9, 0.6, 0.3):
        target = int(source * fraction)
        new, removed = select(config, full, random_scores(config), target)
        assert target - largest_cost(config) < count_of(config, new) <= target
        assert removed == {
            "heads": sum(int((~m).sum()) for m in new.heads),
            "ffn": sum(int((~m).sum()) for m in new.ffn),
            "hidden": int((~new.hidden).sum())}
    assert all(bool(m.all()) for m in (*full.heads, *full.ffn, full.hidden))


def test_select_removes_the_least_salient_per_parameter_first():
    """Scores: all 1 but one FFN channel at 0, target one parameter below the source: that
    channel and nothing else goes. A hidden dim whose raw score exceeds an FFN channel's but
    whose score per parameter is lower goes before it."""
    config = decoder_config("gqa-rope-tied")
    full = Masks.full(config)
    source = count_of(config, full)
    scores = uniform_scores(config)
    scores.ffn[1][7] = 0.0
    new, removed = select(config, full, scores, source - 1)
    assert removed == {"heads": 0, "ffn": 1, "hidden": 0}
    assert not new.ffn[1][7] and int(new.ffn[1].sum()) == 47
    assert all(bool(m.all()) for m in (*new.heads, new.ffn[0], new.ffn[2], new.hidden))
    assert count_of(config, new) == source - 3 * config.hidden_size

    scores = uniform_scores(config, 1e3)
    cost_h, cost_f = hidden_cost(config, full), 3 * config.hidden_size
    scores.hidden[5], scores.ffn[0][3] = 1.0, 0.5  # raw: FFN lower; per parameter: hidden
    assert 1.0 / cost_h < 0.5 / cost_f
    new, removed = select(config, full, scores, source - 1)
    assert removed == {"heads": 0, "ffn": 0, "hidden": 1}
    assert not new.hidden[5] and bool(new.ffn[0].all())


def test_select_keeps_one_group_of_each_kind_and_refuses_an_unreachable_target():
    """Zero scores for everything of layer 0: at the smallest reachable count every layer
    keeps exactly one head group and one FFN channel and the model one hidden dimension; one
    parameter less raises ValueError."""
    config = decoder_config("gqa-rope-tied")
    full = Masks.full(config)
    scores = uniform_scores(config)
    scores.heads[0].zero_()
    scores.ffn[0].zero_()
    floor = count_of(config, smallest_masks(config))
    new, removed = select(config, full, scores, floor)
    assert count_of(config, new) == floor
    assert [int(m.sum()) for m in new.heads] == [1] * LAYERS
    assert [int(m.sum()) for m in new.ffn] == [1] * LAYERS
    assert int(new.hidden.sum()) == 1
    assert removed == {"heads": LAYERS * 1, "ffn": LAYERS * 47, "hidden": 31}
    with pytest.raises(ValueError, match=f"cannot reach {floor - 1} parameters"):
        select(config, full, scores, floor - 1)


def test_select_with_ffn_groups_only_changes_ffn_masks():
    """groups=('ffn',): heads and hidden stay whole, only FFN channels go; a target below
    what FFN pruning alone can reach is refused."""
    config = decoder_config("mqa-learned-untied")
    full = Masks.full(config)
    source = count_of(config, full)
    target = source - 50 * 3 * config.hidden_size
    new, removed = select(config, full, random_scores(config, 3), target, groups=("ffn",))
    assert removed["heads"] == removed["hidden"] == 0 and removed["ffn"] == 50
    assert all(bool(m.all()) for m in (*new.heads, new.hidden))
    assert count_of(config, new) == target
    ffn_floor = source - LAYERS * 47 * 3 * config.hidden_size
    with pytest.raises(ValueError, match=r"\['ffn'\]"):
        select(config, full, random_scores(config), ffn_floor - 1, groups=("ffn",))


def test_select_continues_from_existing_masks():
    """A second event starts from the first's masks: it never restores a pruned group, and
    reaches its own (lower) target."""
    config = decoder_config("mha-none-tied")
    full = Masks.full(config)
    source = count_of(config, full)
    first, _ = select(config, full, random_scores(config, 1), int(source * 0.8))
    second, _ = select(config, first, random_scores(config, 2), int(source * 0.6))
    assert count_of(config, second) <= int(source * 0.6)
    for a, b in zip((*first.heads, *first.ffn, first.hidden),
                    (*second.heads, *second.ffn, second.hidden)):
        assert not (b & ~a).any()


# ---------------------------------------------------------------------------------- compensation


def test_compensation_beats_zeroing_on_held_out_correlated_inputs():
    """A linear layer with correlated inputs (X = Z A): the least-squares update over the kept
    columns reproduces the full output on held-out inputs better than zeroing the columns;
    pruned columns come back exactly 0 and the kept ones are changed."""
    g = torch.Generator().manual_seed(0)
    n_in, n_out = 24, 10
    mixing = torch.randn(n_in, n_in, generator=g)
    weight = torch.randn(n_out, n_in, generator=g)

    def inputs(n):
        return torch.randn(n, n_in, generator=g) @ mixing

    train, held_out = inputs(400), inputs(400)
    keep = torch.ones(n_in, dtype=torch.bool)
    keep[torch.randperm(n_in, generator=g)[:9]] = False
    compensated = compensate(weight, train.T @ train, keep)
    zeroed = weight * keep
    assert (compensated[:, ~keep] == 0).all()
    assert not torch.allclose(compensated[:, keep], weight[:, keep])
    target = held_out @ weight.T
    error_comp = (held_out @ compensated.T - target).norm()
    error_zero = (held_out @ zeroed.T - target).norm()
    assert error_comp < 0.7 * error_zero
    # inputs that span fewer dimensions than the kept columns: compensation is near exact
    basis = torch.randn(12, n_in, generator=g)
    low_rank = torch.randn(400, 12, generator=g) @ basis
    exact = compensate(weight, low_rank.T @ low_rank, keep, damp=1e-8)
    test = torch.randn(50, 12, generator=g) @ basis
    assert (test @ exact.T - test @ weight.T).norm() < 1e-3 * (test @ weight.T).norm()


def test_affected_linears_are_the_layers_reading_pruned_columns():
    """Heads cut: that layer's o_proj; FFN channels: its down_proj; hidden dims: every Q/K/V
    (sharing q_proj's input), gate/up (sharing gate_proj's) and an untied LM head."""
    for shape, tied in (("gqa-rope-tied", True), ("mqa-learned-untied", False)):
        model = random_model(shape)
        full, new = Masks.full(model.config), Masks.full(model.config)
        new.heads[1][0] = False
        new.ffn[2][4] = False
        got = affected_linears(model, full, new)
        assert sorted(got) == ["1.o_proj", "2.down_proj"]
        linear, keep, source = got["1.o_proj"]
        assert linear is model.model.layers[1].self_attn.o_proj and source == "1.o_proj"
        _, q_per, _ = head_layout(model.config, 1)
        assert keep.tolist() == [False] * (q_per * 8) + [True] * (32 - q_per * 8)
        assert got["2.down_proj"][1].tolist() == [i != 4 for i in range(48)]
        new.hidden[9] = False
        got = affected_linears(model, full, new)
        per_layer = {f"{i}.{n}" for i in range(LAYERS)
                     for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
        assert set(got) == per_layer | {"1.o_proj", "2.down_proj"} | (
            set() if tied else {"lm_head"})
        assert got["0.v_proj"][2] == "0.q_proj" and got["2.up_proj"][2] == "2.gate_proj"
        assert affected_linears(model, new, new) == {}


def pattern_batch(g: torch.Generator, n: int = 8, t: int = 24) -> dict:
    """Rows of a repeating pattern of token ids (its period and offset vary by row)."""
    start = torch.randint(0, 7, (n, 1), generator=g)
    period = torch.randint(3, 6, (n, 1), generator=g)
    ids = 2 + (start + torch.arange(t)[None] % period * 5 + period * 3) % (VOCAB - 2)
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def trained_decoder():
    """A GQA decoder trained 40 steps on repeating patterns, with calibration and held-out
    batches of the same distribution."""
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=64)
    model = DecoderForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        model(**pattern_batch(g)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, [pattern_batch(g) for _ in range(4)], [pattern_batch(g) for _ in range(4)]


def _linear_inputs(model, names, batches) -> dict[str, torch.Tensor]:
    """The inputs (rows) of the named o_proj/down_proj layers over ``batches``."""
    seen = {name: [] for name in names}
    handles = []
    for name in names:
        i, kind = name.split(".")
        layer = model.model.layers[int(i)]
        module = layer.self_attn.o_proj if kind == "o_proj" else layer.mlp.down_proj

        def hook(module, args, output, name=name):
            seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"])
    for h in handles:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


@pytest.mark.parametrize("hidden", [False, True])
def test_compensate_model_lowers_held_out_loss_and_layer_error(trained_decoder, hidden):
    """Masking heads and FFN channels (and hidden dims): after compensate_model the masked
    model's held-out loss is lower than plain masking's, and for o_proj/down_proj the
    held-out reconstruction error ||W X - W' X|| of the compensated weight is lower than that
    of the zeroed one."""
    model, calib, held_out = trained_decoder
    config = model.config
    full, new = Masks.full(config), Masks.full(config)
    new.heads[0][0] = False
    new.ffn[0][::2] = False
    new.ffn[1][:24] = False
    if hidden:
        new.hidden[::4] = False
    plain, comp = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(plain, new)
    n = compensate_model(comp, full, new, calib)
    assert n == (3 + 2 * 5 if hidden else 3)
    assert not comp.training
    apply_masks(comp, new)
    with torch.no_grad():
        loss_plain = sum(plain(**b).loss.item() for b in held_out)
        loss_comp = sum(comp(**b).loss.item() for b in held_out)
        loss_full = sum(model(**b).loss.item() for b in held_out)
    assert loss_full < loss_comp < loss_plain

    _, q_per, _ = head_layout(config, 0)
    keeps = {"0.o_proj": new.heads[0].repeat_interleave(q_per * config.head_dim),
             "0.down_proj": new.ffn[0], "1.down_proj": new.ffn[1]}
    inputs = _linear_inputs(model, keeps, held_out)  # the unpruned model's, as in calibration
    for name, keep in keeps.items():
        i, kind = name.split(".")
        pick = (lambda m: m.model.layers[int(i)].self_attn.o_proj) if kind == "o_proj" else (
            lambda m: m.model.layers[int(i)].mlp.down_proj)
        x = inputs[name]
        with torch.no_grad():
            want = pick(model)(x)
            w_comp = pick(comp).weight
            assert (w_comp[:, ~keep] == 0).all() and (w_comp[new.hidden][:, keep] != 0).all()
            zeroed = pick(model).weight * keep
            err_comp = (x @ w_comp.T - want)[:, new.hidden].norm()
            err_zero = (x @ zeroed.T - want)[:, new.hidden].norm()
        assert err_comp < err_zero, name


def test_input_gram_sums_x_transpose_x_over_calls_and_removes_its_hooks():
    """InputGram: sum of X^T X over forwards for each hooked layer; closed, it hooks nothing."""
    linear = torch.nn.Linear(5, 3)
    gram = InputGram({"a": linear})
    xs = [torch.randn(2, 4, 5), torch.randn(7, 5)]
    for x in xs:
        linear(x)
    grams = gram.close()
    flat = torch.cat([x.reshape(-1, 5) for x in xs])
    torch.testing.assert_close(grams["a"], flat.T @ flat)
    linear(torch.randn(3, 5))
    torch.testing.assert_close(grams["a"], flat.T @ flat)
    assert not linear._forward_hooks


def test_check_prunable_refuses_what_cannot_be_pruned():
    """Per-head score biases refuse head groups, sinusoidal positions hidden groups, MLA and
    MoE everything; the other groups of such models stay allowed."""
    check_prunable(decoder_config("gqa-rope-tied"))
    alibi = decoder_config("gqa-rope-tied", position_encoding="alibi")
    with pytest.raises(ValueError, match="head groups"):
        check_prunable(alibi)
    check_prunable(alibi, ("ffn", "hidden"))
    sinus = decoder_config("gqa-rope-tied", position_encoding="sinusoidal")
    with pytest.raises(ValueError, match="hidden groups"):
        check_prunable(sinus)
    check_prunable(sinus, ("heads", "ffn"))
    with pytest.raises(ValueError, match="'mla'"):
        check_prunable(decoder_config("gqa-rope-tied", attention="mla"), ("ffn",))
    with pytest.raises(ValueError, match="8 experts"):
        check_prunable(decoder_config("gqa-rope-tied", num_experts=8), ("ffn",))


# ------------------------------------------------------------------------------------- schedule


def test_cubic_target_starts_at_the_source_ends_at_the_target_and_never_rises():
    """cubic_target: the source at step 0, the target at the last step and after, monotone
    non-increasing in between, fast at first (half-way is already 7/8 of the way)."""
    from effllm.training.prune import cubic_target

    source, target, steps = 100_000, 40_000, 200
    values = [cubic_target(source, target, s, steps) for s in range(steps + 5)]
    assert values[0] == source and values[steps] == target and values[-1] == target
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[steps // 2] == target + (source - target) // 8
    assert values[1] < source


def test_pruner_prunes_every_few_steps_down_the_schedule_and_keeps_masks():
    """Pruner's train() hooks: events after steps every, 2 every, ... and at prune_steps,
    each at or under the cubic schedule, the last at the target; the masked weights an
    optimiser step moves are zero again after on_step; a target not below the source is
    refused."""
    from effllm.specs import PruningSpec
    from effllm.training.prune import Pruner, cubic_target

    model = random_model("mqa-learned-untied", std=0.1).train()
    cfg = PruningSpec(mode="continuous", compensation=False, prune_steps=7, every=3,
                      groups=("heads", "ffn", "hidden"), saliency="taylor", calib_batches=1,
                      damp=0.01)
    source = count_params(model)[0]
    target = source * 6 // 10
    pruner = Pruner(model, cfg, target, lambda: [], tokens_per_step=10)
    assert pruner.source == source
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(7):
        ids = random_ids(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        pruner.on_gradients(step)
        optimizer.step()  # moves masked weights off zero (their gradient is not)
        optimizer.zero_grad()
        pruner.on_step(step)
        again = copy.deepcopy(model)
        apply_masks(again, pruner.masks)
        for a, b in zip(model.parameters(), again.parameters()):
            assert torch.equal(a, b)
    events = pruner.trajectory
    assert [e["tokens"] for e in events] == [0, 30, 60, 70]
    assert events[0]["params"] == source
    for e, done in zip(events[1:], (3, 6, 7)):
        assert e["params"] <= cubic_target(source, target, done, 7)
    assert events[-1]["params"] == count_of(model.config, pruner.masks) <= target
    assert pruner.scores is None
    masks = pruner.masks
    assert pruner.removed == {
        "heads": sum(int((~m).sum()) for m in masks.heads),
        "ffn": sum(int((~m).sum()) for m in masks.ffn), "hidden": int((~masks.hidden).sum())}
    with pytest.raises(ValueError, match="not below"):
        Pruner(random_model("mqa-learned-untied"), cfg, source, lambda: [], 10)


# --------------------------------------------------------------------------------------- config


def test_default_config_expands_to_the_pruning_runs(config, schema):
    """The default block, for each of its seeds: three routes from gqa-small (trained with
    that seed, else the attention block's first) to the tiny size, with their modes,
    compensation and steps, the source's shape and 500 steps; the scratch baseline is the
    tiny GQA run of that seed (seed 0: the attention block's gqa-tiny-s0, with one more
    membership), never a run of its own name."""
    from effllm.config import check_config
    from effllm.specs import RunSpec
    from effllm.sweep import LABELS, Membership, block_seeds, expand_runs, model_shape

    config = check_config(copy.deepcopy(config), schema)
    runs = expand_runs(config)["pretrain"]
    seeds = block_seeds(config, "pruning")
    attention_seeds = block_seeds(config, "attention")
    assert 0 in seeds and 0 in attention_seeds
    routes = {"pruning-aware": ("pruning_aware", "continuous", True, 200),
              "oneshot": ("oneshot", "oneshot", False, 0),
              "oneshot-obs": ("oneshot_obs", "oneshot", True, 0)}
    pruned = {name: run for name, run in runs.items() if run.spec.pruning is not None}
    assert sorted(pruned) == sorted(f"{prefix}-gqa-small-to-tiny-s{seed}"
                                    for prefix in routes for seed in seeds)
    tiny = model_shape(config, "tiny", {"name": "gqa"})
    for seed in seeds:
        source = runs[f"gqa-small-s{seed if seed in attention_seeds else attention_seeds[0]}"]
        for prefix, (technique, mode, compensation, prune_steps) in routes.items():
            run = pruned[f"{prefix}-gqa-small-to-tiny-s{seed}"]
            spec = run.spec
            assert run.technique == technique and run.upstream == source.run_id
            assert run.size == "tiny" and run.group == "pruning-tiny" and run.seed == seed
            assert run.memberships == (Membership("pruning", "pruning-tiny", technique,
                                                  LABELS[technique]),)
            assert spec.model == source.spec.model
            assert spec.train.steps == 500 and spec.train.sharding is None
            p = spec.pruning
            assert (p.mode, p.compensation, p.prune_steps) == (mode, compensation, prune_steps)
            assert (p.every, p.groups, p.saliency, p.calib_batches) == (
                20, ("heads", "ffn", "hidden"), "taylor", 4)
            assert p.target_params is None and p.target_model == tiny
        scratch = runs[f"gqa-tiny-s{seed}"]
        assert Membership("pruning", "pruning-tiny", "scratch", "Scratch") in scratch.memberships
        assert scratch.spec.model == tiny and scratch.spec.pruning is None
        assert scratch.spec.train.steps == 500 and scratch.seed == seed
    assert runs["gqa-small-s0"].memberships[0].block == "attention"
    scratch = runs["gqa-tiny-s0"]
    assert scratch.memberships[0] == Membership("attention", "attention-tiny", "gqa", "GQA")
    assert not any(name.startswith("scratch") for name in runs)
    spec = pruned["pruning-aware-gqa-small-to-tiny-s0"].spec
    assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def _set_block(**changes):
    return lambda c: c["pretrain"]["blocks"]["pruning"].update(changes)


@pytest.mark.parametrize("mutate, key", [
    (_set_block(source="gqa-huge"), "source"),
    (_set_block(source="moe-8x-small"), "source"),
    (_set_block(source="mamba-tiny"), "source"),
    (_set_block(target_params="medium"), "target_params"),
    (_set_block(target_params="small"), "target_params"),
    (_set_block(target_params="giant"), "target_params"),
    (_set_block(source="sinusoidal-small"), "groups"),
    (_set_block(source="alibi-small"), "groups"),
    (_set_block(target_params=100_000), "baselines"),
    (_set_block(every=300), "every"),
    (_set_block(prune_steps=494, continue_steps=6), "continue_steps"),  # no timed step after
])
def test_bad_pruning_blocks_are_refused_naming_the_key(config, schema, mutate, key):
    """Each bad pruning block raises ConfigError naming pretrain.blocks.pruning.<key>."""
    from effllm.config import ConfigError, check_config

    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError, match=f"'pretrain.blocks.pruning.{key}'"):
        check_config(bad, schema)


def test_a_target_size_with_more_parameters_than_the_source_is_refused(config, schema):
    """A target size narrower but much deeper than the source (hidden 64 x 40 layers: 2.1M
    parameters against gqa-small's 1.05M at vocabulary 2048) is refused, naming the key."""
    from effllm.config import ConfigError, check_config

    bad = copy.deepcopy(config)
    bad["sizes"]["deep"] = {"hidden_size": 64, "num_layers": 40, "num_heads": 4,
                            "intermediate_size": 192}
    bad["pretrain"]["blocks"]["pruning"]["target_params"] = "deep"
    with pytest.raises(ConfigError, match="'pretrain.blocks.pruning.target_params'"):
        check_config(bad, schema)


def test_adding_a_seed_to_the_attention_block_keeps_the_scratch_runs_spec(config, schema):
    """The scratch baseline of pruning seed 1 keeps its spec when the attention block starts
    running seed 1 too (the run just gains a membership)."""
    from effllm.config import check_config
    from effllm.sweep import expand_runs

    before = copy.deepcopy(config)
    before["pretrain"]["blocks"]["pruning"]["seeds"] = [0, 1]
    after = copy.deepcopy(before)
    after["pretrain"]["blocks"]["attention"]["seeds"] = [0, 1]
    a = expand_runs(check_config(before, schema))["pretrain"]["gqa-tiny-s1"]
    b = expand_runs(check_config(after, schema))["pretrain"]["gqa-tiny-s1"]
    assert a.spec.to_json() == b.spec.to_json()


def test_pruning_blocks_that_are_fine_are_accepted(config, schema):
    """Sinusoidal source without hidden groups, an integer target without scratch, ALiBi
    without head groups: accepted, and the integer target labels the runs in millions."""
    from effllm.config import check_config
    from effllm.sweep import expand_runs

    for changes in ({"source": "sinusoidal-small", "groups": ["heads", "ffn"]},
                    {"source": "alibi-small", "groups": ["ffn", "hidden"]},
                    {"target_params": 150_000, "baselines": ["oneshot"]}):
        ok = copy.deepcopy(config)
        ok["pretrain"]["blocks"]["pruning"].update(changes)
        check_config(ok, schema)
    runs = expand_runs(ok)["pretrain"]
    names = sorted(n for n, r in runs.items() if r.spec.pruning is not None and r.seed == 0)
    assert names == ["oneshot-gqa-small-to-0.15M-s0", "pruning-aware-gqa-small-to-0.15M-s0"]
    assert runs[names[0]].spec.pruning.target_params == 150_000
    assert runs[names[0]].spec.pruning.target_model is None


# ------------------------------------------------------------------------------------ run level


@pytest.fixture(scope="module")
def source_dir(stdlib_tokens, tmp_path_factory):
    """A randomly initialised source model of examples.SPEC's shape, saved with the tokenizer
    as a pretraining run's model folder."""
    from effllm.data.tokenizer import load_tokenizer, save_tokenizer
    from effllm.specs import ModelShape
    from effllm.training.pretrain import build_model
    from examples import SPEC

    tokenizer = load_tokenizer(stdlib_tokens / "tokenizer")
    torch.manual_seed(0)
    model = build_model(ModelShape.from_json(SPEC["settings"]["model"]), tokenizer)
    folder = tmp_path_factory.mktemp("source") / "model"
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    return folder


def route_spec(technique: str, pruning: dict, steps: int) -> dict:
    from examples import SPEC

    spec = copy.deepcopy(SPEC)
    spec.update(run_id=f"pretrain/{technique}-gqa-tiny-to-x-s0", technique=technique,
                label=technique, size="x", group="pruning-x", upstream="pretrain/gqa-tiny-s0")
    spec["settings"]["train"].update(steps=steps, checkpoint_every=0, eval_tokens=256)
    spec["settings"]["pruning"] = {"every": 2, "groups": ["heads", "ffn", "hidden"],
                                   "saliency": "taylor", "calib_batches": 2, "damp": 0.01,
                                   **pruning}
    return spec


@pytest.mark.parametrize("technique, pruning", [
    ("pruning_aware", {"mode": "continuous", "compensation": True, "prune_steps": 6,
                       "target_model": {"family": "decoder", "hidden_size": 16,
                                        "num_hidden_layers": 2, "num_attention_heads": 4,
                                        "intermediate_size": 32, "max_position_embeddings": 64,
                                        "num_key_value_heads": 2, "rope_theta": 10000.0,
                                        "attention": "gqa", "position_encoding": "rope"}}),
    ("oneshot_obs", {"mode": "oneshot", "compensation": True, "prune_steps": 0,
                     "target_params": 22_000}),
    ("pruning_aware", {"mode": "continuous", "compensation": False, "prune_steps": 6,
                       "groups": ["ffn"], "saliency": "taylor_elementwise",
                       "target_params": 26_000}),
], ids=["continuous-obs-to-shape", "oneshot-obs-to-count", "continuous-ffn-only"])
def test_a_pruning_route_runs_end_to_end(stdlib_tokens, source_dir, tmp_path, technique,
                                         pruning):
    """run_prune: the record validates; params_total is the saved model's count and <= the
    target; prune_params starts at the source, never rises, stays under the cubic schedule
    at each event and ends <= target; the route's other series and metrics agree with the
    saved model, which loads through AutoModelForCausalLM; groups left out stay whole."""
    from effllm.data.tokenizer import load_tokenizer
    from effllm.records import validate_record
    from effllm.training.prune import cubic_target, run_prune, target_count
    from effllm.specs import PruningSpec

    steps = 10
    spec = route_spec(technique, pruning, steps)
    run_prune(spec, stdlib_tokens, source_dir, tmp_path / "model", tmp_path / "record.json")
    record = json.loads((tmp_path / "record.json").read_text())
    validate_record(record)
    metrics = {k: m["value"] for k, m in record["metrics"].items()}
    series = record["series"]

    source = AutoModelForCausalLM.from_pretrained(source_dir)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(loaded) is DecoderForCausalLM
    target = target_count(PruningSpec.from_json(spec["settings"]["pruning"]),
                          load_tokenizer(stdlib_tokens / "tokenizer"))
    assert metrics["params_target"] == target
    assert metrics["params_source"] == count_params(source)[0]
    assert metrics["params_total"] == count_params(loaded)[0] <= target
    groups = spec["settings"]["pruning"]["groups"]
    assert metrics["hidden_size"] == loaded.config.hidden_size
    assert (loaded.config.hidden_size < 32) == ("hidden" in groups)
    assert metrics["source_hidden_size"] == 32
    bs, seq = spec["settings"]["train"]["batch_size"], spec["settings"]["train"]["seq_len"]
    assert metrics["route_tokens"] == steps * bs * seq
    # passes over the 2 calibration batches: one-shot saliency once, compensation per event
    # that cut something
    cuts = sum(b < a for a, b in zip(series["prune_params"], series["prune_params"][1:]))
    passes = (pruning["mode"] == "oneshot") + (cuts if pruning["compensation"] else 0)
    assert metrics["calibration_tokens"] == passes * 2 * bs * seq
    assert record["provenance"]["execution"]["pruning"] == (
        f"{pruning['mode']}, groups {groups}, saliency {spec['settings']['pruning']['saliency']}"
        f", compensation {pruning['compensation']}")
    assert record["params"]["settings"]["pruning"] == spec["settings"]["pruning"]

    params = series["prune_params"]
    assert params[0] == metrics["params_source"] and params[-1] <= target
    assert params[-1] == metrics["params_total"]
    changed = [b for a, b in zip(params, params[1:]) if b != a]
    assert changed and all(a > b for a, b in zip([params[0], *changed], changed))
    if pruning["mode"] == "continuous":
        assert series["prune_tokens"] == [float(s * bs * seq) for s in (0, 2, 4, 6)]
        for k, p in enumerate(params[1:], 1):
            assert p <= cubic_target(params[0], target, 2 * k, 6)
        assert len(series["prune_train_loss"]) == 6 and len(series["train_loss"]) == steps - 6
    else:
        assert series["prune_tokens"] == [0.0, 0.0] and "prune_train_loss" not in series
        assert len(series["train_loss"]) == steps
    for key in ("prune_heads", "prune_ffn_channels", "prune_hidden"):
        assert len(series[key]) == len(params)
        assert all(a >= b for a, b in zip(series[key], series[key][1:])), key

    c = loaded.config
    layers = range(c.num_hidden_layers)
    for key in ("layer_heads", "layer_kv_heads", "layer_ffn", "source_layer_heads",
                "source_layer_ffn"):
        assert len(series[key]) == c.num_hidden_layers == 2, key
    assert series["layer_heads"] == [float(c.heads_at(i)) for i in layers]
    assert series["layer_kv_heads"] == [float(c.kv_heads_at(i)) for i in layers]
    assert series["layer_ffn"] == [float(c.ffn_at(i)) for i in layers]
    assert series["source_layer_heads"] == [4.0, 4.0]
    assert series["source_layer_ffn"] == [64.0, 64.0]
    assert series["prune_heads"][-1] == sum(series["layer_heads"])
    assert series["prune_ffn_channels"][-1] == sum(series["layer_ffn"])
    assert series["prune_hidden"][-1] == c.hidden_size
    assert metrics["groups_removed_heads"] == 2 * 2 - sum(series["layer_kv_heads"])
    assert metrics["groups_removed_ffn"] == 2 * 64 - sum(series["layer_ffn"])
    assert metrics["groups_removed_hidden"] == 32 - c.hidden_size
    if "heads" not in groups:
        assert series["layer_heads"] == [4.0, 4.0] and metrics["groups_removed_heads"] == 0
    assert params_of(c, {"heads": [c.heads_at(i) for i in layers],
                         "kv_heads": [c.kv_heads_at(i) for i in layers],
                         "ffn": [c.ffn_at(i) for i in layers],
                         "hidden": c.hidden_size}) == metrics["params_total"]
    ids = torch.randint(2, 100, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=ids).logits).all()


# ----------------------------------------------------------------------------------- hub sources


@pytest.mark.parametrize("tied", [True, False])
def test_a_llama_maps_onto_our_decoder_exactly(tied):
    """as_decoder: a Llama-architecture model becomes our decoder with identical logits (the
    weights map by name), so it can be pruned and sliced like ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from effllm.models.pruning import as_decoder

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
        rope_theta=5e5)).eval()
    ours = as_decoder(llama).eval()
    assert type(ours) is DecoderForCausalLM and ours.config.rope_theta == 5e5
    assert ours.config.tie_word_embeddings == tied
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, llama(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)
    assert count_params(ours)[0] == count_params(llama)[0]


def test_a_hub_model_with_biases_is_refused():
    """Qwen2's Q/K/V biases have no place in our decoder: as_decoder says so."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from effllm.models.pruning import as_decoder

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2))
    with pytest.raises(ValueError, match="Llama-architecture.*qwen2"):
        as_decoder(qwen)


def hub_source_config(config, repo: str) -> dict:
    config = copy.deepcopy(config)
    config["hub_models"] = {"tiny-llama": {"repo_id": repo}}
    config["data"]["tokenizer"]["hub"] = "tiny-llama"
    config["pretrain"]["blocks"]["pruning"].update(
        source="tiny-llama", target_params=30_000, baselines=["oneshot"], seeds=[0])
    return config


def test_a_cached_hub_model_is_a_pruning_source(config, schema, hub, use_cache, stdlib_tokens,
                                                tmp_path):
    """A Llama in the hub cache as the block's source: the routes start from hub/<name> with
    its shape, the config insists on its tokenizer, and a one-shot route runs from the cached
    snapshot to a sliced decoder of at most the target's parameters."""
    from hubcache import REPO

    from effllm.config import ConfigError, check_config
    from effllm.data.hub import cached_model
    from effllm.sweep import expand_runs
    from effllm.training.prune import run_prune

    use_cache(hub)
    checked = check_config(hub_source_config(config, REPO), schema)
    runs = expand_runs(checked)["pretrain"]
    route = runs["oneshot-tiny-llama-to-0.03M-s0"].spec
    assert route.upstream == "hub/tiny-llama"
    assert (route.model.hidden_size, route.model.num_key_value_heads, route.model.attention) == (
        64, 2, "gqa")
    wrong = hub_source_config(config, REPO)
    wrong["data"]["tokenizer"]["hub"] = None
    with pytest.raises(ConfigError, match="'data.tokenizer.hub'"):
        check_config(wrong, schema)

    spec = route.to_json()
    spec["settings"]["train"].update(steps=8, eval_tokens=256, seq_len=32, batch_size=4)
    spec["settings"]["long_context"] = None
    run_prune(spec, stdlib_tokens, cached_model(REPO), tmp_path / "model",
              tmp_path / "record.json")
    record = json.loads((tmp_path / "record.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(loaded) is DecoderForCausalLM
    assert record["metrics"]["params_total"]["value"] == count_params(loaded)[0] <= 30_000
    assert record["metrics"]["source_hidden_size"]["value"] == 64


def test_the_schema_states_the_pruning_defaults_the_sweep_applies(schema):
    """The schema's defaults of the pruning block (what config/README.md documents) are the
    ones effllm.sweep.PRUNING_DEFAULTS fills in: one set of defaults, not two that drift."""
    import yaml

    from effllm.sweep import PRUNING_DEFAULTS

    tree = yaml.safe_load(schema.read_text())
    block = tree["properties"]["pretrain"]["properties"]["blocks"]["properties"]["pruning"]
    props = next(o for o in block["anyOf"] if o.get("type") == "object")["properties"]
    stated = {key: spec["default"] for key, spec in props.items() if "default" in spec}
    assert stated == PRUNING_DEFAULTS
