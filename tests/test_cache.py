"""readlib.cache: the hidden-state cache (round trip, float16, sizing, disk reuse, the key) on stub splits and READ."""

import collections

import datasets
import numpy as np
import pytest
import torch
from helpers import CPU

import readlib.cache
import readlib.paths
import readlib.train
from readlib import backbones, data, methods
from readlib.cache import HiddenStateCache, build, cache_key
from readlib.data import Encoded
from readlib.errors import ConfigError

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
