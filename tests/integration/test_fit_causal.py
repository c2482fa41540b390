"""End to end on decoder-only LMs (random weights: no decoder-only weights are reachable offline): GLUE as a prompt,
the label as the next tokens. READ from its cache gives the numbers it gives without one, the cache holds one row per
target token, a saved model answers new text as its run did, LoRA trains on the same formulation."""

import numpy as np
import pytest

import readlib.paths
from readlib import data, serve
from readlib.params import make_params
from readlib.train import fit

RUN = dict(task="sst2", backbone="random-gpt2-tiny", max_train=32, max_eval=16, max_epochs=3, patience=3,
           batch_size=8, micro_batch_size=8, max_length=48, lr=3e-3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readlib.paths, "OUTPUT_DIR", out)
        result = {mode: fit(make_params("quick", method="read", cache=mode, **RUN), progress=False,
                            save_dir=out / f"read-{mode}") for mode in ("off", "memory")}
        result["lora"] = fit(make_params("quick", method="lora", **RUN | {"backbone": "random-llama-tiny"}),
                             progress=False)
    result["dir"] = out
    return result


def test_read_trains_from_its_cache_as_without_it(runs):
    off, memory = runs["off"], runs["memory"]
    assert off["formulation"] == memory["formulation"] == "causal-lm"
    assert off["validation"] == memory["validation"] and off["test"] == memory["test"]
    for a, b in zip(off["history"], memory["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_score"] == b["val_score"]
    # from a random LM's ln(50257) = 10.8 nats, READ learns to answer "0" / "1" then [SEP]
    losses = [row["train_loss"] for row in memory["history"]]
    assert losses[0] > 9 and losses[-1] < losses[0] - 1


def test_the_cache_holds_one_row_per_target_token(runs):
    # 32 training examples x 2 target tokens ("0" or "1", then [SEP]) x 2 layers x d 64 x 4 bytes; evaluation decodes
    # token by token (the input grows), so only the train split is cached
    assert runs["memory"]["cache"]["bytes"] == 32 * 2 * 2 * 64 * 4
    assert runs["off"]["cache"] == {"mode": "off"}


def test_a_saved_decoder_only_read_answers_as_its_run(runs):
    record = runs["memory"]
    model = serve.load(runs["dir"] / "read-memory")
    splits, _ = data.load_task("sst2", max_train=RUN["max_train"], max_eval=RUN["max_eval"])
    answers = model.predict([dict(row) for row in splits["test"]])
    assert [a["label"] for a in answers] == record["test_examples"]["predictions"]
    assert all(isinstance(a["generated"], str) for a in answers)
    valid = [a for a in answers if a["generated"] in ("0", "1")]
    assert all(a["label"] == int(a["generated"]) for a in valid)


def test_lora_trains_a_llama_shaped_lm_on_the_same_formulation(runs):
    lora = runs["lora"]
    assert lora["formulation"] == "causal-lm" and lora["backbone"] == "random-llama-tiny"
    # rank 32 on q_proj and v_proj (64 -> 64) of 2 layers: 2 x 2 x 32 x (64 + 64)
    assert lora["trainable_params"] == 2 * 2 * 32 * 128
    assert np.isfinite([row["train_loss"] for row in lora["history"]]).all()
    assert lora["history"][-1]["train_flops"] > lora["history"][0]["train_flops"] > 0
