"""READ (readlib.methods.read, Algorithm 1): the encoder path with a head and the encoder–decoder path on T5
(Appendix B.1/B.2), the layer recurrence, the gated joiner of eq. (18), parameter counts (Table 4), gradient
isolation in bytes, drop_layers (Appendix C.2).
"""

import copy
import dataclasses

import datasets
import pytest
import torch
from helpers import (
    CPU,
    F32,
    SENTENCES,
    encode_sentences,
    grads_set,
    load_t5,
    randomize,
    saved,
    saved_tensors,
    seq2seq_batch,
    t5_tiny,
)
from transformers import T5ForConditionalGeneration

import readlib.cache
from readlib import backbones, data, methods
from readlib.costs import SavedTensorMeter
from readlib.data import Encoded
from readlib.errors import ConfigError
from readlib.methods import read

READ_PREFIXES = ("encoder_rnn.", "psi.", "decoder_rnn.", "up.")


CELL_WEIGHTS = ("cell.weight_ih", "cell.weight_hh", "cell.bias_ih", "cell.bias_hh")


# every parameter READ adds to T5: N^E, Ψ, N^D, W_o
READ_NAMES = {f"{rnn}.{w}" for rnn in ("encoder_rnn", "decoder_rnn") for w in CELL_WEIGHTS} | {
    "psi.weight", "up.weight"}


GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def read_modules(model):
    return torch.nn.ModuleList([model.encoder_rnn, model.psi, model.decoder_rnn, model.up])


def rnn_params(cell, d, hidden):
    return GATES[cell] * (hidden * d + hidden * hidden + 2 * hidden)  # per gate: W_ih, W_hh, b_ih, b_hh


def read_seq2seq_params(d, cell="gru", hidden=256):
    # N^E and N^D (one cell each, shared across layers) + Ψ: H -> d and W_o: H -> d, both bias-free
    return 2 * rnn_params(cell, d, hidden) + 2 * hidden * d


# ---------------------------------------------------------------- forward, initialisation, gradients


@pytest.fixture(scope="module")
def tiny():
    return load_t5()


def test_read_seq2seq_is_built_for_seq2seq_backbones(tiny):
    model = methods.build("read", tiny, 2)
    assert tiny.formulation == "text-to-text"
    assert type(model) is read.READSeq2Seq
    assert {n for n, p in model.named_parameters() if not n.startswith("frozen.")} == READ_NAMES


def test_logits_shape_and_start_at_the_frozen_t5(tiny):
    model = methods.build("read", tiny, 2).eval()
    inputs = seq2seq_batch()
    logits = model(**inputs)
    assert logits.shape == (2, 3, backbones.T5_VOCAB)
    assert torch.equal(model.up.weight, torch.zeros(64, 256))  # W_o = 0
    # W_o = 0: φ^D'_{N_D} = φ^D_{N_D}, so READ's logits are exactly the frozen T5's (padded row included)
    with torch.no_grad():
        expected = tiny.model(**inputs).logits
    assert torch.equal(logits, expected)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the rows are not trivially equal


def test_randomized_side_network_moves_the_logits(tiny):
    model = methods.build("read", tiny, 2).eval()
    randomize(read_modules(model))
    inputs = seq2seq_batch()
    with torch.no_grad():
        assert (model(**inputs) - tiny.model(**inputs).logits).abs().max() > 1e-2


def hand_gru(x, h, cell):
    gi, gh = x @ cell.weight_ih.T + cell.bias_ih, h @ cell.weight_hh.T + cell.bias_hh
    (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, -1), gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    return (1 - z) * torch.tanh(i_n + r * h_n) + z * h


def test_forward_is_algorithm_1_by_hand(tiny):
    # Algorithm 1 with B.1's reductions, written out from the frozen T5's own outputs:
    #   h^E_i = N^E(φ^E_i, h^E_{i-1}), h^E_0 = 0            (every source token, padding too)
    #   ψ_j = Σ_β σ_{D,j}^{·β} Ψ h^E_{N_E,β}, σ = mean over heads of the cross-attention
    #   x_j = φ^D_j + ψ_j;  h^D_j = N^D(x_j, h^D_{j-1}), h^D_0 = 0
    #   logits = lm_head((φ^D_{N_D} + W_o h^D_{N_D}) * d^-1/2)   (T5's tied-embedding output scale)
    torch.manual_seed(0)
    model = methods.build("read", tiny, 2, {"hidden": 8}).eval()
    randomize(read_modules(model), std=0.3)
    inputs = seq2seq_batch()
    with torch.no_grad():
        out = tiny.model(**inputs, output_hidden_states=True, output_attentions=True)
        h = torch.zeros(2, 7, 8)
        for phi in out.encoder_hidden_states[1:]:
            h = hand_gru(phi, h, model.encoder_rnn.cell)
        s = torch.zeros(2, 3, 8)
        for phi, attn in zip(out.decoder_hidden_states[1:], out.cross_attentions, strict=True):
            psi = torch.einsum("bnm,bmd->bnd", attn.mean(1), h @ model.psi.weight.T)
            s = hand_gru(phi + psi, s, model.decoder_rnn.cell)
        adapted = out.decoder_hidden_states[-1] + s @ model.up.weight.T
        expected = tiny.model.lm_head(adapted * 64**-0.5)
        # padding columns get σ = 0 exactly, so READ skipping padded tokens in N^E changes nothing
        assert torch.equal(out.cross_attentions[0][1, :, :, 4:], torch.zeros(4, 3, 3))
        # written-out ops round differently from READ's on other CPUs: a tolerance relative to the logits (~5)
        torch.testing.assert_close(model(**inputs), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_padding_does_not_change_a_row(tiny):
    model = methods.build("read", tiny, 2).eval()
    randomize(read_modules(model))
    inputs = seq2seq_batch()
    alone = {k: v[1:, : (4 if k != "decoder_input_ids" else None)] for k, v in inputs.items()}
    with torch.no_grad():
        single = model(**alone)
        # another batch shape, another summation order in the kernels: rounding relative to the logits (~6)
        torch.testing.assert_close(model(**inputs)[1:], single, rtol=1e-5, atol=1e-5 * single.abs().max().item())


def test_read_seq2seq_backbone_stays_in_eval_mode_when_training(tiny):
    model = methods.build("read", tiny, 2).train()
    assert model.training and not any(m.training for m in tiny.model.modules())
    randomize(read_modules(model))
    inputs = seq2seq_batch()
    assert torch.equal(model(**inputs), model(**inputs))  # T5's dropout (0.1) is off


def test_gradients_reach_exactly_the_read_parameters():
    bb = load_t5()
    model = methods.build("read", bb, 2).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == READ_NAMES
    assert all(n.startswith("frozen.") for n, p in model.named_parameters() if not p.requires_grad)
    logits = model(**seq2seq_batch())
    logits.square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("frozen."))
    assert all(p.grad is None for p in bb.model.parameters())
    assert {n for n, p in model.named_parameters() if p.grad is not None} == READ_NAMES
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # at initialisation W_o = 0 blocks every path to N^E, Ψ and N^D: only W_o's gradient is nonzero
    assert grads["up.weight"].abs().sum() > 0
    assert all(torch.equal(g, torch.zeros_like(g)) for n, g in grads.items() if n != "up.weight")


def test_every_read_parameter_learns_once_w_o_is_nonzero():
    bb = load_t5()
    model = methods.build("read", bb, 2).train()
    randomize(read_modules(model))
    model(**seq2seq_batch()).square().mean().backward()
    for name in READ_NAMES:
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in bb.model.parameters())


def test_an_optimizer_step_leaves_the_backbone_bitwise_unchanged():
    bb = load_t5()
    model = methods.build("read", bb, 2).train()
    randomize(read_modules(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # hand every parameter to AdamW, with weight decay: the backbone's have no gradient, so no update
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(**seq2seq_batch()).square().mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name.startswith("frozen."):
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name


# ---------------------------------------------------------------- gradient isolation, in bytes


def read_seq2seq_bytes(n_enc, n_dec, tokens_e, batch_size, m, n, d, hidden, width):
    """Bytes READSeq2Seq saves for backward, term by term (float32 unless noted).

    tokens_e: real source tokens; m / n: padded source / target length; width: RNN state (2*hidden
    for an LSTM). The backbone ran under inference_mode and contributes nothing but its cached states.
    """
    phi_e = n_enc * tokens_e * d * F32  # stacked φ^E_1..φ^E_{N_E}: N^E's input (LayerRecurrence)
    states_e = (n_enc + 1) * tokens_e * width * F32  # N^E's states s_0..s_{N_E}; gates are recomputed
    h_e = tokens_e * hidden * F32  # h^E_{N_E}: Ψ's input
    mask = batch_size * m  # the bool mask that scatters Ψh^E into [B, m, d] (index_put), 1 byte each
    sigma = n_dec * batch_size * n * m * F32  # σ^D_1..σ^D_{N_D}, kept by σ @ (Ψh^E) for ∂/∂(Ψh^E)
    x = n_dec * batch_size * n * d * F32  # x_j = φ^D_j + ψ_j: N^D's input (φ^D itself is not kept)
    states_d = (n_dec + 1) * batch_size * n * width * F32  # N^D's states s_0..s_{N_D}
    h_d = batch_size * n * hidden * F32  # h^D_{N_D}: W_o's input
    # the LM head keeps only its weight (a parameter, saved by reference: no bytes) for ∂/∂φ^D'
    return phi_e + states_e + h_e + mask + sigma + x + states_d + h_d


def saved_bytes(model, inputs) -> int:
    with SavedTensorMeter(model) as meter:
        model(**inputs)
    return meter.bytes


@pytest.mark.parametrize("cell, width", [("gru", 16), ("lstm", 32)])
def test_read_seq2seq_bytes_grow_only_by_what_read_stores(cell, width):
    # same batch through a 2-layer and a 6-layer random T5 (same seed): B = 2, m = 7 (11 real
    # tokens), n = 3, d = 64; RNN hidden 16 (a quarter of d, as 256 is a third of T5-base's 768)
    inputs = seq2seq_batch()
    read_b, full_b = {}, {}
    for layers in (2, 6):
        bb = load_t5(f"random-t5-tiny:num_layers={layers}")
        model = methods.build("read", bb, 2, {"rnn": cell, "hidden": 16})
        read_b[layers] = saved_bytes(model, inputs)
        assert read_b[layers] == read_seq2seq_bytes(layers, layers, 11, 2, 7, 3, 64, 16, width)
        full = methods.build("full", load_t5(f"random-t5-tiny:num_layers={layers}"), 2)
        full_b[layers] = saved_bytes(full, inputs)
    # GRU: 2 layers: 5,632 + 2,112 + 704 + 14 + 336 + 3,072 + 1,152 + 384 = 13,406 bytes
    if cell == "gru":
        assert read_b[2] == 13_406
    # per extra encoder layer: one φ^E row and one N^E state per real token: 11 * (64 + width) * 4
    # per extra decoder layer: one σ row (m = 7 floats), one x row (d) and one N^D state per target
    #   position: 2 * 3 * (7 + 64 + width) * 4
    # GRU: 4 * (3,520 + 2,088) = 22,432 bytes; LSTM: 4 * (4,224 + 2,472) = 26,784 bytes
    per_layer = 11 * (64 + width) * F32 + 2 * 3 * (7 + 64 + width) * F32
    assert read_b[6] - read_b[2] == 4 * per_layer == {"gru": 22_432, "lstm": 26_784}[cell]
    # full fine-tuning keeps every layer's activations (attention, FFN, norms) of both stacks
    assert full_b[6] >= 2.5 * full_b[2]
    assert (read_b[6] - read_b[2]) < 0.1 * (full_b[6] - full_b[2])


def test_nothing_saved_is_inference_mode_or_backbone_memory_except_the_lm_head():
    bb = load_t5()
    model = methods.build("read", bb, 2)
    backbone_storages = {p.untyped_storage().data_ptr() for p in bb.model.parameters()}
    saved = saved_tensors(model, seq2seq_batch())
    assert len(saved) > 10
    assert not any(inference for _, inference, _ in saved)  # cached states left inference mode
    # Gradient must flow from the logits back through the frozen LM head to φ^D' (it is T5's own
    # output layer, Algorithm 1's last line), so its weight W (tied to the embedding) is the one
    # backbone tensor autograd keeps: ∂logits/∂φ^D' = W. It is saved by reference (no copy, and it
    # gets no gradient); nothing of the encoder or decoder stacks is kept.
    lm_head = bb.model.lm_head.weight
    shared = [(ptr, shape) for ptr, _, shape in saved if ptr in backbone_storages]
    assert shared == [(lm_head.untyped_storage().data_ptr(), (64, backbones.T5_VOCAB))]
    assert lm_head.untyped_storage().data_ptr() == bb.model.shared.weight.untyped_storage().data_ptr()


# ---------------------------------------------------------------- parameter counts (Table 4, Figure 5)


def meta_backbone(size, **overrides):
    name = f"random-t5-{size}" + (":" + ",".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")
    config = backbones.random_t5_config(name)
    with torch.device("meta"):  # shapes only
        model = T5ForConditionalGeneration(config).requires_grad_(False)
    return backbones.Backbone(name, model, None, config.d_model, config.num_layers, "meta", False, "text-to-text")


def test_read_on_t5_base_has_table4_trainable_parameters():
    bb = meta_backbone("base")
    model = read.build(bb, 0, read.Config())  # GRU/256, Table 7's final choice
    assert (bb.hidden_size, bb.num_layers) == (768, 12)
    trainable, total = methods.count_parameters(model)
    # 2 * 3(256*768 + 256*256 + 2*256) + 2 * 256*768 = 1,575,936 + 393,216 = 1,969,152
    assert read_seq2seq_params(768) == 1_969_152
    assert trainable == 1_969_152
    assert round(trainable / 1e6, 2) == 1.97  # READ's 1.97 M (Table 4)
    assert total == trainable + 222_903_552  # + the T5-base checkpoint (tied embedding counted once)
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith(READ_PREFIXES)) == trainable


@pytest.mark.parametrize("size, d, expected", [
    ("small", 512, 1_444_864),  # 2 * 3(256*512 + 256*256 + 512) + 2 * 256*512 = 1,182,720 + 262,144
    ("base", 768, 1_969_152),
    ("large", 1024, 2_493_440),  # 2 * 3(256*1024 + 256*256 + 512) + 2 * 256*1024 = 1,969,152 + 524,288
    ("3b", 1024, 2_493_440),  # d_model 1024 like T5-large: the same READ, although T5-3B is 4x larger
])
def test_read_count_depends_only_on_d_model(size, d, expected):
    bb = meta_backbone(size)
    trainable, total = methods.count_parameters(read.build(bb, 0, read.Config()))
    assert trainable == read_seq2seq_params(d) == expected
    assert total - trainable == sum(p.numel() for p in bb.model.parameters())


def test_read_count_does_not_change_with_depth_or_dropped_layers():
    counts = {
        "large, 24 layers": read.build(meta_backbone("large"), 0, read.Config()),
        "large, last 4 dropped": read.build(meta_backbone("large"), 0, read.Config(drop_layers=4)),
        "large, 2 layers": read.build(meta_backbone("large", num_layers=2), 0, read.Config()),
    }
    assert len(counts["large, last 4 dropped"].frozen.encoder.block) == 20
    assert {methods.count_parameters(m)[0] for m in counts.values()} == {2_493_440}


# ---------------------------------------------------------------- drop_layers (Appendix C.2)


def test_drop_layers_truncates_both_stacks_and_starts_at_the_truncated_t5():
    bb = load_t5("random-t5-tiny:num_layers=3")
    inputs = seq2seq_batch()
    with torch.no_grad():
        untruncated = bb.model(**inputs).logits
    model = methods.build("read", bb, 2, {"drop_layers": 1}).eval()
    assert len(model.frozen.encoder.block) == len(model.frozen.decoder.block) == 2
    assert bb.num_layers == 2
    # the truncated T5 is a 2-layer T5 with the first two blocks: it loads into one strictly
    two = T5ForConditionalGeneration(backbones.random_t5_config("random-t5-tiny:num_layers=2")).eval()
    two.load_state_dict(model.frozen.state_dict(), strict=True)
    with torch.no_grad():
        expected = two(**inputs).logits
        logits = model(**inputs)
    assert torch.equal(logits, expected)
    assert (logits - untruncated).abs().max() > 1e-3  # dropping a layer did change the model
    phi_e, phi_d, sigma = model.cached_states(**inputs)
    assert (phi_e.shape, phi_d.shape, sigma.shape) == ((2, 11, 64), (2, 2, 3, 64), (2, 2, 3, 7))


@pytest.mark.parametrize("k", [3, 4])
def test_drop_layers_must_leave_a_layer(k):
    bb = load_t5("random-t5-tiny:num_layers=3")
    with pytest.raises(ConfigError, match=f"cannot drop {k} layers from a 3-layer stack"):
        methods.build("read", bb, 2, {"drop_layers": k})
    assert len(bb.model.encoder.block) == len(bb.model.decoder.block) == 3  # nothing was removed


# ---------------------------------------------------------------- LayerRecurrence vs PyTorch's RNNs


@pytest.mark.parametrize("kind, rnn_class", [("rnn", torch.nn.RNN), ("gru", torch.nn.GRU), ("lstm", torch.nn.LSTM)])
def test_layer_recurrence_matches_torch_rnn(kind, rnn_class):
    # N layers as the sequence axis, tokens as the batch: h_N and every gradient as torch.nn.<RNN>
    torch.manual_seed(0)
    d, hidden, layers, tokens = 5, 4, 6, 3
    ours = read.LayerRNN(d, read.Config(rnn=kind, hidden=hidden)).double()
    randomize(ours, std=0.5)
    ref = rnn_class(d, hidden).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, f"{name}_l0").copy_(getattr(ours.cell, name))
    phi = torch.randn(layers, tokens, d, dtype=torch.float64)
    phi_ours, phi_ref = phi.clone().requires_grad_(), phi.clone().requires_grad_()
    h_ours = ours(phi_ours)
    _, state = ref(phi_ref)
    h_ref = (state[0] if kind == "lstm" else state)[0]  # h_n of the single layer
    torch.testing.assert_close(h_ours, h_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(tokens, hidden, dtype=torch.float64)
    (h_ours * upstream).sum().backward()
    (h_ref * upstream).sum().backward()
    torch.testing.assert_close(phi_ours.grad, phi_ref.grad, rtol=1e-12, atol=1e-12)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        torch.testing.assert_close(getattr(ours.cell, name).grad, getattr(ref, f"{name}_l0").grad,
                                   rtol=1e-12, atol=1e-12)
    assert phi_ours.grad.abs().min() > 0


def joiner_t5_batch():
    torch.manual_seed(0)
    ids = torch.randint(1000, 3000, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return ids, mask, torch.randint(1000, 3000, (3, 4))


@pytest.mark.parametrize("joiner", read.JOINERS)
def test_both_joiners_start_at_the_frozen_t5(joiner):
    bb = backbones.load("random-t5-tiny")
    model = methods.build("read", bb, 2, {"joiner": joiner, "hidden": 16})
    ids, mask, dec = joiner_t5_batch()
    expected = bb.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(model(ids, mask, dec), expected)


def test_gated_joiner_with_zero_ffn_and_context_is_the_plain_rnn():
    # FFN's output layer starts at zero, so x_i = φ_i + Gate(φ_i) ⊙ 0 = φ_i: the paper's recurrence
    torch.manual_seed(1)
    config = read.Config(rnn="lstm", hidden=5, joiner="gated")
    gated, plain = read.GatedLayerRNN(7, config).double(), read.LayerRNN(7, config).double()
    plain.cell.load_state_dict(gated.cell.state_dict())
    phi = torch.randn(4, 6, 7, dtype=torch.double)
    assert torch.allclose(gated(phi), plain(phi), atol=1e-12)


def test_gated_joiner_gradients_match_finite_differences():
    torch.manual_seed(2)
    net = read.GatedLayerRNN(4, read.Config(rnn="gru", hidden=3, joiner="gated")).double()
    for p in net.parameters():  # leave the zero start, so every term of eq. (18) is exercised
        torch.nn.init.normal_(p, std=0.5)
    phi = torch.randn(3, 2, 4, dtype=torch.double)
    context = torch.randn(3, 2, 4, dtype=torch.double, requires_grad=True)
    params = list(net.parameters())

    def f(context, *weights):
        return torch.func.functional_call(net, dict(zip(dict(net.named_parameters()), weights, strict=True)),
                                          (phi, context))

    assert torch.autograd.gradcheck(f, (context, *params))


def test_gated_parameter_count_by_formula():
    d, h = 384, 16
    model = methods.build("read", backbones.load("minilm"), 2, {"joiner": "gated", "hidden": h})
    gru = 3 * (h * d + h * h + 2 * h)
    gate = d * d + d
    ffn = (h * h + h) + (h * d + d)
    w_o, head = h * d, d * 2 + 2
    assert methods.count_parameters(model)[0] == gru + gate + ffn + w_o + head == 180_850


def test_gated_joiner_trains_only_side_parameters():
    bb = backbones.load("random-t5-tiny")
    model = methods.build("read", bb, 2, {"joiner": "gated", "hidden": 16})
    ids, mask, dec = joiner_t5_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(5):  # zero starts: each step lets gradients reach one more level of the joiners
        opt.zero_grad()
        model(ids, mask, dec).logsumexp(-1).sum().backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert not any(n.startswith("frozen.") for n, p in model.named_parameters() if p.grad is not None)
    assert {"encoder_rnn.gate.weight", "decoder_rnn.ffn.2.weight", "psi.2.weight", "up.weight"} <= moved


def test_unknown_joiner():
    with pytest.raises(ConfigError, match="read.joiner must be one of: paper, gated; got 'attention'"):
        methods.make_config("read", {"joiner": "attention"})


def read_trainable(cell, d, hidden, num_labels):
    w_o = hidden * d  # W_o: H -> d, no bias
    head = d * num_labels + num_labels
    return rnn_params(cell, d, hidden) + w_o + head


def test_make_config_rnn_lists_cells():
    with pytest.raises(ConfigError, match="rnn, lstm, gru"):
        methods.make_config("read", {"rnn": "transformer"})


def test_make_config_rejects_non_integer_hidden():
    with pytest.raises(ConfigError, match="2.5"):
        methods.make_config("read", {"hidden": 2.5})


def test_read_gradients_only_in_side_network_and_head(minilm):
    model = methods.build("read", minilm, 2).train()
    model(**encode_sentences(minilm)).sum().backward()
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if n.startswith(("side.", "head."))}
    assert grads_set(model) == expected
    assert len(expected) >= 5  # W_ih, W_hh, b_ih, b_hh, W_o, head weight and bias
    assert all(p.grad is None and not p.requires_grad for p in minilm.model.parameters())
    assert all(n.startswith(("side.", "head.", "frozen.")) for n in names)


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("hidden, num_labels", [(8, 1), (16, 3)])
def test_read_trainable_count_formula(cell, hidden, num_labels):
    bb = t5_tiny()
    model = methods.build("read", bb, num_labels, {"rnn": cell, "hidden": hidden})
    trainable, total = methods.count_parameters(model)
    assert trainable == read_trainable(cell, 64, hidden, num_labels)
    assert total == trainable + sum(p.numel() for p in bb.model.parameters())


def test_read_count_minilm(minilm):
    # GRU/256 on d = 384, 2 labels: 3(256*384 + 256*256 + 512) + 256*384 + 384*2 + 2 = 592,130
    model = methods.build("read", minilm, 2)
    assert methods.count_parameters(model) == (592_130, 592_130 + 22_565_376)
    assert read_trainable("gru", 384, 256, 2) == 592_130


def test_read_encoder_count_does_not_grow_with_depth():
    # one RNN shared across layers (Section 2.1): the layer count changes nothing
    counts = {n: methods.count_parameters(methods.build(
        "read", backbones.load(f"random-t5-tiny:num_layers={n}", formulation="classification"), 2))[0] for n in (2, 6)}
    assert counts[2] == counts[6] == read_trainable("gru", 64, 256, 2)


def test_read_t5_base_count_matches_table4():
    # GRU/256 on T5-base (d = 768): 3(256*768 + 256*256 + 2*256) + 256*768 = 787,968 + 196,608
    side = read.READSideNetwork(768, read.Config(rnn="gru", hidden=256))
    n = sum(p.numel() for p in side.parameters())
    assert n == rnn_params("gru", 768, 256) + 256 * 768 == 984_576
    assert 2 * n == 1_969_152  # encoder + decoder side networks
    assert round(2 * n / 1e6, 2) == 1.97  # READ's "1.97M" trainable parameters, Table 4


# ---------------------------------------------------------------- READ semantics


def test_read_starts_at_the_frozen_backbone(minilm):
    # W_o = 0 at initialisation: φ_N' = φ_N, so READ's logits are the head on the frozen output
    model = methods.build("read", minilm, 3).eval()
    batch = encode_sentences(minilm)
    expected = model.head(minilm.last_hidden_state(**batch), batch["attention_mask"])
    logits = model(**batch)
    assert logits.shape == (3, 3)
    assert torch.equal(logits, expected)
    phi = model.features(**batch)
    assert torch.equal(model.side(phi), torch.zeros(phi.shape[1], 384))


def test_read_features_are_phi_1_to_N_of_real_tokens(minilm):
    model = methods.build("read", minilm, 2)
    batch = encode_sentences(minilm)
    phi = model.features(**batch)
    mask = batch["attention_mask"].bool()
    states = minilm.hidden_states(**batch)
    assert phi.shape == (6, int(mask.sum()), 384)  # N = 6 layers, no embeddings (φ_0), no padding
    assert not phi.requires_grad
    for i in range(6):
        torch.testing.assert_close(phi[i], states[i + 1][mask], rtol=0, atol=1e-6)


def test_read_encoder_backbone_stays_in_eval_mode(minilm):
    model = methods.build("read", minilm, 2, {"dropout": 0.0}).train()
    assert model.training and model.head.training and model.side.training
    assert not any(m.training for m in minilm.model.modules())
    # MiniLM has dropout 0.1 inside; in eval mode two training-mode forwards agree exactly
    randomize(model.side)
    batch = encode_sentences(minilm)
    assert torch.equal(model(**batch), model(**batch))


def cell_weights(side):
    """(W_ih, W_hh, b_ih, b_hh) of the side network's cell, whatever the submodule is called."""
    params = dict(side.named_parameters())
    return [next(v for k, v in params.items() if k.endswith(suffix) or f"{suffix}_l0" in k)
            for suffix in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def hand_cell(kind, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step of N^E written out (PyTorch's gate order)."""
    gi, gh = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh
    if kind == "rnn":
        return torch.tanh(gi + gh), c
    if kind == "gru":
        (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, -1), gh.chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, c
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_side_network_is_algorithm_1(kind):
    # h_0 = 0; h_i = N^E(φ_i, h_{i-1}) for i = 1..N; correction = W_o h_N
    torch.manual_seed(0)
    d, hidden, layers, tokens = 5, 3, 4, 7
    side = read.READSideNetwork(d, read.Config(rnn=kind, hidden=hidden)).double()
    randomize(side)
    phi = torch.randn(layers, tokens, d, dtype=torch.float64)
    h = c = torch.zeros(tokens, hidden, dtype=torch.float64)
    for i in range(layers):
        h, c = hand_cell(kind, phi[i], h, c, *cell_weights(side))
    w_o = side.up.weight  # [d, hidden]
    torch.testing.assert_close(side(phi), h @ w_o.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("phi_needs_grad", [True, False])
def test_side_network_gradcheck(kind, phi_needs_grad):
    # analytic gradients against central finite differences, float64, tiny dims
    torch.manual_seed(0)
    side = read.READSideNetwork(4, read.Config(rnn=kind, hidden=3)).double()
    randomize(side, std=0.5)
    names = [n for n, _ in side.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in side.parameters()]
    phi = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=phi_needs_grad)

    def f(phi, *weights):
        return torch.func.functional_call(side, dict(zip(names, weights, strict=True)), (phi,))

    assert torch.autograd.gradcheck(f, (phi, *params), eps=1e-6, atol=1e-7)


def test_read_is_invariant_to_padding(minilm):
    model = methods.build("read", minilm, 2).eval()
    randomize(model.side)
    alone = model(**encode_sentences(minilm, SENTENCES[:1]))
    padded = model(**encode_sentences(minilm, SENTENCES[:2]))  # row 0 is padded to the longer sentence
    assert encode_sentences(minilm, SENTENCES[:2])["attention_mask"][0].eq(0).sum() >= 10
    torch.testing.assert_close(padded[:1], alone, rtol=0, atol=1e-5)
    assert (padded[0] - padded[1]).abs().max() > 1e-3  # the rows themselves differ


def test_read_is_invariant_to_padding_t5():
    bb = t5_tiny()
    model = methods.build("read", bb, 3).eval()
    randomize(model.side)
    alone = model(**encode_sentences(bb, SENTENCES[2:]))
    padded = model(**encode_sentences(bb, SENTENCES[1:]))
    torch.testing.assert_close(padded[1:], alone, rtol=0, atol=1e-5)


def test_read_side_network_changes_logits(minilm):
    model = methods.build("read", minilm, 2).eval()
    batch = encode_sentences(minilm)
    before = model(**batch)
    randomize(model.side)
    assert (model(**batch) - before).abs().max() > 1e-3


# ---------------------------------------------------------------- READ vs full


def encode_texts(backbone, texts, max_length=48):
    enc = backbone.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def read_bytes_by_hand(layers, tokens, d, hidden, width, batch, length):
    """Activation bytes READ keeps in eval mode, term by term (float32 unless noted).

    tokens: real tokens in the batch; length: padded length; width: cell state (2*hidden for LSTM).
    """
    phi = layers * tokens * d * F32  # the stacked φ_1..φ_N, the recurrence's input
    states = (layers + 1) * tokens * width * F32  # s_0..s_N; gates are recomputed in backward
    h_last = tokens * hidden * F32  # W_o's input h_N
    head = (batch * length * F32  # the float mask in (hidden * mask)
            + batch * F32  # the token counts dividing the pooled sum
            + batch * d * F32  # the linear layer's input (pooled states)
            + batch * length)  # the bool mask indexing the corrected states (1 byte each)
    return phi + states + h_last + head


@pytest.fixture(scope="module")
def minilm_batch(minilm):
    texts = ["The cat sat on the mat. " * 3,
             "A considerably longer sentence, so that the other one in this batch needs padding. " * 2]
    return encode_texts(minilm, texts)


def test_read_bytes_on_minilm_by_hand(minilm, minilm_batch):
    read = methods.build("read", minilm, 2).eval()
    b, length = minilm_batch["input_ids"].shape
    tokens = int(minilm_batch["attention_mask"].sum())
    assert (b, length, tokens) == (2, 36, 59)
    # φ: 6*59*384*4 = 543,744; s_0..s_6: 7*59*256*4 = 422,912; h_N: 59*256*4 = 60,416;
    # head: 2*36*4 + 2*4 + 2*384*4 + 2*36 = 3,440
    assert read_bytes_by_hand(6, tokens, 384, 256, 256, b, length) == 1_030_512
    assert saved(lambda: read(**minilm_batch), read) == 1_030_512


def test_read_keeps_far_less_than_full_on_minilm(minilm, minilm_batch):
    read = methods.build("read", minilm, 2).eval()
    full = methods.build("full", dataclasses.replace(minilm, model=copy.deepcopy(minilm.model)), 2).eval()
    read_b = saved(lambda: read(**minilm_batch), read)
    full_b = saved(lambda: full(**minilm_batch), full)
    assert read_b / full_b < 0.2  # the target bench/methods.py states


@pytest.mark.parametrize("cell, width", [("gru", 16), ("rnn", 16), ("lstm", 32)])
def test_read_bytes_do_not_depend_on_backbone_activations(cell, width):
    # same batch through a 2-layer and a 6-layer random T5: 19 real tokens of d = 64
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # 12 + 7 = 19 real tokens
    read_b, full_b = {}, {}
    for layers in (2, 6):
        bb = backbones.load(f"random-t5-tiny:num_layers={layers}", formulation="classification")
        read = methods.build("read", bb, 2, {"rnn": cell, "hidden": 16}).eval()
        read_b[layers] = saved(lambda: read(ids, mask), read)  # noqa: B023
        assert read_b[layers] == read_bytes_by_hand(layers, 19, 64, 16, width, 2, 12)
        full = methods.build("full", bb, 2).eval()
        full_b[layers] = saved(lambda: full(ids, mask), full)  # noqa: B023
    # 4 more layers add exactly 4 φ_i and 4 states s_i per token: 4 * 19 * (64 + width) * 4 bytes
    assert read_b[6] - read_b[2] == 4 * 19 * (64 + width) * F32
    # full fine-tuning keeps every layer's activations: its bytes grow almost with depth
    assert full_b[6] >= 2.5 * full_b[2]
    per_layer_read, per_layer_full = (read_b[6] - read_b[2]) / 4, (full_b[6] - full_b[2]) / 4
    assert per_layer_read < 0.15 * per_layer_full


# ---------------------------------------------------------------- options from the authors' code (off by default)

# every option on: the authors' RMSNorm before N, b_o with a fixed factor s, the mean of h_1..h_N
ALL_OPTIONS = {"state_norm": True, "output_bias": True, "output_scale": 0.5, "combine": "mean"}
OPTIONS = [{"state_norm": True}, {"output_bias": True}, {"output_scale": 0.1}, {"combine": "mean"}, ALL_OPTIONS]


def options_id(option):
    """Test ids: the option as key=value, "all" for every option on (None: pytest's own id for other values)."""
    if not isinstance(option, dict):
        return None
    return "all" if option is ALL_OPTIONS else ",".join(f"{k}={v}" for k, v in option.items())


def test_options_default_to_the_paper():
    config = read.Config()
    assert (config.state_norm, config.output_bias, config.output_scale, config.combine) == (False, False, 1.0, "last")
    side = read.READSideNetwork(8, read.Config(hidden=4))
    assert side.norm is None and side.up.bias is None and side.scale == 1.0
    assert [n for n, _ in side.named_parameters()] == [*CELL_WEIGHTS, "up.weight"]  # W_o and N, nothing else


def kernel_step(kind, x, state, w_ih, w_hh, b_ih, b_hh, hidden):
    """One step with PyTorch's own cell kernels; an LSTM state is [h, c]."""
    if kind == "lstm":
        return torch.cat(torch.lstm_cell(x, (state[:, :hidden], state[:, hidden:]), w_ih, w_hh, b_ih, b_hh), -1)
    step = torch.gru_cell if kind == "gru" else torch.rnn_tanh_cell
    return step(x, state, w_ih, w_hh, b_ih, b_hh)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_default_options_add_no_arithmetic(kind):
    # float32, compared bit for bit: with the defaults the correction is W_o h_N from the very kernel calls
    # Algorithm 1 makes, so s = 1 and the unused options change no output (nor any cached or earlier result)
    torch.manual_seed(0)
    side = read.READSideNetwork(6, read.Config(rnn=kind, hidden=4))
    randomize(side, std=0.5)
    phi = torch.randn(5, 7, 6)
    state = torch.zeros(7, 8 if kind == "lstm" else 4)
    for i in range(5):
        state = kernel_step(kind, phi[i], state, *cell_weights(side), 4)
    assert torch.equal(side(phi), torch.nn.functional.linear(state[:, :4], side.up.weight))


@pytest.mark.parametrize("joiner, hidden, base", [("paper", 256, 592_130), ("gated", 16, 180_850)])
@pytest.mark.parametrize("option, extra", [
    ({"state_norm": True}, 384),  # the RMSNorm gain g [d]
    ({"output_bias": True}, 384),  # b_o [d]
    ({"output_scale": 0.1}, 0),  # s is a fixed factor, not trained
    ({"combine": "mean"}, 0),  # an average has no weights
    (ALL_OPTIONS, 768),
], ids=options_id)
def test_every_option_adds_exactly_its_parameters_on_minilm(minilm, joiner, hidden, base, option, extra):
    # encoder path, d = 384; baselines: GRU/256 (test_read_count_minilm) and gated GRU/16 (by formula above)
    model = methods.build("read", minilm, 2, {"joiner": joiner, "hidden": hidden, **option})
    assert methods.count_parameters(model) == (base + extra, base + extra + 22_565_376)


@pytest.mark.parametrize("option, extra", [
    ({"state_norm": True}, 2 * 768),  # one gain g [d] per RNN: N^E and N^D
    ({"output_bias": True}, 768),  # b_o of W_o; Ψ stays bias-free
    ({"output_scale": 0.1}, 0),
    ({"combine": "mean"}, 0),
    (ALL_OPTIONS, 3 * 768),
], ids=options_id)
def test_every_option_adds_exactly_its_parameters_on_t5_base(option, extra):
    # text-to-text on T5-base: 1,969,152 for the paper's READ (Table 4), + 2,304 with every option on
    trainable, total = methods.count_parameters(read.build(meta_backbone("base"), 0, read.Config(**option)))
    assert trainable == 1_969_152 + extra
    assert total == trainable + 222_903_552
    if option is ALL_OPTIONS:
        assert trainable == 1_971_456


@pytest.mark.parametrize("option", OPTIONS, ids=options_id)
def test_options_draw_no_random_numbers(minilm, option):
    # same seed, any option: N, W_o and the head start from the very weights of the paper's READ, so a comparison
    # of options changes nothing else (the gain g starts at 1 and b_o at 0)
    torch.manual_seed(0)
    paper, paper_next = methods.build("read", minilm, 2).state_dict(), torch.rand(3)
    torch.manual_seed(0)
    variant, variant_next = methods.build("read", minilm, 2, option).state_dict(), torch.rand(3)
    assert set(variant) - set(paper) <= {"side.norm.weight", "side.up.bias"}
    assert all(torch.equal(variant[k], v) for k, v in paper.items())
    assert torch.equal(variant_next, paper_next)  # the generator is where the paper's READ leaves it


def test_options_on_the_t5_encoder_classification_path():
    # T5 encoder under a head, d = 64, GRU/256, 3 labels:
    # 3(256*64 + 256*256 + 2*256) + 256*64 + (64*3 + 3) + g 64 + b_o 64 = 247,296 + 16,384 + 195 + 128
    model = methods.build("read", t5_tiny(), 3, ALL_OPTIONS)
    assert methods.count_parameters(model)[0] == read_trainable("gru", 64, 256, 3) + 2 * 64 == 264_003


@pytest.mark.parametrize("option", OPTIONS, ids=options_id)
def test_every_option_starts_at_the_frozen_backbone(minilm, tiny, option):
    # W_o = 0 and b_o = 0 at the start, whatever N reads: the logits are exactly the frozen model's
    model = methods.build("read", minilm, 3, option).eval()
    batch = encode_sentences(minilm)
    assert torch.equal(model(**batch), model.head(minilm.last_hidden_state(**batch), batch["attention_mask"]))
    for joiner in read.JOINERS:
        t5 = methods.build("read", tiny, 2, {"joiner": joiner, "hidden": 16, **option}).eval()
        inputs = seq2seq_batch()
        with torch.no_grad():
            assert torch.equal(t5(**inputs), tiny.model(**inputs).logits)


def test_state_norm_is_the_rmsnorm_formula():
    # φ̂ = φ / sqrt(mean_k φ_k^2 + 1e-6) ⊙ g, per token and layer (the authors' T5LayerNorm, eps 1e-6)
    torch.manual_seed(0)
    side = read.READSideNetwork(5, read.Config(rnn="gru", hidden=3, state_norm=True)).double()
    assert side.norm.eps == 1e-6 and torch.equal(side.norm.weight, torch.ones(5, dtype=torch.double))  # g = 1
    randomize(side, std=0.5)  # g and W_o away from their starts
    phi = torch.randn(4, 6, 5, dtype=torch.double) * 3
    phi[:, 0] *= 1e-5  # mean square ~1e-9 << eps: the epsilon decides this token's scale
    g = side.norm.weight
    by_hand = phi / torch.sqrt(phi.square().mean(-1, keepdim=True) + 1e-6) * g
    torch.testing.assert_close(side.norm(phi), by_hand, rtol=1e-12, atol=0)
    assert by_hand[:, 0].abs().max() < 1e-1 < by_hand[:, 1:].abs().max()  # no blow-up of the tiny states
    # the norm sits in front of N: the same RNN and W_o fed the normalised states by hand
    plain = read.READSideNetwork(5, read.Config(rnn="gru", hidden=3)).double()
    plain.load_state_dict({k: v for k, v in side.state_dict().items() if not k.startswith("norm.")})
    torch.testing.assert_close(side(phi), plain(by_hand), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_mean_combination_is_the_layer_average_by_hand(kind):
    # combine="mean": correction = s (W_o (h_1 + ... + h_N) / N + b_o), h_0 = 0 not included
    torch.manual_seed(0)
    d, hidden, layers, tokens = 5, 3, 4, 7
    config = read.Config(rnn=kind, hidden=hidden, combine="mean", output_bias=True, output_scale=0.5)
    side = read.READSideNetwork(d, config).double()
    randomize(side)
    phi = torch.randn(layers, tokens, d, dtype=torch.float64)
    h = c = torch.zeros(tokens, hidden, dtype=torch.float64)
    total = torch.zeros(tokens, hidden, dtype=torch.float64)
    for i in range(layers):
        h, c = hand_cell(kind, phi[i], h, c, *cell_weights(side))
        total = total + h
    expected = 0.5 * ((total / layers) @ side.up.weight.T + side.up.bias)
    torch.testing.assert_close(side(phi), expected, rtol=1e-12, atol=1e-12)
    # the gated joiner with FFN = 0 reads x_i = φ_i: the same average
    gated = read.GatedLayerRNN(d, dataclasses.replace(config, joiner="gated")).double()
    gated.cell.load_state_dict(side.cell.state_dict())
    torch.testing.assert_close(gated(phi), total / layers, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("combine", read.COMBINES)
def test_options_gradcheck(kind, combine):
    # LayerRecurrence's hand-written backward with the mean, through the RMSNorm, b_o and s: central differences
    torch.manual_seed(0)
    config = read.Config(rnn=kind, hidden=3, state_norm=True, output_bias=True, output_scale=0.5, combine=combine)
    side = read.READSideNetwork(4, config).double()
    randomize(side, std=0.5)
    names = [n for n, _ in side.named_parameters()]
    assert {"norm.weight", "up.bias"} <= set(names)
    params = [p.detach().clone().requires_grad_() for p in side.parameters()]
    phi = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)

    def f(phi, *weights):
        return torch.func.functional_call(side, dict(zip(names, weights, strict=True)), (phi,))

    assert torch.autograd.gradcheck(f, (phi, *params), eps=1e-6, atol=1e-7)


def test_mean_recurrence_matches_torch_rnn_outputs():
    # the mean of nn.GRU's per-step outputs (the authors' agg_type="mean"), and its gradients
    torch.manual_seed(0)
    ours = read.LayerRNN(5, read.Config(rnn="gru", hidden=4, combine="mean")).double()
    randomize(ours, std=0.5)
    ref = torch.nn.GRU(5, 4).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, f"{name}_l0").copy_(getattr(ours.cell, name))
    phi = torch.randn(6, 3, 5, dtype=torch.float64)
    phi_ours, phi_ref = phi.clone().requires_grad_(), phi.clone().requires_grad_()
    h_ours, h_ref = ours(phi_ours), ref(phi_ref)[0].mean(0)
    torch.testing.assert_close(h_ours, h_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(3, 4, dtype=torch.float64)
    (h_ours * upstream).sum().backward()
    (h_ref * upstream).sum().backward()
    torch.testing.assert_close(phi_ours.grad, phi_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.cell.weight_hh.grad, ref.weight_hh_l0.grad, rtol=1e-12, atol=1e-12)


def options_by_hand(t5, model, inputs, hidden, s):
    """Algorithm 1 with every option on, from the frozen T5's own outputs: RMSNorm of each φ before N^E and N^D
    (ψ added after the norm), the mean of h_1..h_N of both RNNs, φ^D' = φ^D_N + s (W_o h̄^D + b_o)."""
    def norm(phi, g):
        return phi / torch.sqrt(phi.square().mean(-1, keepdim=True) + 1e-6) * g

    out = t5(**inputs, output_hidden_states=True, output_attentions=True)
    h, total = torch.zeros(2, 7, hidden), torch.zeros(2, 7, hidden)
    for phi in out.encoder_hidden_states[1:]:
        h = hand_gru(norm(phi, model.encoder_rnn.norm.weight), h, model.encoder_rnn.cell)
        total = total + h
    h_e = total / len(out.encoder_hidden_states[1:])
    s_d, total = torch.zeros(2, 3, hidden), torch.zeros(2, 3, hidden)
    for phi, attn in zip(out.decoder_hidden_states[1:], out.cross_attentions, strict=True):
        psi = torch.einsum("bnm,bmd->bnd", attn.mean(1), h_e @ model.psi.weight.T)
        s_d = hand_gru(norm(phi, model.decoder_rnn.norm.weight) + psi, s_d, model.decoder_rnn.cell)
        total = total + s_d
    h_d = total / len(out.decoder_hidden_states[1:])
    adapted = out.decoder_hidden_states[-1] + s * (h_d @ model.up.weight.T + model.up.bias)
    return t5.lm_head(adapted * 64**-0.5)


def test_forward_with_every_option_is_algorithm_1_by_hand(tiny):
    torch.manual_seed(0)
    model = methods.build("read", tiny, 2, {**ALL_OPTIONS, "hidden": 8}).eval()
    randomize(torch.nn.ModuleList([read_modules(model), model.encoder_rnn.norm, model.decoder_rnn.norm]), std=0.3)
    inputs = seq2seq_batch()
    with torch.no_grad():
        expected = options_by_hand(tiny.model, model, inputs, 8, 0.5)
        # written-out ops round differently from READ's: a tolerance relative to the logits
        torch.testing.assert_close(model(**inputs), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


OPTION_NAMES = {"encoder_rnn.norm.weight", "decoder_rnn.norm.weight", "up.bias"}


@pytest.mark.parametrize("joiner", read.JOINERS)
def test_gradients_with_every_option_stay_out_of_the_backbone(joiner):
    bb = load_t5()
    model = methods.build("read", bb, 2, {**ALL_OPTIONS, "joiner": joiner, "hidden": 16}).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert OPTION_NAMES <= trainable and not any(n.startswith("frozen.") for n in trainable)
    model(**seq2seq_batch()).square().mean().backward()
    assert all(p.grad is None for p in bb.model.parameters())
    # at the start W_o = 0 and b_o = 0 block every path to N^E, Ψ, N^D and the gains: only W_o and b_o learn
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"up.weight", "up.bias"}
    model.zero_grad()
    randomize(torch.nn.ModuleList(m for n, m in model.named_children() if n != "frozen"))
    model(**seq2seq_batch()).square().mean().backward()
    assert all(p.grad is None for p in bb.model.parameters())
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable)


def test_encoder_gradients_with_every_option_only_in_side_network_and_head(minilm):
    model = methods.build("read", minilm, 2, ALL_OPTIONS).train()
    randomize(model.side)
    model(**encode_sentences(minilm)).sum().backward()
    names = {n for n, _ in model.named_parameters()}
    assert grads_set(model) == {n for n in names if n.startswith(("side.", "head."))}
    assert {"side.norm.weight", "side.up.bias"} <= grads_set(model)
    assert all(p.grad is None and not p.requires_grad for p in minilm.model.parameters())


def test_cached_and_uncached_forward_agree_with_every_option(minilm):
    task = data.get_task("rte")
    splits, _ = data.load_task("rte", max_train=6, max_eval=1)
    split = Encoded(splits["train"], minilm.tokenizer, task, max_length=24)
    model = methods.build("read", minilm, task.num_labels, ALL_OPTIONS).eval()
    randomize(model.side)
    layout = model.cache_layout(split)
    store = readlib.cache.build_set(model, split, layout, 4, CPU, progress=False)
    order = [5, 2, 0]
    inputs, _ = split.batch(order, CPU)
    with torch.no_grad():
        direct = model(**inputs)
        cached = model.forward_features(store["phi"].gather(order, CPU), inputs["attention_mask"])
    # cached states come from other batch shapes: rounding relative to the logits
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5 * direct.abs().max().item())
    assert (direct[0] - direct[1]).abs().max() > 1e-3


@pytest.mark.parametrize("joiner", read.JOINERS)
def test_text_to_text_cache_agrees_with_every_option(joiner):
    bb = backbones.load("random-t5-tiny")
    model = methods.build("read", bb, 1, {**ALL_OPTIONS, "joiner": joiner, "hidden": 16}).eval()
    randomize(torch.nn.ModuleList(m for n, m in model.named_children() if n != "frozen"))
    task = data.get_task("rte")
    rows = {"sentence1": ["a b c d e", "f g"], "sentence2": ["h", "i j k"], "label": [0, 1], "idx": [0, 1]}
    split = Encoded(datasets.Dataset.from_dict(rows), bb.tokenizer, task, 32, bb.eos_id)
    store = readlib.cache.build_set(model, split, model.cache_layout(split), 2, CPU, progress=False)
    inputs, _ = split.batch([1, 0], CPU)
    masks = {k: v for k, v in inputs.items() if k.endswith("attention_mask")}
    keep = inputs["decoder_attention_mask"].bool()
    with torch.no_grad():
        cached = model.forward_features(store.gather([1, 0], CPU), **masks)[keep]
        direct = model(**inputs)[keep]
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5 * direct.abs().max().item())


@pytest.mark.parametrize("args, message", [
    ({"combine": "max"}, "read.combine must be one of: last, mean; got 'max'"),
    ({"output_scale": "0"}, "read.output_scale must be a positive finite number, got 0.0"),
    ({"output_scale": -1}, "read.output_scale must be a positive finite number, got -1.0"),
    ({"output_scale": "inf"}, "read.output_scale must be a positive finite number, got inf"),
    ({"output_scale": "nan"}, "read.output_scale must be a positive finite number, got nan"),
    ({"state_norm": "maybe"}, "read.state_norm must be true or false, got 'maybe'"),
    ({"output_bias": "2"}, "read.output_bias must be true or false, got '2'"),
])
def test_bad_option_values(args, message):
    with pytest.raises(ConfigError) as err:
        methods.make_config("read", args)
    assert str(err.value) == message  # one line


def test_option_values_from_the_command_line():
    config = methods.make_config("read", {"state_norm": "true", "output_bias": "yes", "output_scale": "0.1",
                                          "combine": "mean"})
    assert (config.state_norm, config.output_bias, config.output_scale, config.combine) == (True, True, 0.1, "mean")


# ---------------------------------------------------------------- which φ on T5


def block_outputs(stack):
    """Forward hooks recording each block's raw output (the residual stream) of a T5 stack."""
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out[0])) for block in stack.block]
    return outputs, hooks


def test_t5_phi_1_to_n_minus_1_are_residual_states_and_phi_n_is_normalised(tiny):
    # φ_1..φ_{N-1}: the blocks' outputs as they are; φ_N: final_layer_norm(block N's output), the LM head's input
    bb = load_t5("random-t5-tiny:num_layers=3")
    model = methods.build("read", bb, 2)
    inputs = seq2seq_batch()
    enc, enc_hooks = block_outputs(bb.model.encoder)
    dec, dec_hooks = block_outputs(bb.model.decoder)
    phi_e, phi_d, _ = model.cached_states(**inputs)
    for hook in enc_hooks + dec_hooks:
        hook.remove()
    keep = inputs["attention_mask"].bool()
    for i in range(2):
        assert torch.equal(phi_e[i], enc[i][keep]) and torch.equal(phi_d[i], dec[i])
    assert torch.equal(phi_e[2], bb.model.encoder.final_layer_norm(enc[2])[keep])
    assert torch.equal(phi_d[2], bb.model.decoder.final_layer_norm(dec[2]))
    assert not torch.allclose(phi_d[2], dec[2], atol=1e-3)  # the norm does change the last state
    # the encoder classification path (T5EncoderModel): the same split
    bb = backbones.load("random-t5-tiny:num_layers=3", formulation="classification")
    batch = encode_sentences(bb)
    enc, hooks = block_outputs(bb.model.encoder)
    phi = methods.build("read", bb, 2).features(**batch)
    for hook in hooks:
        hook.remove()
    keep = batch["attention_mask"].bool()
    assert torch.equal(phi[1], enc[1][keep]) and torch.equal(phi[2], bb.model.encoder.final_layer_norm(enc[2])[keep])
