import dataclasses
import re

import pytest
import torch
from helpers import assert_restores, own_copy, randomize

from readlib import backbones, methods
from readlib.errors import ConfigError
from readlib.methods import read

TEXTS = [
    "The cat sat on the mat.",
    "A considerably longer sentence, so that the other two in this batch need padding.",
    "Short one.",
]
GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # weight blocks per cell: tanh RNN 1, GRU r/z/n, LSTM i/f/g/o


def encode(backbone, texts=TEXTS):
    enc = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def t5_tiny():
    return backbones.load("random-t5-tiny", formulation="classification")



def grads_set(model):
    return {n for n, p in model.named_parameters() if p.grad is not None}


def rnn_params(cell, d, hidden):
    # per gate block: W_ih [H, d], W_hh [H, H], b_ih [H], b_hh [H]
    return GATES[cell] * (hidden * d + hidden * hidden + 2 * hidden)


def read_trainable(cell, d, hidden, num_labels):
    w_o = hidden * d  # W_o: H -> d, no bias
    head = d * num_labels + num_labels
    return rnn_params(cell, d, hidden) + w_o + head


# ---------------------------------------------------------------- registry and configs


def test_registry_specs_have_the_same_shape():
    assert {"full", "read"} <= set(methods.METHODS)
    for name, spec in methods.METHODS.items():
        assert spec.name == name and spec.check() is spec
        assert dataclasses.is_dataclass(spec.config), name
        assert 0 < spec.default_lr < 1, name
        assert callable(spec.build), name
        spec.config().validate()  # the defaults are valid
    assert [n for n, s in methods.METHODS.items() if s.trains_from_cache] == ["read"]
    assert methods.METHODS["lst"].not_in_name == ("recompute_attention",)


@pytest.mark.parametrize("change, problem", [
    ({"default_lr": 0.0}, "default_lr must be in (0, 1)"),
    ({"formulations": ("text-to-text", "speech")}, "formulations must be a non-empty subset"),
    ({"not_in_name": ("rank",)}, "not_in_name names no config field: ['rank']"),
    ({"config": dict}, "config must be a dataclass with validate()"),
])
def test_a_bad_spec_is_refused_at_registration(change, problem):
    bad = dataclasses.replace(methods.METHODS["read"], **change)
    with pytest.raises(TypeError, match=re.escape(problem)):
        bad.check()


def test_the_frozen_backbone_stays_in_eval_mode_whatever_the_method_mode():
    model = methods.build("read", backbones.load("random-t5-tiny", formulation="classification"), 2)
    model.train()
    assert model.training and model.side.training and not model.frozen.training
    assert not any(m.training for m in model.frozen.modules())


def test_a_formulation_the_method_does_not_train_is_refused_by_build():
    with pytest.raises(ConfigError, match="method 'selective' does not train text-to-text"):
        methods.build("selective", backbones.load("random-t5-tiny"), 2)
    with pytest.raises(ConfigError, match="method 'read' does not train causal-lm"):
        methods.build("read", backbones.load("random-opt-tiny", meta=True), 2)


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError) as e:
        methods.get_method("lora-ish")
    msg = str(e.value)
    assert "'lora-ish'" in msg and "\n" not in msg
    assert msg.endswith(", ".join(methods.METHODS))


def test_make_config_converts_cli_strings():
    cfg = methods.make_config("read", {"hidden": "128", "rnn": "lstm", "dropout": "0"})
    assert cfg == read.Config(rnn="lstm", hidden=128, dropout=0.0)
    assert type(cfg.hidden) is int and type(cfg.dropout) is float
    assert methods.make_config("read") == read.Config(rnn="gru", hidden=256, dropout=0.1)
    assert methods.make_config("full", {"dropout": "0.25"}).dropout == 0.25


def case_id(values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


BAD_CONFIGS = [
    ({"hidden": "abc"}, "'abc'"),
    ({"hidden": "12.5"}, "'12.5'"),
    ({"hidden": "0"}, "got 0"),
    ({"dropout": "1.0"}, "got 1.0"),
    ({"dropout": "-0.1"}, "got -0.1"),
    ({"rnn": "transformer"}, "'transformer'"),
]


@pytest.mark.parametrize("args, needle", BAD_CONFIGS, ids=[case_id(case) for case, _ in BAD_CONFIGS])
def test_make_config_rejects_bad_values(args, needle):
    with pytest.raises(ConfigError) as e:
        methods.make_config("read", args)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert msg.startswith(f"read.{next(iter(args))} ")


def test_make_config_rnn_lists_cells():
    with pytest.raises(ConfigError, match="rnn, lstm, gru"):
        methods.make_config("read", {"rnn": "transformer"})


def test_make_config_unknown_key():
    with pytest.raises(ConfigError) as e:
        methods.make_config("read", {"rank": "8"})
    assert str(e.value) == ("unknown hyperparameter 'rank' for method 'read'; "
                            "allowed: rnn, hidden, dropout, drop_layers, joiner")
    with pytest.raises(ConfigError, match="'rnn' for method 'full'; allowed: dropout"):
        methods.make_config("full", {"rnn": "gru"})


def test_make_config_rejects_non_integer_hidden():
    with pytest.raises(ConfigError, match="2.5"):
        methods.make_config("read", {"hidden": 2.5})


# ---------------------------------------------------------------- the method matrix


@pytest.mark.parametrize("num_labels", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_forward_shape(name, num_labels):
    bb = t5_tiny()
    model = methods.build(name, bb, num_labels).eval()
    logits = model(**encode(bb))
    assert logits.shape == (len(TEXTS), num_labels)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_gradients_reach_exactly_the_trainable_parameters(name):
    bb = t5_tiny()
    model = methods.build(name, bb, 2).train()
    model(**encode(bb)).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable  # every method trains something
    assert grads_set(model) == trainable


def test_read_gradients_only_in_side_network_and_head(minilm):
    model = methods.build("read", minilm, 2).train()
    model(**encode(minilm)).sum().backward()
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if n.startswith(("side.", "head."))}
    assert grads_set(model) == expected
    assert len(expected) >= 5  # W_ih, W_hh, b_ih, b_hh, W_o, head weight and bias
    assert all(p.grad is None and not p.requires_grad for p in minilm.model.parameters())
    assert all(n.startswith(("side.", "head.", "frozen.")) for n in names)


def test_full_gradients_reach_every_t5_parameter():
    bb = t5_tiny()
    model = methods.build("full", bb, 2)
    model(**encode(bb)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_full_minilm_trains_only_parameters_that_get_gradients(minilm):
    model = methods.build("full", own_copy(minilm), 2)
    model(**encode(minilm)).sum().backward()
    assert grads_set(model) == {n for n, p in model.named_parameters() if p.requires_grad}


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


def test_read_count_does_not_grow_with_depth():
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


def test_full_count_is_total():
    bb = t5_tiny()
    backbone_params = sum(p.numel() for p in bb.model.parameters())
    model = methods.build("full", bb, 3)
    assert methods.count_parameters(model) == (backbone_params + 64 * 3 + 3,) * 2


def test_count_parameters_counts_shared_tensors_once():
    layer = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(layer, layer, torch.nn.Linear(4, 2).requires_grad_(False))
    assert methods.count_parameters(model) == (20, 30)


# ---------------------------------------------------------------- READ semantics


def test_read_starts_at_the_frozen_backbone(minilm):
    # W_o = 0 at initialisation: φ_N' = φ_N, so READ's logits are the head on the frozen output
    model = methods.build("read", minilm, 3).eval()
    batch = encode(minilm)
    expected = model.head(minilm.last_hidden_state(**batch), batch["attention_mask"])
    logits = model(**batch)
    assert logits.shape == (3, 3)
    assert torch.equal(logits, expected)
    phi = model.features(**batch)
    assert torch.equal(model.side(phi), torch.zeros(phi.shape[1], 384))


def test_read_features_are_phi_1_to_N_of_real_tokens(minilm):
    model = methods.build("read", minilm, 2)
    batch = encode(minilm)
    phi = model.features(**batch)
    mask = batch["attention_mask"].bool()
    states = minilm.hidden_states(**batch)
    assert phi.shape == (6, int(mask.sum()), 384)  # N = 6 layers, no embeddings (φ_0), no padding
    assert not phi.requires_grad
    for i in range(6):
        torch.testing.assert_close(phi[i], states[i + 1][mask], rtol=0, atol=1e-6)


def test_read_backbone_stays_in_eval_mode(minilm):
    model = methods.build("read", minilm, 2, {"dropout": 0.0}).train()
    assert model.training and model.head.training and model.side.training
    assert not any(m.training for m in minilm.model.modules())
    # MiniLM has dropout 0.1 inside; in eval mode two training-mode forwards agree exactly
    randomize(model.side)
    batch = encode(minilm)
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
    alone = model(**encode(minilm, TEXTS[:1]))
    padded = model(**encode(minilm, TEXTS[:2]))  # row 0 is padded to the longer sentence
    assert encode(minilm, TEXTS[:2])["attention_mask"][0].eq(0).sum() >= 10
    torch.testing.assert_close(padded[:1], alone, rtol=0, atol=1e-5)
    assert (padded[0] - padded[1]).abs().max() > 1e-3  # the rows themselves differ


def test_read_is_invariant_to_padding_t5():
    bb = t5_tiny()
    model = methods.build("read", bb, 3).eval()
    randomize(model.side)
    alone = model(**encode(bb, TEXTS[2:]))
    padded = model(**encode(bb, TEXTS[1:]))
    torch.testing.assert_close(padded[1:], alone, rtol=0, atol=1e-5)


def test_read_side_network_changes_logits(minilm):
    model = methods.build("read", minilm, 2).eval()
    batch = encode(minilm)
    before = model(**batch)
    randomize(model.side)
    assert (model(**batch) - before).abs().max() > 1e-3


def test_trainable_state_round_trip(minilm, tmp_path):
    torch.manual_seed(0)
    trained = methods.build("read", minilm, 2, {"rnn": "lstm", "hidden": 32}).eval()
    randomize(trained.side, seed=1)
    torch.nn.init.normal_(trained.head.out.weight)  # stands in for training
    state = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    torch.save(state, tmp_path / "read.pt")

    torch.manual_seed(1)
    restored = methods.build("read", minilm, 2, {"rnn": "lstm", "hidden": 32}).eval()
    batch = encode(minilm)
    assert not torch.equal(restored(**batch), trained(**batch))
    result = restored.load_state_dict(torch.load(tmp_path / "read.pt"), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("frozen.") for k in result.missing_keys)
    assert torch.equal(restored(**batch), trained(**batch))
    assert sum(p.numel() for p in state.values()) == read_trainable("lstm", 384, 32, 2)


# ---------------------------------------------------------------- the matrix: every method, both formulations

MATRIX = [pytest.param(name, formulation, id=f"{name}-{formulation}") for name in sorted(methods.METHODS)
          for formulation in ("classification", "text-to-text") if methods.supports(name, formulation)]


def tiny_batch(bb, t2t):
    """Inputs and labels on a tiny random T5: 3 sentences (classification, 2 labels) or 3 x 4 target tokens."""
    if not t2t:
        return encode(bb), torch.tensor([0, 1, 1])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels = torch.randint(5, 1000, (3, 4), generator=gen)
    decoder_input_ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), labels[:, :-1]], 1)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_input_ids}, labels


def tiny_loss(model, batch, labels):
    from readlib.train import task_loss

    return task_loss(model(**batch), labels, regression=False)


def test_the_matrix_covers_every_method_and_refuses_nothing_silently():
    names = {p.values[0] for p in MATRIX}
    assert names == set(methods.METHODS)
    assert {p.values[0] for p in MATRIX if p.values[1] == "text-to-text"} == set(methods.METHODS) - {"selective"}


@pytest.mark.parametrize("name, formulation", MATRIX)
def test_matrix_trained_state_round_trips(name, formulation, tmp_path):
    torch.manual_seed(0)
    trained = methods.build(name, backbones.load("random-t5-tiny", formulation=formulation), 2).eval()
    with torch.no_grad():  # stands in for training: move every trained tensor
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    state = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    torch.save(state, tmp_path / f"{name}.pt")

    torch.manual_seed(1)
    restored = methods.build(name, backbones.load("random-t5-tiny", formulation=formulation), 2).eval()
    batch, _ = tiny_batch(backbones.load("random-t5-tiny", formulation=formulation), formulation == "text-to-text")
    assert_restores(restored, trained, tmp_path / f"{name}.pt", state, batch)


@pytest.mark.parametrize("name, formulation", MATRIX)
def test_matrix_short_training_lowers_the_loss(name, formulation):
    torch.manual_seed(0)
    t2t = formulation == "text-to-text"
    bb = backbones.load("random-t5-tiny", formulation=formulation)
    model = methods.build(name, bb, 2)
    batch, labels = tiny_batch(bb, t2t)
    with torch.no_grad():
        before = tiny_loss(model.eval(), batch, labels).item()
    # over a 32128-word vocabulary a random T5 starts near ln(32128) = 10.4 nats: a larger step for text-to-text
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2 if t2t else 3e-3)
    model.train()
    for _ in range(25):
        optimizer.zero_grad()
        tiny_loss(model, batch, labels).backward()
        optimizer.step()
    with torch.no_grad():
        after = tiny_loss(model.eval(), batch, labels).item()
    assert after < (before - 0.3 if t2t else 0.7 * before), (before, after)


def test_parse_variant():
    assert methods.parse_variant("read") == ("read", {})
    assert methods.parse_variant("read:hidden=128,rnn=lstm") == ("read", {"hidden": "128", "rnn": "lstm"})
    with pytest.raises(ConfigError, match="unknown hyperparameter 'rank' for method 'read'"):
        methods.parse_variant("read:rank=4")
    with pytest.raises(ConfigError, match="bad variant"):
        methods.parse_variant("lora:8")
