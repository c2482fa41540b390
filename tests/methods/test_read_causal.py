"""READ on decoder-only LMs (GPT-2, OPT, Llama, Qwen2): start point, Algorithm 1 by hand, gradient isolation,
stored bytes per layer, the cache, trainable parameters on real shapes."""

import pytest
import torch
from helpers import saved_tensors

from readlib import backbones, cache, data, methods
from readlib.costs import SavedTensorMeter
from readlib.data import Encoded

DECODERS = ["random-gpt2-tiny", "random-opt-tiny", "random-llama-tiny", "random-qwen2-tiny"]
F32 = 4


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two sequences, the second padded after 6 tokens; targets: 2 positions in row 0, 1 in row 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[0, 6:8] = True
    target[1, 5] = True
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target}


def build(name: str, args: dict | None = None, seed: int = 0):
    bb = backbones.load(name, seed=seed)
    return bb, methods.build("read", bb, 2, args)


@pytest.mark.parametrize("name", DECODERS)
def test_read_starts_at_the_frozen_lm(name):
    """W_o = 0: READ's logits are the frozen LM's own next-token logits at the target positions, bitwise."""
    bb, model = build(name)
    inputs = batch()
    with torch.no_grad():
        frozen = bb.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        logits = model(**inputs)
    assert logits.shape == (3, bb.model.config.vocab_size)
    torch.testing.assert_close(logits, frozen[inputs["target_mask"]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_forward_is_algorithm_1_by_hand(name):
    """h_i = GRU(φ_i, h_{i-1}), h_0 = 0, over the layers of each target position; logits = LMHead(φ_N + W_o h_N)."""
    bb, model = build(name, {"hidden": 8})
    torch.nn.init.normal_(model.side.up.weight, std=0.5)
    inputs = batch()
    with torch.no_grad():
        states = bb.model.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     output_hidden_states=True).hidden_states
        phi = [s[inputs["target_mask"]] for s in states[1:]]  # φ_1..φ_N, [3, d] each
        h = torch.zeros(3, 8)
        for phi_i in phi:
            h = model.side.cell(phi_i, h)
        expected = bb.model.get_output_embeddings()(phi[-1] + model.side.up(h))
        got = model(**inputs)
    assert not torch.allclose(got, bb.model.get_output_embeddings()(phi[-1]), atol=1e-3)  # the correction matters
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_row_does_not_depend_on_padding_or_its_batch():
    _, model = build("random-llama-tiny")
    torch.nn.init.normal_(model.side.up.weight, std=0.5)
    inputs = batch()
    alone = {k: v[1:, :6] for k, v in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[2:], model(**alone), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_gradients_reach_exactly_the_read_parameters(name):
    bb, model = build(name)
    torch.nn.init.normal_(model.side.up.weight, std=0.1)  # W_o = 0 would stop the gradient to N
    logits = model(**batch())
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3])).backward()
    side = {id(p) for p in model.side.parameters()}
    for p in model.parameters():
        if id(p) in side:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert not p.requires_grad and p.grad is None
    assert all(p.grad is None for p in bb.model.parameters())


@pytest.mark.parametrize("name", ["random-gpt2-tiny", "random-llama-tiny"])
def test_nothing_saved_is_inference_mode_or_backbone_memory_except_the_lm_head(name):
    bb, model = build(name)
    backbone_storages = {p.untyped_storage().data_ptr() for p in bb.model.parameters()}
    saved = saved_tensors(model, batch())
    assert len(saved) >= 4
    assert not any(inference for _, inference, _ in saved)
    # the frozen LM head's weight (transposed view) is the one backbone tensor autograd keeps, by reference:
    # ∂logits/∂φ'_N = W; its input φ'_N is not kept, since W gets no gradient
    head = bb.model.get_output_embeddings().weight
    shared = [(ptr, shape) for ptr, _, shape in saved if ptr in backbone_storages]
    assert shared == [(head.untyped_storage().data_ptr(), tuple(head.shape)[::-1])]


def read_causal_bytes(layers: int, targets: int, d: int, hidden: int) -> int:
    """What READ stores for backward on a decoder-only LM, by hand (float32):
    φ_1..φ_N of the target positions [N, t, d], the GRU states s_0..s_N [N + 1, t, d_h] and h_N (W_o's input)
    [t, d_h]. The frozen LM head keeps only its weight: its input would serve only W's gradient."""
    return (layers * targets * d + (layers + 1) * targets * hidden + targets * hidden) * F32


def saved_bytes(model, inputs) -> int:
    with SavedTensorMeter(model) as meter:
        model(**inputs)
    return meter.bytes


def test_bytes_grow_only_by_reads_own_rows_per_layer():
    """Same batch through a 2- and a 6-layer GPT-2 (d 64, READ hidden 16, 3 target positions): READ's bytes are its
    own rows, 4 more layers add 4 × 3 × (64 + 16) floats; full fine-tuning keeps every layer's activations of all
    18 tokens."""
    inputs = batch()
    read_b, full_b = {}, {}
    for layers in (2, 6):
        name = f"random-gpt2-tiny:n_layer={layers}"
        read_b[layers] = saved_bytes(build(name, {"hidden": 16})[1], inputs)
        assert read_b[layers] == read_causal_bytes(layers, 3, 64, 16)
        full_b[layers] = saved_bytes(methods.build("full", backbones.load(name), 2), inputs)
    assert read_b[2] == 2_304  # (2 × 3 × 64 + 3 × 3 × 16 + 3 × 16) × 4
    assert read_b[6] - read_b[2] == 4 * 3 * (64 + 16) * F32 == 3_840
    assert full_b[6] - full_b[2] > 50 * (read_b[6] - read_b[2])


@pytest.mark.parametrize("name, d, trainable, backbone_params", [
    # GRU/256 over d: W_ih 768 x d, W_hh 768 x 256, two biases of 768; W_o: d x 256. No task head: the LM head answers.
    ("random-gpt2-small", 768, 3 * 256 * 768 + 3 * 256 * 256 + 2 * 768 + 768 * 256, 124_439_808),
    ("random-opt-125m", 768, 984_576, 125_239_296),
    ("random-llama-7b", 4096, 3 * 256 * 4096 + 3 * 256 * 256 + 2 * 768 + 4096 * 256, 6_738_415_616),
])
def test_trainable_parameters_on_real_shapes(name, d, trainable, backbone_params):
    bb = backbones.load(name, meta=True)
    with torch.device("meta"):
        model = methods.build("read", bb, 2)
    assert methods.count_parameters(model) == (trainable, trainable + backbone_params)
    assert {"random-gpt2-small": 984_576, "random-llama-7b": 4_392_448}.get(name, trainable) == trainable


def test_drop_layers_is_refused_on_a_decoder_only_lm():
    with pytest.raises(Exception, match="drop_layers applies to encoders and T5"):
        build("random-gpt2-tiny", {"drop_layers": 1})


@pytest.fixture(scope="module")
def tokenizer():
    return backbones.load("random-gpt2-tiny").tokenizer


def rte_rows():
    import datasets

    return datasets.Dataset.from_dict({"sentence1": ["A man is sleeping.", "Cats purr when content and calm."],
                                       "sentence2": ["A person rests.", "Dogs bark."], "label": [0, 1],
                                       "idx": [0, 1]})


def test_cached_states_give_the_uncached_logits(tokenizer):
    """The hidden-state cache keeps one row per target token; forward_features on it equals the full forward."""
    bb, model = build("random-gpt2-tiny", {"hidden": 8})
    torch.nn.init.normal_(model.side.up.weight, std=0.5)
    split = Encoded(rte_rows(), tokenizer, data.get_task("rte"), 64, bb.eos_id, causal=True)
    layout = model.cache_layout(split)
    assert layout == {"phi": ([2, 2], 2, 64)}  # "0" + eos and "1" + eos: 2 target tokens each
    states = cache.build_set(model, split, layout, 2, torch.device("cpu"), progress=False)["phi"]
    inputs, labels = split.batch([1, 0], torch.device("cpu"))
    masks = {k: v for k, v in inputs.items() if k.endswith("_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(states.gather([1, 0], torch.device("cpu")), **masks),
                                   model(**inputs), rtol=1e-5, atol=1e-6)
    assert states.nbytes == 4 * 2 * 64 * F32
