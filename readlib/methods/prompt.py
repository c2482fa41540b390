"""Prompt tuning (Lester et al. 2021) — READ's "Prompt-tuning" baseline (Section 3.1, Table 1).

n trainable virtual-token embeddings P [n, d] are prepended to the input token embeddings; the attention mask
is extended with n ones. Only P is trained (plus the shared head on the encoder path); the backbone, its
embedding table and the T5 LM head stay frozen.

- T5, text-to-text: ``peft``'s prompt tuning (``PromptTuningConfig``, task ``SEQ_2_SEQ_LM``); the encoder sees
  [P; tokens], the decoder is unchanged. ``num_transformer_submodules=1``: peft's seq2seq default of 2 would
  allocate a second set of n prompts for the decoder, which prompt tuning never reads.
- Encoder path (BERT-like, T5 encoder): written here, because peft's ``FEATURE_EXTRACTION`` prompt tuning
  drops ``token_type_ids`` (it warns and passes None), which BERT's sentence-pair tasks need. Prompts get
  token type 0; on BERT the real tokens' absolute positions shift by n, as with peft (so inputs must be at
  most 512 - n tokens long). The head pools the real tokens only: the n prompt positions are dropped before
  the masked mean.

Choices: n = 20, READ Table 7's final choice among {10, 20, 30}. P is initialised from the embeddings of n
token ids drawn uniformly from the whole embedding table (peft's ``SAMPLE_VOCAB``; Lester et al. sample from the
5,000 most frequent tokens, a list we do not have for every tokenizer).

Unlike LoRA and BitFit, the model does not start at the frozen backbone: the prompts are attended to from the
first step. The backbone's parameters are untouched (only ``requires_grad`` stays False); the peft wrapper holds
``backbone.model`` as its base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from readlib.methods.head import MeanPoolHead, Seq2SeqLM, check_dropout

# Prompt tuning needs large steps: READ Table 8 lists 7.5e-4..3e-3 per task, mostly ~3e-3.
DEFAULT_LR = 3e-3


@dataclass
class Config:
    n_prompts: int = 20  # virtual tokens; READ Table 7 candidates {10, 20, 30}, final 20
    dropout: float = 0.1  # head dropout (encoder path)

    def validate(self) -> None:
        from readlib.errors import ConfigError

        if self.n_prompts < 1:
            raise ConfigError(f"prompt.n_prompts must be >= 1, got {self.n_prompts}")
        check_dropout("prompt", self.dropout)


class PromptTuning(nn.Module):
    """Encoder path: [P; tokens] through the frozen encoder, the head on the real tokens."""

    def __init__(self, backbone, num_labels: int, config: Config):
        super().__init__()
        self.frozen = backbone.model  # registered so .to(device) moves it; never trained
        table = self.frozen.get_input_embeddings().weight
        ids = torch.randint(0, table.shape[0], (config.n_prompts,), device=table.device)
        self.prompts = nn.Parameter(table[ids].detach().clone())  # P [n, d], sampled vocabulary embeddings
        self.head = MeanPoolHead(backbone.hidden_size, num_labels, config.dropout)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        batch, n = input_ids.shape[0], self.prompts.shape[0]
        tokens = self.frozen.get_input_embeddings()(input_ids)
        embeds = torch.cat([self.prompts.to(tokens.dtype).expand(batch, -1, -1), tokens], 1)
        ones = attention_mask.new_ones(batch, n)
        kwargs = {}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], 1)
        out = self.frozen(inputs_embeds=embeds, attention_mask=torch.cat([ones, attention_mask], 1), **kwargs)
        return self.head(out.last_hidden_state[:, n:], attention_mask)


class PromptTuningSeq2Seq(Seq2SeqLM):
    """T5 text-to-text through peft: LM logits [batch, n, vocab]."""

    def __init__(self, backbone, config: Config):
        nn.Module.__init__(self)
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        peft_config = PromptTuningConfig(
            task_type=TaskType.SEQ_2_SEQ_LM,
            num_virtual_tokens=config.n_prompts,
            num_transformer_submodules=1,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        )
        self.t5 = get_peft_model(backbone.model, peft_config)


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    if backbone.kind == "seq2seq":
        return PromptTuningSeq2Seq(backbone, config)
    return PromptTuning(backbone, num_labels, config)
