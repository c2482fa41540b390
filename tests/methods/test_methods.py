"""The method registry and contract (readlib.methods, readlib.methods.base), and tests run over every method or
a group of them: shapes, gradients, parameter counts, start points, save/load, short training (the shape of
peft's test matrix).

Methods that change the backbone they are given get their own copy: the session's MiniLM deep-copied, the tiny
T5s loaded fresh.
"""

import dataclasses
import re

import pytest
import torch
from helpers import (
    VOCAB,
    assert_restores,
    encode_pairs,
    grads_set,
    own_copy,
    randomize,
    t5_batch,
    t5_text,
    t5_tiny,
    train_steps,
    trainable_names,
)

from readlib import backbones, methods
from readlib.errors import ConfigError
from readlib.methods import read

BASELINES = ["bitfit", "lora", "prompt"]


# MiniLM-L6: 6 layers, d = 384, FFN 1536. Tiny T5: 2 + 2 layers, d = 64, inner (heads * d_kv) = 64, FFN 128.
D, FFN, LAYERS = 384, 1536, 6


T5_D, T5_INNER, T5_FFN, T5_LAYERS = 64, 64, 128, 2


def head(num_labels, d=D):
    return d * num_labels + num_labels


def bitfit_minilm(num_labels):
    # per layer: q, k, v, attention output 4*384 + attention LayerNorm 384 + intermediate 1536 + output 384
    # + output LayerNorm 384; plus the embeddings' LayerNorm 384
    per_layer = 4 * D + D + FFN + D + D
    return LAYERS * per_layer + D + head(num_labels)


def bitfit_t5_tiny():
    attention = 3 * T5_INNER + T5_D  # q, k, v biases [inner] and o [d]
    ffn = T5_FFN + T5_D  # wi [d_ff], wo [d]
    encoder_block = attention + T5_D + ffn + T5_D  # + layer norms of self-attention and FFN
    decoder_block = encoder_block + attention + T5_D  # + cross-attention and its layer norm
    return T5_LAYERS * encoder_block + T5_LAYERS * decoder_block


def lora_minilm(rank, num_labels):
    return LAYERS * 2 * rank * (D + D) + head(num_labels)  # q and v: A [r, 384] + B [384, r]


def lora_t5_tiny(rank):
    attentions = T5_LAYERS + T5_LAYERS + T5_LAYERS  # encoder self, decoder self, decoder cross
    return attentions * 2 * rank * (T5_D + T5_INNER)


def intended(name, param_names, seq2seq):
    """Names of the parameters the method should train, by a rule written independently of the method."""
    if name == "bitfit":
        own = {n for n in param_names if n.endswith(".bias") and not n.startswith("head.")}
        if seq2seq:  # the added biases, nothing else
            assert all(n.rsplit(".", 2)[-2] in {"q", "k", "v", "o", "wi", "wo", "layer_norm"} for n in own)
    elif name == "lora":  # A and B next to the query and value projections only
        own = {n for n in param_names if ".lora_A." in n or ".lora_B." in n}
        assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in own} == ({"q", "v"} if seq2seq else {"query", "value"})
    else:
        own = {"t5.prompt_encoder.default.embedding.weight"} if seq2seq else {"prompts"}
    return own | {n for n in param_names if n.startswith("head.")}


# ---------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("num_labels", [1, 2, 3])
@pytest.mark.parametrize("name", BASELINES)
def test_encoder_forward_shape_and_backward(minilm, name, num_labels):
    model = methods.build(name, own_copy(minilm), num_labels).train()
    logits = model(**encode_pairs(minilm))
    assert logits.shape == (3, num_labels) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert grads_set(model)


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_text_to_text_forward_shape_and_backward(name):
    model = methods.build(name, t5_text(), 2).train()
    inputs, _ = t5_batch()
    logits = model(**inputs)
    assert logits.shape == (3, 4, VOCAB) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert grads_set(model)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("path", ["encoder", "seq2seq"])
def test_baseline_gradients_reach_exactly_the_intended_parameters(minilm, name, path):
    if path == "encoder":
        model = methods.build(name, own_copy(minilm), 2).train()
        model(**encode_pairs(minilm)).sum().backward()
    else:
        model = methods.build(name, t5_text(), 2).train()
        model(**t5_batch()[0]).logsumexp(-1).sum().backward()
    names = [n for n, _ in model.named_parameters()]
    expected = intended(name, names, path == "seq2seq")
    assert expected and len(expected) < len(names)
    assert trainable_names(model) == expected
    assert grads_set(model) == expected  # and no frozen parameter has a gradient
    assert not any(p.requires_grad for p in minilm.model.parameters())  # the shared backbone is untouched


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name, args, num_labels, expected", [
    ("bitfit", {}, 2, bitfit_minilm(2)),
    ("bitfit", {}, 1, bitfit_minilm(1)),
    ("lora", {}, 2, lora_minilm(32, 2)),
    ("lora", {"rank": 8}, 3, lora_minilm(8, 3)),
    ("prompt", {}, 2, 20 * D + head(2)),
    ("prompt", {"n_prompts": 10}, 1, 10 * D + head(1)),
])
def test_minilm_trainable_count_formula(minilm, name, args, num_labels, expected):
    frozen = sum(p.numel() for p in minilm.model.parameters())
    model = methods.build(name, own_copy(minilm), num_labels, args)
    added = 0 if name == "bitfit" else expected - head(num_labels)  # BitFit trains biases MiniLM already has
    assert methods.count_parameters(model) == (expected, frozen + added + head(num_labels))


def test_minilm_formulas_by_number():
    assert bitfit_minilm(2) == 25_728 + 770
    assert lora_minilm(32, 2) == 294_912 + 770
    assert lora_t5_tiny(32) == 49_152 and bitfit_t5_tiny() == 2_944


@pytest.mark.parametrize("name, args, expected", [
    ("bitfit", {}, bitfit_t5_tiny()),
    ("lora", {}, lora_t5_tiny(32)),
    ("lora", {"rank": 4}, lora_t5_tiny(4)),
    ("prompt", {}, 20 * T5_D),
    ("prompt", {"n_prompts": 3}, 3 * T5_D),
])
def test_t5_trainable_count_formula(name, args, expected):
    bb = t5_text()
    frozen = sum(p.numel() for p in bb.model.parameters())
    model = methods.build(name, bb, 2, args)
    assert methods.count_parameters(model) == (expected, frozen + expected)  # every trained parameter is new


# ---------------------------------------------------------------- the start point


@pytest.mark.parametrize("name", BASELINES)
def test_encoder_start_point(minilm, name):
    # LoRA (B = 0) starts at the frozen model; BitFit trains MiniLM's own biases, so it does too. Prompt tuning
    # does not: the prompts are attended to from the first step.
    model = methods.build(name, own_copy(minilm), 3).eval()
    batch = encode_pairs(minilm)
    with torch.no_grad():
        frozen = model.head(minilm.last_hidden_state(**batch), batch["attention_mask"])
        logits = model(**batch)
    if name == "prompt":
        assert (logits - frozen).abs().max() > 1e-3
    else:
        torch.testing.assert_close(logits, frozen, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_text_to_text_start_point(name):
    # the added zero biases (BitFit) and B = 0 (LoRA) leave T5's logits as they were
    bb = t5_text()
    inputs, _ = t5_batch()
    with torch.no_grad():
        frozen = bb.model(**inputs).logits
        logits = methods.build(name, bb, 2).eval()(**inputs)
    if name == "prompt":
        assert (logits - frozen).abs().max() > 1e-3
    else:  # BitFit's zero biases make T5's matmuls addmm, which may round differently: relative to the logits (~5)
        torch.testing.assert_close(logits, frozen, rtol=1e-5, atol=1e-5 * frozen.abs().max().item())


# ---------------------------------------------------------------- save and load


def build_for(name, path, minilm, seed):
    torch.manual_seed(seed)
    if path == "encoder":
        return methods.build(name, own_copy(minilm), 2).eval(), encode_pairs(minilm)
    return methods.build(name, t5_text(), 2).eval(), t5_batch()[0]


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("path", ["encoder", "seq2seq"])
def test_baseline_trainable_state_round_trip(minilm, tmp_path, name, path):
    trained, batch = build_for(name, path, minilm, seed=0)
    params = [p for p in trained.parameters() if p.requires_grad]
    randomize(torch.nn.ParameterList(params), seed=1)  # stands in for training
    state = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    torch.save(state, tmp_path / f"{name}.pt")

    restored, _ = build_for(name, path, minilm, seed=2)
    assert_restores(restored, trained, tmp_path / f"{name}.pt", state, batch)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("name", BASELINES)
def test_short_training_lowers_the_loss_encoder(minilm, name):
    torch.manual_seed(0)
    model = methods.build(name, own_copy(minilm), 2, {"dropout": 0.0})
    labels = torch.tensor([0, 1, 1])
    first, last = train_steps(model, encode_pairs(minilm), labels, torch.nn.functional.cross_entropy, lr=1e-2)
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_short_training_lowers_the_loss_text_to_text(name):
    torch.manual_seed(0)
    model = methods.build(name, t5_text(), 2)
    inputs, labels = t5_batch()

    def token_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    # random targets on a random T5: from ~ln(32128) = 10.4 nats; 20 prompts x 64 dims move it the least
    first, last = train_steps(model, inputs, labels, token_loss, lr=3e-2)
    assert last < first - 0.3, (first, last)


# ---------------------------------------------------------------- configs and the registry


def test_baseline_registry_and_defaults():
    assert set(BASELINES) <= set(methods.METHODS)
    assert methods.make_config("lora") == methods.METHODS["lora"].config(rank=32, alpha=0.0, lora_dropout=0.0)
    assert methods.make_config("prompt").n_prompts == 20  # READ Table 7 final choices
    assert [methods.METHODS[n].default_lr for n in BASELINES] == [1e-3, 5e-4, 3e-3]
    cfg = methods.make_config("lora", {"rank": "8", "alpha": "16"})
    assert (cfg.rank, cfg.alpha) == (8, 16.0) and type(cfg.rank) is int


BASELINE_BAD_CONFIGS = [
    ("lora", {"rank": "0"}, "lora.rank ", "got 0"),
    ("lora", {"rank": "-3"}, "lora.rank ", "got -3"),
    ("lora", {"alpha": "-1"}, "lora.alpha ", "got -1.0"),
    ("lora", {"lora_dropout": "1"}, "lora.lora_dropout ", "got 1.0"),
    ("prompt", {"n_prompts": "0"}, "prompt.n_prompts ", "got 0"),
    ("prompt", {"dropout": "1.5"}, "prompt.dropout ", "got 1.5"),
    ("bitfit", {"dropout": "-0.1"}, "bitfit.dropout ", "got -0.1"),
]


@pytest.mark.parametrize("name, args, prefix, needle", BASELINE_BAD_CONFIGS,
                         ids=[f"{n}-{next(iter(a))}={next(iter(a.values()))}" for n, a, _, _ in BASELINE_BAD_CONFIGS])
def test_baseline_configs_reject_bad_values(name, args, prefix, needle):
    with pytest.raises(ConfigError) as e:
        methods.make_config(name, args)
    msg = str(e.value)
    assert msg.startswith(prefix) and needle in msg and "\n" not in msg


TEXTS = [
    "The cat sat on the mat.",
    "A considerably longer sentence, so that the other two in this batch need padding.",
    "Short one.",
]


GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # weight blocks per cell: tanh RNN 1, GRU r/z/n, LSTM i/f/g/o


def encode(backbone, texts=TEXTS):
    enc = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


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
    with pytest.raises(ConfigError, match="method 'bitfit' does not train causal-lm"):
        methods.build("bitfit", backbones.load("random-opt-tiny", meta=True), 2)


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


def test_make_config_unknown_key():
    with pytest.raises(ConfigError) as e:
        methods.make_config("read", {"rank": "8"})
    assert str(e.value) == ("unknown hyperparameter 'rank' for method 'read'; "
                            "allowed: rnn, hidden, dropout, drop_layers, joiner, state_norm, output_bias, "
                            "output_scale, combine")
    with pytest.raises(ConfigError, match="'rnn' for method 'full'; allowed: dropout"):
        methods.make_config("full", {"rnn": "gru"})


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


def test_count_parameters_counts_shared_tensors_once():
    layer = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(layer, layer, torch.nn.Linear(4, 2).requires_grad_(False))
    assert methods.count_parameters(model) == (20, 30)


def test_read_trainable_state_round_trip(minilm, tmp_path):
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
