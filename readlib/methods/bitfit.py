"""BitFit (Ben Zaken et al. 2022): only bias terms are trained — READ's "BitFit" baseline (Section 3.1, Table 1).

What is trained:

- BERT-like encoders: every existing bias of the backbone (every parameter whose name ends in ``bias``:
  attention query/key/value/output, FFN intermediate/output, every LayerNorm including the embeddings'),
  plus the shared masked-mean-pool head (``readlib.methods.head``).
- T5 has no bias in its linear maps or layer norms, so "BitFit on T5" (the READ/LST line of work) first adds
  them. We follow LST's released T5 BitFit (Sung et al. 2022, github.com/ylsung/Ladder-Side-Tuning, config
  ``bitfit`` with ``freeze_bitfit_lm_head``): inside every T5 block, each linear map — attention q, k, v, o
  (self- and cross-attention) and FFN wi, wo (wi_0, wi_1, wo when gated) — gets a bias vector, and each
  block layer norm becomes ``w ⊙ x / rms(x) + b``. Only those biases are trained; embeddings, relative
  attention tables, the stacks' final layer norms and the LM head stay frozen. On the encoder path the head
  is trained as well.

Choice: every added bias starts at zero, so the adapted T5 starts exactly at the frozen backbone (LST's code
leaves its attention biases at PyTorch's default uniform init).

Written here because peft has no BitFit tuner (its ``bias="all"`` option only unfreezes biases next to
another adapter), and no library adds the biases T5 lacks. The backbone object is modified in place — the
added biases and ``requires_grad`` live in ``backbone.model`` — as full fine-tuning already does: build each
run on a freshly loaded backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from readlib.methods.head import Classifier, Seq2SeqLM, check_dropout

# Biases need a larger step than full fine-tuning: the BitFit paper searched 1e-4..1e-3 on BERT, and READ's
# Table 8 lists 2.83e-3 for BitFit on T5-base. 1e-3 is inside both.
DEFAULT_LR = 1e-3


@dataclass
class Config:
    dropout: float = 0.1  # head dropout (encoder path)

    def validate(self) -> None:
        check_dropout("bitfit", self.dropout)


def _add_bias(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.bias  # forward hook of a T5 layer norm: w ⊙ x / rms(x) + b


def add_t5_biases(model: nn.Module) -> None:
    """Give every linear map and layer norm inside T5's blocks a zero bias (LST's T5 BitFit), in place."""
    from transformers.models.t5.modeling_t5 import T5Block, T5LayerNorm

    for block in [m for m in model.modules() if isinstance(m, T5Block)]:
        for module in block.modules():
            if isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(module.weight.new_zeros(module.out_features))
            elif isinstance(module, T5LayerNorm) and "bias" not in module._parameters:
                module.bias = nn.Parameter(torch.zeros_like(module.weight))
                module.register_forward_hook(_add_bias)


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    model = backbone.model
    add_t5_biases(model)  # no-op on BERT-like encoders, which have their biases
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("bias"))
    if backbone.kind == "seq2seq":
        return Seq2SeqLM(backbone)
    return Classifier(backbone, num_labels, config.dropout)
