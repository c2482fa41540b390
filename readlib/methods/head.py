"""The task head shared by every method on the encoder path, and the wrappers of an adapted backbone.

READ and its baselines are evaluated text-to-text on T5 in the paper; on an encoder we need a head.
Every method gets the same one so that only the adaptation differs: masked mean pooling over the
(corrected) last hidden state — MiniLM was trained with mean pooling and T5 has no [CLS] token —
then dropout and one linear layer (one output for regression).
See docs/methods/README.md.
"""

from __future__ import annotations

import torch
from torch import nn

from readlib.errors import ConfigError


def check_dropout(method: str, value: float, name: str = "dropout") -> None:
    """ConfigError unless ``value`` is a dropout probability in [0, 1)."""
    if not 0 <= value < 1:
        raise ConfigError(f"{method}.{name} must be in [0, 1), got {value}")


class MeanPoolHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden [batch, tokens, d], attention_mask [batch, tokens] -> logits [batch, num_labels]."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.out(self.dropout(pooled))


class Classifier(nn.Module):
    """A backbone trained or adapted in place (full, BitFit, LoRA) under the shared head: [batch, num_labels]."""

    def __init__(self, backbone, num_labels: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.encoder = backbone.model
        self.head = MeanPoolHead(backbone.hidden_size, num_labels, dropout)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        hidden = self.backbone.last_hidden_state(input_ids, attention_mask, token_type_ids)
        return self.head(hidden, attention_mask)


class Seq2SeqLM(nn.Module):
    """A T5 trained or adapted in place (full, BitFit, LoRA), text-to-text: LM logits [batch, n, vocab]."""

    def __init__(self, backbone):
        super().__init__()
        self.t5 = backbone.model

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> torch.Tensor:
        return self.t5(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       decoder_attention_mask=decoder_attention_mask).logits


class CausalLM(nn.Module):
    """A decoder-only LM trained or adapted in place (full, LoRA): next-token logits [targets, vocab] at the positions
    ``target_mask`` marks (``readlib.data.Encoded``), the frozen or trained LM head applied there only."""

    def __init__(self, backbone):
        super().__init__()
        self.lm = backbone.model

    def forward(self, input_ids, attention_mask, target_mask) -> torch.Tensor:
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.lm.get_output_embeddings()(hidden[target_mask])


def wrap(backbone, num_labels: int, dropout: float) -> nn.Module:
    """The backbone, adapted in place, as a model of its formulation: under the shared head (classification),
    as T5 text-to-text, or as a causal LM."""
    if backbone.formulation == "text-to-text":
        return Seq2SeqLM(backbone)
    if backbone.formulation == "causal-lm":
        return CausalLM(backbone)
    return Classifier(backbone, num_labels, dropout)
