"""LoRA (readlib.methods.lora): the alpha / rank scale and a short run through fit; the shared matrix is in
test_methods.py.
"""

from helpers import t5_text

from readlib import methods
from readlib.params import make_params
from readlib.train import fit

# MiniLM-L6: 6 layers, d = 384, FFN 1536. Tiny T5: 2 + 2 layers, d = 64, inner (heads * d_kv) = 64, FFN 128.
D, FFN, LAYERS = 384, 1536, 6


def head(num_labels, d=D):
    return d * num_labels + num_labels


def lora_minilm(rank, num_labels):
    return LAYERS * 2 * rank * (D + D) + head(num_labels)  # q and v: A [r, 384] + B [384, r]


def test_lora_alpha_sets_the_scale():
    bb = t5_text()
    methods.build("lora", bb, 2, {"rank": 4, "alpha": 8})
    assert bb.model.encoder.block[0].layer[0].SelfAttention.q.scaling == {"default": 2.0}
    bb = t5_text()
    methods.build("lora", bb, 2, {"rank": 4})
    assert bb.model.encoder.block[0].layer[0].SelfAttention.q.scaling == {"default": 1.0}  # alpha = rank


def test_fit_lora_on_minilm():
    params = make_params("quick", task="rte", method="lora", backbone="minilm", max_train=32, max_eval=16,
                         max_epochs=1, batch_size=16, micro_batch_size=16, max_length=32)
    record = fit(params, progress=False)
    assert (record["method"], record["status"]) == ("lora", "ok")
    assert record["trainable_params"] == lora_minilm(32, 2)
    assert record["method_args"] == {"rank": 32, "alpha": 0.0, "lora_dropout": 0.0, "dropout": 0.1}
    assert record["lr"] == 5e-4
