"""Houlsby adapters (Houlsby et al. 2019, Section 2.1, Figure 2) — READ's "Adapter" baseline (Section 3.1, Table 1).

A residual bottleneck MLP on the output of every attention and feed-forward sublayer, after its dropout and
before the skip connection (on T5 in the encoder and the decoder; cross-attention gets none):

    A(h) = h + W_up f(W_down h + b_down) + b_up,        W_down [m, d], W_up [d, m], bottleneck m << d

Written by hand: AdapterHub ``adapters`` 1.3.0 requires ``transformers~=4.57.6``, which breaks the T5 paths here,
and peft has no sequential bottleneck adapter; with the same weights this module reproduces AdapterHub's Houlsby
adapter exactly on MiniLM. The adapters are attached to ``backbone.model`` in place: build each run on a freshly
loaded backbone.
See docs/methods/adapter.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from readlib.errors import ConfigError
from readlib.methods.base import MethodSpec
from readlib.methods.head import check_dropout, wrap

# Adapters learn at larger steps than full fine-tuning: Houlsby et al. swept {3e-5, 3e-4, 3e-3} on GLUE (Section 3.2)
# and 3e-5..1e-3 on SQuAD (Section 3.5); READ Table 8 lists 1.95e-3 in the adapter row (T5-base); LST's released
# adapter baseline uses 3e-4. 1e-3 lies between READ's and LST's values.
DEFAULT_LR = 1e-3
INIT_STD = 1e-2  # Houlsby et al. 2019, Section 3.6: near-identity init, truncated at 2 std
NONLINEARITIES = {
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


@dataclass
class Config:
    bottleneck: int = field(default=64, metadata={
        "help": "bottleneck width m; READ Table 7 candidates {32, 64, 128}, final 64"})
    nonlinearity: str = field(default="swish", metadata={
        "help": "f: swish | gelu | gelu_new | relu (swish: AdapterHub's Houlsby config)"})
    attention: bool = field(default=True, metadata={
        "help": "adapters after attention too (Houlsby); false: after the feed-forward block only"})
    layer_norms: bool = field(default=False, metadata={
        "help": "also train the backbone's layer norms (Houlsby; not READ / AdapterHub)"})
    dropout: float = field(default=0.1, metadata={"help": "head dropout (encoder path)"})

    def validate(self) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"adapter.bottleneck must be >= 1, got {self.bottleneck}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ConfigError(
                f"adapter.nonlinearity must be one of: {', '.join(NONLINEARITIES)}; got '{self.nonlinearity}'"
            )
        check_dropout("adapter", self.dropout)


class Adapter(nn.Module):
    """A(h) = h + W_up f(W_down h + b_down) + b_up over the last axis: [..., d] -> [..., d]."""

    def __init__(self, d: int, bottleneck: int, nonlinearity: str = "swish"):
        super().__init__()
        self.down = nn.Linear(d, bottleneck)
        self.act = NONLINEARITIES[nonlinearity]()
        self.up = nn.Linear(bottleneck, d)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _through_adapter(dropout: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return dropout.adapter(output)  # forward hook: the sublayer's dropout output goes through its adapter


def sublayers(model: nn.Module, attention: bool = True) -> list[nn.Module]:
    """The residual sublayers that get an adapter, in model order; each has a ``dropout`` applied to its output
    right before the skip connection (BERT: ``BertSelfOutput``, ``BertOutput``; T5: ``T5LayerSelfAttention``,
    ``T5LayerFF``)."""
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput
    from transformers.models.t5.modeling_t5 import T5LayerFF, T5LayerSelfAttention

    kinds = (BertOutput, T5LayerFF) + ((BertSelfOutput, T5LayerSelfAttention) if attention else ())
    return [m for m in model.modules() if isinstance(m, kinds)]


def add_adapters(model: nn.Module, config: Config) -> list[Adapter]:
    """Attach an adapter to each sublayer's output dropout in place; returns the adapters in model order."""
    targets = sublayers(model, config.attention)
    if not targets:
        raise ConfigError(f"adapter supports BERT and T5 backbones; found no adapter site in {type(model).__name__}")
    d = model.config.d_model if hasattr(model.config, "d_model") else model.config.hidden_size
    ref = next(model.parameters())
    adapters = []
    for sublayer in targets:
        adapter = Adapter(d, config.bottleneck, config.nonlinearity).to(ref.device, ref.dtype)
        sublayer.dropout.adapter = adapter
        sublayer.dropout.register_forward_hook(_through_adapter)
        adapters.append(adapter)
    return adapters


def layer_norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return [p for m in model.modules() if isinstance(m, (nn.LayerNorm, T5LayerNorm)) for p in m.parameters()]


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    model = backbone.model
    model.requires_grad_(False)
    add_adapters(model, config)  # new parameters: requires_grad
    if config.layer_norms:
        for param in layer_norm_parameters(model):
            param.requires_grad_(True)
    return wrap(backbone, num_labels, config.dropout)


SPEC = MethodSpec("adapter", Config, DEFAULT_LR, build, checkpointing=True)
