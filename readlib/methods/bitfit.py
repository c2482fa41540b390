"""BitFit (Ben Zaken et al. 2022): only bias terms are trained — READ's "BitFit" baseline (Section 3.1, Table 1).

BERT-like encoders train their existing biases. T5 has none, so, as in LST's released T5 BitFit, every linear
map and block layer norm inside T5's blocks first gets a zero-initialised bias (layer norm: w ⊙ x / rms(x) + b):
the adapted T5 starts exactly at the frozen backbone. On the encoder path the head is trained as well.

Written here because peft has no BitFit tuner and no library adds the biases T5 lacks. The backbone is
modified in place: build each run on a freshly loaded backbone.
See docs/methods/bitfit.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from readlib.methods.base import MethodSpec
from readlib.methods.head import check_dropout, wrap

# Biases need a larger step than full fine-tuning: the BitFit paper searched 1e-4..1e-3 on BERT, and READ's
# Table 8 lists 2.83e-3 for BitFit on T5-base. 1e-3 is inside both.
DEFAULT_LR = 1e-3


@dataclass
class Config:
    dropout: float = field(default=0.1, metadata={"help": "head dropout (encoder path)"})

    def validate(self) -> None:
        check_dropout("bitfit", self.dropout)


def _add_bias(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.bias  # forward hook of a T5 layer norm: w ⊙ x / rms(x) + b


def add_t5_biases(model: nn.Module) -> None:
    """Give every linear map and layer norm inside T5's blocks a zero bias (LST's T5 BitFit), in place."""
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
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
    return wrap(backbone, num_labels, config.dropout)


SPEC = MethodSpec("bitfit", Config, DEFAULT_LR, build, checkpointing=True)
