"""READ: REcurrent ADaptation (Wang et al. 2023, arXiv 2305.15348), Algorithm 1.

The frozen backbone T runs once without gradient (``torch.inference_mode``) and hands over what Algorithm 1
caches: per-layer hidden states φ and, for the decoder, cross-attention scores σ. Small RNNs whose weights are
shared across layers walk the *layer* axis, one independent sequence per token α; backpropagation never
enters T (Section 2.1).

    h^E_i^α = N^E(φ^E_i^α, h^E_{i-1}^α),  h^E_0 = 0            (eq. (1) with Φ = Ψ = 0, Appendix B.1)
    ψ_j^α = Σ_β σ_{D,j}^{αβ} Ψ h^E_{N_E,β},  h^D_j^α = N^D(φ^D_j^α + ψ_j^α, h^D_{j-1}^α)    (eq. (17) reduced)
    φ'_N = φ_N + W_o h_N                     (W_o zero-initialised: training starts at the frozen backbone)

A decoder-only LM (GPT-2, OPT, Llama, Qwen2: ``READCausal``) has one stack and no cross-attention, so it takes the
encoder's recursion (Ψ = 0): N walks φ_1..φ_N of each position whose next token is a target (causal attention has
already mixed the prompt into those states) and the frozen LM head reads φ'_N. Only those positions are kept or
cached: one row per target token, not per prompt token.

Options from the authors' public code (off by default, so the defaults are Algorithm 1 exactly): a learnable
RMSNorm of each φ_i before N (``state_norm``), a bias and a fixed factor on the correction, φ'_N = φ_N +
s (W_o h + b_o) (``output_bias``, ``output_scale``), and the mean of h_1..h_N instead of h_N (``combine``).

Written here because no maintained library implements READ.
See docs/methods/read.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from readlib.backbones import drop_last_layers
from readlib.errors import ConfigError
from readlib.methods.base import FrozenBackbone, MethodSpec
from readlib.methods.head import MeanPoolHead, check_dropout

DEFAULT_LR = 1e-3
CELLS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
JOINERS = ("paper", "gated")
COMBINES = ("last", "mean")
NORM_EPS = 1e-6  # the authors' RMSNorm (their T5LayerNorm) default


@dataclass
class Config:
    rnn: str = field(default="gru", metadata={
        "help": "recurrent cell N: rnn | lstm | gru (READ Table 7 final choice: gru)"})
    hidden: int = field(default=256, metadata={"help": "RNN hidden size d_h; Table 7 final choice: 256"})
    dropout: float = field(default=0.1, metadata={"help": "head dropout (encoder path)"})
    drop_layers: int = field(default=0, metadata={
        "help": "drop the backbone's last k encoder and decoder layers (Appendix C.2: 4 for T5-large)"})
    joiner: str = field(default="paper", metadata={
        "help": "'paper': Appendix B.1 (eq. 1 reduced); 'gated': eq. (18), the paper's future work"})
    state_norm: bool = field(default=False, metadata={
        "help": "learnable RMSNorm (weight 1 at start, eps 1e-6) of each φ_i before N; authors' code"})
    output_bias: bool = field(default=False, metadata={
        "help": "W_o gets a bias b_o (zero at start, like W_o); the authors' projection has one"})
    output_scale: float = field(default=1.0, metadata={
        "help": "fixed factor s on the correction s (W_o h + b_o); authors' outputs_scaling_factor"})
    combine: str = field(default="last", metadata={
        "help": "'last': h_N (Algorithm 1); 'mean': (h_1 + ... + h_N) / N, the authors' agg_type='mean'"})

    def validate(self) -> None:
        if self.rnn not in CELLS:
            raise ConfigError(f"read.rnn must be one of: {', '.join(CELLS)}; got '{self.rnn}'")
        if self.hidden < 1:
            raise ConfigError(f"read.hidden must be >= 1, got {self.hidden}")
        check_dropout("read", self.dropout)
        if self.drop_layers < 0:
            raise ConfigError(f"read.drop_layers must be >= 0, got {self.drop_layers}")
        if self.joiner not in JOINERS:
            raise ConfigError(f"read.joiner must be one of: {', '.join(JOINERS)}; got '{self.joiner}'")
        if not 0 < self.output_scale < math.inf:
            raise ConfigError(f"read.output_scale must be a positive finite number, got {self.output_scale}")
        if self.combine not in COMBINES:
            raise ConfigError(f"read.combine must be one of: {', '.join(COMBINES)}; got '{self.combine}'")


def _cell_step(kind: str, x: torch.Tensor, state: torch.Tensor, weights, hidden: int) -> torch.Tensor:
    """One step of the cell; an LSTM state is [h, c] concatenated on the last axis."""
    if kind == "lstm":
        h, c = torch.lstm_cell(x, (state[..., :hidden], state[..., hidden:]), *weights)
        return torch.cat([h, c], -1)
    return (torch.gru_cell if kind == "gru" else torch.rnn_tanh_cell)(x, state, *weights)


class LayerRecurrence(torch.autograd.Function):
    """h_N (combine "last") or (h_1 + ... + h_N) / N ("mean") of the recurrence s_i = cell(φ_i, s_{i-1}),
    s_0 = 0, over the layer axis.

    Stores for backward only φ (already held by READ) and the states s_0..s_N; each step's gate
    activations are recomputed in backward, one step at a time. PyTorch's fused nn.GRU on CPU
    instead keeps every gate of every step: 3.0x more bytes for GRU/256 on a MiniLM batch (204 vs 68 MiB), and
    5.9x for an LSTM (563 vs 96 MiB; batch 32 x 128, φ included).
    """

    @staticmethod
    def forward(ctx, kind: str, hidden: int, combine: str, phi: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        width = 2 * hidden if kind == "lstm" else hidden
        states = phi.new_zeros(phi.shape[0] + 1, phi.shape[1], width)
        for i in range(phi.shape[0]):
            states[i + 1] = _cell_step(kind, phi[i], states[i], weights, hidden)
        ctx.kind, ctx.hidden, ctx.combine = kind, hidden, combine
        ctx.save_for_backward(phi, states, *weights)
        if combine == "mean":
            return states[1:, :, :hidden].mean(0)
        return states[-1, :, :hidden].clone()

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        phi, states, *weights = ctx.saved_tensors
        want_phi = ctx.needs_input_grad[3]
        grad_state = torch.zeros_like(states[0])
        if ctx.combine == "last":
            grad_state[:, : ctx.hidden] = grad_h
        grad_step = grad_h / phi.shape[0]  # "mean": every h_i receives 1/N of the output's gradient
        grad_weights = [torch.zeros_like(w) for w in weights]
        grad_phi = torch.zeros_like(phi) if want_phi else None
        for i in reversed(range(phi.shape[0])):
            if ctx.combine == "mean":
                grad_state[:, : ctx.hidden] += grad_step
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
        return None, None, None, grad_phi, *grad_weights


class LayerRNN(nn.Module):
    """An RNN N whose weights are shared across layers, run over the layer axis: [N, tokens, d] -> h_N.

    ``context`` [N, tokens, d] is added to the (normalised) states: the decoder's joiner x_j = φ_j + ψ_j.
    """

    def __init__(self, d_model: int, config: Config):
        super().__init__()
        self.kind, self.hidden, self.combine = config.rnn, config.hidden, config.combine
        self.cell = CELLS[config.rnn](d_model, config.hidden)  # holds N's weights, PyTorch's init
        self.norm = state_norm(d_model, config)

    def forward(self, phi: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        cell = self.cell
        weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        x = phi if self.norm is None else self.norm(phi)
        x = x if context is None else x + context
        return LayerRecurrence.apply(self.kind, self.hidden, self.combine, x, *weights)  # h_N, with h_0 = 0


def state_norm(d_model: int, config: Config) -> nn.RMSNorm | None:
    """The authors' RMSNorm of the layer states, φ / sqrt(mean_k φ_k^2 + 1e-6) ⊙ g with g [d] starting at 1,
    shared across layers (one per RNN); None for the paper's READ."""
    return nn.RMSNorm(d_model, eps=NORM_EPS) if config.state_norm else None


def combine_steps(steps: list[torch.Tensor], combine: str) -> torch.Tensor:
    """What N hands to W_o: h_N ("last", Algorithm 1) or the mean of h_1..h_N ("mean")."""
    return torch.stack(steps).mean(0) if combine == "mean" else steps[-1]


class GatedLayerRNN(nn.Module):
    """N with the gated joiner of eq. (18), run over the layer axis: [N, tokens, d] -> h_N.

        x_i^α = φ_i^α + Gate(φ_i^α) ⊙ (FFN(h_{i-1}^α) + c_i^α),   h_i^α = N(x_i^α, h_{i-1}^α)

    Gate(φ) = sigmoid(W_g φ + b_g); FFN = Linear(d_h, d_h) -> GELU -> Linear(d_h, d), the last layer
    zero-initialised so x_i = φ_i at the start, as with the paper's joiner. ``c_i`` is the decoder's
    cross-attention term Σ_β σ^{αβ} FFN^E(h^E_β) (None in the encoder, where Ψ = 0 as in Appendix B.1, so
    tokens stay independent). The input now depends on h_{i-1}, so the loop runs under plain autograd.
    With ``state_norm`` φ_i is normalised first, for the gate as for the sum.
    """

    def __init__(self, d_model: int, config: Config):
        super().__init__()
        self.kind, self.hidden, self.combine = config.rnn, config.hidden, config.combine
        self.cell = CELLS[config.rnn](d_model, config.hidden)
        self.gate = nn.Linear(d_model, d_model)
        self.ffn = feed_forward(config.hidden, d_model)
        self.norm = state_norm(d_model, config)

    def forward(self, phi: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        cell = self.cell
        weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        width = 2 * self.hidden if self.kind == "lstm" else self.hidden
        phi = phi if self.norm is None else self.norm(phi)
        state = phi.new_zeros(phi.shape[1], width)
        steps = []
        for i in range(phi.shape[0]):
            mix = self.ffn(state[:, : self.hidden]) + (0 if context is None else context[i])
            x = phi[i] + torch.sigmoid(self.gate(phi[i])) * mix  # eq. (18), Φ and Ψ terms
            state = _cell_step(self.kind, x, state, weights, self.hidden)
            steps.append(state[:, : self.hidden])
        return combine_steps(steps, self.combine)


def output_projection(config: Config, d_model: int) -> nn.Linear:
    """W_o: d_h -> d (with b_o if ``output_bias``), zero: training starts at the frozen backbone.

    b_o is attached after nn.Linear's init, so it draws no random numbers: with the same seed every variant's
    other modules (the head) start from the same weights.
    """
    up = nn.Linear(config.hidden, d_model, bias=False)
    nn.init.zeros_(up.weight)
    if config.output_bias:
        up.bias = nn.Parameter(torch.zeros(d_model))
    return up


def feed_forward(hidden: int, d_model: int) -> nn.Sequential:
    """FFN of eq. (18): d_h -> d_h -> d with GELU; the output layer starts at zero."""
    ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d_model))
    nn.init.zeros_(ffn[2].weight)
    nn.init.zeros_(ffn[2].bias)
    return ffn


class GatedSideNetwork(GatedLayerRNN):
    """Encoder-path side network with the gated joiner: corrections s (W_o h_N + b_o) [tokens, d]."""

    def __init__(self, d_model: int, config: Config):
        super().__init__(d_model, config)
        self.up, self.scale = output_projection(config, d_model), config.output_scale  # W_o (b_o), s

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(super().forward(phi))


class READSideNetwork(LayerRNN):
    """N^E and W_o: maps stacked layer states φ_1..φ_N [N, tokens, d] to corrections W_o h_N [tokens, d].

    With the authors' options: s (W_o h + b_o), h = h_N or the mean of h_1..h_N; s = 1 and no b_o by default.
    """

    def __init__(self, d_model: int, config: Config):
        super().__init__(d_model, config)
        self.up, self.scale = output_projection(config, d_model), config.output_scale  # W_o (b_o), s

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(super().forward(phi))


class READ(FrozenBackbone):
    """Encoder READ with the shared classification head."""

    def __init__(self, backbone, num_labels: int, config: Config):
        super().__init__(backbone)
        side = GatedSideNetwork if config.joiner == "gated" else READSideNetwork
        self.side = side(backbone.hidden_size, config)
        self.head = MeanPoolHead(backbone.hidden_size, num_labels, config.dropout)

    def cache_layout(self, split) -> dict[str, tuple[list[int], int, int]]:
        """Rows per example (its real tokens), layers and width of φ_1..φ_N, for ``readlib.cache``."""
        return {"phi": ([len(ids) for ids in split.input_ids], self.backbone.num_layers, self.backbone.hidden_size)}

    def features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """φ_1..φ_N of the non-padding tokens, [N, tokens, d], computed without gradient.

        Everything READ needs from the backbone, so ``readlib.cache`` can store it once.
        """
        with torch.inference_mode():  # no autograd bookkeeping at all inside the backbone
            states = self.backbone.hidden_states(input_ids, attention_mask, token_type_ids)
        keep = attention_mask.bool()
        return torch.stack([phi[keep] for phi in states[1:]])  # a normal tensor: may be saved for backward

    def forward_features(self, phi: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from cached states ``phi`` [N, tokens, d] of the batch's non-padding tokens."""
        corrected = torch.zeros(*attention_mask.shape, phi.shape[-1], dtype=phi.dtype, device=phi.device)
        corrected[attention_mask.bool()] = phi[-1] + self.side(phi)  # φ_N' = φ_N + W_o h_N
        return self.head(corrected, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.forward_features(self.features(input_ids, attention_mask, token_type_ids), attention_mask)


class READSeq2Seq(FrozenBackbone):
    """Encoder–decoder READ, Algorithm 1 line by line; the frozen LM head reads the adapted output."""

    def __init__(self, backbone, config: Config):
        super().__init__(backbone)  # self.frozen: T5ForConditionalGeneration
        d = backbone.hidden_size
        self.gated = config.joiner == "gated"
        rnn = GatedLayerRNN if self.gated else LayerRNN
        self.encoder_rnn = rnn(d, config)  # N^E
        # Ψ, the learnable projection; with the gated joiner FFN^E of eq. (18)
        self.psi = feed_forward(config.hidden, d) if self.gated else nn.Linear(config.hidden, d, bias=False)
        self.decoder_rnn = rnn(d, config)  # N^D
        self.up, self.scale = output_projection(config, d), config.output_scale  # W_o (b_o), zero; s

    def cached_states(self, input_ids, attention_mask, decoder_input_ids):
        """Algorithm 1, line 2: one backbone pass without gradient.

        Returns φ^E_1..φ^E_{N_E} of the non-padding source tokens [N_E, tokens, d], φ^D_1..φ^D_{N_D}
        [N_D, batch, n, d] and the cross-attention scores σ^D_1..σ^D_{N_D} averaged over heads
        [N_D, batch, n, m]. (Encoder self-attention scores σ^E are not needed: Φ = Ψ = 0 there.)
        """
        with torch.inference_mode():
            out = self.frozen(input_ids=input_ids, attention_mask=attention_mask,
                              decoder_input_ids=decoder_input_ids, output_hidden_states=True,
                              output_attentions=True)
        keep = attention_mask.bool()
        phi_e = torch.stack([h[keep] for h in out.encoder_hidden_states[1:]])
        phi_d = torch.stack(out.decoder_hidden_states[1:])
        sigma = torch.stack([a.mean(1) for a in out.cross_attentions])
        return phi_e, phi_d, sigma

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None) -> torch.Tensor:
        """LM logits [batch, n, vocab] of the adapted decoder output."""
        phi_e, phi_d, sigma = self.cached_states(input_ids, attention_mask, decoder_input_ids)
        return self.adapt(phi_e, phi_d, sigma, attention_mask)

    def adapt(self, phi_e, phi_d, sigma, attention_mask) -> torch.Tensor:
        """Algorithm 1 after the backbone pass: the two RNNs, the joiner, the frozen LM head."""
        h_e = self.encoder_rnn(phi_e)  # h^E_{N_E,β} = N^E over φ^E_1..φ^E_{N_E}, h^E_0 = 0
        proj = h_e.new_zeros(*attention_mask.shape, phi_d.shape[-1])
        proj[attention_mask.bool()] = self.psi(h_e)  # Ψ h^E_{N_E,β}; padding positions have σ = 0
        psi = sigma @ proj  # ψ_j^α = Σ_β σ_{D,j}^{αβ} Ψ h^E_{N_E,β}, for every decoder layer j
        n_layers, batch, n, d = phi_d.shape
        # paper joiner: x_j^α = φ_j^α + ψ_j^α (plain addition, Appendix B.1), h^D_j = N^D(x_j, h^D_{j-1});
        # gated: x_j = φ_j + Gate(φ_j) ⊙ (FFN^D(h^D_{j-1}) + ψ_j), eq. (18). state_norm normalises φ_j, not ψ_j.
        h_d = self.decoder_rnn(phi_d.reshape(n_layers, batch * n, d), psi.reshape(n_layers, batch * n, d))
        adapted = phi_d[-1] + self.scale * self.up(h_d).reshape(batch, n, d)  # φ^D'_{N_D} = φ^D_{N_D} + W_o h^D_{N_D}
        return lm_logits(self.frozen, adapted)

    # --- hidden-state cache (readlib.cache): what the backbone pass gives, stored per example ---

    def cache_layout(self, split) -> dict[str, tuple[list[int], int, int]]:
        """Rows per example, layers and width of φ^E (source tokens), φ^D (target tokens) and σ (pairs)."""
        source = [len(ids) for ids in split.input_ids]
        target = [len(ids) for ids in split.targets]
        n_e, n_d = len(self.frozen.encoder.block), len(self.frozen.decoder.block)
        d = self.frozen.config.d_model
        pairs = [m * n for m, n in zip(source, target, strict=True)]
        return {"phi_e": (source, n_e, d), "phi_d": (target, n_d, d), "sigma": (pairs, n_d, 1)}

    def features(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> dict:
        """The backbone pass as cache rows: φ^E, φ^D of real tokens, σ of real (target, source) pairs."""
        phi_e, phi_d, sigma = self.cached_states(input_ids, attention_mask, decoder_input_ids)
        lengths = zip(attention_mask.sum(1).tolist(), decoder_attention_mask.sum(1).tolist(), strict=True)
        pairs = [sigma[:, b, :n, :m].reshape(sigma.shape[0], -1) for b, (m, n) in enumerate(lengths)]
        return {"phi_e": phi_e, "phi_d": phi_d[:, decoder_attention_mask.bool()],
                "sigma": torch.cat(pairs, 1).unsqueeze(-1)}

    def forward_features(self, features: dict, attention_mask, decoder_attention_mask) -> torch.Tensor:
        """Logits from cached rows (``features`` as stored); the same numbers as ``forward``."""
        keep_d = decoder_attention_mask.bool()
        phi_d = features["phi_d"].new_zeros(features["phi_d"].shape[0], *keep_d.shape, features["phi_d"].shape[-1])
        phi_d[:, keep_d] = features["phi_d"]
        sigma = phi_d.new_zeros(phi_d.shape[0], *keep_d.shape, attention_mask.shape[1])
        start = 0
        lengths = zip(attention_mask.sum(1).tolist(), decoder_attention_mask.sum(1).tolist(), strict=True)
        for b, (m, n) in enumerate(lengths):
            sigma[:, b, :n, :m] = features["sigma"][:, start : start + n * m, 0].reshape(-1, n, m)
            start += n * m
        return self.adapt(features["phi_e"], phi_d, sigma, attention_mask)


class READCausal(FrozenBackbone):
    """READ on a decoder-only LM: logits [targets, vocab] of the next tokens at the positions ``target_mask`` marks.

        h_i^α = N(φ_i^α, h_{i-1}^α),  φ'_N^α = φ_N^α + W_o h_N^α,  logits^α = LMHead(φ'_N^α)   (α: a target position)

    φ_N is the stack's output after its final norm (what the LM head reads), φ_1..φ_{N-1} the residual stream, as
    T5's φ^D. The LM head stays frozen (tied to the embeddings on GPT-2, OPT and Qwen2).
    """

    def __init__(self, backbone, config: Config):
        super().__init__(backbone)
        side = GatedSideNetwork if config.joiner == "gated" else READSideNetwork
        self.side = side(backbone.hidden_size, config)

    def cache_layout(self, split) -> dict[str, tuple[list[int], int, int]]:
        """Rows per example (its target tokens), layers and width of φ_1..φ_N, for ``readlib.cache``."""
        return {"phi": (split.target_rows(), self.backbone.num_layers, self.backbone.hidden_size)}

    def features(self, input_ids, attention_mask, target_mask) -> torch.Tensor:
        """φ_1..φ_N at the target positions, [N, targets, d], computed without gradient (one backbone pass)."""
        with torch.inference_mode():
            states = self.backbone.hidden_states(input_ids, attention_mask)
        return torch.stack([phi[target_mask] for phi in states[1:]])  # a normal tensor: may be saved for backward

    def forward_features(self, phi: torch.Tensor, attention_mask, target_mask) -> torch.Tensor:
        """Next-token logits [targets, vocab] from the states ``phi`` [N, targets, d] (cached or just computed)."""
        return self.frozen.get_output_embeddings()(phi[-1] + self.side(phi))  # LMHead(φ_N + W_o h_N)

    def forward(self, input_ids, attention_mask, target_mask) -> torch.Tensor:
        return self.forward_features(self.features(input_ids, attention_mask, target_mask), attention_mask,
                                     target_mask)


def lm_logits(t5, hidden: torch.Tensor) -> torch.Tensor:
    """T5's LM head on a final decoder state, with the model's output scaling for tied embeddings."""
    if t5.config.scale_decoder_outputs:
        hidden = hidden * t5.config.d_model**-0.5
    return t5.lm_head(hidden)


def build(backbone, num_labels: int, config: Config) -> nn.Module:
    if backbone.formulation == "causal-lm":
        if config.drop_layers:  # φ_N must stay the stack's normalised output, the one the LM head was trained on
            raise ConfigError("read.drop_layers applies to encoders and T5, not to a decoder-only LM")
        return READCausal(backbone, config)
    if config.drop_layers:
        drop_last_layers(backbone, config.drop_layers)
    if backbone.formulation == "text-to-text":
        return READSeq2Seq(backbone, config)
    return READ(backbone, num_labels, config)


SPEC = MethodSpec("read", Config, DEFAULT_LR, build, trains_from_cache=True,
                  formulations=("classification", "text-to-text", "causal-lm"), quantizable=True)
