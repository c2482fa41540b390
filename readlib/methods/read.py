"""READ: REcurrent ADaptation (Wang et al. 2023, arXiv 2305.15348), encoder part.

Written here because no maintained library implements READ. The frozen backbone T runs once with
no gradient and exposes its per-layer hidden states φ_1..φ_N (Algorithm 1, first line). A small RNN
N^E with weights shared across layers walks the *layer* axis, one independent sequence per token α:

    h_0^α = 0                                   ("embeddings need no corrections")
    h_i^α = N^E(φ_i^α, h_{i-1}^α),  i = 1..N    (Algorithm 1, encoder loop; eq. (1) with Φ = Ψ = 0)
    φ_N'^α = φ_N^α + W_o h_N^α                  (Algorithm 1, last line: adapted output)

Because φ_i comes out of ``torch.no_grad()``, backpropagation never enters T: nothing of the
backbone is stored for backward and no backbone parameter gets a gradient (Section 2.1).

Choices the paper leaves open, and ours:

- Joiner. Appendix B.1 sets Φ = Ψ = 0 in self-attention, so the encoder joiner reduces to
  x_i = φ_i: the RNN input is the cached hidden state itself (input size d).
- Output projection W_o. h_N has the RNN's size (128/256) and φ_N the backbone's d, so the
  correction needs an up-projection. We use one bias-free linear map d_h -> d shared across tokens,
  initialised to zero so the adapted model starts exactly at the frozen backbone (as LoRA does
  with its B matrix). Check against the paper: with GRU/256 on T5-base (d = 768) the encoder RNN
  plus W_o have 3(256·768 + 256·256 + 2·256) + 256·768 = 984,576 parameters; twice that (encoder
  and decoder) is 1.97 M, READ's count in Table 4.
- RNN initialisation: PyTorch's default (uniform ±1/sqrt(d_h)) — no pretraining, as the paper
  stresses. Cells: ``rnn`` (tanh), ``lstm``, ``gru``; Table 7 candidates GRU/256, GRU/128, LSTM/128.
- Padding. Only non-padding tokens go through the RNN (each token is an independent sequence over
  layers, so this changes nothing but the cost).
- Dropout. The backbone runs in eval mode (no dropout), so its states are a deterministic function
  of the input — the property that lets them be cached.
- Head. On the encoder path, the shared masked-mean-pool head (``readlib.methods.head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from readlib.methods.head import MeanPoolHead

DEFAULT_LR = 1e-3
CELLS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


@dataclass
class Config:
    rnn: str = "gru"  # READ Table 7 final choice: GRU
    hidden: int = 256  # RNN hidden size d_h; Table 7 final choice: 256
    dropout: float = 0.1  # head dropout

    def validate(self) -> None:
        from readlib.errors import ConfigError

        if self.rnn not in CELLS:
            raise ConfigError(f"read.rnn must be one of: {', '.join(CELLS)}; got '{self.rnn}'")
        if self.hidden < 1:
            raise ConfigError(f"read.hidden must be >= 1, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"read.dropout must be in [0, 1), got {self.dropout}")


def _cell_step(kind: str, x: torch.Tensor, state: torch.Tensor, weights, hidden: int) -> torch.Tensor:
    """One step of the cell; an LSTM state is [h, c] concatenated on the last axis."""
    if kind == "lstm":
        h, c = torch.lstm_cell(x, (state[..., :hidden], state[..., hidden:]), *weights)
        return torch.cat([h, c], -1)
    return (torch.gru_cell if kind == "gru" else torch.rnn_tanh_cell)(x, state, *weights)


class LayerRecurrence(torch.autograd.Function):
    """h_N of the recurrence s_i = cell(φ_i, s_{i-1}), s_0 = 0, over the layer axis.

    Stores for backward only φ (already held by READ) and the states s_0..s_N; each step's gate
    activations are recomputed in backward, one step at a time. PyTorch's fused nn.GRU on CPU
    instead keeps every gate of every step: 3.4x more bytes for GRU/256 on a MiniLM batch, and
    8x for an LSTM (measured by ``bench/read_vs_full.py`` and tests/test_methods.py).
    """

    @staticmethod
    def forward(ctx, kind: str, hidden: int, phi: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        width = 2 * hidden if kind == "lstm" else hidden
        states = phi.new_zeros(phi.shape[0] + 1, phi.shape[1], width)
        for i in range(phi.shape[0]):
            states[i + 1] = _cell_step(kind, phi[i], states[i], weights, hidden)
        ctx.kind, ctx.hidden = kind, hidden
        ctx.save_for_backward(phi, states, *weights)
        return states[-1, :, :hidden].clone()

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        phi, states, *weights = ctx.saved_tensors
        want_phi = ctx.needs_input_grad[2]
        grad_state = torch.zeros_like(states[0])
        grad_state[:, : ctx.hidden] = grad_h
        grad_weights = [torch.zeros_like(w) for w in weights]
        grad_phi = torch.zeros_like(phi) if want_phi else None
        for i in reversed(range(phi.shape[0])):
            with torch.enable_grad():
                x = phi[i].detach().requires_grad_(want_phi)
                s = states[i].detach().requires_grad_()
                w = [t.detach().requires_grad_() for t in weights]
                out = _cell_step(ctx.kind, x, s, w, ctx.hidden)
                grads = torch.autograd.grad(out, [s, *w] + ([x] if want_phi else []), grad_state)
            grad_state = grads[0]
            for total, g in zip(grad_weights, grads[1 : 1 + len(w)], strict=True):
                total += g
            if want_phi:
                grad_phi[i] = grads[-1]
        return None, None, grad_phi, *grad_weights


class READSideNetwork(nn.Module):
    """N^E and W_o: maps stacked layer states φ_1..φ_N [N, tokens, d] to corrections [tokens, d]."""

    def __init__(self, d_model: int, config: Config):
        super().__init__()
        self.kind, self.hidden = config.rnn, config.hidden
        self.cell = CELLS[config.rnn](d_model, config.hidden)  # holds N^E's weights, PyTorch's init
        self.up = nn.Linear(config.hidden, d_model, bias=False)  # W_o
        nn.init.zeros_(self.up.weight)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        cell = self.cell
        weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        h_last = LayerRecurrence.apply(self.kind, self.hidden, phi, *weights)  # h_N, with h_0 = 0
        return self.up(h_last)  # W_o h_N


class READ(nn.Module):
    def __init__(self, backbone, num_labels: int, config: Config):
        super().__init__()
        self.backbone = backbone
        self.frozen = backbone.model  # registered so .to(device) moves it; never trained
        self.side = READSideNetwork(backbone.hidden_size, config)
        self.head = MeanPoolHead(backbone.hidden_size, num_labels, config.dropout)

    def train(self, mode: bool = True) -> READ:
        super().train(mode)
        self.frozen.eval()  # the backbone never uses dropout (see module docstring)
        return self

    def layer_states(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """φ_1..φ_N of the non-padding tokens, [N, tokens, d], computed without gradient."""
        with torch.inference_mode():  # no autograd bookkeeping at all inside the backbone
            states = self.backbone.hidden_states(input_ids, attention_mask, token_type_ids)
        keep = attention_mask.bool()
        return torch.stack([phi[keep] for phi in states[1:]])  # a normal tensor: may be saved for backward

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        phi = self.layer_states(input_ids, attention_mask, token_type_ids)
        corrected = torch.zeros(*attention_mask.shape, phi.shape[-1], dtype=phi.dtype, device=phi.device)
        corrected[attention_mask.bool()] = phi[-1] + self.side(phi)  # φ_N' = φ_N + W_o h_N
        return self.head(corrected, attention_mask)


def build(backbone, num_labels: int, config: Config) -> READ:
    return READ(backbone, num_labels, config)
