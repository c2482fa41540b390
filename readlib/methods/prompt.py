"""Prompt tuning (Lester et al. 2021) — READ's "Prompt-tuning" baseline (Section 3.1, Table 1).

n trainable virtual-token embeddings P [n, d] are prepended to the input token embeddings; the attention mask
is extended with n ones. Only P is trained (plus the shared head on the encoder path). T5 text-to-text goes
through ``peft``; the encoder path is written here because peft's ``FEATURE_EXTRACTION`` prompt tuning drops
``token_type_ids``, which BERT's sentence-pair tasks need.
See docs/methods/prompt.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from readlib.errors import ConfigError
from readlib.methods.base import MethodSpec
from readlib.methods.head import MeanPoolHead, Seq2SeqLM, check_dropout

# Prompt tuning needs large steps: READ Table 8 lists 7.5e-4..3e-3 per task, mostly ~3e-3.
DEFAULT_LR = 3e-3


@dataclass
class Config:
    n_prompts: int = field(default=20, metadata={
        "help": "virtual tokens; READ Table 7 candidates {10, 20, 30}, final 20"})
    dropout: float = field(default=0.1, metadata={"help": "head dropout (encoder path)"})

    def validate(self) -> None:
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
        # heavy (seconds to import): loaded when a model is built, so bad input fails fast
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        peft_config = PromptTuningConfig(
            task_type=TaskType.SEQ_2_SEQ_LM,
            num_virtual_tokens=config.n_prompts,
            num_transformer_submodules=1,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        )
        self.t5 = get_peft_model(backbone.model, peft_config)


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    if backbone.formulation == "text-to-text":
        return PromptTuningSeq2Seq(backbone, config)
    return PromptTuning(backbone, num_labels, config)


SPEC = MethodSpec("prompt", Config, DEFAULT_LR, build, checkpointing=True)
