"""READ's two joiners: the paper's (Appendix B.1) and the gated one of eq. (18)."""

import pytest
import torch

from readlib import backbones, methods
from readlib.errors import ConfigError
from readlib.methods import read


def t5_batch():
    torch.manual_seed(0)
    ids = torch.randint(1000, 3000, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return ids, mask, torch.randint(1000, 3000, (3, 4))


@pytest.mark.parametrize("joiner", read.JOINERS)
def test_both_joiners_start_at_the_frozen_t5(joiner):
    bb = backbones.load("random-t5-tiny")
    model = methods.build("read", bb, 2, {"joiner": joiner, "hidden": 16})
    ids, mask, dec = t5_batch()
    expected = bb.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(model(ids, mask, dec), expected)


def test_gated_joiner_with_zero_ffn_and_context_is_the_plain_rnn():
    # FFN's output layer starts at zero, so x_i = φ_i + Gate(φ_i) ⊙ 0 = φ_i: the paper's recurrence
    torch.manual_seed(1)
    config = read.Config(rnn="lstm", hidden=5, joiner="gated")
    gated, plain = read.GatedLayerRNN(7, config).double(), read.LayerRNN(7, config).double()
    plain.cell.load_state_dict(gated.cell.state_dict())
    phi = torch.randn(4, 6, 7, dtype=torch.double)
    assert torch.allclose(gated(phi), plain(phi), atol=1e-12)


def test_gated_joiner_gradients_match_finite_differences():
    torch.manual_seed(2)
    net = read.GatedLayerRNN(4, read.Config(rnn="gru", hidden=3, joiner="gated")).double()
    for p in net.parameters():  # leave the zero start, so every term of eq. (18) is exercised
        torch.nn.init.normal_(p, std=0.5)
    phi = torch.randn(3, 2, 4, dtype=torch.double)
    context = torch.randn(3, 2, 4, dtype=torch.double, requires_grad=True)
    params = list(net.parameters())

    def f(context, *weights):
        return torch.func.functional_call(net, dict(zip(dict(net.named_parameters()), weights, strict=True)),
                                          (phi, context))

    assert torch.autograd.gradcheck(f, (context, *params))


def test_gated_parameter_count_by_formula():
    d, h = 384, 16
    model = methods.build("read", backbones.load("minilm"), 2, {"joiner": "gated", "hidden": h})
    gru = 3 * (h * d + h * h + 2 * h)
    gate = d * d + d
    ffn = (h * h + h) + (h * d + d)
    w_o, head = h * d, d * 2 + 2
    assert methods.count_parameters(model)[0] == gru + gate + ffn + w_o + head == 180_850


def test_gated_joiner_trains_only_side_parameters():
    bb = backbones.load("random-t5-tiny")
    model = methods.build("read", bb, 2, {"joiner": "gated", "hidden": 16})
    ids, mask, dec = t5_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(5):  # zero starts: each step lets gradients reach one more level of the joiners
        opt.zero_grad()
        model(ids, mask, dec).logsumexp(-1).sum().backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert not any(n.startswith("frozen.") for n, p in model.named_parameters() if p.grad is not None)
    assert {"encoder_rnn.gate.weight", "decoder_rnn.ffn.2.weight", "psi.2.weight", "up.weight"} <= moved


def test_unknown_joiner():
    with pytest.raises(ConfigError, match="read.joiner must be one of: paper, gated; got 'attention'"):
        methods.make_config("read", {"joiner": "attention"})
