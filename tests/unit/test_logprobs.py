"""Blocked scoring (effllm.evaluation.logprobs) equals plain full-logits scoring, for our decoder,
a transformers Llama, a peft-wrapped model and a head with a bias, and never holds more than a
block of logits."""

import pytest
import torch
import torch.nn.functional as F

from effllm.evaluation.logprobs import token_scores
from effllm.models import DecoderConfig, DecoderForCausalLM
from hubcache import llama
from invariants import LargestTensor

VOCAB = 97


def decoder(vocab=VOCAB):
    torch.manual_seed(0)
    return DecoderForCausalLM(DecoderConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()


def with_bias():
    model = decoder()
    head = torch.nn.Linear(32, VOCAB, bias=True)
    torch.nn.init.normal_(head.bias)
    model.config.tie_word_embeddings = False
    model.lm_head = head
    return model


def lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(decoder(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    return model.eval()


def plain(model, ids, mask, targets):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    keep = targets != -100
    return (F.cross_entropy(logits[keep], targets[keep], reduction="sum").item(),
            int((logits.argmax(-1)[keep] == targets[keep]).sum()), int(keep.sum()))


def batch(vocab=VOCAB):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    targets[1, :4] = -100
    targets[2, :2] = -100  # a prompt
    return ids, mask, targets


def baseline(family):
    from test_baselines import tiny

    return lambda: tiny(family).eval()


@pytest.mark.parametrize("make", [decoder, with_bias, lora, lambda: llama(VOCAB).eval(),
                                  baseline("mamba"), baseline("rwkv"), baseline("gpt_neox")],
                         ids=["decoder", "bias", "peft", "llama", "mamba", "rwkv", "gpt_neox"])
@pytest.mark.parametrize("rows, vocab", [(4, 10), (1, 97), (1000, 32)])
def test_blocked_scores_equal_full_logits(make, rows, vocab):
    model = make()
    ids, mask, targets = batch()
    nll, correct, count = token_scores(model, ids, mask, targets, rows=rows, vocab=vocab)
    ref_nll, ref_correct, ref_count = plain(model, ids, mask, targets)
    assert count == ref_count == int((targets != -100).sum())
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    assert correct == ref_correct


def test_no_tensor_holds_the_batchs_logits():
    """The largest tensor made while scoring is a block (rows x vocab), never B x T x V."""
    model = decoder(vocab=2000)  # logits outgrow the activations, as in a real model
    ids, mask, targets = batch(vocab=2000)
    with LargestTensor() as probe:
        token_scores(model, ids, mask, targets, rows=4, vocab=16)
    full = ids.numel() * 2000 * 4  # bytes of fp32 logits
    assert probe.largest < full / 10, (probe.largest, full)
    with LargestTensor() as reference:
        plain(model, ids, mask, targets)
    assert reference.largest >= full  # the plain path does hold them: the probe can see it
