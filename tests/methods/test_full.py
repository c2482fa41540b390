"""Full fine-tuning (readlib.methods.full): every backbone parameter trains, on both formulations."""

import torch
from helpers import encode_sentences, grads_set, load_t5, own_copy, seq2seq_batch, t5_tiny

from readlib import methods


def test_full_seq2seq_trains_every_t5_parameter():
    bb = load_t5()
    model = methods.build("full", bb, 2)
    inputs = seq2seq_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs), bb.model(**inputs).logits)
    model(**inputs).square().mean().backward()
    params = list(model.parameters())
    assert params and all(p.requires_grad for p in params)
    assert all(p.grad is not None for p in params)
    assert methods.count_parameters(model)[0] == sum(p.numel() for p in bb.model.parameters())


def test_full_gradients_reach_every_t5_parameter():
    bb = t5_tiny()
    model = methods.build("full", bb, 2)
    model(**encode_sentences(bb)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_full_minilm_trains_only_parameters_that_get_gradients(minilm):
    model = methods.build("full", own_copy(minilm), 2)
    model(**encode_sentences(minilm)).sum().backward()
    assert grads_set(model) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_count_is_total():
    bb = t5_tiny()
    backbone_params = sum(p.numel() for p in bb.model.parameters())
    model = methods.build("full", bb, 3)
    assert methods.count_parameters(model) == (backbone_params + 64 * 3 + 3,) * 2
