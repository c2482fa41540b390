"""Full fine-tuning: every backbone weight (and the head, on the encoder path) is trained (READ Table 1)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from readlib.methods.head import Classifier, Seq2SeqLM, check_dropout

DEFAULT_LR = 5e-5


@dataclass
class Config:
    dropout: float = 0.1  # head dropout (encoder path)

    def validate(self) -> None:
        check_dropout("full", self.dropout)


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    backbone.model.requires_grad_(True)  # in place: the backbone object now trains
    if backbone.kind == "seq2seq":
        return Seq2SeqLM(backbone)
    return Classifier(backbone, num_labels, config.dropout)
