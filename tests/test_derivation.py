"""The hand-written Jacobians of readlib.derivation against autograd, and the O(ε²) claim of Appendix A."""

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch.func import jvp

from readlib import derivation as dv

TOL = 1e-10


@pytest.fixture(scope="module")
def model() -> dv.TinyTransformer:
    return dv.make_transformer(n_layers=2, d_model=8, seq_len=4, seed=1)


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return {kind: dv.gap_vs_epsilon(dv.eps_grid(8), kind=kind) for kind in dv.KINDS}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dv.DTYPE)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) < TOL


def test_layer_norm_jacobian_matches_autograd(model):
    p = model.encoder[0].ln_attn
    x = randn(4, 8)
    auto = torch.autograd.functional.jacobian(lambda t: dv.layer_norm(t, p), x)  # (m, d, m, d)
    explicit = dv.layer_norm_jacobian(x, p)
    for a in range(4):
        assert close(explicit[a], auto[a, :, a, :])
    # tokens do not mix
    assert float(auto[0, :, 1, :].abs().max()) == 0.0


def test_gelu_and_ffn_jacobians_match_autograd(model):
    p = model.encoder[0].ffn
    z = randn(50, seed=2) * 3
    assert close(dv.gelu_tanh(z), torch.nn.functional.gelu(z, approximate="tanh"))
    assert close(dv.gelu_tanh_derivative(z), torch.func.vmap(torch.func.grad(dv.gelu_tanh))(z))
    x, dx = randn(4, 8, seed=3), randn(4, 8, seed=4)
    _, auto = jvp(lambda t: dv.ffn(t, p), (x,), (dx,))
    assert close(dv.apply_tokenwise(dv.ffn_jacobian(x, p), dx), auto)
    zero, one = torch.tensor(0.0, dtype=dv.DTYPE), torch.tensor(1.0, dtype=dv.DTYPE)
    _, auto_eps = jvp(lambda e: dv.ffn(x, p, e), (zero,), (one,))
    assert close(dv.ffn_lora_derivative(x, p), auto_eps)


def test_phi_psi_match_jvp_self_attention(model):
    p = model.encoder[0].attn
    x, dx = randn(4, 8, seed=5), randn(4, 8, seed=6)
    cache = dv.attention(x, x, p)
    phi, psi = dv.attention_jacobians(cache, p)
    assert phi.shape == (4, 8, 8) and psi.shape == (4, 4, 8, 8)
    _, auto = jvp(lambda t: dv.attention(t, t, p).out, (x,), (dx,))
    assert close(dv.attention_jvp(cache, phi, psi, dx, dx), auto)


def test_phi_psi_match_jvp_cross_attention(model):
    p = model.decoder[0].cross_attn
    xq, xkv = randn(5, 8, seed=7), randn(3, 8, seed=8)
    dq, dkv = randn(5, 8, seed=9), randn(3, 8, seed=10)
    cache = dv.attention(xq, xkv, p)
    phi, psi = dv.attention_jacobians(cache, p)
    _, auto = jvp(lambda a, b: dv.attention(a, b, p).out, (xq, xkv), (dq, dkv))
    assert close(dv.attention_jvp(cache, phi, psi, dq, dkv), auto)
    # each part alone: Φ is the query derivative, Σ σ Ψ the key/value derivative
    _, auto_q = jvp(lambda a: dv.attention(a, xkv, p).out, (xq,), (dq,))
    assert close(dv.attention_jvp(cache, phi, psi, dq, torch.zeros_like(dkv)), auto_q)


def test_first_order_layers_are_the_layer_jvp(model):
    """With ε = 0 the first-order step is JR δφ + δφ: compare with the jvp of the whole layer."""
    enc, dec = model.encoder[0], model.decoder[0]
    phi, d_phi = model.enc_input, randn(*model.enc_input.shape, seed=11)
    _, auto = jvp(lambda t: dv.encoder_layer(enc, t), (phi,), (d_phi,))
    assert close(dv.encoder_layer_first_order(enc, phi, d_phi, eps=0.0), auto)
    psi_d, d_psi = model.dec_input, randn(*model.dec_input.shape, seed=12)
    _, auto = jvp(lambda a, b: dv.decoder_layer(dec, a, b), (psi_d, phi), (d_psi, d_phi))
    assert close(dv.decoder_layer_first_order(dec, psi_d, d_psi, phi, d_phi, eps=0.0), auto)


def test_zero_eps_gives_zero_correction(model):
    true = dv.true_corrections(model, 0.0)
    first = dv.first_order_corrections(model, 0.0)
    for t in true.encoder + true.decoder + first.encoder + first.decoder:
        assert torch.equal(t, torch.zeros_like(t))
    assert len(true.encoder) == len(model.encoder) + 1


def test_gap_is_second_order(tables):
    for table in tables.values():
        assert 1.8 <= dv.loglog_slope(table["eps"], table["gap"]) <= 2.2
        assert 0.9 <= dv.loglog_slope(table["eps"], table["correction"]) <= 1.1
        smallest = table["eps"].idxmin()
        assert table.loc[smallest, "gap"] < 1e-3 * table.loc[smallest, "correction"]


def test_dropping_the_jacobian_leaves_first_order_gap(tables):
    for table in tables.values():
        assert 0.8 <= dv.loglog_slope(table["eps"], table["gap_without_jacobian"]) <= 1.2


def test_cross_needs_the_encoder_correction(model):
    """Eq. (17) without the Σ σ Ψ δφ^E term: the decoder's first-order error becomes O(ε)."""
    eps_values = dv.eps_grid(4, 1e-2, 1e-4)
    gaps = []
    for eps in eps_values:
        base, true = dv.forward(model), dv.true_corrections(model, eps)
        h = torch.zeros_like(model.dec_input)
        errors = []
        for layer, phi, t in zip(model.decoder, base.decoder[:-1], true.decoder[1:], strict=True):
            h = dv.decoder_layer_first_order(layer, phi, h, base.encoder[-1], torch.zeros_like(model.enc_input), eps)
            errors.append(t - h)
        gaps.append(dv.max_frobenius(errors))
    assert dv.loglog_slope(eps_values, gaps) < 1.2


def test_loglog_slope_and_validation():
    eps = dv.eps_grid(5)
    assert dv.loglog_slope(eps, 3.0 * eps**2) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="kind"):
        dv.gap_vs_epsilon(eps, kind="causal")


def test_gap_figure(tables):
    fig = dv.gap_figure(pd.concat(tables.values()))
    assert isinstance(fig, Figure)
    assert [ax.get_xlabel() for ax in fig.axes] == ["ε (LoRA scale, dimensionless)"] * 2
    assert all("Frobenius" in ax.get_ylabel() for ax in fig.axes)
