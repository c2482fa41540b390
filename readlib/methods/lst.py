"""LST: Ladder Side-Tuning (Sung, Cho & Bansal, NeurIPS 2022, arXiv 2206.06522) — READ's memory-efficient baseline
(READ Appendix C.1, Tables 3 and 4).

A small side network of width d/r runs next to the frozen backbone (under ``torch.no_grad()``) and makes the
predictions; the backbone's hidden states reach it through gated ladders (LST Section 3.2, Fig. 3):

    x_i = μ_i · W_i φ_i + (1 - μ_i) · h_{i-1},  μ_i = sigmoid(α_i / T);   h_i = B_i(x_i);   output U · norm(h_N)

Side blocks start from the L1-pruned backbone, with LST's layer dropping, as in the authors' code
(github.com/ylsung/Ladder-Side-Tuning); side attention probabilities are recomputed in backward instead of
being stored (``recompute_attention``).

Written here because no maintained library implements LST (peft has no side-network tuner).
See docs/methods/lst.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from readlib.errors import ConfigError
from readlib.methods.base import FrozenBackbone, MethodSpec
from readlib.methods.head import MeanPoolHead, check_dropout
from readlib.methods.read import lm_logits

# LST's T5-base GLUE learning rate (lr=3e-3 in seq2seq/scripts/ladder_side_tuning_base.sh); the largest of the
# TokenTune paper's LST candidates [3e-4, 1e-3, 3e-3]. READ Table 8 tuned 7.47e-4 for its LST.
DEFAULT_LR = 3e-3
INITS = ("pruned", "random")
LADDER_STD = 0.01  # N(0, 0.01²) for ladders and upsample, LST's init of plain linear layers


@dataclass
class Config:
    reduction: int = field(default=8, metadata={
        "help": "r: side width d/r; 8 on T5-base = side dim 96, READ Table 7's final choice (64/96/128)"})
    gate_temperature: float = field(default=0.1, metadata={"help": "T in μ_i = sigmoid(α_i / T)"})
    drop_every: int = field(default=4, metadata={
        "help": "drop side block i when i % drop_every == 0 (LST's T5 GLUE runs: 0, 4, 8); 0: keep all"})
    init: str = field(default="pruned", metadata={
        "help": "'pruned': side blocks from the L1-pruned backbone (LST); 'random': PyTorch defaults"})
    dropout: float = field(default=0.1, metadata={"help": "head dropout (encoder path)"})
    recompute_attention: bool = field(default=True, metadata={
        "help": "side attention probabilities recomputed in backward, not stored"})

    def validate(self) -> None:
        if self.reduction < 1:
            raise ConfigError(f"lst.reduction must be >= 1 (side width = d / reduction), got {self.reduction}")
        if not self.gate_temperature > 0:
            raise ConfigError(f"lst.gate_temperature must be > 0, got {self.gate_temperature}")
        if self.drop_every < 0 or self.drop_every == 1:
            raise ConfigError(f"lst.drop_every must be 0 (keep every side block) or >= 2, got {self.drop_every}")
        if self.init not in INITS:
            raise ConfigError(f"lst.init must be one of: {', '.join(INITS)}; got '{self.init}'")
        check_dropout("lst", self.dropout)


def ladder(h_prev: torch.Tensor, rung: torch.Tensor, alpha: torch.Tensor, temperature: float) -> torch.Tensor:
    """x_i = μ_i · W_i φ_i + (1 - μ_i) · h_{i-1} with μ_i = sigmoid(α_i / T) (LST Section 3.2)."""
    mu = torch.sigmoid(alpha / temperature)
    return mu * rung + (1 - mu) * h_prev


def keep_rows(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k rows of ``weight`` with the largest L1 norm, in increasing order (Torch-Pruning's
    ``L1Strategy``, which drops the n - k rows of smallest L1 norm)."""
    return weight.abs().sum(1).topk(k).indices.sort().values


def side_layers(num_layers: int, drop_every: int) -> list[int]:
    """Backbone layers that get a side block: all but i % drop_every == 0 (none dropped for drop_every = 0)."""
    return [i for i in range(num_layers) if not drop_every or i % drop_every]


def _prune_group(weights: list[torch.Tensor], cols: torch.Tensor, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One linear group of LST's chain: inputs cut to ``cols``, then the k rows whose L1 norm of the group's
    element-wise product is largest. Returns the pruned weights and the kept rows."""
    cut = [w[:, cols] for w in weights]
    product = cut[0]
    for w in cut[1:]:
        product = product * w
    rows = keep_rows(product, k)
    return [w[rows] for w in cut], rows


# ---------------------------------------------------------------- the side network


class SideNetwork(nn.Module):
    """The ladder side network of one stack: [φ_0, ..., φ_N] -> side output [batch, tokens, d/r]."""

    def __init__(self, d_model: int, width: int, layers: list[int], blocks: list[nn.Module], final: nn.Module,
                 dropout: float, temperature: float):
        super().__init__()
        self.layers = layers  # backbone layer of each side block
        self.first_down = nn.Linear(d_model, width)  # W_0, on the embedding output
        self.downs = nn.ModuleList(nn.Linear(d_model, width) for _ in layers)  # W_i, the ladders
        self.alpha = nn.Parameter(torch.zeros(len(layers)))  # α_i = 0: μ_i = 0.5
        self.blocks = nn.ModuleList(blocks)  # B_i
        self.final = final  # T5: final layer norm and dropout; BERT: identity
        self.dropout = nn.Dropout(dropout)
        self.temperature = temperature
        for linear in [self.first_down, *self.downs]:
            nn.init.normal_(linear.weight, std=LADDER_STD)
            nn.init.zeros_(linear.bias)

    def gates(self) -> torch.Tensor:
        """μ_i of every side block."""
        return torch.sigmoid(self.alpha / self.temperature)

    def forward(self, phi: list[torch.Tensor], **context) -> torch.Tensor:
        """``phi``: the backbone's embedding output and layer outputs, constants [batch, tokens, d]."""
        h = self.first_down(self.dropout(phi[0]))  # h_0 = W_0 φ_0
        for j, i in enumerate(self.layers):
            h = ladder(h, self.downs[j](phi[i + 1]), self.alpha[j], self.temperature)
            h = self.block(j, h, **context)  # h_i = B_i(x_i)
        return self.final(h)

    def block(self, j: int, h: torch.Tensor, **context) -> torch.Tensor:
        raise NotImplementedError


class T5Side(SideNetwork):
    """Side T5 stack: attention masks are additive [batch, 1, q, k]. The first side block that exists owns the
    stack's trainable relative-position-bias table and every side block adds its bias, as T5 shares block 0's table
    (LST's code: ``first_available_layer`` owns it, ``side_position_bias`` is passed on)."""

    def relative_bias(self, n: int, device: torch.device) -> torch.Tensor:
        """Self-attention bias [1, heads, n, n] from the side's own table (decoder stacks: causal buckets)."""
        return self.blocks[0].layer[0].SelfAttention.compute_bias(n, n, device=device)

    def forward(self, phi: list[torch.Tensor], mask=None, memory=None, memory_mask=None) -> torch.Tensor:
        bias = self.relative_bias(phi[0].shape[1], phi[0].device)  # computed once: every block's gradient reaches it
        return super().forward(phi, mask=mask, bias=bias, memory=memory, memory_mask=memory_mask)

    def block(self, j: int, h: torch.Tensor, mask=None, bias=None, memory=None, memory_mask=None) -> torch.Tensor:
        return self.blocks[j](h, attention_mask=mask, position_bias=bias, encoder_hidden_states=memory,
                              encoder_attention_mask=memory_mask)[0]


class BertSide(SideNetwork):
    """Side stack of BERT-like layers (post-LN)."""

    def block(self, j: int, h: torch.Tensor, mask=None) -> torch.Tensor:
        return self.blocks[j](h, attention_mask=mask)


# ---------------------------------------------------------------- attention that stores no [batch, heads, q, k]

RECOMPUTED = "readlib_recomputed_eager"


def _eager(q, k, v, mask, bias, scaling: float, p: float) -> torch.Tensor:
    """BERT's and T5's eager attention: dropout(softmax(q kᵀ·s + bias + mask)) v, [batch, heads, q, d_head]."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores + mask
    return torch.matmul(nn.functional.dropout(torch.softmax(scores, dim=-1), p=p, training=p > 0), v)


def _rng(device: torch.device):
    """The generator state dropout on ``device`` draws from (CUDA per device; CPU and meta share the CPU one)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


class RecomputedAttention(torch.autograd.Function):
    """Eager attention whose backward recomputes the probabilities from the saved q, k, v, masks and RNG state."""

    @staticmethod
    def forward(ctx, q, k, v, mask, bias, scaling: float, p: float) -> torch.Tensor:
        ctx.scaling, ctx.p, ctx.rng = scaling, p, _rng(q.device)
        ctx.save_for_backward(q, k, v, mask, bias)
        return _eager(q, k, v, mask, bias, scaling, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(saved, ctx.needs_input_grad[:5], strict=True)]
        cuda = [saved[0].device] if saved[0].device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            if cuda:
                torch.cuda.set_rng_state(ctx.rng, cuda[0])
            else:
                torch.set_rng_state(ctx.rng)
            out = _eager(*inputs, ctx.scaling, ctx.p)  # the same dropout mask as the forward pass
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None, None)


def recomputed_attention(module: nn.Module, query, key, value, attention_mask, scaling: float | None = None,
                         dropout: float = 0.0, position_bias=None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry (BERT and T5 call signature); output [batch, q, heads, d_head]."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    out = RecomputedAttention.apply(query, key, value, attention_mask, position_bias, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def side_config_of(config, recompute: bool):
    """A copy of a backbone config for side blocks; ``recompute``: their attention is ``recomputed_attention``."""
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from transformers import AttentionInterface

    config = copy.deepcopy(config)
    if recompute:
        AttentionInterface.register(RECOMPUTED, recomputed_attention)
        config._attn_implementation = RECOMPUTED
    return config


def t5_side(stack: nn.Module, config: Config) -> T5Side:
    """Side network for a T5 stack (encoder or decoder): widths of the stack's config divided by r."""
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from transformers.models.t5.modeling_t5 import T5Block, T5LayerNorm

    side_config = side_config_of(stack.config, config.recompute_attention)
    for name in ("d_model", "d_kv", "d_ff"):  # floor division, as LST's code; the head count is kept
        setattr(side_config, name, getattr(stack.config, name) // config.reduction)
    layers = side_layers(len(stack.block), config.drop_every)
    # the first side block owns the table even when layer dropping removed side block 0 (LST: first_available_layer)
    blocks = [T5Block(side_config, has_relative_attention_bias=j == 0, layer_idx=i) for j, i in enumerate(layers)]
    final = nn.Sequential(T5LayerNorm(side_config.d_model, eps=side_config.layer_norm_epsilon),
                          nn.Dropout(side_config.dropout_rate))
    return T5Side(stack.config.d_model, side_config.d_model, layers, blocks, final, side_config.dropout_rate,
                  config.gate_temperature)


def bert_side(encoder: nn.Module, config: Config) -> BertSide:
    """Side network for a BERT-like encoder: its layer class at hidden and FFN widths divided by r."""
    side_config = side_config_of(encoder.config, config.recompute_attention)
    side_config.hidden_size //= config.reduction
    side_config.intermediate_size //= config.reduction
    layers = side_layers(len(encoder.encoder.layer), config.drop_every)
    layer_class = type(encoder.encoder.layer[0])
    blocks = [layer_class(side_config) for _ in layers]
    return BertSide(encoder.config.hidden_size, side_config.hidden_size, layers, blocks, nn.Identity(),
                    side_config.hidden_dropout_prob, config.gate_temperature)


# ---------------------------------------------------------------- pruned initialisation (LST's pruning_v2)


def prune_t5(stack: nn.Module, side: T5Side, cols: torch.Tensor) -> torch.Tensor:
    """Copy the chain-pruned weights of ``stack``'s blocks into ``side``'s blocks and its final layer norm.

    ``cols``: the residual dimensions kept so far; returns those kept after the stack (the chain continues from
    the encoder into the decoder, as in LST's code). Dropped layers are pruned too: they carry the chain.
    The first side block's relative-bias table is the backbone's block-0 table, whole (heads are kept), whichever
    backbone layer that side block sits beside (LST's run_seq2seq.py loads it from ``block.0``).
    """
    table = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    width = side.first_down.out_features
    inner = side.blocks[0].layer[0].SelfAttention.inner_dim
    ff_width = side.blocks[0].layer[-1].DenseReluDense.wo.in_features
    for i, block in enumerate(stack.block):
        state = {}
        for n, sub in enumerate(block.layer):
            state[f"layer.{n}.layer_norm.weight"] = sub.layer_norm.weight[cols]
            if hasattr(sub, "DenseReluDense"):
                ff, prefix = sub.DenseReluDense, f"layer.{n}.DenseReluDense"
                names = [m for m in ("wi", "wi_0", "wi_1") if hasattr(ff, m)]
                wi, mid = _prune_group([getattr(ff, m).weight for m in names], cols, ff_width)
                (wo,), cols = _prune_group([ff.wo.weight], mid, width)
                state |= {f"{prefix}.{m}.weight": w for m, w in zip([*names, "wo"], [*wi, wo], strict=True)}
                continue
            name = "SelfAttention" if hasattr(sub, "SelfAttention") else "EncDecAttention"
            attn, prefix = getattr(sub, name), f"layer.{n}.{name}"
            qkv, heads = _prune_group([attn.q.weight, attn.k.weight, attn.v.weight], cols, inner)
            (o,), cols = _prune_group([attn.o.weight], heads, width)
            state |= {f"{prefix}.{m}.weight": w for m, w in zip("qkvo", [*qkv, o], strict=True)}
        if i in side.layers:
            j = side.layers.index(i)
            if j == 0:
                state["layer.0.SelfAttention.relative_attention_bias.weight"] = table
            side.blocks[j].load_state_dict(state)
    side.final[0].load_state_dict({"weight": stack.final_layer_norm.weight[cols]})
    return cols


def prune_bert(encoder: nn.Module, side: BertSide) -> None:
    """Copy the chain-pruned weights of a BERT-like encoder's layers into ``side``'s layers (weights and biases)."""
    width = side.first_down.out_features
    ff_width = side.blocks[0].intermediate.dense.out_features
    cols = keep_rows(encoder.get_input_embeddings().weight.T, width)
    for i, layer in enumerate(encoder.encoder.layer):
        state = {}
        att = layer.attention.self
        qkv, cols = _prune_group([att.query.weight, att.key.weight, att.value.weight], cols, width)
        for m, w in zip(("query", "key", "value"), qkv, strict=True):
            state |= {f"attention.self.{m}.weight": w, f"attention.self.{m}.bias": getattr(att, m).bias[cols]}
        for name, width_out in [("attention.output", width), ("intermediate", ff_width), ("output", width)]:
            module = layer.get_submodule(name)
            (w,), cols = _prune_group([module.dense.weight], cols, width_out)
            state |= {f"{name}.dense.weight": w, f"{name}.dense.bias": module.dense.bias[cols]}
            if hasattr(module, "LayerNorm"):  # post-LN: the norm lives on the dimensions just kept
                norm = module.LayerNorm
                state |= {f"{name}.LayerNorm.weight": norm.weight[cols], f"{name}.LayerNorm.bias": norm.bias[cols]}
        if i in side.layers:
            side.blocks[side.layers.index(i)].load_state_dict(state)


# ---------------------------------------------------------------- the frozen backbone's states


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, q or 1, k] booleans -> additive attention mask [batch, 1, q or 1, k] (0 or the dtype's minimum)."""
    return (~keep.bool())[:, None].to(dtype) * torch.finfo(dtype).min


def t5_states(stack: nn.Module, input_ids: torch.Tensor, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """φ_0 (embedding output), φ_1..φ_N (block outputs, before the final layer norm) and the stack's output.

    Call under ``torch.no_grad()``. The block outputs are read with forward hooks: transformers returns the last
    layer's state only after the final layer norm, while LST's ladder N reads the block's own output.
    """
    outputs = []
    hooks = [block.register_forward_hook(lambda _m, _a, out: outputs.append(out[0])) for block in stack.block]
    try:
        last = stack(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return [stack.embed_tokens(input_ids), *outputs], last


# ---------------------------------------------------------------- the methods' models


class LSTEncoder(FrozenBackbone):
    """LST on an encoder (BERT-like or a T5 encoder): the side output, upsampled to d, under the shared head."""

    def __init__(self, backbone, num_labels: int, config: Config):
        super().__init__(backbone)
        self.t5 = self.frozen.config.model_type == "t5"
        if self.t5:
            self.side = t5_side(self.frozen.encoder, config)
        else:
            self.side = bert_side(self.frozen, config)
        self.up = upsample(self.side, backbone.hidden_size)
        self.head = MeanPoolHead(backbone.hidden_size, num_labels, config.dropout)
        if config.init == "pruned":
            with torch.no_grad():
                if self.t5:
                    embeddings = self.frozen.encoder.embed_tokens.weight
                    prune_t5(self.frozen.encoder, self.side, keep_rows(embeddings.T, self.side.first_down.out_features))
                else:
                    prune_bert(self.frozen, self.side)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        dtype = self.side.first_down.weight.dtype
        with torch.no_grad():  # the backbone's states are constants for the side network
            if self.t5:
                phi, _ = t5_states(self.frozen.encoder, input_ids, attention_mask=attention_mask)
            else:
                phi = self.backbone.hidden_states(input_ids, attention_mask, token_type_ids)
        mask = additive_mask(attention_mask[:, None], dtype)
        return self.head(self.up(self.side(list(phi), mask=mask)), attention_mask)


class LSTSeq2Seq(FrozenBackbone):
    """LST on T5, text-to-text: side encoder, side decoder, upsample, the frozen LM head: [batch, n, vocab]."""

    def __init__(self, backbone, config: Config):
        super().__init__(backbone)  # self.frozen: T5ForConditionalGeneration
        self.side_encoder = t5_side(self.frozen.encoder, config)
        self.side_decoder = t5_side(self.frozen.decoder, config)
        self.up = upsample(self.side_decoder, backbone.hidden_size)
        if config.init == "pruned":
            with torch.no_grad():
                width = self.side_encoder.first_down.out_features
                cols = prune_t5(self.frozen.encoder, self.side_encoder, keep_rows(self.frozen.shared.weight.T, width))
                prune_t5(self.frozen.decoder, self.side_decoder, cols)

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> torch.Tensor:
        t5, dtype = self.frozen, self.side_encoder.first_down.weight.dtype
        n = decoder_input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()[None]
        if decoder_attention_mask is not None:
            causal = causal & decoder_attention_mask.bool()[:, None]
        with torch.no_grad():
            phi_e, memory = t5_states(t5.encoder, input_ids, attention_mask=attention_mask)
            phi_d, _ = t5_states(t5.decoder, decoder_input_ids, attention_mask=decoder_attention_mask,
                                 encoder_hidden_states=memory, encoder_attention_mask=attention_mask)
        source_mask = additive_mask(attention_mask[:, None], dtype)
        h_e = self.side_encoder(phi_e, mask=source_mask)
        h_d = self.side_decoder(phi_d, mask=additive_mask(causal, dtype), memory=h_e, memory_mask=source_mask)
        return lm_logits(t5, self.up(h_d))  # the side decoder's output alone, through the frozen LM head


def upsample(side: SideNetwork, d_model: int) -> nn.Linear:
    """U: side width -> d, with bias, N(0, 0.01²) weights and zero bias (LST's ``side_final_upsample``)."""
    up = nn.Linear(side.first_down.out_features, d_model)
    nn.init.normal_(up.weight, std=LADDER_STD)
    nn.init.zeros_(up.bias)
    return up


def check_backbone(backbone, config: Config) -> None:
    """ConfigError unless LST can build its side network on this backbone with these widths."""
    model_config, r = backbone.model.config, config.reduction
    d = backbone.hidden_size
    if model_config.model_type != "t5" and not hasattr(getattr(backbone.model, "encoder", None), "layer"):
        raise ConfigError(f"lst needs a T5 or a BERT-like encoder (encoder.layer), got '{model_config.model_type}'")
    if d % r:
        raise ConfigError(f"lst.reduction must divide the backbone width {d} (side width d / reduction), got {r}")
    if model_config.model_type == "t5":
        if model_config.d_kv < r or model_config.d_ff < r:
            raise ConfigError(f"lst.reduction must be <= the head width d_kv = {model_config.d_kv} and the FFN "
                              f"width d_ff = {model_config.d_ff}, got {r}")
    elif (d // r) % model_config.num_attention_heads or model_config.intermediate_size < r:
        raise ConfigError(f"lst.reduction must leave a side width d / reduction = {d // r} divisible by the "
                          f"{model_config.num_attention_heads} attention heads and be <= the FFN width "
                          f"{model_config.intermediate_size}, got {r}")
    if not side_layers(backbone.num_layers, config.drop_every):
        raise ConfigError(f"lst.drop_every={config.drop_every} drops every side block of a "
                          f"{backbone.num_layers}-layer backbone; use 0 to keep all")


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    check_backbone(backbone, config)
    # the side network lives where the backbone does (the meta device for parameter counts)
    with torch.device(next(backbone.model.parameters()).device):
        if backbone.formulation == "text-to-text":
            return LSTSeq2Seq(backbone, config)
        return LSTEncoder(backbone, num_labels, config)


# recompute_attention changes memory and time, not results: sweep studies do not split on it. Quantizable: on an
# encoder the backbone runs under no_grad and its states are constants for the side network (LSTEncoder.forward)
SPEC = MethodSpec("lst", Config, DEFAULT_LR, build, not_in_name=("recompute_attention",), quantizable=True)
