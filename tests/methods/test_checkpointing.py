"""Gradient checkpointing of the backbone's layers (readlib.methods.enable_gradient_checkpointing): for every method
that back-propagates through them, the same gradients as without it and far fewer bytes saved for backward, on
MiniLM and on a small random T5 text-to-text; a ConfigError for the methods that never back-propagate through the
backbone's layers.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import F32, own_copy
from torch import nn
from transformers import T5ForConditionalGeneration

from readlib import backbones, methods
from readlib.costs import SavedTensorMeter
from readlib.errors import ConfigError

CHECKPOINTING = [name for name, spec in methods.METHODS.items() if spec.checkpointing]
B, N, T = 4, 16, 4  # batch, source tokens, target tokens
PROMPTS = methods.make_config("prompt").n_prompts  # prompt tuning lengthens the encoder's input by these
# MiniLM-L6: 6 layers, d = 384, FFN 1536. The T5: 6 + 6 layers, d = 64, FFN 512 (8 d: its FFN activations alone then
# bound the bytes without checkpointing above twice the bound with it), a 128-word vocabulary (small logits).
LAYERS, D, FFN = 6, 384, 1536
T5_LAYERS, T5_D, T5_FFN, T5_VOCAB = 6, 64, 512, 128


def small_t5() -> backbones.Backbone:
    config = backbones.random_t5_config(f"random-t5-tiny:num_layers={T5_LAYERS},d_ff={T5_FFN}")
    config.vocab_size = T5_VOCAB
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(config).requires_grad_(False).eval()
    return backbones.Backbone("small-t5", model, None, T5_D, T5_LAYERS, "test", False, "text-to-text")


def batch_for(backbone):
    gen = torch.Generator().manual_seed(0)
    vocab = T5_VOCAB if backbone.formulation == "text-to-text" else backbone.tokenizer.vocab_size
    ids = torch.randint(5, vocab, (B, N), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if backbone.formulation == "text-to-text":
        labels = torch.randint(5, vocab, (B, T), generator=gen)
        batch["decoder_input_ids"] = torch.cat([torch.zeros(B, 1, dtype=torch.long), labels[:, :-1]], 1)
        return batch, labels
    return batch, torch.tensor([0, 1, 1, 0])


def step(method, backbone, checkpointing):
    """Gradients of the trainable parameters after one training-mode forward and backward, and the bytes saved
    for backward in the forward."""
    torch.manual_seed(0)  # the same initialisation (LoRA's A, the prompts, the adapters) in both runs
    model = methods.build(method, backbone, 2).train()  # transformers checkpoints only in training mode
    if checkpointing:
        methods.enable_gradient_checkpointing(method, model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B and T5's added biases start at zero; from zero, LoRA's A would get no gradient
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    batch, labels = batch_for(backbone)
    torch.manual_seed(2)  # the same dropout masks: checkpointing replays the RNG state when it recomputes a layer
    with SavedTensorMeter(model) as meter:
        logits = model(**batch)
        loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return grads, meter.bytes


def assert_same_gradients(with_gc, without_gc):
    assert with_gc.keys() == without_gc.keys()
    # relative to the largest gradient: some are zero up to rounding (T5's key biases: softmax ignores a shift of a
    # query's scores), so a per-tensor relative tolerance would compare rounding noise
    scale = max(g.abs().max().item() for g in without_gc.values())
    assert scale > 0
    for name, g in without_gc.items():
        torch.testing.assert_close(with_gc[name], g, rtol=0, atol=1e-4 * scale, msg=name)


def test_checkpointing_methods():
    assert set(CHECKPOINTING) == {"full", "bitfit", "lora", "prompt", "adapter"}


@pytest.mark.parametrize("method", CHECKPOINTING)
def test_minilm_same_gradients_fewer_saved_bytes(minilm, method):
    with_gc, gc_bytes = step(method, own_copy(minilm), checkpointing=True)
    without_gc, bytes_ = step(method, own_copy(minilm), checkpointing=False)
    assert_same_gradients(with_gc, without_gc)
    n = N + PROMPTS if method == "prompt" else N
    # with checkpointing autograd keeps, per layer, only its input [B, n, D]; outside the layers the embeddings'
    # sum and dropout mask and the head's pooled vectors [B, D]: under (LAYERS + 3) B n D floats
    assert gc_bytes <= (LAYERS + 3) * B * n * D * F32
    # without it every layer keeps at least its GELU input [B, n, FFN] (GELU's backward needs it)
    assert bytes_ >= LAYERS * B * n * FFN * F32
    assert 2 * gc_bytes < bytes_  # follows from the two bounds: 9 D = 3456 < 6 FFN / 2 = 4608 per B n floats


@pytest.mark.parametrize("method", CHECKPOINTING)
def test_t5_same_gradients_fewer_saved_bytes(method):
    with_gc, gc_bytes = step(method, small_t5(), checkpointing=True)
    without_gc, bytes_ = step(method, small_t5(), checkpointing=False)
    assert_same_gradients(with_gc, without_gc)
    n = N + PROMPTS if method == "prompt" else N
    # with checkpointing: per block its input (encoder [B, n, d], decoder [B, T, d]); outside the blocks the
    # embeddings' dropout masks and outputs, the final layer norms' inputs, outputs and dropout masks, the encoder's
    # output (every cross-attention's input) and the LM head's input: under (layers + 6) B (n + T) d floats, the
    # extra B (n + T) d covering the position biases [heads, n, n], [heads, T, T], [heads, T, n], the attention
    # masks, the token ids and the log-softmax of the logits [B T, 128]
    assert gc_bytes <= (T5_LAYERS + 6) * B * (n + T) * T5_D * F32
    # without it every block keeps at least its ReLU output [B, n or T, FFN] (ReLU's backward needs it)
    assert bytes_ >= T5_LAYERS * B * (n + T) * T5_FFN * F32
    assert 2 * gc_bytes < bytes_  # follows from the two bounds: 12 d = 768 < 6 FFN / 2 = 1536 per B (n + T) floats


@pytest.mark.parametrize("method", ["read", "lst", "selective"])
def test_no_checkpointing_without_backprop_through_the_backbone(method):
    assert not methods.get_method(method).checkpointing
    with pytest.raises(ConfigError, match=f"layers \\(full, bitfit, lora, prompt, adapter\\), not to '{method}'"):
        methods.enable_gradient_checkpointing(method, nn.Identity())  # refused before the model is looked at


def test_spec_checkpointing_excludes_the_cache():
    with pytest.raises(TypeError, match="trains from the cache cannot checkpoint"):
        dataclasses.replace(methods.get_method("read"), checkpointing=True).check()


def test_checkpointing_needs_a_transformers_model():
    with pytest.raises(ConfigError, match="no transformers model inside Linear"):
        methods.enable_gradient_checkpointing("full", nn.Linear(2, 2))
