"""Houlsby adapters (Houlsby et al. 2019, "Parameter-efficient transfer learning for NLP", Section 2.1, Figure 2) —
READ's "Adapter" baseline (Section 3.1: "the sequential adapter version by Houlsby et al."; Table 1, Table 7).

An adapter is a residual bottleneck MLP on the d-dimensional output h of a sublayer:

    A(h) = h + W_up f(W_down h + b_down) + b_up,        W_down [m, d], W_up [d, m], bottleneck m << d

Two per layer, on the sublayer's output after its output projection and dropout, before the skip connection:

    BERT (post-LN):  LayerNorm(x + A(Dropout(W_o · attention(x))))     and the same around the feed-forward block
    T5 (pre-LN):     x + A(Dropout(attention(LayerNorm(x))))           and the same around the feed-forward block

in every layer; on T5 in the encoder and in the decoder. Per adapter 2md + m + d parameters.

Choices the papers leave open (checked against AdapterHub ``adapters`` 1.3.0, whose Houlsby config is
``DoubleSeqBnConfig`` / "double_seq_bn", and against LST's released adapter baseline, Sung et al. 2022,
github.com/ylsung/Ladder-Side-Tuning, ``seq2seq/configs/adapters.json``):

- Placement on T5: after self-attention and after the feed-forward block of every encoder and decoder block, applied
  to the sublayer's dropout output right before the residual add — where AdapterHub's ``T5LayerSelfAttention`` and
  ``T5LayerFF`` call their adapters (on BERT it calls them where Houlsby does: after the dropout, before
  ``LayerNorm(· + x)``). The decoder's cross-attention gets no adapter: AdapterHub's ``cross_adapter`` defaults to
  False and LST's T5 adds none there either.
- What is trained: the adapters only (plus the shared head on the encoder path; the T5 LM head stays frozen).
  Houlsby also trains the layer norms; AdapterHub's ``train_adapter`` does not, LST's baseline does
  (``unfreeze_layer_norms``), and READ Section 3.1 says its baselines "only update the new parameters" — so we
  leave them frozen by default; ``layer_norms = True`` trains every layer norm of the backbone as well (BERT:
  weight and bias, embeddings' included; T5: the RMS-norm weights, the stacks' final norms included).
- Nonlinearity f: swish (SiLU), AdapterHub's Houlsby default. Houlsby's released code uses the tanh-approximated
  GELU, as does LST's baseline: ``nonlinearity = "gelu_new"``.
- Initialisation: Houlsby's near-identity init — every weight from a zero-mean normal with std 1e-2 truncated at
  two standard deviations, biases zero (AdapterHub's ``init_weights="houlsby"``; its Houlsby config defaults to
  BERT's N(0, 0.02) instead). The adapted model therefore starts close to, not exactly at, the frozen one.
- Bottleneck m = 64, READ Table 7's final choice among {32, 64, 128}; the same m on every layer.

READ Table 1's "0.96 %" for the adapter on T5-base (of 247.58 M = 222.90 M + the tied 32128 x 768 LM head counted a
second time) is 2.377 M parameters. Houlsby's placement at m = 64 trains 48 x 99,136 = 4.76 M (1.92 %; AdapterHub's
Houlsby config trains the same 4,758,528); at m = 32, 48 x 49,952 = 2.40 M (0.97 %). What gives 0.96 % is 24
adapters at m = 64 (2,379,264, 0.961 %): one per block in the encoder and the decoder (``attention = False``: after
the feed-forward block only), or Houlsby's two per block in one of the two stacks. We keep Houlsby's placement as
the default.

Written by hand although AdapterHub ``adapters`` implements it: its 1.3.0 release requires
``transformers~=4.57.6``, and pinning the project there would also downgrade tokenizers, huggingface_hub, datasets
and sentence-transformers, and breaks the T5 paths (4.57's ``T5EncoderModel`` rejects ``token_type_ids``; its
``T5Config`` has no ``scale_decoder_outputs``). peft has no sequential bottleneck adapter. With the same weights
this module reproduces AdapterHub's Houlsby adapter exactly on MiniLM (``tests/test_adapter.py``). The adapters are
attached to ``backbone.model`` in place (as LoRA and BitFit change the backbone): build each run on a freshly
loaded backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from readlib.methods.head import Classifier, Seq2SeqLM, check_dropout

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
    bottleneck: int = 64  # m; READ Table 7 candidates {32, 64, 128}, final 64
    nonlinearity: str = "swish"  # f; AdapterHub's Houlsby config
    attention: bool = True  # adapters after attention too (Houlsby); False: after the feed-forward block only
    layer_norms: bool = False  # also train the backbone's layer norms (Houlsby; not READ / AdapterHub)
    dropout: float = 0.1  # head dropout (encoder path)

    def validate(self) -> None:
        from readlib.errors import ConfigError

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
    from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput
    from transformers.models.t5.modeling_t5 import T5LayerFF, T5LayerSelfAttention

    kinds = (BertOutput, T5LayerFF) + ((BertSelfOutput, T5LayerSelfAttention) if attention else ())
    return [m for m in model.modules() if isinstance(m, kinds)]


def add_adapters(model: nn.Module, config: Config) -> list[Adapter]:
    """Attach an adapter to each sublayer's output dropout in place; returns the adapters in model order."""
    from readlib.errors import ConfigError

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
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return [p for m in model.modules() if isinstance(m, (nn.LayerNorm, T5LayerNorm)) for p in m.parameters()]


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    model = backbone.model
    model.requires_grad_(False)
    add_adapters(model, config)  # new parameters: requires_grad
    if config.layer_norms:
        for param in layer_norm_parameters(model):
            param.requires_grad_(True)
    if backbone.kind == "seq2seq":
        return Seq2SeqLM(backbone)
    return Classifier(backbone, num_labels, config.dropout)
