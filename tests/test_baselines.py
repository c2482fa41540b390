"""The READ paper's PETL baselines (Section 3.1, Table 1): BitFit, LoRA, prompt tuning — a matrix over methods.

Each of them changes (or wraps) the backbone it is given, so every model here is built on its own copy: the
session's MiniLM deep-copied, the tiny T5s loaded fresh.
"""


import pytest
import torch
from helpers import assert_restores, own_copy, randomize, t5_batch, train_steps

from readlib import backbones, methods
from readlib.errors import ConfigError
from readlib.params import make_params
from readlib.train import fit

BASELINES = ["bitfit", "lora", "prompt"]
TEXTS = ["The cat sat on the mat.", "A considerably longer sentence, so that the others need padding.", "Short."]
PAIRS = ["It sat.", "The sentence is long.", "Yes."]
VOCAB = backbones.T5_VOCAB

# MiniLM-L6: 6 layers, d = 384, FFN 1536. Tiny T5: 2 + 2 layers, d = 64, inner (heads * d_kv) = 64, FFN 128.
D, FFN, LAYERS = 384, 1536, 6
T5_D, T5_INNER, T5_FFN, T5_LAYERS = 64, 64, 128, 2



def t5_text():
    return backbones.load("random-t5-tiny")


def encode(backbone):
    enc = backbone.tokenizer(TEXTS, PAIRS, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}



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


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def grads_set(model):
    return {n for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("num_labels", [1, 2, 3])
@pytest.mark.parametrize("name", BASELINES)
def test_encoder_forward_shape_and_backward(minilm, name, num_labels):
    model = methods.build(name, own_copy(minilm), num_labels).train()
    logits = model(**encode(minilm))
    assert logits.shape == (3, num_labels) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert grads_set(model)


@pytest.mark.parametrize("name", BASELINES)
def test_text_to_text_forward_shape_and_backward(name):
    model = methods.build(name, t5_text(), 2).train()
    inputs, _ = t5_batch()
    logits = model(**inputs)
    assert logits.shape == (3, 4, VOCAB) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert grads_set(model)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("path", ["encoder", "seq2seq"])
def test_gradients_reach_exactly_the_intended_parameters(minilm, name, path):
    if path == "encoder":
        model = methods.build(name, own_copy(minilm), 2).train()
        model(**encode(minilm)).sum().backward()
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


def test_bitfit_on_the_t5_encoder_trains_encoder_biases_and_head():
    bb = backbones.load("random-t5-tiny", formulation="classification")
    encoder_block = 3 * T5_INNER + T5_D + T5_D + T5_FFN + T5_D + T5_D
    assert methods.count_parameters(methods.build("bitfit", bb, 3))[0] == T5_LAYERS * encoder_block + head(3, T5_D)


# ---------------------------------------------------------------- the start point


@pytest.mark.parametrize("name", BASELINES)
def test_encoder_start_point(minilm, name):
    # LoRA (B = 0) starts at the frozen model; BitFit trains MiniLM's own biases, so it does too. Prompt tuning
    # does not: the prompts are attended to from the first step.
    model = methods.build(name, own_copy(minilm), 3).eval()
    batch = encode(minilm)
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


# ---------------------------------------------------------------- prompt tuning's inputs


def captured_kwargs(module):
    """The keyword arguments of ``module``'s next call, filled in place."""
    seen = {}
    module.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    return seen


def rows_of(table, rows):
    return all((table == row).all(-1).any() for row in rows)


def test_prompt_encoder_path_prepends_prompts_and_pools_real_tokens(minilm):
    torch.manual_seed(0)
    model = methods.build("prompt", own_copy(minilm), 2, {"n_prompts": 5}).eval()
    batch = encode(minilm)
    into_bert, into_head = captured_kwargs(model.frozen), {}
    model.head.register_forward_pre_hook(lambda _, args: into_head.update(hidden=args[0], mask=args[1]))
    with torch.no_grad():
        model(**batch)
    table = minilm.model.get_input_embeddings().weight
    prompts = model.prompts.detach()
    assert prompts.shape == (5, D) and rows_of(table, prompts)  # sampled vocabulary embeddings
    ones, zeros = torch.ones(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)
    expected_embeds = torch.cat([prompts.expand(3, -1, -1), table[batch["input_ids"]]], 1)
    assert torch.equal(into_bert["inputs_embeds"], expected_embeds)
    assert torch.equal(into_bert["attention_mask"], torch.cat([ones, batch["attention_mask"]], 1))
    assert torch.equal(into_bert["token_type_ids"], torch.cat([zeros, batch["token_type_ids"]], 1))
    assert batch["token_type_ids"].any()  # sentence pairs: segment B is kept
    with torch.no_grad():  # the head sees the real tokens' states, prompts dropped
        states = minilm.model(**{k: into_bert[k] for k in ("inputs_embeds", "attention_mask", "token_type_ids")})
    torch.testing.assert_close(into_head["hidden"], states.last_hidden_state[:, 5:], rtol=0, atol=1e-6)
    assert torch.equal(into_head["mask"], batch["attention_mask"])


def test_prompt_t5_encoder_sees_prompts_then_tokens():
    torch.manual_seed(0)
    bb = t5_text()
    model = methods.build("prompt", bb, 2, {"n_prompts": 4}).eval()
    inputs, _ = t5_batch()
    into_encoder = captured_kwargs(bb.model.encoder)
    with torch.no_grad():
        model(**inputs)
    prompts = model.t5.prompt_encoder.default.embedding.weight.detach()
    table = bb.model.shared.weight
    assert prompts.shape == (4, T5_D) and rows_of(table, prompts)
    expected_embeds = torch.cat([prompts.expand(3, -1, -1), table[inputs["input_ids"]]], 1)
    assert torch.equal(into_encoder["inputs_embeds"], expected_embeds)
    ones = torch.ones(3, 4, dtype=torch.long)
    assert torch.equal(into_encoder["attention_mask"].long(), torch.cat([ones, inputs["attention_mask"]], 1))


# ---------------------------------------------------------------- save and load


def build_for(name, path, minilm, seed):
    torch.manual_seed(seed)
    if path == "encoder":
        return methods.build(name, own_copy(minilm), 2).eval(), encode(minilm)
    return methods.build(name, t5_text(), 2).eval(), t5_batch()[0]


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("path", ["encoder", "seq2seq"])
def test_trainable_state_round_trip(minilm, tmp_path, name, path):
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
    first, last = train_steps(model, encode(minilm), labels, torch.nn.functional.cross_entropy, lr=1e-2)
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("name", BASELINES)
def test_short_training_lowers_the_loss_text_to_text(name):
    torch.manual_seed(0)
    model = methods.build(name, t5_text(), 2)
    inputs, labels = t5_batch()

    def token_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    # random targets on a random T5: from ~ln(32128) = 10.4 nats; 20 prompts x 64 dims move it the least
    first, last = train_steps(model, inputs, labels, token_loss, lr=3e-2)
    assert last < first - 0.3, (first, last)


# ---------------------------------------------------------------- configs and the registry


def test_registry_and_defaults():
    assert set(BASELINES) <= set(methods.METHODS)
    assert methods.make_config("lora") == methods.METHODS["lora"].config(rank=32, alpha=0.0, lora_dropout=0.0)
    assert methods.make_config("prompt").n_prompts == 20  # READ Table 7 final choices
    assert [methods.METHODS[n].default_lr for n in BASELINES] == [1e-3, 5e-4, 3e-3]
    cfg = methods.make_config("lora", {"rank": "8", "alpha": "16"})
    assert (cfg.rank, cfg.alpha) == (8, 16.0) and type(cfg.rank) is int


def test_lora_alpha_sets_the_scale():
    bb = t5_text()
    methods.build("lora", bb, 2, {"rank": 4, "alpha": 8})
    assert bb.model.encoder.block[0].layer[0].SelfAttention.q.scaling == {"default": 2.0}
    bb = t5_text()
    methods.build("lora", bb, 2, {"rank": 4})
    assert bb.model.encoder.block[0].layer[0].SelfAttention.q.scaling == {"default": 1.0}  # alpha = rank


BAD_CONFIGS = [
    ("lora", {"rank": "0"}, "lora.rank ", "got 0"),
    ("lora", {"rank": "-3"}, "lora.rank ", "got -3"),
    ("lora", {"alpha": "-1"}, "lora.alpha ", "got -1.0"),
    ("lora", {"lora_dropout": "1"}, "lora.lora_dropout ", "got 1.0"),
    ("prompt", {"n_prompts": "0"}, "prompt.n_prompts ", "got 0"),
    ("prompt", {"dropout": "1.5"}, "prompt.dropout ", "got 1.5"),
    ("bitfit", {"dropout": "-0.1"}, "bitfit.dropout ", "got -0.1"),
]


@pytest.mark.parametrize("name, args, prefix, needle", BAD_CONFIGS,
                         ids=[f"{n}-{next(iter(a))}={next(iter(a.values()))}" for n, a, _, _ in BAD_CONFIGS])
def test_make_config_rejects_bad_values(name, args, prefix, needle):
    with pytest.raises(ConfigError) as e:
        methods.make_config(name, args)
    msg = str(e.value)
    assert msg.startswith(prefix) and needle in msg and "\n" not in msg


def test_fit_lora_on_minilm():
    params = make_params("quick", task="rte", method="lora", backbone="minilm", max_train=32, max_eval=16,
                         max_epochs=1, batch_size=16, micro_batch_size=16, max_length=32)
    record = fit(params, progress=False)
    assert (record["method"], record["status"]) == ("lora", "ok")
    assert record["trainable_params"] == lora_minilm(32, 2)
    assert record["method_args"] == {"rank": 32, "alpha": 0.0, "lora_dropout": 0.0, "dropout": 0.1}
    assert record["lr"] == 5e-4
