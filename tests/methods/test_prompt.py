"""Prompt tuning (readlib.methods.prompt): what the encoder and T5 see. The shared matrix is in test_methods.py."""

import torch
from helpers import encode_pairs, own_copy, t5_batch, t5_text

from readlib import methods

# MiniLM-L6: 6 layers, d = 384, FFN 1536. Tiny T5: 2 + 2 layers, d = 64, inner (heads * d_kv) = 64, FFN 128.
D, FFN, LAYERS = 384, 1536, 6


T5_D, T5_INNER, T5_FFN, T5_LAYERS = 64, 64, 128, 2


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
    batch = encode_pairs(minilm)
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
