"""BitFit (readlib.methods.bitfit): what trains on the T5 encoder. The shared matrix is in test_methods.py."""

from readlib import backbones, methods

# MiniLM-L6: 6 layers, d = 384, FFN 1536. Tiny T5: 2 + 2 layers, d = 64, inner (heads * d_kv) = 64, FFN 128.
D, FFN, LAYERS = 384, 1536, 6


T5_D, T5_INNER, T5_FFN, T5_LAYERS = 64, 64, 128, 2


def head(num_labels, d=D):
    return d * num_labels + num_labels


def test_bitfit_on_the_t5_encoder_trains_encoder_biases_and_head():
    bb = backbones.load("random-t5-tiny", formulation="classification")
    encoder_block = 3 * T5_INNER + T5_D + T5_D + T5_FFN + T5_D + T5_D
    assert methods.count_parameters(methods.build("bitfit", bb, 3))[0] == T5_LAYERS * encoder_block + head(3, T5_D)
