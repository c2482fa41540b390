"""readlib.train units: the loss, greedy decoding and parsing, prediction, step costs, the cache phase's keys."""

import contextlib
import math
import types
from pathlib import Path

import pytest
import torch
from helpers import CPU, ids_of, rte_rows

import readlib.cache
import readlib.data
import readlib.methods
import readlib.paths
import readlib.train
from readlib import backbones, data, methods, train
from readlib.data import Encoded
from readlib.params import RunParams
from readlib.train import build_caches, greedy_decode, parse_generated, predict, task_loss

SEP, PAD = 102, 0  # the bundled word-piece tokenizer's [SEP] (eos for random T5s) and [PAD]


# ---------------------------------------------------------------- Encoded in text-to-text mode


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
    out = parse_generated(rte, tokenizer, ids, SEP, refs, "t5")  # T5's class names; LST's "0"/"1" below
    assert out.tolist() == [0, 1, 1, 0, 1]  # junk and "entailment entailment" are the other class
    assert all(p != r for p, r in zip(out[2:], refs[2:], strict=True))
    mnli = data.get_task("mnli")
    junk_rows = torch.tensor([row(junk + [SEP])] * 3)
    assert parse_generated(mnli, tokenizer, junk_rows, SEP, [0, 1, 2], "t5").tolist() == [1, 2, 0]
    lst = torch.tensor([row(ids_of(tokenizer, "1") + [SEP]), row(ids_of(tokenizer, "0")), row(junk + [SEP]),
                        row(ids_of(tokenizer, "2") + [SEP])])
    assert parse_generated(rte, tokenizer, lst, SEP, [0, 0, 1, 1]).tolist() == [1, 0, 0, 0]  # "2": no RTE class
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
    enc = Encoded(rte_rows(), tokenizer, data.get_task("rte"), max_length=64, eos_id=SEP, target_format="t5")
    model = AnswerModel(ids_of(tokenizer, "not_entailment") + [SEP])
    pred = predict(model, enc, batch_size=1, device=torch.device("cpu"), task=data.get_task("rte"),
                   tokenizer=tokenizer, eos_id=SEP)
    assert pred.tolist() == [1, 1]
    # 5 word pieces + eos = 6 steps: a model that needs 7 is cut off before its end and is wrong
    long = AnswerModel(ids_of(tokenizer, "not not_entailment") + [SEP])
    assert predict(long, enc, 2, torch.device("cpu"), data.get_task("rte"), tokenizer, SEP).tolist() == [1, 0]


# a tiny real run: 64 RTE pairs, 32 validation and 32 test pairs, 2 epochs of 4 steps of 2 micro-batches


def test_step_costs_flops_by_formula():
    """Full fine-tuning of a 2-layer BERT: every matmul's backward costs twice its forward, so a training
    micro-batch is exactly 3x the forward; the forward is the hand count of its matmuls."""
    splits, _ = data.load_task("sst2", max_train=8, max_eval=8)
    backbone = backbones.load("random-bert-tiny")
    split = Encoded(splits["train"], backbone.tokenizer, data.get_task("sst2"), 16)
    model = methods.build("full", backbone, 2)
    run = types.SimpleNamespace(params=types.SimpleNamespace(micro_batch_size=2), eval_batch=4, model=model,
                                device=torch.device("cpu"), splits={"train": split, "validation": split},
                                task=data.get_task("sst2"), regression=False, autocast=contextlib.nullcontext)
    out = train.step_costs(run)
    d, ffn, layers, labels = 64, 128, 2, 2

    def forward(examples: int) -> int:
        b, n = split.batch(torch.arange(examples), torch.device("cpu"))[0]["input_ids"].shape
        per_layer = 2 * b * n * (4 * d * d + 2 * d * ffn) + 2 * (2 * b * n * n * d)  # projections, FFN; QKᵀ, PV
        return layers * per_layer + 2 * b * d * labels  # + the head

    assert out["flops"]["inference_batch"] == forward(4)
    assert out["flops"]["train_micro_batch"] == 3 * forward(2)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind for the optimizer
    phases, weights = out["phases"], 4 * sum(p.numel() for p in model.parameters())
    assert phases["after"]["backward"] - phases["after"]["weights"] >= weights  # every weight has a gradient
    assert phases["after"]["optimizer"] - phases["after"]["backward"] == 2 * weights + 4 * len(list(model.parameters()))


class FakeTokenizer:
    def __init__(self, name="tok", size=100):
        self.name_or_path, self.size = name, size

    def __len__(self):
        return self.size


def fake_backbone(**changes):
    values = dict(source="bundled:x", pretrained=True, num_layers=6, hidden_size=8, tokenizer=FakeTokenizer(),
                  formulation="classification")
    return types.SimpleNamespace(**(values | changes))


def fake_run(params, model, backbone, splits, data_info):
    """What build_caches reads of a readlib.train.Run."""
    return types.SimpleNamespace(params=params, model=model, backbone=backbone, splits=splits, data_info=data_info,
                                 eval_batch=16, device=CPU, autocast=contextlib.nullcontext,
                                 procs=types.SimpleNamespace(main_process_first=contextlib.nullcontext))


DATA_INFO = {"task": "rte", "source": "bundled", "split_seed": 42, "subsample_seed": 0,
             "sizes_full": {"train": 2490}, "sizes_used": {"train": 48, "validation": 24, "test": 24}}


@pytest.fixture
def keys_of(tmp_path, monkeypatch):
    """keys_of(params changes, backbone changes, data_info) -> {split: key} that build_caches uses."""
    monkeypatch.setattr(readlib.paths, "OUTPUT_DIR", tmp_path)
    built = []

    def fake_build_set(model, split, layout, batch_size, device, mode, dtype, path, progress):
        (_, n_layers, d_model), = layout.values()
        built.append((split.name, n_layers, d_model, mode, dtype, Path(path)))
        return readlib.cache.CacheSet(phi=types.SimpleNamespace(nbytes=10, fill_flops=0.0))

    monkeypatch.setattr(readlib.cache, "build_set", fake_build_set)

    def keys_of(params=None, backbone=None, data_info=DATA_INFO, input_ids=((1, 2),)):
        built.clear()
        run = RunParams(task="rte", backbone="minilm", max_length=32, seed=0) if params is None else params
        bb = fake_backbone(**(backbone or {}))
        model = types.SimpleNamespace(cache_layout=lambda split: {"phi": ([2], bb.num_layers, bb.hidden_size)})
        encoded = {name: types.SimpleNamespace(name=name, cache=None, input_ids=[list(ids) for ids in input_ids],
                                               token_type_ids=None, targets=None, formulation="classification")
                   for name in ("train", "validation", "test")}
        info = build_caches(fake_run(run, model, bb, encoded, data_info), False)
        assert info["mode"] == run.cache and info["bytes"] == 30
        assert all(split.cache is not None for split in encoded.values())
        assert all(b[5].parent == tmp_path / "cache" for b in built)
        assert all(b[1:5] == (6 if backbone is None else fake_backbone(**backbone).num_layers, 8, run.cache,
                              run.cache_dtype) for b in built)
        return {b[0]: b[5].name for b in built}

    return keys_of


def test_build_caches_key_covers_what_the_states_depend_on(keys_of):
    base = keys_of()
    assert len(set(base.values())) == 3  # one key per split
    assert keys_of() == base

    def params(**changes):
        return RunParams(**(dict(task="rte", backbone="minilm", max_length=32, seed=0) | changes))

    changed = {
        "backbone": keys_of(params(backbone="random-t5-tiny")),
        "task": keys_of(params(task="mrpc")),
        "max_length": keys_of(params(max_length=64)),
        "dtype": keys_of(params(cache_dtype="float16")),
        "source": keys_of(backbone={"source": "hub:other"}),
        "layers": keys_of(backbone={"num_layers": 4}),
        "tokenizer": keys_of(backbone={"tokenizer": FakeTokenizer(name="other")}),
        "vocab": keys_of(backbone={"tokenizer": FakeTokenizer(size=101)}),
        "random weights": keys_of(backbone={"pretrained": False}),
        "split_seed": keys_of(data_info=DATA_INFO | {"split_seed": 7}),
        "subsample_seed": keys_of(data_info=DATA_INFO | {"subsample_seed": 3}),
        "sizes": keys_of(data_info=DATA_INFO | {"sizes_used": {"train": 40, "validation": 24, "test": 24}}),
        "data source": keys_of(data_info=DATA_INFO | {"source": "local:elsewhere/glue"}),
        "token ids": keys_of(input_ids=((2, 1),)),  # the same lengths, other tokens
    }
    for what, keys in changed.items():
        assert all(keys[s] != base[s] for s in base), what

    # random weights depend on the seed, pretrained ones do not
    random_t5 = {"pretrained": False}
    assert keys_of(params(seed=1), random_t5) != keys_of(params(seed=0), random_t5)
    assert keys_of(params(seed=1)) == base
    # what only the side network's training depends on shares the cache (epochs, LR trials, method args)
    assert keys_of(params(lr=3e-4, batch_size=32, micro_batch_size=4, max_epochs=9,
                          method_args={"hidden": 128})) == base
    assert keys_of(params(cache="disk")) == base


def test_build_caches_off_or_unsupported_method_builds_nothing(monkeypatch):
    monkeypatch.setattr(readlib.cache, "build_set", lambda *a, **k: pytest.fail("no cache should be built"))
    encoded = {"train": types.SimpleNamespace(cache=None)}
    for params in (RunParams(method="read", cache="off"), RunParams(method="lora")):  # lora: no trains_from_cache
        assert build_caches(fake_run(params, object(), fake_backbone(), encoded, DATA_INFO), False) == {"mode": "off"}
    assert encoded["train"].cache is None


def test_lr_schedules_by_hand():
    constant = train.lr_lambda("constant", 4, 10)
    assert [constant(s) for s in range(11)] == [1.0] * 11
    linear = train.lr_lambda("linear_warmup", 4, 10)  # up over 4 steps, then down to 0 at step 10
    assert [linear(s) for s in range(12)] == pytest.approx(
        [0, 0.25, 0.5, 0.75, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0, 0])
    assert train.lr_lambda("linear_warmup", 0, 4)(0) == 1.0  # no warmup: decay from the first step


def test_shard_splits_contiguously_and_covers_everything():
    def procs(rank, n):
        return types.SimpleNamespace(process_index=rank, num_processes=n)

    assert [train.shard(5, procs(r, 2)).tolist() for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [train.shard(2, procs(r, 4)).tolist() for r in range(4)] == [[0], [1], [], []]
    assert train.shard(7, procs(0, 1)).tolist() == list(range(7))
