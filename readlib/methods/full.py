"""Full fine-tuning: every backbone weight (and the head, on the encoder path) is trained (READ Table 1).

See docs/methods/full.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from readlib.methods.base import MethodSpec
from readlib.methods.head import check_dropout, wrap

DEFAULT_LR = 5e-5


@dataclass
class Config:
    dropout: float = field(default=0.1, metadata={"help": "head dropout (encoder path)"})

    def validate(self) -> None:
        check_dropout("full", self.dropout)


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    backbone.model.requires_grad_(True)  # in place: the backbone object now trains
    return wrap(backbone, num_labels, config.dropout)


SPEC = MethodSpec("full", Config, DEFAULT_LR, build, formulations=("classification", "text-to-text", "causal-lm"),
                  checkpointing=True)
