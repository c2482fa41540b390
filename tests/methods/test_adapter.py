"""Houlsby adapters (readlib.methods.adapter): places, counts, start point, AdapterHub reference, training.

Every model is built on its own backbone (the session's MiniLM deep-copied, tiny T5s loaded fresh): the method
attaches its adapters to the backbone in place.
"""

from pathlib import Path

import pytest
import torch
from helpers import (
    VOCAB,
    assert_restores,
    encode,
    grads_set,
    own_copy,
    randomize,
    t5_batch,
    t5_text,
    train_steps,
    trainable_names,
)
from torch.nn import functional as F

from readlib import backbones, methods
from readlib.errors import ConfigError
from readlib.methods import adapter
from readlib.params import make_params
from readlib.train import fit

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "adapter_reference.pt"


# MiniLM-L6: 6 layers, d = 384. Tiny T5: 2 + 2 blocks, d = 64. T5-base: 12 + 12 blocks, d = 768.
D, LAYERS = 384, 6


T5_D, T5_LAYERS = 64, 2


def t5_encoder():
    return backbones.load("random-t5-tiny", formulation="classification")


def head(num_labels, d=D):
    return d * num_labels + num_labels


def per_adapter(d, m):
    return 2 * d * m + m + d  # W_down [m, d] + b_down [m] + W_up [d, m] + b_up [d]


def minilm_count(num_labels, m=64, per_layer=2):
    return LAYERS * per_layer * per_adapter(D, m) + head(num_labels)


def t5_tiny_count(m=64):
    return (T5_LAYERS + T5_LAYERS) * 2 * per_adapter(T5_D, m)  # encoder and decoder: self-attention + FFN


MINILM_LAYER_NORMS = (1 + 2 * LAYERS) * 2 * D  # embeddings' + 2 per layer, weight and bias


T5_TINY_LAYER_NORMS = (2 * T5_LAYERS + 1 + 3 * T5_LAYERS + 1) * T5_D  # RMS norms, weight only; + each stack's final


def adapters_of(model):
    return [m for m in model.modules() if isinstance(m, adapter.Adapter)]


def sites(names):
    """Module paths of the adapters among parameter names (the dropout module each one follows)."""
    return {n.split(".adapter.")[0] for n in names if ".adapter." in n}


def expected_sites(path):
    if path == "encoder":
        return {f"encoder.encoder.layer.{i}.{s}.dropout" for i in range(LAYERS) for s in ("attention.output", "output")}
    if path == "t5-encoder":
        return {f"encoder.encoder.block.{i}.layer.{j}.dropout" for i in range(T5_LAYERS) for j in (0, 1)}
    # decoder blocks: layer 0 self-attention, 1 cross-attention (no adapter), 2 FFN
    return ({f"t5.encoder.block.{i}.layer.{j}.dropout" for i in range(T5_LAYERS) for j in (0, 1)}
            | {f"t5.decoder.block.{i}.layer.{j}.dropout" for i in range(T5_LAYERS) for j in (0, 2)})


def build(path, minilm, args=None):
    if path == "encoder":
        bb = own_copy(minilm)
        return methods.build("adapter", bb, 2, args), encode(minilm)
    if path == "t5-encoder":
        bb = t5_encoder()
        return methods.build("adapter", bb, 2, args), encode(bb)
    return methods.build("adapter", t5_text(), 2, args), t5_batch()[0]


def scalar(out):
    return out.sum() if out.dim() == 2 else out.logsumexp(-1).sum()


# ---------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("num_labels", [1, 3])
def test_encoder_forward_shape_and_backward(minilm, num_labels):
    model = methods.build("adapter", own_copy(minilm), num_labels).train()
    logits = model(**encode(minilm))
    assert logits.shape == (3, num_labels) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for a in adapters_of(model) for p in a.parameters())


def test_t5_encoder_forward_shape_and_backward():
    bb = t5_encoder()
    model = methods.build("adapter", bb, 3).train()
    logits = model(**encode(bb))
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert grads_set(model) == trainable_names(model)


def test_text_to_text_forward_shape_and_backward():
    model = methods.build("adapter", t5_text(), 2).train()
    logits = model(**t5_batch()[0])
    assert logits.shape == (3, 4, VOCAB) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert grads_set(model) == trainable_names(model)


@pytest.mark.parametrize("layer_norms", [False, True])
@pytest.mark.parametrize("path", ["encoder", "t5-encoder", "seq2seq"])
def test_gradients_reach_exactly_the_intended_parameters(minilm, path, layer_norms):
    model, batch = build(path, minilm, {"layer_norms": layer_norms})
    model.train()
    scalar(model(**batch)).backward()
    names = [n for n, _ in model.named_parameters()]
    own = {n for n in names if ".adapter." in n}
    assert sites(own) == expected_sites(path)  # after self-attention and FFN; never after cross-attention
    assert {n.rsplit(".adapter.", 1)[1] for n in own} == {"down.weight", "down.bias", "up.weight", "up.bias"}
    norms = {n for n in names if "LayerNorm" in n or "layer_norm" in n}  # incl. embeddings' / final norms
    expected = own | {n for n in names if n.startswith("head.")} | (norms if layer_norms else set())
    assert norms and len(expected) < len(names)
    assert trainable_names(model) == expected
    assert grads_set(model) == expected  # and no frozen parameter has a gradient
    assert not any(p.requires_grad for p in minilm.model.parameters())  # the shared backbone is untouched


def test_attention_false_keeps_only_the_ffn_adapters(minilm):
    model, _ = build("seq2seq", minilm, {"attention": False})
    assert sites(trainable_names(model)) == {f"t5.{stack}.block.{i}.layer.{j}.dropout" for i in range(T5_LAYERS)
                                             for stack, j in (("encoder", 1), ("decoder", 2))}


# ---------------------------------------------------------------- where the adapter sits


def test_bert_adapter_sits_before_the_residual_add_and_layer_norm(minilm):
    # Houlsby Figure 2: LayerNorm(x + A(Dropout(W_o attention))) — checked inside the first attention sublayer
    model = methods.build("adapter", own_copy(minilm), 2).eval()
    randomize(torch.nn.ModuleList(adapters_of(model)), std=0.05)
    out = model.encoder.encoder.layer[0].attention.output
    seen = {}
    out.register_forward_pre_hook(lambda _, args: seen.update(h=args[0], x=args[1]))
    out.LayerNorm.register_forward_pre_hook(lambda _, args: seen.update(ln_in=args[0]))
    with torch.no_grad():
        model(**encode(minilm))
        expected = seen["x"] + out.dropout.adapter(out.dense(seen["h"]))
    torch.testing.assert_close(seen["ln_in"], expected, rtol=0, atol=1e-6)


def test_t5_adapter_sits_before_the_residual_add():
    # pre-LN T5: x + A(Dropout(FFN(LayerNorm(x)))) — checked on the decoder's last FFN sublayer
    bb = t5_text()
    model = methods.build("adapter", bb, 2).eval()
    randomize(torch.nn.ModuleList(adapters_of(model)), std=0.2)
    ff = bb.model.decoder.block[-1].layer[2]
    seen = {}
    ff.register_forward_hook(lambda _, args, output: seen.update(x=args[0], y=output))
    with torch.no_grad():
        model(**t5_batch()[0])
        expected = seen["x"] + ff.dropout.adapter(ff.DenseReluDense(ff.layer_norm(seen["x"])))
    torch.testing.assert_close(seen["y"], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, f", [
    ("swish", F.silu), ("gelu", F.gelu), ("gelu_new", lambda z: F.gelu(z, approximate="tanh")), ("relu", F.relu)])
def test_adapter_computes_the_residual_bottleneck(name, f):
    module = adapter.Adapter(8, 3, name)
    randomize(module, std=0.5)
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    w1, b1, w2, b2 = module.down.weight, module.down.bias, module.up.weight, module.up.bias
    with torch.no_grad():
        expected = h + f(h @ w1.T + b1) @ w2.T + b2
        # nn.Linear vs matmul and add round differently on other CPUs: ~30 ulps of the largest value (~8), still
        # far below what separates gelu from its tanh approximation here (~1e-3)
        torch.testing.assert_close(module(h), expected, rtol=2e-6, atol=2e-6 * expected.abs().max().item())


def test_houlsby_init_is_near_zero_truncated_normal():
    torch.manual_seed(0)
    module = adapter.Adapter(768, 64)
    for w in (module.down.weight, module.up.weight):
        assert w.abs().max() <= 2e-2  # truncated at two standard deviations
        assert 0.0080 < w.std() < 0.0096  # std of N(0, 0.01²) cut at ±2σ: 0.01 · 0.880
    assert not module.down.bias.any() and not module.up.bias.any()


def test_unsupported_backbone_is_a_config_error():
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    with pytest.raises(ConfigError, match="^adapter supports BERT and T5 backbones; found no adapter site in GPT2"):
        adapter.add_adapters(gpt2, adapter.Config())


# ---------------------------------------------------------------- parameter counts


def test_formulas_by_number():
    assert per_adapter(384, 64) == 49_600 and per_adapter(768, 64) == 99_136 and per_adapter(768, 32) == 49_952
    assert minilm_count(2) == 595_200 + 770
    assert t5_tiny_count() == 66_560 and T5_TINY_LAYER_NORMS == 768 and MINILM_LAYER_NORMS == 9_984


@pytest.mark.parametrize("args, num_labels, expected", [
    ({}, 2, minilm_count(2)),
    ({"bottleneck": 32}, 1, minilm_count(1, m=32)),
    ({"attention": False}, 3, minilm_count(3, per_layer=1)),
    ({"layer_norms": True}, 2, minilm_count(2) + MINILM_LAYER_NORMS),
])
def test_minilm_trainable_count_formula(minilm, args, num_labels, expected):
    frozen = sum(p.numel() for p in minilm.model.parameters())
    model = methods.build("adapter", own_copy(minilm), num_labels, args)
    added = expected - head(num_labels) - (MINILM_LAYER_NORMS if args.get("layer_norms") else 0)
    assert methods.count_parameters(model) == (expected, frozen + added + head(num_labels))


@pytest.mark.parametrize("args, expected", [
    ({}, t5_tiny_count()),
    ({"bottleneck": 8}, t5_tiny_count(8)),
    ({"layer_norms": True}, t5_tiny_count() + T5_TINY_LAYER_NORMS),
])
def test_t5_trainable_count_formula(args, expected):
    bb = t5_text()
    frozen = sum(p.numel() for p in bb.model.parameters())
    model = methods.build("adapter", bb, 2, args)
    added = expected - (T5_TINY_LAYER_NORMS if args.get("layer_norms") else 0)
    assert methods.count_parameters(model) == (expected, frozen + added)


def test_t5_encoder_trainable_count_formula():
    model = methods.build("adapter", t5_encoder(), 3)
    assert methods.count_parameters(model)[0] == T5_LAYERS * 2 * per_adapter(T5_D, 64) + head(3, T5_D)


@pytest.mark.parametrize("args, adapters, percent", [
    ({}, 48, 1.92),  # Houlsby: 2 per block, encoder + decoder
    ({"bottleneck": 32}, 48, 0.97),
    ({"attention": False}, 24, 0.96),  # 1 per block: READ Table 1's "Adapter 0.96 %"
])
def test_t5_base_counts_against_read_table_1(args, adapters, percent):
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):  # shapes only
        t5 = T5ForConditionalGeneration(backbones.random_t5_config("random-t5-base"))
    frozen = sum(p.numel() for p in t5.parameters())
    read_total = frozen + VOCAB * 768  # READ's 247.58 M counts the tied LM head a second time
    assert (frozen, read_total) == (222_903_552, 247_577_856)
    config = methods.make_config("adapter", args)
    trained = sum(p.numel() for a in adapter.add_adapters(t5, config) for p in a.parameters())
    assert trained == adapters * per_adapter(768, config.bottleneck)
    assert round(100 * trained / read_total, 2) == percent


# ---------------------------------------------------------------- the start point


def test_encoder_starts_near_the_frozen_model(minilm):
    # Houlsby's near-identity init: weights ~ N(0, 1e-2²) cut at 2σ move MiniLM's last hidden state by ~1.4 %
    bb = own_copy(minilm)
    batch = encode(minilm)
    with torch.no_grad():
        frozen = minilm.last_hidden_state(**batch)
        torch.manual_seed(0)
        model = methods.build("adapter", bb, 3).eval()
        adapted = bb.last_hidden_state(**batch)
        mask = batch["attention_mask"].bool()
        relative = ((adapted - frozen)[mask].norm() / frozen[mask].norm()).item()
        assert 1e-3 < relative < 3e-2, relative
        for a in adapters_of(model):  # with W_up = 0 and b_up = 0 every adapter is the identity, exactly
            a.up.weight.zero_()
            a.up.bias.zero_()
        assert torch.equal(bb.last_hidden_state(**batch), frozen)
        assert torch.equal(model(**batch), model.head(frozen, batch["attention_mask"]))


def test_text_to_text_starts_near_the_frozen_t5():
    bb = t5_text()
    inputs, _ = t5_batch()
    with torch.no_grad():
        frozen = bb.model(**inputs).logits
        torch.manual_seed(0)
        model = methods.build("adapter", bb, 2).eval()
        logits = model(**inputs)
        relative = ((logits - frozen).norm() / frozen.norm()).item()
        assert 1e-4 < relative < 1e-2, relative
        for a in adapters_of(model):
            a.up.weight.zero_()
            a.up.bias.zero_()
        assert torch.equal(model(**inputs), frozen)


# ---------------------------------------------------------------- AdapterHub reference


def test_matches_adapterhub_houlsby_on_minilm(minilm):
    """Same weights, same output as AdapterHub's Houlsby adapter ("double_seq_bn", bottleneck 64).

    The reference was made with adapters 1.3.0 on transformers 4.57.6 (the newest transformers it supports):
    MiniLM with this module's adapters, their parameters in model order set by ``helpers.randomize(
    ModuleList(adapters), std, seed)``, copied into AdapterHub's ``adapter_down[0]`` / ``adapter_up`` of the
    same layer and sublayer; AdapterHub's last hidden state on two sentences was saved (under 4.57.6 the two
    implementations agreed exactly). Stored: inputs, seed, std, a checksum of the weights, the output.
    """
    ref = torch.load(REFERENCE, weights_only=True)
    assert (ref["transformers"], ref["adapters"], ref["bottleneck"]) == ("4.57.6", "1.3.0", 64)
    bb = own_copy(minilm)
    model = methods.build("adapter", bb, 2, {"bottleneck": ref["bottleneck"]}).eval()
    adapters = adapters_of(model)
    assert len(adapters) == 2 * LAYERS
    randomize(torch.nn.ModuleList(adapters), std=ref["std"], seed=ref["seed"])
    checksum = sum(p.double().abs().sum().item() for a in adapters for p in a.parameters())
    # torch.randn's float32 kernel differs in the last bits between CPUs (AVX2 vs AVX-512 or none); another seed
    # moves the sum by ~1e-3
    assert checksum == pytest.approx(ref["weights_abs_sum"], rel=1e-6)  # the very weights of the reference
    with torch.no_grad():
        hidden = bb.last_hidden_state(**ref["inputs"])
        frozen = minilm.last_hidden_state(**ref["inputs"])
    mask = ref["inputs"]["attention_mask"].bool()
    assert (ref["last_hidden_state"] - frozen)[mask].abs().max() > 0.5  # the randomised adapters matter
    expected = ref["last_hidden_state"][mask]
    # another implementation, other CPU kernels, weights differing in their last bits: rounding scales with the
    # states (up to ~6)
    torch.testing.assert_close(hidden[mask], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


# ---------------------------------------------------------------- save and load


@pytest.mark.parametrize("path", ["encoder", "seq2seq"])
def test_trainable_state_round_trip(minilm, tmp_path, path):
    torch.manual_seed(0)
    trained, batch = build(path, minilm)
    trained.eval()
    randomize(torch.nn.ParameterList([p for p in trained.parameters() if p.requires_grad]), seed=1)
    state = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    torch.save(state, tmp_path / "adapter.pt")

    torch.manual_seed(2)
    restored, _ = build(path, minilm)
    restored.eval()
    assert_restores(restored, trained, tmp_path / "adapter.pt", state, batch)


# ---------------------------------------------------------------- training


def test_short_training_lowers_the_loss_encoder(minilm):
    torch.manual_seed(0)
    model = methods.build("adapter", own_copy(minilm), 2, {"dropout": 0.0})
    first, last = train_steps(model, encode(minilm), torch.tensor([0, 1, 1]), F.cross_entropy, lr=1e-2)
    assert last < 0.5 * first, (first, last)


def test_short_training_lowers_the_loss_text_to_text():
    torch.manual_seed(0)
    model = methods.build("adapter", t5_text(), 2)
    inputs, labels = t5_batch()

    def token_loss(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    first, last = train_steps(model, inputs, labels, token_loss, lr=3e-2)  # from ~ln(32128) = 10.4 nats
    assert last < first - 0.3, (first, last)


def test_fit_adapter_on_minilm():
    params = make_params("quick", task="rte", method="adapter", max_train=16, max_eval=8, max_epochs=1)
    record = fit(params, progress=False)
    assert (record["method"], record["status"], record["backbone"]) == ("adapter", "ok", "minilm")
    assert record["trainable_params"] == minilm_count(2)
    assert record["method_args"] == {"bottleneck": 64, "nonlinearity": "swish", "attention": True,
                                     "layer_norms": False, "dropout": 0.1}
    assert record["lr"] == adapter.DEFAULT_LR == 1e-3


# ---------------------------------------------------------------- configs


def test_config_defaults_and_cli_strings():
    assert methods.METHODS["adapter"] is adapter.SPEC
    assert methods.make_config("adapter") == adapter.Config(bottleneck=64, nonlinearity="swish", attention=True,
                                                            layer_norms=False, dropout=0.1)
    cfg = methods.make_config("adapter", {"bottleneck": "32", "attention": "false", "layer_norms": "yes"})
    assert (cfg.bottleneck, cfg.attention, cfg.layer_norms) == (32, False, True) and type(cfg.bottleneck) is int


BAD_CONFIGS = [
    ({"bottleneck": "0"}, "adapter.bottleneck must be >= 1, got 0"),
    ({"bottleneck": "-4"}, "adapter.bottleneck must be >= 1, got -4"),
    ({"nonlinearity": "tanh"}, "adapter.nonlinearity must be one of: swish, gelu, gelu_new, relu; got 'tanh'"),
    ({"dropout": "1"}, "adapter.dropout must be in [0, 1), got 1.0"),
    ({"attention": "maybe"}, "adapter.attention must be true or false, got 'maybe'"),
]


@pytest.mark.parametrize("args, message", BAD_CONFIGS, ids=[next(iter(a)) + "=" + next(iter(a.values()))
                                                             for a, _ in BAD_CONFIGS])
def test_make_config_rejects_bad_values(args, message):
    with pytest.raises(ConfigError) as e:
        methods.make_config("adapter", args)
    assert str(e.value) == message
