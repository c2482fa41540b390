"""Selective fine-tuning, "TokenTune" (Simoulin et al., ES-FoMo @ ICML 2023), Section 2, eq. (1)-(4).

Per sequence, k random token positions plus the first form G; only G carries gradient (eq. (3):
∂L/∂a = [∂L/∂a_G, 0]), so only h_G is stored for backward (eq. (4)). Each layer runs twice: without gradient
over all n positions (K, V of every position), and with gradient for G, whose queries attend to K*, V* (K, V
with rows G replaced by k_G, v_G). Training pools the selected positions (eq. (1)), evaluation every real token:

    π = MLP(1/|G| Σ_{i∈G} h_G,i),    p(y|X) = softmax(π)

Written by hand because no maintained library implements it (peft, transformers and torchtune have nothing
like it); the per-layer forward calls the layer's own submodules, so LoRA modules injected by peft still apply.
See docs/methods/selective.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from readlib.errors import ConfigError
from readlib.methods import lora
from readlib.methods.base import MethodSpec
from readlib.methods.head import MeanPoolHead, check_dropout

# The paper's cross-validated grid on BERT-large GLUE is [5e-5, 3e-5, 2e-5, 1e-5] (Section 3.1); its k ablation
# on BERT-base uses 5e-5 (Section 3.2). With lora_rank > 0 only LoRA trains: pass lora's rate (5e-4) instead.
DEFAULT_LR = 5e-5


@dataclass
class Config:
    k: int = field(default=16, metadata={
        "help": "selected positions per sequence besides the first; paper: 16 (Section 3.1), 4..64 in Figure 2"})
    lora_rank: int = field(default=0, metadata={
        "help": "0: every backbone weight trains; r > 0: LoRA (query/value, alpha = r) trains instead"})
    dropout: float = field(default=0.1, metadata={"help": "head dropout"})

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"selective.k must be >= 1, got {self.k}")
        if self.lora_rank < 0:
            raise ConfigError(f"selective.lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        check_dropout("selective", self.dropout)


# ---------------------------------------------------------------- which positions


def select_positions(
    attention_mask: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions G per sequence: the first real token plus k drawn uniformly among the other real tokens.

    attention_mask [batch, n] (1 = real token). Returns (idx, valid), both [batch, m] with
    m = max over the batch of min(k, real - 1) + 1: idx the positions in increasing order, valid False on
    the padding positions that fill rows with fewer selected positions than m.
    """
    real = attention_mask.bool()
    b, n = real.shape
    device = generator.device if generator is not None else real.device
    noise = torch.rand(b, n, generator=generator, device=device).to(real.device)
    order = torch.arange(n, device=real.device)
    # ascending sort key: first real token (-1), then the real tokens in random order ([0, 1)), then padding
    key = torch.where(real, noise, 2.0 + order / n)
    key[torch.arange(b, device=real.device), real.int().argmax(1)] = -1.0
    count = (real.sum(1) - 1).clamp(max=k) + 1
    # a row with fewer than m selected has all its real tokens selected, so its fillers are always padding
    idx = key.argsort(1)[:, : int(count.max())].sort(1).values
    return idx, real.gather(1, idx)


# ---------------------------------------------------------------- one layer, two streams


def _put(full: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``full`` [b, n, d] with rows ``idx`` [b, m] replaced by ``rows`` [b, m, d] (out of place)."""
    return full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]), rows)


def _attend(q, k, v, bias: torch.Tensor, heads: int, scale: float, dropout: float, eager: bool) -> torch.Tensor:
    """Multi-head attention of queries q [b, t, d] over keys/values [b, n, d]; bias [b, 1, t or 1, n] additive."""
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    if eager:
        probs = (q @ k.transpose(-1, -2) * scale + bias).softmax(-1, dtype=torch.float32).to(v.dtype)
        out = F.dropout(probs, dropout, training=dropout > 0) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).flatten(2)


@dataclass(frozen=True)
class _Family:
    """Where a transformers model family keeps its pieces, and its layer split at the attention."""

    base: Callable  # model -> the module holding embeddings and layers
    layers: Callable  # base -> nn.ModuleList
    positions: Callable  # attention_mask [b, n] -> position ids [b or 1, n] of the model's own forward
    embed: Callable  # (base, ids, positions, token_type_ids) -> input of layer 1
    qkv: Callable  # (layer, h) -> q, k, v, each [b, t, d]
    attention: Callable  # layer -> (heads, scale, dropout probability)
    rest: Callable  # (layer, h, attention context) -> layer output: output projection, residuals, FFN
    final: Callable  # (base, h) -> last hidden state (the model's final layer norm / projection)
    causal: bool
    position_bias: Callable | None = None  # (base, query positions [b or 1, t], n) -> [b or 1, heads, t, n]


def _arange(mask: torch.Tensor) -> torch.Tensor:
    return torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)


def _bert_embed(base, ids, pos, types):
    types = torch.zeros_like(ids) if types is None else types
    return base.embeddings(input_ids=ids, token_type_ids=types, position_ids=pos.expand_as(ids))


def _bert_qkv(layer, h):
    sa = layer.attention.self
    return sa.query(h), sa.key(h), sa.value(h)


def _bert_rest(layer, h, ctx):
    a = layer.attention.output(ctx, h)  # dense, dropout, LayerNorm(· + h)
    return layer.output(layer.intermediate(a), a)


def _gpt2_rest(block, h, ctx):
    a = h + block.attn.resid_dropout(block.attn.c_proj(ctx))
    return a + block.mlp(block.ln_2(a))


def _opt_embed(base, ids, pos, types):
    dec = base.decoder
    x = dec.embed_tokens(ids)
    x = dec.project_in(x) if dec.project_in is not None else x
    return x + dec.embed_positions(None, position_ids=pos)


def _opt_qkv(layer, h):
    sa = layer.self_attn
    x = layer.self_attn_layer_norm(h) if layer.do_layer_norm_before else h
    return sa.q_proj(x) * sa.scaling, sa.k_proj(x), sa.v_proj(x)  # OPT scales q before q Kᵀ


def _opt_rest(layer, h, ctx):
    pre = layer.do_layer_norm_before
    a = h + F.dropout(layer.self_attn.out_proj(ctx), layer.dropout, layer.training)
    a = a if pre else layer.self_attn_layer_norm(a)
    x = layer.final_layer_norm(a) if pre else a
    out = a + F.dropout(layer.fc2(layer.activation_fn(layer.fc1(x))), layer.dropout, layer.training)
    return out if pre else layer.final_layer_norm(out)


def _opt_final(base, h):
    dec = base.decoder
    h = dec.final_layer_norm(h) if dec.final_layer_norm is not None else h
    return dec.project_out(h) if dec.project_out is not None else h


def _t5_qkv(block, h):
    sa = block.layer[0].SelfAttention
    x = block.layer[0].layer_norm(h)
    return sa.q(x), sa.k(x), sa.v(x)


def _t5_rest(block, h, ctx):
    a = h + block.layer[0].dropout(block.layer[0].SelfAttention.o(ctx))
    return block.layer[-1](a)  # T5LayerFF: a + dropout(FFN(layer_norm(a)))


def _t5_position_bias(base, query_pos, n):
    """T5's learned bias per relative-distance bucket (block 0's table, shared by every block), [b, heads, t, n]."""
    sa = base.block[0].layer[0].SelfAttention
    relative = torch.arange(n, device=query_pos.device) - query_pos.unsqueeze(-1)  # key position - query position
    buckets = sa._relative_position_bucket(relative, bidirectional=True, num_buckets=sa.relative_attention_num_buckets,
                                           max_distance=sa.relative_attention_max_distance)
    return sa.relative_attention_bias(buckets).permute(0, 3, 1, 2)


def _opt_positions(mask):
    return (mask.long().cumsum(1) * mask - 1).long()  # OPTDecoder: count of real tokens so far, from 0


FAMILIES = {
    "bert": _Family(
        base=lambda m: m,
        layers=lambda base: base.encoder.layer,
        positions=_arange,
        embed=_bert_embed,
        qkv=_bert_qkv,
        attention=lambda layer: (layer.attention.self.num_attention_heads, layer.attention.self.scaling,
                                 layer.attention.self.dropout.p),
        rest=_bert_rest,
        final=lambda base, h: h,
        causal=False,
    ),
    "gpt2": _Family(
        base=lambda m: m.base_model,
        layers=lambda base: base.h,
        positions=_arange,
        embed=lambda base, ids, pos, types: base.drop(base.wte(ids) + base.wpe(pos)),
        qkv=lambda block, h: block.attn.c_attn(block.ln_1(h)).split(block.attn.split_size, dim=-1),
        attention=lambda block: (block.attn.num_heads, block.attn.scaling, block.attn.attn_dropout.p),
        rest=_gpt2_rest,
        final=lambda base, h: base.ln_f(h),
        causal=True,
    ),
    "opt": _Family(
        base=lambda m: m.base_model,
        layers=lambda base: base.decoder.layers,
        positions=_opt_positions,
        embed=_opt_embed,
        qkv=_opt_qkv,
        attention=lambda layer: (layer.self_attn.num_heads, 1.0, layer.self_attn.dropout),
        rest=_opt_rest,
        final=_opt_final,
        causal=True,
    ),
    "t5": _Family(  # the encoder stack only (T5EncoderModel)
        base=lambda m: m.encoder,
        layers=lambda base: base.block,
        positions=_arange,
        embed=lambda base, ids, pos, types: base.dropout(base.embed_tokens(ids)),
        qkv=_t5_qkv,
        attention=lambda block: (block.layer[0].SelfAttention.n_heads, 1.0, block.layer[0].SelfAttention.dropout),
        rest=_t5_rest,
        final=lambda base, h: base.dropout(base.final_layer_norm(h)),
        causal=False,
        position_bias=_t5_position_bias,
    ),
}


def _family(model: nn.Module) -> _Family:
    kind = model.config.model_type
    if kind not in FAMILIES:
        raise ConfigError(f"selective fine-tuning has no per-layer forward for model type '{kind}'; "
                          f"supported: {', '.join(FAMILIES)}")
    if getattr(model.config, "add_cross_attention", False) or getattr(model.config, "layerdrop", 0.0) > 0:
        raise ConfigError("selective fine-tuning supports encoders and decoder-only LMs without cross-attention "
                          "or LayerDrop")
    return FAMILIES[kind]


def _biases(attention_mask: torch.Tensor, idx: torch.Tensor, causal: bool, dtype: torch.dtype):
    """Additive attention masks [b, 1, queries, n] for all n queries and for the selected ones."""
    allowed = attention_mask.bool().unsqueeze(1)  # [b, 1, n]: keys that are real tokens
    if causal:  # in original positions: query i sees keys j <= i
        pos = torch.arange(allowed.shape[-1], device=allowed.device)
        allowed = allowed & (pos[:, None] >= pos[None, :])  # [b, n, n]
    sel = allowed.gather(1, idx.unsqueeze(-1).expand(-1, -1, allowed.shape[-1])) if causal else allowed
    low = torch.finfo(dtype).min
    return [torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill(~a, low)[:, None] for a in (allowed, sel)]


def _selective_layer(fam: _Family, layer: nn.Module, h, h_sel, idx, bias, bias_sel, eager: bool):
    """One layer: h [b, n, d] without gradient, h_sel [b, m, d] = rows idx with gradient -> both outputs."""
    heads, scale, p = fam.attention(layer)
    p = p if layer.training else 0.0
    with torch.no_grad():  # h_Ḡ: nothing of this stream is stored for backward
        q, k, v = fam.qkv(layer, h)
        out = fam.rest(layer, h, _attend(q, k, v, bias, heads, scale, p, eager))
    q_sel, k_sel, v_sel = fam.qkv(layer, h_sel)  # h_G
    ctx = _attend(q_sel, _put(k, idx, k_sel), _put(v, idx, v_sel), bias_sel, heads, scale, p, eager)
    out_sel = fam.rest(layer, h_sel, ctx)
    return _put(out, idx, out_sel.detach()), out_sel


def selective_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    idx: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's last hidden state with gradient only through positions ``idx`` [b, m].

    ``model``: a transformers BertModel, T5EncoderModel, GPT-2 or OPT (base or causal-LM). Returns
    (hidden [b, n, d] without gradient, hidden_sel [b, m, d] = hidden at idx, with gradient); the values equal
    the model's own forward.
    """
    fam = _family(model)
    base = fam.base(model)
    eager = model.config._attn_implementation == "eager"
    pos = fam.positions(attention_mask)
    pos_sel = pos.expand_as(input_ids).gather(1, idx)
    types_sel = None if token_type_ids is None else token_type_ids.gather(1, idx)
    with torch.no_grad():
        h = fam.embed(base, input_ids, pos, token_type_ids)
    h_sel = fam.embed(base, input_ids.gather(1, idx), pos_sel, types_sel)
    h = _put(h, idx, h_sel.detach())
    bias, bias_sel = _biases(attention_mask, idx, fam.causal, h.dtype)
    if fam.position_bias is not None:  # T5: positions enter as a bias on the scores, taken at the original positions
        n = input_ids.shape[1]
        with torch.no_grad():
            bias = bias + fam.position_bias(base, pos, n)
        bias_sel = bias_sel + fam.position_bias(base, idx, n)
    for layer in fam.layers(base):
        h, h_sel = _selective_layer(fam, layer, h, h_sel, idx, bias, bias_sel, eager)
    with torch.no_grad():
        h = fam.final(base, h)
    return h, fam.final(base, h_sel)


# ---------------------------------------------------------------- the method: encoder classification


class SelectiveClassifier(nn.Module):
    """A BERT-like encoder fine-tuned selectively, under the shared head: logits [batch, num_labels].

    Training (``.train()``): eq. 1, the head pools the selected positions of a selective forward.
    Evaluation: the model's own forward, pooled over every real token.
    """

    def __init__(self, backbone, head: MeanPoolHead, k: int):
        super().__init__()
        self.backbone = backbone
        self.encoder = backbone.model
        self.head = head
        self.k = k

    def forward(self, input_ids, attention_mask, token_type_ids=None, selection=None) -> torch.Tensor:
        """``selection``: (idx, valid) from ``select_positions``; drawn from torch's global RNG when None."""
        if not self.training:
            return self.head(self.backbone.last_hidden_state(input_ids, attention_mask, token_type_ids),
                             attention_mask)
        idx, valid = selection if selection is not None else select_positions(attention_mask, self.k)
        _, hidden = selective_forward(self.encoder, input_ids, attention_mask, idx, token_type_ids)
        return self.head(hidden, valid)


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    """SelectiveClassifier on an encoder, SelectiveCausalLM on a decoder-only LM (T5 text-to-text is refused by
    the spec's formulations: the paper defines the method for encoders and decoder-only LMs only)."""
    _family(backbone.model)
    if config.lora_rank > 0:  # LoRA exactly as the "lora" method injects it (query/value, alpha = rank)
        lora.inject(backbone.model, lora.Config(rank=config.lora_rank))
    else:
        backbone.model.requires_grad_(True)  # in place, as full fine-tuning: the backbone object now trains
    if backbone.formulation == "causal-lm":
        return SelectiveCausalLM(backbone.model, config.k)
    return SelectiveClassifier(backbone, MeanPoolHead(backbone.hidden_size, num_labels, config.dropout), config.k)


# ---------------------------------------------------------------- decoder-only LMs


class SelectiveCausalLM(nn.Module):
    """Next-token loss of a transformers GPT-2 / OPT causal LM at k random positions (+ the first) per sequence.

    ``forward(input_ids, attention_mask, labels)`` -> mean cross-entropy (nats) over the selected positions
    that have a next-token label; ``labels`` as for transformers' causal LMs (unshifted, -100 ignored).
    """

    def __init__(self, model: nn.Module, k: int, generator: torch.Generator | None = None):
        super().__init__()
        if not _family(model).causal:
            raise ConfigError(f"SelectiveCausalLM needs a decoder-only LM (gpt2, opt), got '{model.config.model_type}'")
        if k < 1:
            raise ConfigError(f"selective.k must be >= 1, got {k}")
        self.model = model
        self.k = k
        self.generator = generator

    def forward(self, input_ids, attention_mask, labels, selection=None) -> torch.Tensor:
        """``selection``: (idx, valid) from ``select_positions``; drawn with ``generator`` when None."""
        idx, valid = selection if selection is not None else select_positions(attention_mask, self.k, self.generator)
        _, hidden = selective_forward(self.model, input_ids, attention_mask, idx)
        logits = self.model.get_output_embeddings()(hidden)  # [b, m, vocab]: the LM head on G only
        n = input_ids.shape[1]
        target = labels.gather(1, (idx + 1).clamp(max=n - 1))  # the token after each selected position
        keep = valid & (idx + 1 < n) & (target != -100)
        return F.cross_entropy(logits[keep], target[keep])


SPEC = MethodSpec("selective", Config, DEFAULT_LR, build, formulations=("classification", "causal-lm"))
