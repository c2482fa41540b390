"""Numeric check of the READ derivation (paper Appendix A): corrections of a perturbed transformer, to first order.

A tiny float64 transformer is perturbed by a LoRA update of scale ε on its feed-forward layers; the true
corrections ``δφ_i = φ'_i − φ_i`` (Definition 2.1) are compared with the first-order recursion of eq. (6)/(11)::

    δφ_i ≈ ε ∂_ε R'_i(φ_{i-1}) + JR_i(φ_{i-1}) δφ_{i-1} + δφ_{i-1},   JA^α δx = Φ^α δx^α + Σ_β σ^{αβ} Ψ^{αβ} δx^β

for self-attention (eq. (15)) and cross-attention (eq. (17)). If the derivation is right the gap is O(ε²):
:func:`gap_vs_epsilon` tabulates it and :func:`loglog_slope` fits a slope ≈ 2 (≈ 1 without the Jacobian term).

Hand-written because no library exposes the attention Jacobian in the factored form Φ, Ψ of eq. (13)-(15);
autograd (``torch.func.jvp``) is used only in the tests, as an independent check of these formulas.
See docs/derivation.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from torch import Tensor

DTYPE = torch.float64
LN_EPS = 1e-5  # LayerNorm variance floor
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715
KINDS = ("self", "cross")


# ----------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class LayerNormParams:
    """LN(x) = gain ⊙ (x − mean x) / sqrt(var x + LN_EPS) + bias, per token."""

    gain: Tensor  # (d,)
    bias: Tensor  # (d,)


@dataclass(frozen=True)
class AttentionParams:
    """Single-head attention without output projection: q^α = W_Q x_q^α, k^β = W_K x_kv^β, v^β = W_V x_kv^β."""

    w_q: Tensor  # (d, d)
    w_k: Tensor  # (d, d)
    w_v: Tensor  # (d, d)


@dataclass(frozen=True)
class LoRA:
    """Low-rank update ε · up @ down of one weight matrix (LoRA's B A, with fixed random A and B)."""

    down: Tensor  # A: (rank, d_in)
    up: Tensor  # B: (d_out, rank)

    @property
    def delta(self) -> Tensor:
        """B A, the direction of the weight update (d_out, d_in)."""
        return self.up @ self.down


@dataclass(frozen=True)
class FFNParams:
    """F(x) = W_out g(W_in x + b_in) + b_out, with a LoRA update on W_in and on W_out."""

    w_in: Tensor  # (d_ff, d)
    b_in: Tensor  # (d_ff,)
    w_out: Tensor  # (d, d_ff)
    b_out: Tensor  # (d,)
    lora_in: LoRA
    lora_out: LoRA


@dataclass(frozen=True)
class EncoderLayer:
    """L_i = (F*_i + I) ∘ A*_i + I, eq. (5)."""

    ln_attn: LayerNormParams
    attn: AttentionParams
    ln_ffn: LayerNormParams
    ffn: FFNParams


@dataclass(frozen=True)
class DecoderLayer:
    """L^D_j = (F*_j + I) ∘ (C*_j(·, φ^E) + I) ∘ A*_j + I: self-attention, cross-attention, FFN."""

    ln_self: LayerNormParams
    self_attn: AttentionParams
    ln_cross: LayerNormParams  # on the decoder side (queries)
    ln_memory: LayerNormParams  # on the encoder output φ^E (keys and values)
    cross_attn: AttentionParams
    ln_ffn: LayerNormParams
    ffn: FFNParams


@dataclass(frozen=True)
class TinyTransformer:
    """An encoder stack, a decoder stack, and the fixed input hidden states φ^E_0, φ^D_0 they run on."""

    encoder: tuple[EncoderLayer, ...]
    decoder: tuple[DecoderLayer, ...]
    enc_input: Tensor  # φ^E_0: (m_E, d)
    dec_input: Tensor  # φ^D_0: (m_D, d)


@dataclass(frozen=True)
class Stacks:
    """Per-layer tensors of both stacks, index i = layer i; entry 0 is the input (or its correction, 0)."""

    encoder: list[Tensor]
    decoder: list[Tensor]


def make_transformer(n_layers: int = 3, d_model: int = 16, seq_len: int = 5, d_ff: int | None = None,
                     rank: int = 2, dec_len: int | None = None, seed: int = 0) -> TinyTransformer:
    """Random float64 weights and inputs: n_layers encoder and n_layers decoder layers.

    d_ff defaults to 4 d_model; the decoder sequence has dec_len tokens (default seq_len + 1, so that
    cross-attention scores are rectangular). Weights are scaled by 1/sqrt(fan-in), LayerNorm gains are
    near 1 and biases near 0 but not equal, so no term of the Jacobians vanishes by symmetry.
    """
    d_ff = 4 * d_model if d_ff is None else d_ff
    dec_len = seq_len + 1 if dec_len is None else dec_len
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=gen, dtype=DTYPE)

    def layer_norm_params() -> LayerNormParams:
        return LayerNormParams(1.0 + randn(d_model, scale=0.1), randn(d_model, scale=0.1))

    def attention_params() -> AttentionParams:
        return AttentionParams(*(randn(d_model, d_model, scale=d_model**-0.5) for _ in range(3)))

    def lora(d_out: int, d_in: int) -> LoRA:
        return LoRA(down=randn(rank, d_in, scale=d_in**-0.5), up=randn(d_out, rank, scale=rank**-0.5))

    def ffn_params() -> FFNParams:
        return FFNParams(w_in=randn(d_ff, d_model, scale=d_model**-0.5), b_in=randn(d_ff, scale=0.1),
                         w_out=randn(d_model, d_ff, scale=d_ff**-0.5), b_out=randn(d_model, scale=0.1),
                         lora_in=lora(d_ff, d_model), lora_out=lora(d_model, d_ff))

    encoder = tuple(EncoderLayer(layer_norm_params(), attention_params(), layer_norm_params(), ffn_params())
                    for _ in range(n_layers))
    decoder = tuple(DecoderLayer(layer_norm_params(), attention_params(), layer_norm_params(), layer_norm_params(),
                                 attention_params(), layer_norm_params(), ffn_params())
                    for _ in range(n_layers))
    return TinyTransformer(encoder, decoder, enc_input=randn(seq_len, d_model), dec_input=randn(dec_len, d_model))


# ------------------------------------------------------------------------------------------ building blocks


def apply_tokenwise(jac: Tensor, dx: Tensor) -> Tensor:
    """Apply one (d_out, d_in) matrix per token: jac (m, d_out, d_in), dx (m, d_in) -> (m, d_out)."""
    return torch.einsum("aij,aj->ai", jac, dx)


def layer_norm(x: Tensor, p: LayerNormParams) -> Tensor:
    """LN over the last dimension (population variance), then gain and bias."""
    centred = x - x.mean(-1, keepdim=True)
    return p.gain * centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + LN_EPS) + p.bias


def layer_norm_jacobian(x: Tensor, p: LayerNormParams) -> Tensor:
    """JLN at x, one (d, d) matrix per token: diag(gain) (I − 11ᵀ/d − x̂ x̂ᵀ/d) / s, x̂ = (x − μ)/s.

    Here s = sqrt(var x + LN_EPS); the three terms are the identity, the mean and the variance paths.
    """
    d = x.shape[-1]
    centred = x - x.mean(-1, keepdim=True)
    s = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + LN_EPS)  # (m, 1)
    x_hat = centred / s
    eye = torch.eye(d, dtype=x.dtype)
    jac = (eye - 1.0 / d - x_hat[:, :, None] * x_hat[:, None, :] / d) / s[:, :, None]
    return p.gain[:, None] * jac


@dataclass(frozen=True)
class AttentionCache:
    """What the unperturbed pass caches at one attention map: the inputs of eq. (13)-(15)."""

    q: Tensor  # (m_q, d)
    k: Tensor  # (m_k, d)
    v: Tensor  # (m_k, d)
    sigma: Tensor  # σ^{αβ} = softmax_β(q^α·k^β / √d): (m_q, m_k)
    out: Tensor  # A^α = Σ_β σ^{αβ} v^β: (m_q, d)


def attention(x_q: Tensor, x_kv: Tensor, p: AttentionParams) -> AttentionCache:
    """Single-head attention of queries x_q (m_q, d) over keys/values x_kv (m_k, d); self-attention: x_kv = x_q."""
    q, k, v = x_q @ p.w_q.T, x_kv @ p.w_k.T, x_kv @ p.w_v.T
    sigma = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1)
    return AttentionCache(q, k, v, sigma, sigma @ v)


def attention_jacobians(cache: AttentionCache, p: AttentionParams) -> tuple[Tensor, Tensor]:
    """Φ and Ψ of eq. (13)-(15), from cached q, k, v, σ, A only.

    Φ^α = Σ_β σ^{αβ} (v^β − A^α) k^βᵀ W_Q / √d          (m_q, d, d), acts on the query move δx^α;
    Ψ^{αβ} = (v^β − A^α) q^αᵀ W_K / √d + W_V              (m_q, m_k, d, d), acts on the key/value move δx^β.

    Ψ depends on α and β through (v^β − A^α) and q^α; the paper's Ψ is this family of matrices.
    """
    scale = math.sqrt(cache.q.shape[-1])
    diff = cache.v[None, :, :] - cache.out[:, None, :]  # v^β − A^α: (m_q, m_k, d)
    phi = torch.einsum("ab,abi,bj,jk->aik", cache.sigma, diff, cache.k, p.w_q) / scale
    psi = torch.einsum("abi,aj,jk->abik", diff, cache.q, p.w_k) / scale + p.w_v
    return phi, psi


def attention_jvp(cache: AttentionCache, phi: Tensor, psi: Tensor, dx_q: Tensor, dx_kv: Tensor) -> Tensor:
    """JA^α (δx_q, δx_kv) = Φ^α δx_q^α + Σ_β σ^{αβ} Ψ^{αβ} δx_kv^β, eq. (15) (self) and (17) (cross)."""
    return apply_tokenwise(phi, dx_q) + torch.einsum("ab,abij,bj->ai", cache.sigma, psi, dx_kv)


def gelu_tanh(z: Tensor) -> Tensor:
    """GELU, tanh approximation: z/2 (1 + tanh(c (z + a z³)))."""
    return 0.5 * z * (1.0 + torch.tanh(GELU_C * (z + GELU_A * z**3)))


def gelu_tanh_derivative(z: Tensor) -> Tensor:
    """d gelu_tanh / dz, elementwise."""
    t = torch.tanh(GELU_C * (z + GELU_A * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t**2) * GELU_C * (1.0 + 3.0 * GELU_A * z**2)


def ffn(x: Tensor, p: FFNParams, eps: float = 0.0) -> Tensor:
    """F'(x) with LoRA of scale ε on both matrices: (W_out + ε B A) g((W_in + ε B A) x + b_in) + b_out."""
    w_in = p.w_in + eps * p.lora_in.delta
    w_out = p.w_out + eps * p.lora_out.delta
    return gelu_tanh(x @ w_in.T + p.b_in) @ w_out.T + p.b_out


def ffn_jacobian(x: Tensor, p: FFNParams) -> Tensor:
    """JF at x (unperturbed), one (d, d) matrix per token: W_out diag(g'(z)) W_in, z = W_in x + b_in."""
    slope = gelu_tanh_derivative(x @ p.w_in.T + p.b_in)  # (m, d_ff)
    return torch.einsum("ok,ak,ki->aoi", p.w_out, slope, p.w_in)


def ffn_lora_derivative(x: Tensor, p: FFNParams) -> Tensor:
    """∂_ε F'(x) at ε = 0: (B A)_out g(z) + W_out (g'(z) ⊙ (B A)_in x); ε times this is W_i φ of eq. (7)."""
    z = x @ p.w_in.T + p.b_in
    return gelu_tanh(z) @ p.lora_out.delta.T + (gelu_tanh_derivative(z) * (x @ p.lora_in.delta.T)) @ p.w_out.T


# ------------------------------------------------------------------------------------------------- layers


def encoder_layer(layer: EncoderLayer, phi: Tensor, eps: float = 0.0) -> Tensor:
    """Eq. (5): L_i(φ) = φ + A*(φ) + F*(A*(φ)), with the FFN perturbed by LoRA of scale ε."""
    x = layer_norm(phi, layer.ln_attn)
    a = attention(x, x, layer.attn).out
    return phi + a + ffn(layer_norm(a, layer.ln_ffn), layer.ffn, eps)


def decoder_layer(layer: DecoderLayer, phi: Tensor, memory: Tensor, eps: float = 0.0) -> Tensor:
    """L^D(φ) = φ + t + F*(t), t = s + C*(s, φ^E), s = A*(φ): eq. (5) with cross-attention to memory = φ^E."""
    x = layer_norm(phi, layer.ln_self)
    s = attention(x, x, layer.self_attn).out
    t = s + attention(layer_norm(s, layer.ln_cross), layer_norm(memory, layer.ln_memory), layer.cross_attn).out
    return phi + t + ffn(layer_norm(t, layer.ln_ffn), layer.ffn, eps)


def forward(model: TinyTransformer, eps: float = 0.0) -> Stacks:
    """Hidden states φ_0 … φ_N of both stacks of T' (T at ε = 0); the decoder attends to the final φ^E_N."""
    enc = [model.enc_input]
    for layer in model.encoder:
        enc.append(encoder_layer(layer, enc[-1], eps))
    dec = [model.dec_input]
    for layer in model.decoder:
        dec.append(decoder_layer(layer, dec[-1], enc[-1], eps))
    return Stacks(enc, dec)


def encoder_layer_first_order(layer: EncoderLayer, phi: Tensor, d_phi: Tensor, eps: float,
                              jacobian: bool = True) -> Tensor:
    """First-order δφ_i from φ_{i-1} (cached) and δφ_{i-1}: eq. (6) and (11) to first order, JR by (12), (15).

    δφ_i = ε ∂_ε F'(y) + (JF(y) JLN(a) + I) JA (JLN(φ) δφ_{i-1}) + δφ_{i-1}, with a = A*(φ), y = LN(a).
    jacobian=False drops the JR_i term (the ablation that must leave an O(ε) gap).
    """
    x = layer_norm(phi, layer.ln_attn)
    cache = attention(x, x, layer.attn)
    y = layer_norm(cache.out, layer.ln_ffn)
    lora_term = eps * ffn_lora_derivative(y, layer.ffn)  # δR_i(φ_{i-1}) to first order, eq. (7)
    if not jacobian:
        return lora_term + d_phi
    dx = apply_tokenwise(layer_norm_jacobian(phi, layer.ln_attn), d_phi)  # JLN δφ_{i-1}
    da = attention_jvp(cache, *attention_jacobians(cache, layer.attn), dx, dx)  # eq. (15)
    d_ffn = apply_tokenwise(ffn_jacobian(y, layer.ffn) @ layer_norm_jacobian(cache.out, layer.ln_ffn), da)
    return lora_term + d_phi + da + d_ffn  # eq. (6): W-term + (JF* + I) JA JLN δφ + δφ


def decoder_layer_first_order(layer: DecoderLayer, phi: Tensor, d_phi: Tensor, memory: Tensor, d_memory: Tensor,
                              eps: float, jacobian: bool = True) -> Tensor:
    """First-order δφ^D_j from the decoder's δφ^D_{j-1} and the final encoder correction δφ^E, eq. (17).

    The self-attention moves with δφ^D_{j-1} (Φ, Ψ terms of eq. (15)); the cross-attention's queries move
    with the self-attention output (its Φ term) and its keys/values with δφ^E (its Σ_β σ^{αβ} Ψ^{αβ} term).
    """
    x = layer_norm(phi, layer.ln_self)
    self_cache = attention(x, x, layer.self_attn)
    s = self_cache.out
    u, mem = layer_norm(s, layer.ln_cross), layer_norm(memory, layer.ln_memory)
    cross_cache = attention(u, mem, layer.cross_attn)
    t = s + cross_cache.out
    y = layer_norm(t, layer.ln_ffn)
    lora_term = eps * ffn_lora_derivative(y, layer.ffn)
    if not jacobian:
        return lora_term + d_phi
    dx = apply_tokenwise(layer_norm_jacobian(phi, layer.ln_self), d_phi)
    ds = attention_jvp(self_cache, *attention_jacobians(self_cache, layer.self_attn), dx, dx)
    du = apply_tokenwise(layer_norm_jacobian(s, layer.ln_cross), ds)
    d_mem = apply_tokenwise(layer_norm_jacobian(memory, layer.ln_memory), d_memory)
    dt = ds + attention_jvp(cross_cache, *attention_jacobians(cross_cache, layer.cross_attn), du, d_mem)
    d_ffn = apply_tokenwise(ffn_jacobian(y, layer.ffn) @ layer_norm_jacobian(t, layer.ln_ffn), dt)
    return lora_term + d_phi + dt + d_ffn


# -------------------------------------------------------------------------------------------- corrections


def true_corrections(model: TinyTransformer, eps: float) -> Stacks:
    """δφ_i = φ'_i − φ_i for every layer of both stacks (Definition 2.1); entry 0 is δφ_0 = 0."""
    base, perturbed = forward(model, 0.0), forward(model, eps)
    return Stacks([p - b for p, b in zip(perturbed.encoder, base.encoder, strict=True)],
                  [p - b for p, b in zip(perturbed.decoder, base.decoder, strict=True)])


def first_order_corrections(model: TinyTransformer, eps: float, jacobian: bool = True) -> Stacks:
    """The linearised recursion h_i ≈ δφ_i for both stacks, from the cached unperturbed pass only.

    Encoder: eq. (6)/(11)/(12)/(15) layer by layer from h_0 = 0. Decoder: eq. (17), fed by its own h^D_{j-1}
    and the encoder's final first-order correction h^E_N. jacobian=False drops every JR term.
    """
    base = forward(model, 0.0)
    enc = [torch.zeros_like(model.enc_input)]
    for layer, phi in zip(model.encoder, base.encoder[:-1], strict=True):
        enc.append(encoder_layer_first_order(layer, phi, enc[-1], eps, jacobian))
    dec = [torch.zeros_like(model.dec_input)]
    for layer, phi in zip(model.decoder, base.decoder[:-1], strict=True):
        dec.append(decoder_layer_first_order(layer, phi, dec[-1], base.encoder[-1], enc[-1], eps, jacobian))
    return Stacks(enc, dec)


def max_frobenius(tensors: Sequence[Tensor]) -> float:
    """max_i ‖X_i‖_F over a list of per-layer tensors (absolute, in hidden-state units)."""
    return max(float(torch.linalg.matrix_norm(t)) for t in tensors)


def eps_grid(points: int = 8, largest: float = 1e-1, smallest: float = 1e-4) -> np.ndarray:
    """Log-spaced LoRA scales; 1e-4 … 1e-1 keeps the O(ε²) gap (≥ 1e-9) far above float64 round-off."""
    return np.logspace(math.log10(largest), math.log10(smallest), points)


def gap_vs_epsilon(eps_values: Sequence[float], kind: str = "self", seed: int = 0, n_layers: int = 3,
                   d_model: int = 16, seq_len: int = 5) -> pd.DataFrame:
    """Table of the first-order error against ε for one attention kind.

    kind="self" measures the encoder stack (Case 1), kind="cross" the decoder stack (Case 2), whose
    corrections include the cross-attention response to the encoder's correction. Columns (all absolute
    Frobenius norms, max over layers i = 1 … N, in hidden-state units):
    ``correction`` = max ‖δφ_i‖ (O(ε)), ``gap`` = max ‖δφ_i − h_i‖ (O(ε²) if the derivation holds),
    ``gap_without_jacobian`` = the same with the JR_i terms dropped (O(ε)).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model = make_transformer(n_layers=n_layers, d_model=d_model, seq_len=seq_len, seed=seed)
    rows = []
    for eps in eps_values:
        stacks = (true_corrections(model, float(eps)), first_order_corrections(model, float(eps)),
                  first_order_corrections(model, float(eps), jacobian=False))
        true, first, no_jac = (getattr(s, "encoder" if kind == "self" else "decoder")[1:] for s in stacks)
        rows.append({"kind": kind, "eps": float(eps), "correction": max_frobenius(true),
                     "gap": max_frobenius([t - h for t, h in zip(true, first, strict=True)]),
                     "gap_without_jacobian": max_frobenius([t - h for t, h in zip(true, no_jac, strict=True)])})
    return pd.DataFrame(rows)


def loglog_slope(eps: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(values) against log(eps): p where values ≈ C ε^p."""
    return float(np.polyfit(np.log(np.asarray(eps, dtype=float)), np.log(np.asarray(values, dtype=float)), 1)[0])


def gap_figure(table: pd.DataFrame) -> Figure:
    """Log-log plot of correction, gap and gap without Jacobian against ε, one panel per attention kind.

    A dashed reference line of slope 2 runs parallel to the gap, one decade below it (so both stay visible).
    """
    long = table.melt(id_vars=["kind", "eps"], value_vars=["correction", "gap", "gap_without_jacobian"],
                      var_name="quantity", value_name="norm")
    labels = {"correction": "‖δφ‖ (true correction)", "gap": "‖δφ − first order‖",
              "gap_without_jacobian": "‖δφ − first order without JR‖"}
    long["quantity"] = long["quantity"].map(labels)
    kinds = list(dict.fromkeys(table["kind"]))
    fig = Figure(figsize=(5.2 * len(kinds), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
    for ax, kind in zip(axes, kinds, strict=True):
        part = table[table["kind"] == kind].sort_values("eps")
        sns.lineplot(long[long["kind"] == kind], x="eps", y="norm", hue="quantity", marker="o", ax=ax)
        eps0, gap0 = part["eps"].iloc[0], part["gap"].iloc[0]
        ax.plot(part["eps"], 0.1 * gap0 * (part["eps"] / eps0) ** 2, ls="--", c="grey",
                label="slope 2 reference (×0.1)")
        ax.set(xscale="log", yscale="log", xlabel="ε (LoRA scale, dimensionless)",
               ylabel="Frobenius norm, max over layers (hidden-state units)",
               title=f"{kind}-attention: slope of gap {loglog_slope(part['eps'], part['gap']):.2f}")
        ax.legend(fontsize=8)
    return fig
