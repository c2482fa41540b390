"""Selective fine-tuning (TokenTune, Section 2): selection, forward values, gradients, memory, the method.

The reference for every gradient is the model's own transformers forward with the selection imposed by hooks:
at each layer input h = sel·h + (1 - sel)·h.detach(), and the key/value projections' outputs mixed the same
way, so that the unselected positions' keys and values are constants (eq. 4 stores only h_G: W_k and W_v get
no gradient through h_Ḡ). Mixing at the layer inputs alone is *not* the same gradient (tested below).
"""

import pytest
import torch
from helpers import TEXTS, encode, own_copy, randomize
from scipy.stats import chisquare
from torch.nn import functional as F

from readlib import backbones, methods
from readlib.costs import SavedTensorMeter
from readlib.errors import ConfigError
from readlib.methods import selective
from readlib.methods.selective import SelectiveCausalLM, select_positions, selective_forward
from readlib.params import make_params
from readlib.train import fit

D, H, LAYERS = 384, 12, 6  # MiniLM-L6


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # T5's attention keeps a float
            module.dropout = 0.0
    return model


def t5_encoder():
    """The tiny random T5 encoder (2 layers, d_model 64) and a padded batch for it."""
    bb = backbones.load("random-t5-tiny", formulation="classification")
    enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return bb, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def rows(hidden, idx):
    return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def sel_mask(idx, valid, n):
    """[b, n, 1]: 1.0 at the selected (valid) positions."""
    return torch.zeros(idx.shape[0], n).scatter(1, idx, valid.float()).unsqueeze(-1)


def mix_hooks(layers, kv_modules, sel):
    """The reference: gradient only through the selected rows of every layer input and key/value output."""

    def mix(x):
        return sel * x + (1 - sel) * x.detach()

    handles = [layer.register_forward_pre_hook(lambda _, args: (mix(args[0]), *args[1:])) for layer in layers]
    return handles + [m.register_forward_hook(lambda _, args, out: mix(out)) for m in kv_modules]


def bert_parts(model):
    layers = list(model.encoder.layer)
    return layers, [m for layer in layers for m in (layer.attention.self.key, layer.attention.self.value)]


def t5_parts(model):
    blocks = list(model.encoder.block)
    return blocks, [m for block in blocks for m in (block.layer[0].SelfAttention.k, block.layer[0].SelfAttention.v)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ours, ref, atol=1e-5):
    assert ours.keys() == ref.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------- tiny random decoder-only LMs


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1))


def opt(pre_norm=True):
    from transformers import OPTConfig, OPTForCausalLM

    # post-norm with a projected word embedding is OPT-350m's layout; pre-norm that of the others
    extra = {} if pre_norm else {"do_layer_norm_before": False, "word_embed_proj_dim": 16}
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                    vocab_size=97, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                                    pad_token_id=0, bos_token_id=2, eos_token_id=2, **extra))


def opt_lora():
    from peft import LoraConfig, inject_adapter_in_model

    model = opt()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), model)
    randomize(torch.nn.ParameterList([p for n, p in model.named_parameters() if "lora_B" in n]), seed=3)
    return model


def eager(model):
    model.set_attn_implementation("eager")
    return model


DECODERS = {"gpt2": gpt2, "gpt2-eager": lambda: eager(gpt2()), "opt": opt, "opt-post-norm": lambda: opt(pre_norm=False),
            "opt-eager": lambda: eager(opt()), "opt+lora": opt_lora}


def decoder_parts(model):
    if model.config.model_type == "gpt2":
        layers = list(model.transformer.h)
        return layers, [b.attn.c_attn for b in layers]  # q, k, v in one projection
    layers = list(model.model.decoder.layers)
    return layers, [m for layer in layers for m in (layer.self_attn.k_proj, layer.self_attn.v_proj)]


def lm_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# ---------------------------------------------------------------- which positions


MASK = torch.tensor([[1] * 10 + [0] * 2, [1] * 4 + [0] * 8, [0] * 3 + [1] * 9, [1] * 12])


@pytest.mark.parametrize("k", [1, 3, 8, 11, 50])
def test_selection_first_in_no_padding_exact_count(k):
    idx, valid = select_positions(MASK, k, torch.Generator().manual_seed(0))
    real = MASK.sum(1)
    count = torch.minimum(torch.full_like(real, k), real - 1) + 1
    assert idx.shape == valid.shape == (4, int(count.max()))
    assert torch.equal(valid.sum(1), count)
    assert (idx.diff(dim=1) > 0).all()  # distinct, increasing
    assert MASK.gather(1, idx)[valid].all() and not MASK.gather(1, idx)[~valid].any()  # fillers are padding
    first = MASK.argmax(1)  # [CLS] / BOS, also under left padding
    assert all(first[b] in idx[b][valid[b]] for b in range(4))


def test_selection_is_uniform_over_the_other_real_tokens():
    mask = MASK[:1].expand(6000, -1)  # 10 real tokens: position 0 always, 3 of positions 1..9
    idx, valid = select_positions(mask, 3, torch.Generator().manual_seed(1))
    assert valid.all() and (idx[:, 0] == 0).all()
    counts = torch.bincount(idx[:, 1:].flatten(), minlength=12)
    assert counts[10:].sum() == 0 and counts[1:10].sum() == 6000 * 3
    assert chisquare(counts[1:10].numpy()).pvalue > 1e-3  # expected 2000 each
    subsets = torch.bincount((2 ** idx[:, 1:]).sum(1))  # each drawn set as a bit mask
    subsets = subsets[subsets > 0]
    assert len(subsets) == 84 and chisquare(subsets.numpy()).pvalue > 1e-3  # all C(9, 3) sets, equally likely


def test_selection_is_reproducible():
    a = select_positions(MASK, 4, torch.Generator().manual_seed(5))
    b = select_positions(MASK, 4, torch.Generator().manual_seed(5))
    c = select_positions(MASK, 4, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(a[0], c[0])
    torch.manual_seed(7)
    d = select_positions(MASK, 4)
    torch.manual_seed(7)
    assert torch.equal(d[0], select_positions(MASK, 4)[0])  # the global RNG, as train.fit seeds it


# ---------------------------------------------------------------- forward values equal the model's own


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [2, 100])  # 100: every position selected
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bert_forward_values_equal_the_models_own(minilm, attn, k, mode):
    model = no_dropout(own_copy(minilm).model).requires_grad_(True).train(mode == "train")
    model.set_attn_implementation(attn)
    batch = encode(minilm)
    mask = batch["attention_mask"]
    idx, valid = select_positions(mask, k, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    hidden, hidden_sel = selective_forward(model, batch["input_ids"], mask, idx, batch["token_type_ids"])
    real = mask.bool()
    scale = expected[real].abs().max().item()  # another op order rounds in proportion to the states (up to ~6)
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(hidden_sel[valid], rows(expected, idx)[valid], rtol=1e-5, atol=1e-5 * scale)
    assert hidden_sel.requires_grad and not hidden.requires_grad
    if k == 100:
        assert torch.equal(valid, real)  # every real token selected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_t5_encoder_forward_values_equal_the_models_own(attn):
    # T5 has no positions in its states: the selected queries get the relative-position bias of their positions
    bb, batch = t5_encoder()
    model = no_dropout(bb.model).requires_grad_(True).train()
    model.set_attn_implementation(attn)
    idx, valid = select_positions(batch["attention_mask"], 3, torch.Generator().manual_seed(0))
    assert (idx[0, 1:] > 1).any()  # positions away from the start: a wrong bias would show
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    hidden, hidden_sel = selective_forward(model, batch["input_ids"], batch["attention_mask"], idx)
    real = batch["attention_mask"].bool()
    scale = expected[real].abs().max().item()  # another op order rounds in proportion to the states (up to ~6)
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(hidden_sel[valid], rows(expected, idx)[valid], rtol=1e-5, atol=1e-5 * scale)


def test_bert_forward_with_lora_applies_the_injected_modules(minilm):
    model = methods.build("selective", own_copy(minilm), 2, {"lora_rank": 4})
    randomize(torch.nn.ParameterList([p for n, p in model.named_parameters() if "lora_B" in n]), seed=2)
    batch = encode(minilm)
    idx, valid = select_positions(batch["attention_mask"], 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.encoder(**batch).last_hidden_state
        frozen = minilm.model(**batch).last_hidden_state
    _, hidden_sel = selective_forward(model.encoder, batch["input_ids"], batch["attention_mask"], idx,
                                      batch["token_type_ids"])
    scale = expected.abs().max().item()  # another op order rounds in proportion to the states (up to ~6)
    torch.testing.assert_close(hidden_sel[valid], rows(expected, idx)[valid], rtol=1e-5, atol=1e-5 * scale)
    assert (rows(frozen, idx) - rows(expected, idx)).abs().max() > 1e-2  # LoRA did change the states


def test_classifier_pools_selected_positions_in_training_and_all_in_eval(minilm):
    torch.manual_seed(0)
    model = no_dropout(methods.build("selective", own_copy(minilm), 3, {"k": 2, "dropout": 0.0}))
    batch = encode(minilm)
    mask = batch["attention_mask"]
    with torch.no_grad():
        hidden = model.encoder(**batch).last_hidden_state
        selection = select_positions(mask, 2, torch.Generator().manual_seed(0))
        idx, valid = selection
        pooled = (rows(hidden, idx) * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)  # eq. 1
        pooled_all = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        expected = pooled @ model.head.out.weight.T + model.head.out.bias
        expected_all = pooled_all @ model.head.out.weight.T + model.head.out.bias
        eval_logits = model.eval()(**batch)
    train_logits = model.train()(**batch, selection=selection)
    torch.testing.assert_close(train_logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(eval_logits, expected_all, rtol=0, atol=1e-5)
    assert (train_logits - eval_logits).abs().max() > 1e-3


# k = 7: the left-padded row (7 real tokens) gets a padding filler, a query that sees no key at all
@pytest.mark.parametrize("k", [4, 7])
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_loss_equals_the_models_own_logits_at_selected_positions(name, k):
    model = DECODERS[name]().train()
    ids, mask, labels = lm_batch()
    selection = select_positions(mask, k, torch.Generator().manual_seed(0))
    idx, valid = selection
    assert bool(valid.all()) is (k == 4)
    loss = SelectiveCausalLM(model, k)(ids, mask, labels, selection=selection)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden, hidden_sel = selective_forward(model, ids, mask, idx)
    # targets written out: position p predicts labels[p + 1]; the last position predicts nothing
    picked, targets = [], []
    for b in range(3):
        for j in range(idx.shape[1]):
            p = int(idx[b, j])
            if valid[b, j] and p + 1 < ids.shape[1] and labels[b, p + 1] != -100:
                picked.append(logits[b, p])
                targets.append(labels[b, p + 1])
    assert len(targets) >= 10
    torch.testing.assert_close(loss, F.cross_entropy(torch.stack(picked), torch.stack(targets)), rtol=0, atol=1e-5)
    head = model.get_output_embeddings()
    real = mask.bool()
    torch.testing.assert_close(head(hidden)[real], logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(head(hidden_sel)[valid], rows(logits, idx)[valid], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- gradients


def test_all_positions_selected_gives_full_fine_tuning_gradients(minilm):
    batch, labels = encode(minilm), torch.tensor([0, 2, 1])
    results = []
    for name in ("full", "selective"):
        torch.manual_seed(0)  # the same head
        model = no_dropout(methods.build(name, own_copy(minilm), 3, {"dropout": 0.0})).train()
        selection = {"selection": select_positions(batch["attention_mask"], 100)} if name == "selective" else {}
        F.cross_entropy(model(**batch, **selection), labels).backward()
        results.append(grads(model))
    assert len(results[0]) == sum(1 for _ in minilm.model.parameters()) + 2
    assert_same_grads(*results)


@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("backbone", ["minilm", "t5-encoder"])
def test_encoder_gradients_equal_the_hooked_reference(minilm, backbone, lora_rank):
    bb, batch = (own_copy(minilm), encode(minilm)) if backbone == "minilm" else t5_encoder()
    torch.manual_seed(0)
    model = no_dropout(methods.build("selective", bb, 3, {"lora_rank": lora_rank, "dropout": 0.0}))
    if lora_rank:
        randomize(torch.nn.ParameterList([p for n, p in model.named_parameters() if "lora_B" in n]), seed=2)
    model.train()
    labels = torch.tensor([0, 2, 1])
    idx, valid = select_positions(batch["attention_mask"], 3, torch.Generator().manual_seed(0))
    F.cross_entropy(model(**batch, selection=(idx, valid)), labels).backward()
    ours = grads(model)
    model.zero_grad()
    parts = bert_parts if backbone == "minilm" else t5_parts
    handles = mix_hooks(*parts(model.encoder), sel_mask(idx, valid, batch["input_ids"].shape[1]))
    hidden = model.encoder(**batch).last_hidden_state
    F.cross_entropy(model.head(rows(hidden, idx), valid), labels).backward()
    for h in handles:
        h.remove()
    assert_same_grads(ours, grads(model))


def test_mixing_only_the_layer_inputs_is_a_different_gradient(minilm):
    # without constant keys/values at Ḡ, W_k and W_v also learn from the unselected positions' inputs
    torch.manual_seed(0)
    model = no_dropout(methods.build("selective", own_copy(minilm), 3, {"dropout": 0.0})).train()
    batch, labels = encode(minilm), torch.tensor([0, 2, 1])
    idx, valid = select_positions(batch["attention_mask"], 3, torch.Generator().manual_seed(0))
    F.cross_entropy(model(**batch, selection=(idx, valid)), labels).backward()
    ours = grads(model)
    model.zero_grad()
    layers, _ = bert_parts(model.encoder)
    handles = mix_hooks(layers, [], sel_mask(idx, valid, batch["input_ids"].shape[1]))
    F.cross_entropy(model.head(rows(model.encoder(**batch).last_hidden_state, idx), valid), labels).backward()
    for h in handles:
        h.remove()
    naive = grads(model)
    key = "encoder.encoder.layer.0.attention.self.key.weight"
    query = "encoder.encoder.layer.0.attention.self.query.weight"
    assert (ours[key] - naive[key]).abs().max() > 1e-3 * naive[key].abs().max()
    torch.testing.assert_close(ours[query], naive[query], rtol=0, atol=1e-5)  # queries only ever see G


@pytest.mark.parametrize("k", [4, 7])
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_gradients_equal_the_hooked_reference(name, k):
    model = DECODERS[name]().train()
    ids, mask, labels = lm_batch()
    idx, valid = select_positions(mask, k, torch.Generator().manual_seed(0))
    SelectiveCausalLM(model, k)(ids, mask, labels, selection=(idx, valid)).backward()
    ours = grads(model)
    model.zero_grad()
    handles = mix_hooks(*decoder_parts(model), sel_mask(idx, valid, ids.shape[1]))
    logits = model(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    n = ids.shape[1]
    target = labels.gather(1, (idx + 1).clamp(max=n - 1))
    keep = valid & (idx + 1 < n) & (target != -100)
    F.cross_entropy(rows(logits, idx)[keep], target[keep]).backward()
    assert_same_grads(ours, grads(model))
    if name == "opt+lora":
        assert set(ours) == {n for n, _ in model.named_parameters() if "lora_" in n}


def test_selective_causal_lm_draws_with_its_generator():
    model = gpt2().train()
    ids, mask, labels = lm_batch()
    losses = [SelectiveCausalLM(model, 2, torch.Generator().manual_seed(s))(ids, mask, labels) for s in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]


# ---------------------------------------------------------------- memory (autograd's saved tensors)


def saved_bytes(model, ids, mask, **kwargs):
    with SavedTensorMeter(model) as meter:
        model(input_ids=ids, attention_mask=mask, **kwargs)
    return meter.bytes


def random_batch(b, n):
    return torch.randint(1000, 20000, (b, n), generator=torch.Generator().manual_seed(0)), torch.ones(b, n).long()


def test_selective_saves_a_fraction_and_naive_detach_saves_nothing(minilm):
    ids, mask = random_batch(8, 128)  # dropout on, the backbone's own attention (SDPA): a real training step
    full_model = methods.build("full", own_copy(minilm), 2).train()
    full = saved_bytes(full_model, ids, mask)
    torch.manual_seed(0)
    ours = saved_bytes(methods.build("selective", own_copy(minilm), 2, {"k": 16}).train(), ids, mask)
    assert ours <= 0.25 * full, ours / full
    # the naive version: the model's own forward, unselected positions detached at every layer input
    idx, valid = select_positions(mask, 16, torch.Generator().manual_seed(0))
    handles = mix_hooks(bert_parts(full_model.encoder)[0], [], sel_mask(idx, valid, 128))
    naive = saved_bytes(full_model, ids, mask)
    for h in handles:
        h.remove()
    assert abs(naive / full - 1) < 0.02, naive / full


def test_saved_bytes_grow_with_k_and_by_formula_with_n(minilm):
    model = no_dropout(methods.build("selective", own_copy(minilm), 2, {"dropout": 0.0})).train()
    model.encoder.set_attn_implementation("eager")  # the |G| x n scores in the open
    ids, mask = random_batch(2, 64)
    by_k = [saved_bytes(model, ids, mask, selection=select_positions(mask, k)) for k in (8, 16, 32)]
    assert by_k[0] < by_k[1] < by_k[2]
    # At fixed k (m = k + 1 selected), what still grows with n, per layer and sequence, fp32:
    # K* and V* of all n positions (2·d per position) and the attention probabilities softmax keeps for backward
    # (H·m per position). Everything else (projections, FFN, layer norms, head) is per selected position.
    b, k = 2, 8
    short, long = random_batch(b, 32), random_batch(b, 64)
    grown = saved_bytes(model, *long, selection=select_positions(long[1], k)) - saved_bytes(
        model, *short, selection=select_positions(short[1], k))
    formula = LAYERS * b * (64 - 32) * (2 * D + H * (k + 1)) * 4
    assert abs(grown / formula - 1) < 0.01, (grown, formula)
    full = no_dropout(methods.build("full", own_copy(minilm), 2, {"dropout": 0.0})).train()
    full.encoder.set_attn_implementation("eager")
    assert saved_bytes(full, *long) > 2 * saved_bytes(full, *short)  # full: linear in n plus n² scores


# ---------------------------------------------------------------- the method: parameters, training, save/load


def head(num_labels):
    return D * num_labels + num_labels


@pytest.mark.parametrize("args, num_labels, expected_extra", [
    ({}, 2, 0),
    ({"lora_rank": 8}, 3, LAYERS * 2 * 8 * (D + D)),  # q and v: A [8, 384] + B [384, 8]
])
def test_trainable_parameters(minilm, args, num_labels, expected_extra):
    frozen = sum(p.numel() for p in minilm.model.parameters())
    model = methods.build("selective", own_copy(minilm), num_labels, args).train()
    trained = frozen + head(num_labels) if not args else expected_extra + head(num_labels)
    assert methods.count_parameters(model) == (trained, frozen + expected_extra + head(num_labels))
    batch = encode(minilm)
    model(**batch).sum().backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if args:
        assert names == {n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("head.")}
    assert set(grads(model)) == names
    assert not any(p.requires_grad for p in minilm.model.parameters())  # the session's backbone is untouched


def test_short_training_lowers_the_loss(minilm):
    torch.manual_seed(0)
    model = methods.build("selective", own_copy(minilm), 2, {"k": 4, "dropout": 0.0})
    batch, labels = encode(minilm), torch.tensor([0, 1, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with torch.no_grad():
        first = F.cross_entropy(model.eval()(**batch), labels).item()
    model.train()
    for _ in range(10):
        optimizer.zero_grad()
        F.cross_entropy(model(**batch), labels).backward()
        optimizer.step()
    with torch.no_grad():
        last = F.cross_entropy(model.eval()(**batch), labels).item()
    assert last < 0.5 * first, (first, last)


def test_trainable_state_round_trip(minilm, tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        return methods.build("selective", own_copy(minilm), 2, {"lora_rank": 4}).eval()

    trained, batch = build(0), encode(minilm)
    randomize(torch.nn.ParameterList([p for p in trained.parameters() if p.requires_grad]), seed=1)
    state = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    torch.save(state, tmp_path / "selective.pt")
    restored = build(2)
    with torch.no_grad():
        assert not torch.equal(restored(**batch), trained(**batch))
        result = restored.load_state_dict(torch.load(tmp_path / "selective.pt"), strict=False)
        assert result.unexpected_keys == [] and set(result.missing_keys) == set(restored.state_dict()) - set(state)
        assert torch.equal(restored(**batch), trained(**batch))


# ---------------------------------------------------------------- configs, backbones, the training loop


def test_defaults():
    assert methods.make_config("selective") == selective.Config(k=16, lora_rank=0, dropout=0.1)
    assert selective.DEFAULT_LR == 5e-5


@pytest.mark.parametrize("args, needle", [
    ({"k": "0"}, "selective.k must be >= 1, got 0"),
    ({"lora_rank": "-1"}, "selective.lora_rank must be >= 0"),
    ({"dropout": "1"}, "selective.dropout must be in [0, 1), got 1.0"),
])
def test_bad_configs(args, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(")", r"\)")) as e:
        methods.make_config("selective", args)
    assert "\n" not in str(e.value)


def test_t5_text_to_text_and_other_misuse_are_refused():
    with pytest.raises(ConfigError, match="does not train text-to-text"):
        methods.build("selective", backbones.load("random-t5-tiny"), 2)
    with pytest.raises(ConfigError, match="needs a decoder-only LM"):
        SelectiveCausalLM(backbones.load("random-t5-tiny", formulation="classification").model, 4)
    with pytest.raises(ConfigError, match="selective.k must be >= 1"):
        SelectiveCausalLM(gpt2(), 0)


def test_fit_selective_on_minilm():
    params = make_params("quick", task="rte", method="selective", max_train=16, max_eval=8, max_epochs=1,
                         batch_size=8, micro_batch_size=8, max_length=32)
    record = fit(params, progress=False)
    assert (record["method"], record["status"], record["lr"]) == ("selective", "ok", 5e-5)
    assert record["method_args"] == {"k": 16, "lora_rank": 0, "dropout": 0.1}
    assert record["trainable_params"] == record["total_params"]  # the paper's "100 %"
    assert record["test"] is not None and 0 <= record["test"]["score"] <= 1
