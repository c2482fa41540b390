"""LoRA (Hu et al. 2021), through ``peft`` — READ's "LoRA" baseline (Section 3.1, Table 1).

Each targeted frozen weight W (the attention query and value projections) gets a trainable low-rank update:
``h = W x + (α / r) · B A x`` with A [r, d_in] (Kaiming-uniform) and B [d_out, r] (zero), so the adapted model
starts exactly at the frozen one. ``peft.inject_adapter_in_model`` changes ``backbone.model`` in place: build
each run on a freshly loaded backbone.
See docs/methods/lora.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from readlib.errors import ConfigError
from readlib.methods.base import MethodSpec
from readlib.methods.head import check_dropout, wrap

# LoRA is usually run at 1e-4..1e-3 (the LoRA paper's RoBERTa GLUE runs: 4e-4..5e-4; READ Table 8: 1.75e-4).
DEFAULT_LR = 5e-4
# by model_type; BERT-like encoders: query, value. GPT-2 fuses q, k, v into one Conv1D (c_attn): LoRA adapts all three.
TARGETS = {"t5": ["q", "v"], "opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
           "gpt2": ["c_attn"]}
BERT_TARGETS = ["query", "value"]


@dataclass
class Config:
    rank: int = field(default=32, metadata={"help": "rank r; READ Table 7 candidates {8, 16, 32}, final 32"})
    alpha: float = field(default=0.0, metadata={"help": "scale numerator α (scale α / r); 0: α = rank (scale 1)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    dropout: float = field(default=0.1, metadata={"help": "head dropout (encoder path)"})

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha < 0:
            raise ConfigError(f"lora.alpha must be >= 0 (0: alpha = rank), got {self.alpha}")
        check_dropout("lora", self.lora_dropout, "lora_dropout")
        check_dropout("lora", self.dropout)


def inject(model: nn.Module, config: Config) -> nn.Module:
    """Put LoRA into a transformers model in place; everything but lora_A / lora_B is frozen."""
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha or config.rank,
        lora_dropout=config.lora_dropout,
        target_modules=TARGETS.get(model.config.model_type, BERT_TARGETS),
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores W as [d_in, d_out]
    )
    return inject_adapter_in_model(lora, model)


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    inject(backbone.model, config)
    return wrap(backbone, num_labels, config.dropout)


SPEC = MethodSpec("lora", Config, DEFAULT_LR, build, formulations=("classification", "text-to-text", "causal-lm"),
                  checkpointing=True)
