"""GLUE as text-to-text for T5: strings, encoding, loss, greedy decoding, training and the CLI."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

import readlib.data
from readlib import backbones, data
from readlib.__main__ import main
from readlib.data import Encoded
from readlib.params import make_params
from readlib.train import fit, greedy_decode, parse_generated, predict, task_loss

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SEP, PAD = 102, 0  # the bundled word-piece tokenizer's [SEP] (eos for random T5s) and [PAD]

# T5's GLUE class names, in GLUE label order
CLASS_NAMES = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return backbones.load("random-t5-tiny").tokenizer


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- source and target strings


@pytest.mark.parametrize("task, row, expected", [
    ("rte", {"sentence1": "A", "sentence2": "B"}, "rte sentence1: A sentence2: B"),
    ("mrpc", {"sentence1": "He said so.", "sentence2": "So he said."},
     "mrpc sentence1: He said so. sentence2: So he said."),
    ("sst2", {"sentence": "a gripping film"}, "sst2 sentence: a gripping film"),
    ("cola", {"sentence": "Him went."}, "cola sentence: Him went."),
    ("stsb", {"sentence1": "x", "sentence2": "y"}, "stsb sentence1: x sentence2: y"),
    ("qqp", {"question1": "Why?", "question2": "How?"}, "qqp question1: Why? question2: How?"),
    ("qnli", {"question": "Who?", "sentence": "Me."}, "qnli question: Who? sentence: Me."),
    ("mnli", {"premise": "P", "hypothesis": "H"}, "mnli premise: P hypothesis: H"),
])
def test_t5_source(task, row, expected):
    assert data.t5_source(data.get_task(task), row | {"label": 0, "idx": 7}) == expected


@pytest.mark.parametrize("task", sorted(CLASS_NAMES))
def test_t5_target_classes(task):
    spec = data.get_task(task)
    assert tuple(data.t5_target(spec, i) for i in range(spec.num_labels)) == CLASS_NAMES[task]
    assert tuple(data.t5_target(spec, float(i)) for i in range(spec.num_labels)) == CLASS_NAMES[task]


# STS-B: T5's recipe round(5 * score) / 5, where round() breaks ties to the even integer
# ("banker's rounding", as tf.round does)
STSB_TARGETS = [
    (3.87, "3.8"),  # 19.35 -> 19 -> 3.8
    (3.9, "4.0"),  # 19.5 -> tie -> even 20 -> 4.0
    (3.7, "3.6"),  # 18.5 -> tie -> even 18 -> 3.6 (not 3.8)
    (0.5, "0.4"),  # 2.5 -> even 2 -> 0.4
    (1.1, "1.2"),  # 5.5 -> even 6 -> 1.2
    (0.3, "0.4"),  # 1.5 -> even 2 -> 0.4 (dividing by 0.2 instead gives 1.4999999999999998 -> 0.2)
    (4.25, "4.2"),  # 21.25 -> 21 -> 4.2
    (4.99, "5.0"),  # 24.95 -> 25 -> 5.0
    (0.09, "0.0"),  # 0.45 -> 0
    (5.0, "5.0"),
    (0.0, "0.0"),
    (2, "2.0"),  # an integer label
]


@pytest.mark.parametrize("score, expected", STSB_TARGETS, ids=[s for _, s in STSB_TARGETS])
def test_t5_target_stsb_rounds_to_0_2(score, expected):
    assert data.STSB_STEP == 0.2
    assert data.t5_target(data.get_task("stsb"), score) == expected


@pytest.mark.parametrize("task", sorted(CLASS_NAMES))
def test_t5_label_round_trips_every_class_through_the_tokenizer(task, tokenizer):
    spec = data.get_task(task)
    for i, name in enumerate(CLASS_NAMES[task]):
        assert data.t5_label(spec, name) == i
        decoded = tokenizer.decode(ids_of(tokenizer, name))  # e.g. "not _ entailment"
        assert data.t5_label(spec, decoded) == i, decoded


def test_t5_label_stsb_round_trips_every_step(tokenizer):
    spec = data.get_task("stsb")
    for k in range(26):  # 0.0, 0.2, ..., 5.0
        target = data.t5_target(spec, k * 0.2)
        assert target == f"{k // 5}.{2 * (k % 5)}"
        decoded = tokenizer.decode(ids_of(tokenizer, target))  # e.g. "3. 8"
        assert data.t5_label(spec, decoded) == pytest.approx(k * 0.2, abs=1e-12)


def test_t5_label_tolerates_word_piece_spacing():
    rte, mnli = data.get_task("rte"), data.get_task("mnli")
    assert data.t5_label(rte, "not _ entailment") == 1
    assert data.t5_label(rte, " entailment \n") == 0
    assert data.t5_label(mnli, "contra diction") == 2
    assert data.t5_label(data.get_task("stsb"), "3. 8") == pytest.approx(3.8)


@pytest.mark.parametrize("task, text", [
    ("rte", ""), ("rte", "entail"), ("rte", "yes"), ("rte", "not entailment x"), ("rte", "neutral"),
    ("mnli", "not_entailment"), ("sst2", "positive negative"), ("cola", "[UNK]"),
    ("stsb", ""), ("stsb", "abc"), ("stsb", "3.8.1"), ("stsb", "entailment"),
])
def test_t5_label_junk_is_none(task, text):
    assert data.t5_label(data.get_task(task), text) is None


@pytest.mark.parametrize("text, value", [("7.5", 5.0), ("5.2", 5.0), ("- 1. 2", 0.0), ("-0.1", 0.0),
                                         ("2.6", 2.6), ("0", 0.0), ("5", 5.0), ("12", 5.0)])
def test_t5_label_clamps_stsb_to_0_5(text, value):
    assert data.t5_label(data.get_task("stsb"), text) == pytest.approx(value)


def test_t5_label_nan_is_no_valid_stsb_target(tokenizer):
    spec = data.get_task("stsb")
    assert tokenizer.convert_tokens_to_ids("nan") != tokenizer.unk_token_id  # a model can generate it
    assert data.t5_label(spec, "nan") is None
    # parse_generated then counts it as wrong (0.0), instead of a NaN that makes Pearson NaN
    ids = torch.tensor([ids_of(tokenizer, "nan") + [SEP]])
    assert parse_generated(spec, tokenizer, ids, SEP, [3.0]).tolist() == [0.0]
    for junk in ("inf", "1_0", "1e3", "1."):
        assert data.t5_label(spec, junk) is None


# ---------------------------------------------------------------- Encoded in text-to-text mode


def rte_rows():
    return datasets.Dataset.from_dict({
        "sentence1": ["A cat sat.", "It rained all day long in the city."],
        "sentence2": ["A cat is sitting.", "The sun shone."],
        "label": [0, 1],  # entailment, not_entailment
        "idx": [0, 1],
    })


def test_encoded_text_to_text_sources_and_targets(tokenizer):
    spec = data.get_task("rte")
    enc = Encoded(rte_rows(), tokenizer, spec, max_length=64, eos_id=SEP)
    assert enc.formulation == "text-to-text" and enc.token_type_ids is None and enc.pad_id == PAD
    assert enc.input_ids[0] == tokenizer("rte sentence1: A cat sat. sentence2: A cat is sitting.")["input_ids"]
    entailment, not_entailment = ids_of(tokenizer, "entailment"), ids_of(tokenizer, "not_entailment")
    assert (len(entailment), len(not_entailment)) == (3, 5)  # word pieces: en ##tail ##ment; not _ ...
    assert enc.targets == [entailment + [SEP], not_entailment + [SEP]]
    assert all(t[-1] == SEP for t in enc.targets)
    assert enc.labels.tolist() == [0, 1] and enc.labels.dtype == torch.long


def test_encoded_text_to_text_batch(tokenizer):
    enc = Encoded(rte_rows(), tokenizer, data.get_task("rte"), max_length=64, eos_id=SEP)
    inputs, labels = enc.batch([0, 1], torch.device("cpu"))
    assert set(inputs) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}
    t0, t1 = enc.targets  # 4 and 6 ids
    assert inputs["decoder_attention_mask"].tolist() == [[1] * len(t0) + [0, 0], [1] * len(t1)]
    # labels: the target ids, padded with -100 (ignored by the loss)
    assert labels.tolist() == [t0 + [-100, -100], t1]
    # decoder inputs: T5's shift right, [pad] + targets[:-1], with the pad id where labels are -100
    assert inputs["decoder_input_ids"].tolist() == [[PAD] + t0 + [PAD], [PAD] + t1[:-1]]
    lengths = [len(i) for i in enc.input_ids]
    assert inputs["attention_mask"].sum(1).tolist() == lengths
    assert inputs["input_ids"][0, lengths[0]:].eq(PAD).all()  # the shorter source is padded
    # one example alone: no padding at all
    single, single_labels = enc.batch([0], torch.device("cpu"))
    assert single_labels.tolist() == [t0] and single["decoder_input_ids"].tolist() == [[PAD] + t0[:-1]]


def test_encoded_stsb_targets(tokenizer):
    rows = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"],
                                       "label": [3.87, 5.0], "idx": [0, 1]})
    enc = Encoded(rows, tokenizer, data.get_task("stsb"), max_length=16, eos_id=SEP)
    assert enc.labels.dtype == torch.float32
    assert enc.targets == [ids_of(tokenizer, "3.8") + [SEP], ids_of(tokenizer, "5.0") + [SEP]]


def test_task_loss_on_3d_logits_ignores_minus_100():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [5.0, -3.0, 0.5], [0.0, 1.0, 0.0]]])  # [1, 3, 3]
    labels = torch.tensor([[0, -100, 1]])

    def nll(row, target):  # -log softmax(row)[target], by hand
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    by_hand = (nll([2.0, 0.0, -1.0], 0) + nll([0.0, 1.0, 0.0], 1)) / 2  # the -100 position is left out
    assert task_loss(logits, labels, regression=False).item() == pytest.approx(by_hand, rel=1e-6)
    # log(e^2 + 1 + e^-1) - 2 = 0.169846; log(1 + e + 1) - 1 = 0.551445; mean 0.360645
    assert by_hand == pytest.approx(0.3606453667, rel=1e-9)
    # whatever the ignored position's logits are, the loss is the same
    logits[0, 1] = torch.tensor([-50.0, 40.0, 3.0])
    assert task_loss(logits, labels, regression=True).item() == pytest.approx(by_hand, rel=1e-6)


# ---------------------------------------------------------------- greedy decoding and parsing


class ChainModel(torch.nn.Module):
    """Stub seq2seq: the next token is a fixed function of the last one (start -> 7 -> 3 -> 9 -> eos)."""

    NEXT = {PAD: 7, 7: 3, 3: 9, 9: SEP, SEP: 5, 5: 5}

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        self.calls.append(decoder_input_ids.clone())
        logits = torch.zeros(*decoder_input_ids.shape, 200)
        for b in range(decoder_input_ids.shape[0]):
            for t in range(decoder_input_ids.shape[1]):
                logits[b, t, self.NEXT[int(decoder_input_ids[b, t])]] = 1.0 + b  # favour the chain's token
        return logits


def test_greedy_decode_follows_the_model():
    model = ChainModel()
    inputs = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
              "decoder_input_ids": torch.full((2, 3), 99)}  # teacher-forcing inputs are ignored
    out = greedy_decode(model, inputs, PAD, steps=5)
    assert out.tolist() == [[7, 3, 9, SEP, 5]] * 2
    # step t sees the start token and the t tokens decoded so far
    assert [c.tolist()[0] for c in model.calls] == [[PAD], [PAD, 7], [PAD, 7, 3], [PAD, 7, 3, 9], [PAD, 7, 3, 9, SEP]]
    assert greedy_decode(model, inputs, PAD, steps=2).tolist() == [[7, 3]] * 2


def test_parse_generated_cuts_at_eos_and_maps_invalid_to_a_wrong_class(tokenizer):
    rte = data.get_task("rte")
    ent, not_ent, junk = ids_of(tokenizer, "entailment"), ids_of(tokenizer, "not_entailment"), ids_of(tokenizer, "cat")
    width = 10

    def row(ids):
        return ids + [PAD] * (width - len(ids))

    ids = torch.tensor([row(ent + [SEP] + junk), row(not_ent + [SEP] + ent), row(junk + [SEP]), row(junk + [SEP]),
                        row(ent + ent)])
    refs = [0, 0, 0, 1, 0]
    out = parse_generated(rte, tokenizer, ids, SEP, refs)
    assert out.tolist() == [0, 1, 1, 0, 1]  # junk and "entailment entailment" are the other class
    assert all(p != r for p, r in zip(out[2:], refs[2:], strict=True))
    mnli = data.get_task("mnli")
    junk_rows = torch.tensor([row(junk + [SEP])] * 3)
    assert parse_generated(mnli, tokenizer, junk_rows, SEP, [0, 1, 2]).tolist() == [1, 2, 0]
    stsb = data.get_task("stsb")
    scores = torch.tensor([row(ids_of(tokenizer, "3.8") + [SEP]), row(junk + [SEP]), row(ids_of(tokenizer, "9.0"))])
    assert parse_generated(stsb, tokenizer, scores, SEP, [3.8, 2.4, 1.0]).tolist() == pytest.approx([3.8, 0.0, 5.0])


class AnswerModel(torch.nn.Module):
    """Stub seq2seq that always generates one fixed token sequence."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        logits = torch.zeros(*decoder_input_ids.shape, 30522)
        for t in range(decoder_input_ids.shape[1]):
            logits[:, t, self.answer[min(t, len(self.answer) - 1)]] = 1.0
        return logits


def test_predict_decodes_as_many_steps_as_the_longest_target(tokenizer):
    enc = Encoded(rte_rows(), tokenizer, data.get_task("rte"), max_length=64, eos_id=SEP)
    model = AnswerModel(ids_of(tokenizer, "not_entailment") + [SEP])
    pred = predict(model, enc, batch_size=1, device=torch.device("cpu"), task=data.get_task("rte"),
                   tokenizer=tokenizer, eos_id=SEP)
    assert pred.tolist() == [1, 1]
    # 5 word pieces + eos = 6 steps: a model that needs 7 is cut off before its end and is wrong
    long = AnswerModel(ids_of(tokenizer, "not not_entailment") + [SEP])
    assert predict(long, enc, 2, torch.device("cpu"), data.get_task("rte"), tokenizer, SEP).tolist() == [1, 0]


# ---------------------------------------------------------------- training runs


RUN = dict(task="rte", backbone="random-t5-tiny", max_train=32, max_eval=16, max_epochs=3, lr=3e-3,
           batch_size=16, micro_batch_size=16, max_length=32, patience=3, seed=0)


@pytest.mark.parametrize("method, trainable", [
    ("read", 527_360),  # 2 * 3(256*64 + 256*256 + 2*256) + 2 * 256*64 on the tiny T5 (d = 64)
    ("full", None),
])
def test_short_text_to_text_run_lowers_the_training_loss(method, trainable):
    record = fit(make_params("quick", method=method, **RUN), progress=False)
    assert record["formulation"] == "text-to-text" and record["status"] == "ok"
    assert (record["backbone"], record["backbone_source"]) == ("random-t5-tiny", "random:random-t5-tiny")
    losses = [row["train_loss"] for row in record["history"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))  # strictly decreasing
    assert losses[-1] < 0.8 * losses[0]
    assert losses[0] < math.log(backbones.T5_VOCAB) + 1  # token cross-entropy of a near-uniform start
    if trainable is not None:
        assert record["trainable_params"] == trainable
    else:
        assert record["trainable_params"] == record["total_params"]
    for split in ("validation", "test"):  # accuracy on 16 examples
        assert record[split] is None or record[split]["accuracy"] * 16 == round(record[split]["accuracy"] * 16)


# ---------------------------------------------------------------- command line


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "readlib", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - start


def test_cli_text_to_text_run():
    proc, _ = cli("train", "--task", "rte", "--method", "read", "--backbone", "random-t5-tiny", "--profile", "quick",
                  "--max_train", "16", "--max_eval", "8", "--max_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["formulation"] == "text-to-text"
    assert (record["task"], record["method"], record["backbone"], record["status"]) == (
        "rte", "read", "random-t5-tiny", "ok")
    assert record["data"]["sizes_used"] == {"train": 16, "validation": 8, "test": 8}
    assert record["epochs_run"] == 1 and record["trainable_params"] == 527_360


def test_cli_text_to_text_needs_a_t5():
    proc, seconds = cli("train", "--task", "rte", "--backbone", "minilm", "--formulation", "text-to-text",
                        "--profile", "quick")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("readlib: error: ") and "text-to-text needs a T5 backbone" in lines[0]
    assert "'minilm'" in lines[0]
    assert proc.stdout == ""
    assert "Loading weights" not in proc.stderr and seconds < 60  # no model was loaded


def test_text_to_text_needs_a_t5_before_any_data_is_loaded(monkeypatch, capsys):
    # readlib/__main__.py: "Bad input exits with code 2 and a one-line message before any data or
    # model is loaded"; readlib/params.py: validate() checks everything "before any data or model is loaded"
    loaded = []
    load_task = readlib.data.load_task

    def spy(*args, **kwargs):
        loaded.append(args)
        return load_task(*args, **kwargs)

    monkeypatch.setattr(readlib.data, "load_task", spy)
    argv = ["train", "--task", "rte", "--backbone", "minilm", "--formulation", "text-to-text", "--profile", "quick"]
    assert main(argv) == 2
    assert "text-to-text needs a T5 backbone" in capsys.readouterr().err
    assert loaded == []


def test_random_t5_is_text_to_text_unless_told_otherwise():
    bb = backbones.load("random-t5-tiny", formulation="classification")
    assert bb.formulation == "classification" and not hasattr(bb.model, "lm_head")
    seq = backbones.load("random-t5-tiny")
    assert seq.formulation == "text-to-text" and seq.eos_id == SEP
