import collections
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import readlib.cache
import readlib.paths
import readlib.train
from readlib import backbones, data, methods
from readlib.cache import HiddenStateCache, build, cache_key
from readlib.data import Encoded
from readlib.errors import ConfigError
from readlib.params import RunParams, make_params
from readlib.train import build_caches, fit

CPU = torch.device("cpu")
LENGTHS = [3, 1, 4, 1, 5, 9, 2, 6]  # tokens per example; 31 in all
N_LAYERS, D = 3, 5


# --- stubs: a split and a model whose states are a known function of the token ids -----------------


def token_states(token_id: int) -> torch.Tensor:
    """The stub backbone's states of one token, [N_LAYERS, D]: random, but fixed by the token id."""
    return torch.randn(N_LAYERS, D, generator=torch.Generator().manual_seed(token_id))


class StubSplit:
    """What build() needs of a readlib.data.Encoded: input_ids, len() and batch() (pads with 0)."""

    def __init__(self, lengths):
        self.input_ids = [[1000 * (i + 1) + p for p in range(n)] for i, n in enumerate(lengths)]

    def __len__(self):
        return len(self.input_ids)

    def batch(self, idx, device):
        idx = [int(i) for i in idx]
        width = max(len(self.input_ids[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(self.input_ids[i])] = torch.tensor(self.input_ids[i])
            mask[row, : len(self.input_ids[i])] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, None

    def expected(self, idx) -> torch.Tensor:
        """[N_LAYERS, tokens, D] of examples idx, their tokens back to back, computed without any cache."""
        return torch.cat([torch.stack([token_states(t) for t in self.input_ids[i]], 1) for i in idx], 1)


class CountingModel:
    """A stand-in for READ's ``features``: counts its calls and the examples it was given."""

    def __init__(self):
        self.calls, self.rows = 0, 0

    def features(self, input_ids, attention_mask):
        self.calls += 1
        self.rows += input_ids.shape[0]
        return torch.stack([token_states(int(t)) for t in input_ids[attention_mask.bool()]], 1)


def stored_in_shuffled_batches(cache: HiddenStateCache, states: list[np.ndarray], seed: int = 0) -> None:
    perm = np.random.default_rng(seed).permutation(len(states))
    for batch in np.array_split(perm, 3):
        phi = torch.from_numpy(np.concatenate([states[i] for i in batch])).transpose(0, 1)  # [N, tokens, d]
        cache.store(batch.tolist(), phi)


# --- HiddenStateCache ------------------------------------------------------------------------------


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_returns_the_stored_rows_in_gather_order(tmp_path, dtype, on_disk):
    rng = np.random.default_rng(1)
    states = [rng.standard_normal((n, N_LAYERS, D)).astype(np.float32) for n in LENGTHS]
    cache = HiddenStateCache(LENGTHS, N_LAYERS, D, dtype, tmp_path / "c" if on_disk else None)
    assert cache.lengths.tolist() == LENGTHS
    assert cache.offsets.tolist() == [0, 3, 4, 8, 9, 14, 23, 25, 31]
    assert cache.nbytes == 31 * N_LAYERS * D * {"float32": 4, "float16": 2}[dtype]  # 1860 / 930 bytes
    assert cache.states.shape == (31, N_LAYERS, D)
    stored_in_shuffled_batches(cache, states)

    if dtype == "float16":  # stored rounded to float16, returned as float32
        states = [s.astype(np.float16).astype(np.float32) for s in states]
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [5, 0, 7, 3], [6, 6, 1], [4]):
        got = cache.gather(order, CPU)
        assert got.dtype == torch.float32
        assert got.shape == (N_LAYERS, sum(LENGTHS[i] for i in order), D)
        want = torch.from_numpy(np.concatenate([states[i] for i in order])).transpose(0, 1)
        assert torch.equal(got, want)


def test_float16_rounding_is_really_applied():
    """The float16 cache is not silently float32: values that float16 cannot hold come back rounded."""
    cache = HiddenStateCache([1], 1, 2, "float16")
    cache.store([0], torch.tensor([[[1 + 2**-12, 0.1]]]))
    assert cache.gather([0], CPU).tolist() == [[[1.0, 0.0999755859375]]]


# --- sizing -----------------------------------------------------------------------------------------

BIG = [1024] * 1024  # 2**20 tokens; x 6 layers x 128 x 4 bytes = 3 GiB in float32


def test_memory_cache_too_big_fails_before_allocating(monkeypatch):
    monkeypatch.setattr(readlib.cache, "available_memory", lambda: 2**30)  # 1 GiB
    allocated = []
    monkeypatch.setattr(readlib.cache.np, "empty", lambda *a, **k: allocated.append(a))
    with pytest.raises(ConfigError) as err:
        HiddenStateCache(BIG, 6, 128, "float32")
    message = str(err.value)
    assert "3.00 GiB" in message and "1.00 GiB" in message
    assert "cache=disk" in message and "cache_dtype=float16" in message and "cache=off" in message
    assert allocated == []


def test_memory_cache_that_fits_is_allocated(monkeypatch):
    monkeypatch.setattr(readlib.cache, "available_memory", lambda: 10 * 1860)
    assert HiddenStateCache(LENGTHS, N_LAYERS, D).states.shape == (31, N_LAYERS, D)
    monkeypatch.setattr(readlib.cache, "available_memory", lambda: 0)  # unknown: no check possible
    assert HiddenStateCache(LENGTHS, N_LAYERS, D).nbytes == 1860


def test_memory_check_applies_through_build(monkeypatch):
    monkeypatch.setattr(readlib.cache, "available_memory", lambda: 100)
    model = CountingModel()
    with pytest.raises(ConfigError, match=r"needs 0\.00 GiB"):
        build(model, StubSplit(LENGTHS), N_LAYERS, D, 4, CPU, "memory")
    assert model.calls == 0


DiskUsage = collections.namedtuple("DiskUsage", "total used free")


def test_disk_cache_too_big_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(readlib.cache.shutil, "disk_usage", lambda path: DiskUsage(2**40, 2**40 - 2**30, 2**30))
    path = tmp_path / "big"
    with pytest.raises(ConfigError) as err:
        HiddenStateCache(BIG, 6, 128, "float32", path)
    message = str(err.value)
    assert "3.00 GiB on disk" in message and "1.00 GiB is free" in message and str(path) in message
    assert "cache_dtype=float16" in message and "cache=off" in message
    assert not (path / "states.npy").exists()
    # float16 halves it: 1.5 GiB still does not fit, and the message says so
    with pytest.raises(ConfigError, match=r"needs 1\.50 GiB on disk"):
        HiddenStateCache(BIG, 6, 128, "float16", path)


def test_complete_disk_cache_is_read_even_when_the_disk_is_full(tmp_path, monkeypatch):
    split, path = StubSplit(LENGTHS), tmp_path / "c"
    build(CountingModel(), split, N_LAYERS, D, 4, CPU, "disk", path=path, progress=False)
    monkeypatch.setattr(readlib.cache.shutil, "disk_usage", lambda p: DiskUsage(1, 1, 0))
    again = build(CountingModel(), split, N_LAYERS, D, 4, CPU, "disk", path=path, progress=False)
    assert torch.equal(again.gather(range(len(split)), CPU), split.expected(range(len(split))))


# --- build() ----------------------------------------------------------------------------------------


def test_build_in_memory_runs_features_once_per_example():
    split, model = StubSplit(LENGTHS), CountingModel()
    cache = build(model, split, N_LAYERS, D, 3, CPU, "memory", progress=False)
    assert (model.calls, model.rows) == (3, 8)  # batches of 3, 3, 2
    assert cache.path is None and cache.nbytes == 1860
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 2, 2, 5]):
        assert torch.equal(cache.gather(order, CPU), split.expected(order))


def test_build_float16_stores_rounded_states():
    split = StubSplit(LENGTHS)
    cache = build(CountingModel(), split, N_LAYERS, D, 4, CPU, "memory", "float16", progress=False)
    order = [3, 0, 6]
    assert cache.nbytes == 930
    assert torch.equal(cache.gather(order, CPU), split.expected(order).half().float())


def test_disk_build_writes_once_then_reuses(tmp_path):
    split, path = StubSplit(LENGTHS), tmp_path / "cache" / "key"
    first_model = CountingModel()
    first = build(first_model, split, N_LAYERS, D, 4, CPU, "disk", path=path, progress=False)
    assert first_model.calls == 2
    assert sorted(p.name for p in path.iterdir()) == ["complete", "states.npy"]
    on_disk = np.load(path / "states.npy")
    assert on_disk.shape == (31, N_LAYERS, D) and on_disk.dtype == np.float32
    everything = list(range(len(split)))
    assert torch.equal(torch.from_numpy(on_disk).transpose(0, 1), split.expected(everything))

    second_model = CountingModel()
    second = build(second_model, split, N_LAYERS, D, 4, CPU, "disk", path=path, progress=False)
    assert second_model.calls == 0  # the backbone never ran
    assert second.complete
    for order in (everything, [6, 1, 1, 0]):
        assert torch.equal(second.gather(order, CPU), first.gather(order, CPU))


def test_incomplete_disk_cache_is_rebuilt(tmp_path):
    split, path = StubSplit(LENGTHS), tmp_path / "c"
    build(CountingModel(), split, N_LAYERS, D, 4, CPU, "disk", path=path, progress=False)
    # an interrupted run: garbage in the array and no marker
    garbage = np.lib.format.open_memmap(path / "states.npy", mode="r+")
    garbage[:] = 7.0
    garbage.flush()
    del garbage
    (path / "complete").unlink()

    model = CountingModel()
    cache = build(model, split, N_LAYERS, D, 4, CPU, "disk", path=path, progress=False)
    assert (model.calls, model.rows) == (2, 8)
    assert (path / "complete").exists()
    order = [2, 5, 0]
    assert torch.equal(cache.gather(order, CPU), split.expected(order))


def test_memory_mode_writes_nothing_to_the_given_path(tmp_path):
    cache = build(CountingModel(), StubSplit(LENGTHS), N_LAYERS, D, 4, CPU, "memory", path=tmp_path / "c",
                  progress=False)
    assert cache.path is None and not (tmp_path / "c").exists()


def test_build_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="off, memory, disk"):
        build(CountingModel(), StubSplit(LENGTHS), N_LAYERS, D, 4, CPU, "ram")


def test_cache_of_real_read_states(minilm):
    """On MiniLM: the float32 cache holds exactly what READ.features returns for the same batches, the
    float16 cache those values rounded, and forward_features on cached states gives forward's logits."""
    task = data.get_task("rte")
    splits, _ = data.load_task("rte", max_train=6, max_eval=1)
    split = Encoded(splits["train"], minilm.tokenizer, task, max_length=24)
    model = methods.build("read", minilm, task.num_labels).eval()
    direct = torch.cat([model.features(**split.batch(idx, CPU)[0]) for idx in ([0, 1, 2, 3], [4, 5])], 1)
    tokens = sum(map(len, split.input_ids))
    assert direct.shape == (6, tokens, 384)

    full = build(model, split, 6, 384, 4, CPU, "memory", "float32", progress=False)
    half = build(model, split, 6, 384, 4, CPU, "memory", "float16", progress=False)
    assert (full.nbytes, half.nbytes) == (tokens * 6 * 384 * 4, tokens * 6 * 384 * 2)
    assert torch.equal(full.gather(range(6), CPU), direct)
    assert torch.equal(half.gather(range(6), CPU), direct.half().float())

    order = [5, 2, 0]
    inputs, _ = split.batch(order, CPU)
    with torch.no_grad():
        cached = model.forward_features(full.gather(order, CPU), inputs["attention_mask"])
        torch.testing.assert_close(cached, model(**inputs), rtol=0, atol=1e-5)


# --- cache_key -------------------------------------------------------------------------------------

KEY = dict(backbone="minilm", source="bundled:x", weights_seed=None, layers=6, tokenizer="tok", vocab=30522,
           task="rte", split="train", max_length=32, dtype="float32",
           data={"task": "rte", "split_seed": 42, "subsample_seed": 0, "sizes_used": {"train": 48, "test": 24}})


def test_cache_key_is_stable_and_order_independent():
    key = cache_key(**KEY)
    assert cache_key(**KEY) == key
    assert len(key) == 20 and all(c in "0123456789abcdef" for c in key)
    reordered = dict(reversed(list(KEY.items())))
    reordered["data"] = dict(reversed(list(KEY["data"].items())))
    reordered["data"]["sizes_used"] = {"test": 24, "train": 48}
    assert cache_key(**reordered) == key


@pytest.mark.parametrize("field,value", [
    ("backbone", "random-t5-tiny"), ("source", "random:random-t5-tiny"), ("weights_seed", 1), ("layers", 5),
    ("tokenizer", "other-tok"), ("vocab", 32128), ("task", "mrpc"), ("split", "validation"),
    ("max_length", 64), ("dtype", "float16"),
    ("data", KEY["data"] | {"split_seed": 43}), ("data", KEY["data"] | {"subsample_seed": 1}),
    ("data", KEY["data"] | {"sizes_used": {"train": 49, "test": 24}}),
])
def test_cache_key_changes_with_every_input(field, value):
    assert cache_key(**(KEY | {field: value})) != cache_key(**KEY)


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
                                 eval_batch=16, device=CPU)


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
        return readlib.cache.CacheSet(phi=types.SimpleNamespace(nbytes=10))

    monkeypatch.setattr(readlib.cache, "build_set", fake_build_set)

    def keys_of(params=None, backbone=None, data_info=DATA_INFO):
        built.clear()
        run = RunParams(task="rte", backbone="minilm", max_length=32, seed=0) if params is None else params
        bb = fake_backbone(**(backbone or {}))
        model = types.SimpleNamespace(cache_layout=lambda split: {"phi": ([2], bb.num_layers, bb.hidden_size)})
        encoded = {name: types.SimpleNamespace(name=name, cache=None, input_ids=[[1, 2]], formulation="classification")
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


# --- fit() ------------------------------------------------------------------------------------------

SMALL = dict(task="rte", method="read", backbone="minilm", max_train=48, max_eval=24, max_epochs=2,
             batch_size=16, micro_batch_size=8, max_length=32)
TRAIN, EVAL, EPOCHS = 48, 24, 2


class BackboneCalls:
    """Counts backbone passes: calls, examples (rows) and non-padding tokens given to hidden_states."""

    def __init__(self, monkeypatch):
        self.calls, self.rows, self.tokens, self.tokens_per_call = 0, 0, 0, []
        original = backbones.Backbone.hidden_states

        def counting(backbone, input_ids, attention_mask, token_type_ids=None):
            self.calls += 1
            self.rows += input_ids.shape[0]
            self.tokens += int(attention_mask.sum())
            self.tokens_per_call.append(int(attention_mask.sum()))
            return original(backbone, input_ids, attention_mask, token_type_ids)

        monkeypatch.setattr(backbones.Backbone, "hidden_states", counting)


def counted_fit(**overrides):
    with pytest.MonkeyPatch.context() as mp:
        calls = BackboneCalls(mp)
        record = fit(make_params("quick", **(SMALL | overrides)), progress=False)
    return record, calls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readlib.paths, "OUTPUT_DIR", out)
        result = {mode: counted_fit(cache=mode) for mode in ("off", "memory", "disk")}
        result["disk again"] = counted_fit(cache="disk")
    result["dir"] = out
    return result


def assert_same_results(a: dict, b: dict, tol: float = 1e-5):
    assert a["validation"] == b["validation"]
    assert a["test"] == b["test"]
    assert [r["epoch"] for r in a["history"]] == [r["epoch"] for r in b["history"]]
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=tol)
        assert ra["val_score"] == rb["val_score"]


def test_same_seed_same_metrics_with_and_without_cache(runs):
    off, memory = runs["off"][0], runs["memory"][0]
    assert off["epochs_run"] == memory["epochs_run"] == EPOCHS
    assert_same_results(off, memory)


def test_backbone_runs_once_per_example_with_the_cache(runs):
    off_calls, memory_calls = runs["off"][1], runs["memory"][1]
    # after training, the record's costs (train.step_costs): a micro-batch of 8 for the training FLOPs and twice
    # for the memory phases (read from the cache when there is one), and a validation batch of 16 for the
    # inference FLOPs, the latency warm-up and each timed repeat (never from the cache)
    inference = (2 + readlib.train.LATENCY_REPEATS) * 16
    # without a cache: every training example and every validation example in each epoch, then test once
    assert off_calls.rows == EPOCHS * TRAIN + EPOCHS * EVAL + EVAL + 3 * 8 + inference == 168 + 24 + 80
    # with it: each example of each split once, in batches of 2 x micro_batch_size = 16
    assert memory_calls.rows == TRAIN + EVAL + EVAL + inference == 96 + 80
    assert memory_calls.calls == 3 + 2 + 2 + 2 + readlib.train.LATENCY_REPEATS


def test_record_describes_the_cache(runs):
    off, memory = runs["off"][0], runs["memory"][0]
    assert off["cache"] == {"mode": "off"}
    info = memory["cache"]
    assert set(info) == {"mode", "dtype", "bytes", "seconds"}
    assert (info["mode"], info["dtype"]) == ("memory", "float32")
    # all tokens of all three splits (the 3 + 2 + 2 filling passes come first), 6 layers of 384 float32 values each
    assert info["bytes"] == sum(runs["memory"][1].tokens_per_call[:7]) * 6 * 384 * 4
    assert 0 <= info["seconds"] < memory["wall_time_s"]


def test_disk_cache_in_fit_is_written_then_reused(runs):
    disk, disk_calls = runs["disk"]
    again, again_calls = runs["disk again"]
    assert disk["cache"]["mode"] == "disk" and disk["cache"]["bytes"] == runs["memory"][0]["cache"]["bytes"]
    inference = (2 + readlib.train.LATENCY_REPEATS) * 16  # the record's inference costs, never from the cache
    assert disk_calls.rows == 96 + inference
    assert again_calls.calls == 2 + readlib.train.LATENCY_REPEATS  # every split came from disk
    dirs = sorted((runs["dir"] / "cache").iterdir())
    assert len(dirs) == 3
    assert all(sorted(p.name for p in d.iterdir()) == ["complete", "states.npy"] for d in dirs)
    assert sum((d / "states.npy").stat().st_size for d in dirs) > disk["cache"]["bytes"]  # + .npy headers
    assert_same_results(disk, runs["off"][0])
    assert_same_results(again, disk, tol=0)


def test_fit_fails_before_any_backbone_pass_when_the_cache_cannot_fit(monkeypatch):
    monkeypatch.setattr(readlib.cache, "available_memory", lambda: 1024)
    calls = BackboneCalls(monkeypatch)
    with pytest.raises(ConfigError, match="cache=disk"):
        fit(make_params("quick", **SMALL), progress=False)
    assert calls.calls == 0


def test_full_fine_tuning_ignores_the_cache():
    record, calls = counted_fit(method="full", cache="memory", max_train=8, max_eval=4, max_epochs=1,
                                batch_size=8, max_length=16)
    assert record["cache"] == {"mode": "off"}
    assert record["status"] == "ok"
    assert calls.calls == 0  # full fine-tuning runs the trainable backbone itself, never from states


# --- params -----------------------------------------------------------------------------------------


def test_params_reject_unknown_cache_mode_and_dtype():
    with pytest.raises(ConfigError, match=r"unknown cache 'ram'; choose one of: off, memory, disk"):
        make_params("quick", cache="ram")
    with pytest.raises(ConfigError, match=r"unknown cache_dtype 'int8'; choose one of: float32, float16"):
        make_params("quick", cache_dtype="int8")
    assert (RunParams().cache, RunParams().cache_dtype) == ("memory", "float32")
    assert make_params("quick", cache="disk", cache_dtype="float16").cache_dtype == "float16"


def test_text_to_text_read_trains_from_the_cache_with_the_same_numbers():
    # encoder states, decoder states and cross-attention scores come from the cache; evaluation
    # generates, so only the training split is cached
    runs = {}
    for mode in ("off", "memory"):
        runs[mode] = fit(make_params("quick", task="stsb", method="read", backbone="random-t5-tiny", max_train=24,
                                     max_eval=8, max_epochs=2, patience=2, lr=3e-3, batch_size=8, micro_batch_size=4,
                                     max_length=32, cache=mode), progress=False)
    losses = [[row["train_loss"] for row in runs[mode]["history"]] for mode in ("off", "memory")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert runs["off"]["test"] == runs["memory"]["test"]
    assert runs["memory"]["cache"]["mode"] == "memory" and runs["memory"]["cache"]["bytes"] > 0


def test_text_to_text_cache_rows_rebuild_the_backbone_pass():
    bb = backbones.load("random-t5-tiny")
    model = methods.build("read", bb, 1)
    task = data.get_task("rte")
    rows = {"sentence1": ["a b c d e", "f g"], "sentence2": ["h", "i j k"], "label": [0, 1], "idx": [0, 1]}
    split = Encoded(datasets.Dataset.from_dict(rows), bb.tokenizer, task, 32, bb.eos_id)
    store = readlib.cache.build_set(model, split, model.cache_layout(split), 2, CPU, progress=False)
    assert set(store) == {"phi_e", "phi_d", "sigma"}
    for order in ([0, 1], [1, 0]):  # gathered in any order, the rows follow the indices
        inputs, _ = split.batch(order, CPU)
        masks = {k: v for k, v in inputs.items() if k.endswith("attention_mask")}
        keep = inputs["decoder_attention_mask"].bool()
        cached = model.forward_features(store.gather(order, CPU), **masks)[keep]
        direct = model(**inputs)[keep]
        # cached and live states may come from other batch shapes: rounding relative to the logits (~5)
        assert torch.allclose(cached, direct, rtol=1e-5, atol=1e-5 * direct.abs().max().item())
