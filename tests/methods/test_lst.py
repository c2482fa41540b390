"""Ladder Side-Tuning (readlib.methods.lst): shapes, gradients, counts, gates, pruned initialisation, memory,
save/load, training and the training loop.

MiniLM is deep-copied per model (the session fixture stays untouched); the tiny T5s are loaded fresh.
"""

import functools

import pytest
import torch
from helpers import VOCAB, assert_restores, encode, own_copy, randomize, t5_batch, train_steps

from readlib import backbones, methods
from readlib.costs import SavedTensorMeter
from readlib.errors import ConfigError
from readlib.methods import lst
from readlib.params import make_params
from readlib.train import fit

# MiniLM-L6: 6 layers, d = 384, FFN 1536, 12 heads. Tiny T5: 2 + 2 layers, d = 64, 4 heads of 16, FFN 128.
D, FFN, LAYERS = 384, 1536, 6


T5_D, T5_HEADS, T5_KV, T5_FFN, T5_LAYERS = 64, 4, 16, 128, 2
BUCKETS = 32  # T5's relative_attention_num_buckets: a relative-bias table is [buckets, heads]


def build(path, minilm, args=None, num_labels=2, seed=0):
    """(model, batch) for one of the three paths; MiniLM is copied, the T5s are fresh."""
    torch.manual_seed(seed)
    if path == "minilm":
        return methods.build("lst", own_copy(minilm), num_labels, args), encode(minilm)
    if path == "t5-encoder":
        bb = backbones.load("random-t5-tiny", formulation="classification")
        return methods.build("lst", bb, num_labels, args), {k: v for k, v in t5_batch()[0].items()
                                                             if not k.startswith("decoder")}
    return methods.build("lst", backbones.load("random-t5-tiny"), num_labels, args), t5_batch()[0]


def scalar(out):
    return out.logsumexp(-1).sum() if out.dim() == 3 else out.sum()


# ---------------------------------------------------------------- parameter counts, by formula


def linear(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def ladders(d, width, kept):
    return (kept + 1) * linear(d, width) + kept  # W_0, W_i and the gates α_i


def bert_side(r, kept):
    s, f = D // r, FFN // r  # side width; heads keep their count, so attention inner width = s
    layer = 4 * linear(s, s) + 2 * s + linear(s, f) + linear(f, s) + 2 * s  # q k v o, LayerNorm, FFN, LayerNorm
    return kept * layer + ladders(D, s, kept) + linear(s, D)  # + upsample U


def t5_side(d, heads, kv, ff, r, kept, decoder):
    s, inner, f = d // r, heads * (kv // r), ff // r
    attention = 4 * s * inner  # q k v o, no biases
    block = attention + s + 2 * s * f + s  # + layer norm, FFN wi wo, layer norm
    if decoder:
        block += attention + s  # cross-attention and its layer norm
    # + the first side block's relative-bias table, the ladders and gates, the side stack's final layer norm
    return kept * block + BUCKETS * heads + ladders(d, s, kept) + s


def t5_tiny(r=8, kept=1, seq2seq=True, num_labels=2):
    enc = t5_side(T5_D, T5_HEADS, T5_KV, T5_FFN, r, kept, decoder=False)
    if not seq2seq:
        return enc + linear(T5_D // r, T5_D) + linear(T5_D, num_labels)
    return enc + t5_side(T5_D, T5_HEADS, T5_KV, T5_FFN, r, kept, decoder=True) + linear(T5_D // r, T5_D)


def t5_base(kept, r=8):
    side = sum(t5_side(768, 12, 64, 3072, r, kept, decoder) for decoder in (False, True))
    return side + linear(768 // r, 768)


def test_formulas_by_number():
    assert bert_side(8, 4) + linear(D, 2) == 225_078  # MiniLM: side layers 1, 2, 3, 5 of 6
    assert t5_tiny() == 4_250 and t5_tiny(seq2seq=False, num_labels=3) == 2_476
    # the two relative-bias tables (32 buckets x 12 heads each) are 768 of T5-base's counts
    assert t5_base(9) == 3_877_938 + 2 * 32 * 12 == 3_878_706
    # LST's code (r = 8, side layers [1,2,3,5,6,7,9,10,11]) also builds the 2 x 3 gates of dropped layers and
    # divides by T5-base after resizing to the tokenizer's 32,100 tokens (utils.py modify_model_after_init):
    # 1.74 %, LST Table 1
    t5_base_lst = 222_903_552 - (32_128 - 32_100) * 768
    assert t5_base_lst == 222_882_048 and round(100 * (t5_base(9) + 2 * 3) / t5_base_lst, 2) == 1.74
    # READ Table 4 (5.04 M / 2.00 %): no layer dropping at READ Table 7's side dim 96 is the nearest LST
    # configuration, 5,097,240 = 5.04 M + 1.1 %; dropping gives 3.88 M (- 23 %)
    assert t5_base(12) == 5_097_240 and round(t5_base(12) / 5.04e6 - 1, 3) == 0.011
    # READ's percentages divide by T5-base with its LM head counted apart from the embedding (Table 4, full
    # tuning: 247.58 M): READ's own 1.97 M is 0.80 % there, but 5.04 M would be 2.04 %, not the 2.00 % printed
    t5_base_untied = 222_903_552 + 32_128 * 768
    assert round(t5_base_untied / 1e6, 2) == 247.58 and round(100 * 1.97e6 / t5_base_untied, 2) == 0.80
    assert round(100 * 5.04e6 / t5_base_untied, 2) == 2.04
    # Table 7's other side dims, 64 and 128 (r = 12, 6), without dropping
    assert (t5_base(12, r=12), t5_base(12, r=6)) == (2_673_688, 8_024_600)


@pytest.mark.parametrize("args, num_labels, expected", [
    ({}, 2, bert_side(8, 4) + linear(D, 2)),
    ({}, 1, bert_side(8, 4) + linear(D, 1)),
    ({"reduction": 4, "drop_every": 0}, 3, bert_side(4, 6) + linear(D, 3)),
    ({"drop_every": 2}, 2, bert_side(8, 3) + linear(D, 2)),  # keeps layers 1, 3, 5
])
def test_minilm_trainable_count_formula(minilm, args, num_labels, expected):
    frozen = sum(p.numel() for p in minilm.model.parameters())
    model = methods.build("lst", own_copy(minilm), num_labels, args)
    assert methods.count_parameters(model) == (expected, frozen + expected)


@pytest.mark.parametrize("args, seq2seq, expected", [
    ({}, True, t5_tiny()),
    ({"reduction": 4}, True, t5_tiny(r=4)),
    ({"drop_every": 0}, True, t5_tiny(kept=2)),
    ({}, False, t5_tiny(seq2seq=False)),
])
def test_t5_tiny_trainable_count_formula(args, seq2seq, expected):
    bb = backbones.load("random-t5-tiny", formulation="text-to-text" if seq2seq else "classification")
    frozen = sum(p.numel() for p in bb.model.parameters())
    model = methods.build("lst", bb, 2, args)
    assert methods.count_parameters(model) == (expected, frozen + expected)


@pytest.mark.parametrize("args, expected, kept", [
    ({}, 3_878_706, 9),
    ({"drop_every": 0}, 5_097_240, 12),  # the paper profile's LST (READ Table 4: 5.04 M)
    ({"drop_every": 0, "reduction": 12}, 2_673_688, 12),  # READ Table 7's side dim 64
    ({"drop_every": 0, "reduction": 6}, 8_024_600, 12),  # and 128
])
def test_t5_base_count_on_the_meta_device(args, expected, kept):
    bb = backbones.load("random-t5-base", meta=True)
    model = methods.build("lst", bb, 2, args)  # pruned initialisation runs on the meta device too
    assert methods.count_parameters(model)[0] == expected
    assert model.up.weight.is_meta and [len(s.layers) for s in (model.side_encoder, model.side_decoder)] == [kept] * 2
    tables = [n for n, p in model.named_parameters() if p.requires_grad and "relative_attention_bias" in n]
    assert tables == [f"side_{stack}.blocks.0.layer.0.SelfAttention.relative_attention_bias.weight"
                      for stack in ("encoder", "decoder")]


# ---------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("path, num_labels, shape", [
    ("minilm", 1, (3, 1)), ("minilm", 3, (3, 3)), ("t5-encoder", 2, (3, 2)), ("seq2seq", 2, (3, 4, VOCAB)),
])
def test_forward_shape_and_backward(minilm, path, num_labels, shape):
    model, batch = build(path, minilm, num_labels=num_labels)
    out = model.train()(**batch)
    assert out.shape == shape and torch.isfinite(out).all()
    scalar(out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def intended(names, path):
    """Parameters LST trains, by a rule written independently of the module: everything outside the backbone."""
    own = {n for n in names if not n.startswith("frozen.")}
    expected_roots = {"side_encoder", "side_decoder", "up"} if path == "seq2seq" else {"side", "up", "head"}
    assert {n.split(".")[0] for n in own} == expected_roots
    return own


@pytest.mark.parametrize("args", [{}, {"drop_every": 0}])
@pytest.mark.parametrize("path", ["minilm", "t5-encoder", "seq2seq"])
def test_gradients_reach_exactly_the_side_network(minilm, path, args):
    model, batch = build(path, minilm, args)
    before = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scalar(model.train()(**batch)).backward()
    names = [n for n, _ in model.named_parameters()]
    expected = intended(names, path)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected  # the gates included
    optimizer.step()
    after = model.frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone is unchanged
    assert not any(p.requires_grad for p in minilm.model.parameters())


@pytest.mark.parametrize("path", ["minilm", "seq2seq"])
def test_the_backbone_runs_without_autograd(minilm, path):
    model, batch = build(path, minilm)
    layers = model.frozen.encoder.layer if path == "minilm" else [*model.frozen.encoder.block,
                                                                    *model.frozen.decoder.block]
    modes = []
    for layer in layers:
        layer.register_forward_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    scalar(model.train()(**batch)).backward()
    assert len(modes) == len(layers) and not any(modes)


# ---------------------------------------------------------------- what the side network computes


def test_minilm_side_network_by_hand(minilm):
    """Eval-mode logits from the ladder equations written out: side block j reads backbone layer i's output."""
    model, batch = build("minilm", minilm, {"reduction": 4})
    model.eval()
    side = model.side
    assert side.layers == [1, 2, 3, 5]  # LST's dropping rule: layers 0 and 4 have no side block
    randomize(torch.nn.ParameterList([side.alpha]), std=0.3, seed=3)  # gates off 0.5
    with torch.no_grad():
        phi = minilm.hidden_states(**batch)  # embedding output, then the outputs of layers 1..6
        mask = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        h = side.first_down(phi[0])
        for j, i in enumerate([1, 2, 3, 5]):
            mu = torch.sigmoid(side.alpha[j] / 0.1)
            h = side.blocks[j](mu * side.downs[j](phi[i + 1]) + (1 - mu) * h, attention_mask=mask)
        expected = model.head(model.up(h), batch["attention_mask"])
        torch.testing.assert_close(model(**batch), expected, rtol=0, atol=1e-6)


def test_t5_states_are_the_block_outputs_before_the_final_norm():
    t5 = backbones.load("random-t5-tiny").model
    inputs, _ = t5_batch()
    with torch.no_grad():
        phi, last = lst.t5_states(t5.encoder, inputs["input_ids"], attention_mask=inputs["attention_mask"])
        reference = t5.encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               output_hidden_states=True)
    assert len(phi) == T5_LAYERS + 1
    for ours, theirs in zip(phi[:-1], reference.hidden_states[:-1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(t5.encoder.final_layer_norm(phi[-1]), last, rtol=0, atol=1e-6)
    torch.testing.assert_close(last, reference.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["minilm", "t5-encoder", "seq2seq"])
def test_padding_does_not_change_the_real_tokens_logits(minilm, path):
    model, batch = build(path, minilm, {"drop_every": 0})
    model.eval()
    row, n = 2, int(batch["attention_mask"][2].sum())
    alone = {k: (v[row : row + 1, :n] if not k.startswith("decoder") else v[row : row + 1]) for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)[row : row + 1], model(**alone), rtol=0, atol=2e-5)


# ---------------------------------------------------------------- relative position bias


def six_layer_t5(args, init="pruned"):
    """LST on a 6 + 6-layer tiny T5: drop_every=4 keeps side blocks 1, 2, 3, 5, so side block 0 is gone."""
    torch.manual_seed(0)
    model = methods.build("lst", backbones.load("random-t5-tiny:num_layers=6"), 2, args | {"init": init})
    stacks = [(model.side_encoder, model.frozen.encoder), (model.side_decoder, model.frozen.decoder)]
    return model, t5_batch()[0], stacks


def table(blocks):
    """The relative-bias table of the first of ``blocks`` (a T5 stack's or a side network's)."""
    return blocks[0].layer[0].SelfAttention.relative_attention_bias.weight


@pytest.mark.parametrize("drop_every, layers", [(4, [1, 2, 3, 5]), (0, [0, 1, 2, 3, 4, 5])])
def test_the_first_side_block_owns_a_trainable_relative_bias_table(drop_every, layers):
    """Side block 0, or the first side block that exists when dropping removed it, owns a [buckets, heads] table
    that starts as the backbone's block-0 table (pruned init) and trains; the frozen tables get no gradient."""
    model, batch, stacks = six_layer_t5({"drop_every": drop_every})
    for side, frozen in stacks:
        assert side.layers == layers
        assert [b.layer[0].SelfAttention.has_relative_attention_bias for b in side.blocks] == [True] + [False] * (
            len(layers) - 1)
        assert table(side.blocks).shape == (BUCKETS, T5_HEADS) and table(side.blocks).requires_grad
        assert torch.equal(table(side.blocks), table(frozen.block)) and not table(frozen.block).requires_grad
    scalar(model.train()(**batch)).backward()
    for side, frozen in stacks:
        assert table(frozen.block).grad is None and torch.count_nonzero(table(side.blocks).grad) > 0


def test_random_init_draws_the_side_table():
    model, _, stacks = six_layer_t5({}, init="random")
    for side, frozen in stacks:
        drawn, backbone = table(side.blocks), table(frozen.block)
        assert drawn.shape == backbone.shape and not torch.equal(drawn, backbone)


@pytest.mark.parametrize("drop_every", [4, 0])
def test_every_side_block_adds_the_side_tables_bias(drop_every):
    """One [1, heads, n, n] bias from the side's own table (decoder: causal buckets) reaches every side block."""
    model, batch, stacks = six_layer_t5({"drop_every": drop_every})
    seen = {id(side): [] for side, _ in stacks}
    for side, _ in stacks:
        for block in side.blocks:
            block.register_forward_hook(lambda _m, _a, kwargs, _out, s=side: seen[id(s)].append(
                kwargs["position_bias"]), with_kwargs=True)
    model.eval()(**batch)
    for (side, _), n in zip(stacks, (7, 4), strict=True):  # source and target lengths
        biases = seen[id(side)]
        assert len(biases) == len(side.blocks) and all(b is biases[0] for b in biases)
        attention = side.blocks[0].layer[0].SelfAttention
        torch.testing.assert_close(biases[0], attention.compute_bias(n, n), rtol=0, atol=0)
        assert biases[0].shape == (1, T5_HEADS, n, n) and biases[0].requires_grad


def leaf_bias(n, device, attention, leaves):
    """``attention``'s relative bias [1, heads, n, n] as a leaf tensor (its gradient is read), kept in ``leaves``."""
    leaves.append(attention.compute_bias(n, n, device=device).detach().requires_grad_())
    return leaves[-1]


def test_side_table_gradient_sums_every_blocks_bias_gradient():
    """d loss / d table = the gradient of the one bias every side block adds, summed into the table row of each
    (query, key) pair's bucket (T5's relative-position buckets: bidirectional encoder, causal decoder)."""
    runs = []
    for leaf in (False, True):
        model, batch, stacks = six_layer_t5({"drop_every": 4, "dropout": 0.0})
        leaves = []
        if leaf:
            for side, _ in stacks:
                side.relative_bias = functools.partial(leaf_bias, attention=side.blocks[0].layer[0].SelfAttention,
                                                       leaves=leaves)
        model.eval()(**batch).logsumexp(-1).sum().backward()
        runs.append((stacks, leaves))
    (stacks, _), (_, leaves) = runs
    for (side, _), bias in zip(stacks, leaves, strict=True):
        attention, n = side.blocks[0].layer[0].SelfAttention, bias.shape[-1]
        position = torch.arange(n)
        buckets = attention._relative_position_bucket(position[None] - position[:, None],
                                                      bidirectional=not attention.is_decoder,
                                                      num_buckets=BUCKETS,
                                                      max_distance=attention.relative_attention_max_distance)
        expected = torch.zeros(BUCKETS, T5_HEADS).index_add_(0, buckets.flatten(),
                                                             bias.grad[0].permute(1, 2, 0).reshape(n * n, T5_HEADS))
        grad = table(side.blocks).grad
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        assert torch.count_nonzero(grad) > 0


@pytest.mark.parametrize("drop_every", [0, 4])
def test_pruned_start_gives_the_frozen_bias_results(drop_every):
    """The side table starts as a copy of the backbone's, so before training the outputs are those of side blocks
    reading the frozen backbone's bias (this module's earlier behaviour); for drop_every=0 every gradient but the
    table's is the same too (side blocks 1.. now also train the table, as in LST's code)."""
    runs = []
    for own in (True, False):
        model, batch, stacks = six_layer_t5({"drop_every": drop_every, "dropout": 0.0})
        if not own:
            for side, frozen in stacks:
                attention = frozen.block[0].layer[0].SelfAttention
                side.relative_bias = lambda n, device, a=attention: a.compute_bias(n, n, device=device)
        out = model.eval()(**batch)
        out.logsumexp(-1).sum().backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out, grads), (ref, ref_grads) = runs
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert set(grads) - set(ref_grads) == {f"side_{s}.blocks.0.layer.0.SelfAttention.relative_attention_bias.weight"
                                           for s in ("encoder", "decoder")}
    if drop_every == 0:
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- gates


def test_gates_start_at_one_half_and_mix_as_written():
    alpha = torch.tensor(0.05)
    prev, rung = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mu = 1 / (1 + torch.exp(-alpha / 0.1))
    torch.testing.assert_close(lst.ladder(prev, rung, alpha, 0.1), mu * rung + (1 - mu) * prev)
    torch.testing.assert_close(lst.ladder(prev, rung, torch.tensor(0.0), 0.1), (prev + rung) / 2)
    model = methods.build("lst", backbones.load("random-t5-tiny"), 2, {"drop_every": 0})
    for side in (model.side_encoder, model.side_decoder):
        assert torch.equal(side.alpha.detach(), torch.zeros(2)) and torch.equal(side.gates().detach(),
                                                                                torch.full((2,), 0.5))


def test_gate_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    prev, rung = (torch.randn(2, 3, 4, generator=gen, dtype=torch.double, requires_grad=True) for _ in range(2))
    alpha = torch.tensor(0.03, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p, r: lst.ladder(p, r, a, 0.1), (alpha, prev, rung))


@pytest.mark.parametrize("alpha, reaching", [(100.0, "downs.3."), (-100.0, "first_down.")])
def test_saturated_gates_leave_one_path(minilm, alpha, reaching):
    # μ = 1: x_i = W_i φ_i discards h_{i-1}, so only the last ladder reaches the output;
    # μ = 0: x_i = h_{i-1} cuts every ladder, so only W_0 φ_0 does
    model, batch = build("minilm", minilm, {"dropout": 0.0})
    with torch.no_grad():
        model.side.alpha.fill_(alpha)
    model.eval()(**batch).sum().backward()
    for name, p in model.side.named_parameters():
        if name.startswith(("first_down", "downs")):
            assert bool(torch.count_nonzero(p.grad)) == name.startswith(reaching), name


# ---------------------------------------------------------------- pruned initialisation


def top(weight, k):
    """Reference selection rule: the k rows of largest L1 norm, in index order."""
    return torch.argsort(weight.abs().sum(1), descending=True)[:k].sort().values


def test_keep_rows_on_a_hand_made_matrix():
    w = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.5], [3.0, 0.0, 0.0], [-0.2, 0.2, 0.3]])  # L1: 2, .5, 3, .7
    assert lst.keep_rows(w, 1).tolist() == [2]
    assert lst.keep_rows(w, 2).tolist() == [0, 2]  # index order, not score order
    assert lst.keep_rows(w, 3).tolist() == [0, 2, 3]
    # groups rank rows by the L1 norm of their element-wise product (LST's q * k * v), after cutting columns
    q, k = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), torch.tensor([[1.0, 9.0, 1.0], [-3.0, 0.0, 1.0]])
    (q_cut, k_cut), rows = lst._prune_group([q, k], torch.tensor([0, 2]), 1)  # products: [2, 1], [-3, 1]
    assert rows.tolist() == [1] and q_cut.tolist() == [[1.0, 1.0]] and k_cut.tolist() == [[-3.0, 1.0]]


def test_minilm_side_layers_are_the_pruned_backbone_layers(minilm):
    model, _ = build("minilm", minilm, {"drop_every": 0})
    bert, side = minilm.model, model.side.blocks
    cols = top(bert.embeddings.word_embeddings.weight.T, 48)
    for j in range(2):  # layer 0 from the embedding columns, layer 1 from layer 0's output rows: the chain
        layer, mine = bert.encoder.layer[j], side[j]
        att = layer.attention.self
        heads = top(att.query.weight[:, cols] * att.key.weight[:, cols] * att.value.weight[:, cols], 48)
        for m in ("query", "key", "value"):
            assert torch.equal(getattr(mine.attention.self, m).weight, getattr(att, m).weight[heads][:, cols])
            assert torch.equal(getattr(mine.attention.self, m).bias, getattr(att, m).bias[heads])
        ao = layer.attention.output.dense.weight[:, heads]
        rows = top(ao, 48)
        assert torch.equal(mine.attention.output.dense.weight, ao[rows])
        assert torch.equal(mine.attention.output.LayerNorm.bias, layer.attention.output.LayerNorm.bias[rows])
        ff = top(layer.intermediate.dense.weight[:, rows], 192)
        assert torch.equal(mine.intermediate.dense.weight, layer.intermediate.dense.weight[ff][:, rows])
        cols = top(layer.output.dense.weight[:, ff], 48)
        assert torch.equal(mine.output.dense.weight, layer.output.dense.weight[cols][:, ff])
        assert torch.equal(mine.output.LayerNorm.weight, layer.output.LayerNorm.weight[cols])


def test_t5_side_blocks_are_the_pruned_backbone_blocks():
    bb = backbones.load("random-t5-tiny")
    model = methods.build("lst", bb, 2, {"drop_every": 0})
    t5, mine = bb.model, model.side_encoder.blocks[0]
    block = t5.encoder.block[0]
    cols = top(t5.shared.weight.T, 8)
    attn, side_attn = block.layer[0].SelfAttention, mine.layer[0].SelfAttention
    assert torch.equal(mine.layer[0].layer_norm.weight, block.layer[0].layer_norm.weight[cols])
    heads = top(attn.q.weight[:, cols] * attn.k.weight[:, cols] * attn.v.weight[:, cols], T5_HEADS * (T5_KV // 8))
    for m in "qkv":
        assert torch.equal(getattr(side_attn, m).weight, getattr(attn, m).weight[heads][:, cols])
    rows = top(attn.o.weight[:, heads], 8)
    assert torch.equal(side_attn.o.weight, attn.o.weight[rows][:, heads])
    assert torch.equal(side_attn.relative_attention_bias.weight, attn.relative_attention_bias.weight)  # unpruned
    ff, side_ff = block.layer[1].DenseReluDense, mine.layer[1].DenseReluDense
    assert torch.equal(mine.layer[1].layer_norm.weight, block.layer[1].layer_norm.weight[rows])
    mid = top(ff.wi.weight[:, rows], T5_FFN // 8)
    assert torch.equal(side_ff.wi.weight, ff.wi.weight[mid][:, rows])
    assert torch.equal(side_ff.wo.weight, ff.wo.weight[top(ff.wo.weight[:, mid], 8)][:, mid])
    assert side_attn.q.weight.requires_grad  # a trainable copy, not a view of the frozen weight
    assert side_attn.q.weight.data_ptr() != attn.q.weight.data_ptr()


def test_random_init_is_not_the_pruned_backbone(minilm):
    pruned, _ = build("minilm", minilm, {"drop_every": 0})
    random, _ = build("minilm", minilm, {"drop_every": 0, "init": "random"})
    q = pruned.side.blocks[0].attention.self.query.weight
    assert q.shape == random.side.blocks[0].attention.self.query.weight.shape
    assert not torch.equal(q, random.side.blocks[0].attention.self.query.weight)


# ---------------------------------------------------------------- memory


def test_saved_activations_are_under_a_third_of_full_fine_tuning(minilm):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (8, 64), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    saved = {}
    for name in ("lst", "full"):
        model = methods.build(name, own_copy(minilm), 2).train()
        with SavedTensorMeter(model) as meter:
            loss = model(**batch).sum()
        loss.backward()
        saved[name] = meter.bytes
    assert saved["lst"] <= 0.3 * saved["full"], saved


def test_recomputed_attention_stores_no_probabilities_and_changes_nothing_else(minilm):
    """Same outputs, dropout draws and gradients as eager side attention; the bytes saved are exactly the three
    [batch, heads, q, k] float tensors eager attention keeps per side block (softmax output, dropout's float mask,
    the dropped probabilities), less the additive mask the recomputing blocks share."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (8, 64), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    runs = {}
    for recompute in (True, False):
        backbone = own_copy(minilm)
        backbone.model.config._attn_implementation = "eager"  # LST's code; MiniLM's own is SDPA
        torch.manual_seed(0)
        model = methods.build("lst", backbone, 2, {"recompute_attention": str(recompute)}).train()
        torch.manual_seed(1)  # the same dropout draws
        with SavedTensorMeter(model) as meter:
            out = model(**batch)
        out.sum().backward()
        runs[recompute] = out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, meter.bytes
    (out, grads, saved), (ref, ref_grads, ref_saved) = runs[True], runs[False]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    blocks, heads, mask_bytes = len(lst.side_layers(LAYERS, 4)), 12, 8 * 64 * 4
    assert ref_saved - saved == blocks * 8 * heads * 64 * 64 * 12 - mask_bytes
    assert saved <= 0.15 * full_fine_tuning_bytes(minilm, batch)


def full_fine_tuning_bytes(minilm, batch) -> int:
    model = methods.build("full", own_copy(minilm), 2).train()
    with SavedTensorMeter(model) as meter:
        model(**batch).sum().backward()
    return meter.bytes


def test_recomputed_attention_gradients_t5_with_relative_bias():
    """T5 text-to-text, every side block kept (block 0 trains its own relative-bias table): eager = recomputed."""
    runs = {}
    for recompute in (True, False):
        model, batch = build("seq2seq", None, {"recompute_attention": str(recompute), "drop_every": "0"})
        model.train()
        torch.manual_seed(1)
        model(**batch).logsumexp(-1).sum().backward()
        runs[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("relative_attention_bias" in n and g.abs().sum() > 0 for n, g in runs[True].items())
    for name, grad in runs[True].items():
        torch.testing.assert_close(grad, runs[False][name], rtol=1e-5, atol=1e-6, msg=name)


def test_recomputed_attention_gradcheck_and_dropout_replay():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    mask[0, ..., -2:] = torch.finfo(torch.float64).min
    assert torch.autograd.gradcheck(lambda *t: lst.RecomputedAttention.apply(*t, mask, bias, 0.5, 0.0), (q, k, v))
    assert torch.autograd.gradcheck(lambda b: lst.RecomputedAttention.apply(q, k, v, mask, b, 0.5, 0.0), (bias,))
    # with dropout: the backward pass replays the forward pass's draws, whatever ran in between
    torch.manual_seed(3)
    ref = lst._eager(q, k, v, mask, bias, 0.5, 0.4)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, bias))
    torch.manual_seed(3)
    out = lst.RecomputedAttention.apply(q, k, v, mask, bias, 0.5, 0.4)
    torch.rand(100)  # moves the generator on
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, bias))
    assert torch.equal(out, ref)
    for grad, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- save and load, training


@pytest.mark.parametrize("path", ["minilm", "seq2seq"])
def test_trainable_state_round_trip(minilm, tmp_path, path):
    trained, batch = build(path, minilm, seed=0)
    trained.eval()
    randomize(torch.nn.ParameterList([p for p in trained.parameters() if p.requires_grad]), seed=1)
    state = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    torch.save(state, tmp_path / "lst.pt")

    restored, _ = build(path, minilm, {"init": "random"}, seed=2)
    restored.eval()
    result = assert_restores(restored, trained, tmp_path / "lst.pt", state, batch)
    assert all(k.startswith("frozen.") for k in result.missing_keys)


def test_short_training_lowers_the_loss_encoder(minilm):
    model, batch = build("minilm", minilm, {"dropout": 0.0})
    first, last = train_steps(model, batch, torch.tensor([0, 1, 1]), torch.nn.functional.cross_entropy, lr=3e-3,
                              steps=20)
    assert last < 0.5 * first, (first, last)


def test_short_training_lowers_the_loss_text_to_text(minilm):
    model, batch = build("seq2seq", minilm)
    _, labels = t5_batch()

    def token_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    first, last = train_steps(model, batch, labels, token_loss, lr=3e-2, steps=20)
    assert last < first - 0.3, (first, last)


def test_fit_lst_on_the_tiny_t5():
    params = make_params("quick", task="rte", method="lst", backbone="random-t5-tiny", max_train=16, max_eval=8,
                         max_epochs=1)
    record = fit(params, progress=False)
    assert (record["method"], record["status"], record["formulation"]) == ("lst", "ok", "text-to-text")
    assert record["trainable_params"] == t5_tiny()
    assert record["method_args"] == {"reduction": 8, "gate_temperature": 0.1, "drop_every": 4, "init": "pruned",
                                     "dropout": 0.1, "recompute_attention": True}
    assert record["lr"] == 3e-3


# ---------------------------------------------------------------- configs


def test_registry_and_defaults():
    assert methods.METHODS["lst"] is lst.SPEC and lst.DEFAULT_LR == 3e-3
    assert methods.make_config("lst") == lst.Config(reduction=8, gate_temperature=0.1, drop_every=4, init="pruned",
                                                    dropout=0.1, recompute_attention=True)
    cfg = methods.make_config("lst", {"reduction": "12", "gate_temperature": "1"})
    assert (cfg.reduction, cfg.gate_temperature) == (12, 1.0) and type(cfg.reduction) is int
    assert lst.side_layers(12, 4) == [1, 2, 3, 5, 6, 7, 9, 10, 11]  # LST's encoder/decoder_side_layers
    assert lst.side_layers(6, 0) == list(range(6))


BAD_CONFIGS = [
    ({"reduction": "0"}, "lst.reduction ", "got 0"),
    ({"gate_temperature": "0"}, "lst.gate_temperature ", "got 0.0"),
    ({"gate_temperature": "-0.1"}, "lst.gate_temperature ", "got -0.1"),
    ({"drop_every": "1"}, "lst.drop_every ", "got 1"),
    ({"drop_every": "-4"}, "lst.drop_every ", "got -4"),
    ({"init": "fisher"}, "lst.init ", "got 'fisher'"),
    ({"dropout": "1"}, "lst.dropout ", "got 1.0"),
]


@pytest.mark.parametrize("args, prefix, needle", BAD_CONFIGS,
                         ids=[f"{next(iter(a))}={next(iter(a.values()))}" for a, _, _ in BAD_CONFIGS])
def test_make_config_rejects_bad_values(args, prefix, needle):
    with pytest.raises(ConfigError) as e:
        methods.make_config("lst", args)
    msg = str(e.value)
    assert msg.startswith(prefix) and needle in msg and "\n" not in msg


@pytest.mark.parametrize("backbone, args, needle", [
    ("minilm", {"reduction": 5}, "divide the backbone width 384"),
    ("minilm", {"reduction": 64}, "divisible by the 12 attention heads"),
    ("random-t5-tiny", {"reduction": 32}, "d_kv = 16"),
    ("random-t5-tiny:num_layers=1", {}, "drops every side block of a 1-layer backbone"),
])
def test_build_rejects_widths_the_backbone_cannot_take(minilm, backbone, args, needle):
    bb = own_copy(minilm) if backbone == "minilm" else backbones.load(backbone)
    with pytest.raises(ConfigError) as e:
        methods.build("lst", bb, 2, args)
    assert str(e.value).startswith("lst.") and needle in str(e.value) and "\n" not in str(e.value)
