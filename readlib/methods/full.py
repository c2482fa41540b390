"""Full fine-tuning: every backbone weight (and the head, on the encoder path) is trained (READ Table 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from readlib.methods.head import MeanPoolHead, check_dropout

DEFAULT_LR = 5e-5


@dataclass
class Config:
    dropout: float = 0.1  # head dropout (encoder path)

    def validate(self) -> None:
        check_dropout("full", self.dropout)


class FullFineTune(nn.Module):
    def __init__(self, backbone, num_labels: int, config: Config):
        super().__init__()
        self.backbone = backbone
        self.encoder = backbone.model.requires_grad_(True)
        self.head = MeanPoolHead(backbone.hidden_size, num_labels, config.dropout)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        hidden = self.backbone.last_hidden_state(input_ids, attention_mask, token_type_ids)
        return self.head(hidden, attention_mask)


class FullFineTuneSeq2Seq(nn.Module):
    """Text-to-text: the whole T5 trained on target strings; returns LM logits [batch, n, vocab]."""

    def __init__(self, backbone):
        super().__init__()
        self.t5 = backbone.model.requires_grad_(True)

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> torch.Tensor:
        return self.t5(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       decoder_attention_mask=decoder_attention_mask).logits


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    if backbone.kind == "seq2seq":
        return FullFineTuneSeq2Seq(backbone)
    return FullFineTune(backbone, num_labels, config)
