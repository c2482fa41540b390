"""A disk cache that changed, shrank or vanished after it was written is reported in one line and rebuilt, never used;
a cache whose data changed under the same paths and sizes is never reused."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CPU

import readlib.cache
import readlib.paths
from readlib.cache import MARKER, build
from readlib.params import make_params
from readlib.train import fit

LAYERS, WIDTH = 4, 256  # 4 KiB of float32 states per token
LENGTHS = [37, 5, 90, 64, 1, 120, 33, 50]  # 400 tokens: 1.6 MB, more than the 1 MiB a case overwrites


class Stub:
    """A split and a backbone in one: token t of example i has states (i * 1000 + t) / 7 + layer/width offsets."""

    def __init__(self):
        self.input_ids = [[i * 1000 + t for t in range(n)] for i, n in enumerate(LENGTHS)]
        self.calls = 0

    def __len__(self):
        return len(self.input_ids)

    def batch(self, idx, device):
        width = max(len(self.input_ids[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, : len(self.input_ids[i])] = torch.tensor(self.input_ids[i])
            mask[row, : len(self.input_ids[i])] = 1
        return {"input_ids": ids, "attention_mask": mask}, None

    def features(self, input_ids, attention_mask):
        self.calls += 1
        tokens = input_ids[attention_mask.bool()].double()
        grid = torch.arange(LAYERS * WIDTH, dtype=torch.float64).view(LAYERS, 1, WIDTH)
        return (tokens.view(1, -1, 1) / 7 + grid / 1000).float()

    def expected(self) -> torch.Tensor:
        return self.features(*self.batch(list(range(len(self))), CPU)[0].values())


def built(stub: Stub, path):
    return build(stub, stub, LAYERS, WIDTH, 3, CPU, "disk", path=path, progress=False)


def flip_64_bytes(file):
    with open(file, "r+b") as f:
        f.seek(800_000)
        chunk = bytearray(f.read(64))
        f.seek(800_000)
        f.write(bytes(b ^ 0xFF for b in chunk))


def overwrite_1_mib(file):
    with open(file, "r+b") as f:
        f.seek(200_000)
        f.write(np.random.default_rng(0).bytes(2**20))


def truncate(file):
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 4096)


DAMAGE = {
    "64 bytes flipped": (flip_64_bytes, "changed after it was written"),
    "1 MiB overwritten": (overwrite_1_mib, "changed after it was written"),
    "truncated": (truncate, "truncated or replaced"),
    "deleted": (lambda file: file.unlink(), "has lost its states.npy"),
    "marker without checksums": (lambda file: (file.parent / MARKER).write_text(""), "has no checksums"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_cache_is_reported_and_rebuilt(tmp_path, caplog, case):
    damage, reason = DAMAGE[case]
    path = tmp_path / "key"
    first = Stub()
    built(first, path)
    assert first.calls == 3
    damage(path / "states.npy")

    again = Stub()
    with caplog.at_level(logging.WARNING, logger="readlib.cache"):
        cache = built(again, path)
    assert again.calls == 3  # the backbone ran again: the damaged file was not used
    lines = [r.getMessage() for r in caplog.records if r.name == "readlib.cache"]
    assert len(lines) == 1 and reason in lines[0] and str(path) in lines[0] and "\n" not in lines[0]
    assert torch.equal(cache.gather(range(len(again)), CPU), again.expected())

    third = Stub()  # the rebuilt cache is whole: read without a pass and without a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="readlib.cache"):
        cache = built(third, path)
    assert third.calls == 0 and not caplog.records
    assert torch.equal(cache.gather(range(len(third)), CPU), third.expected())


def test_every_block_is_checked(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(readlib.cache, "BLOCK_BYTES", 4096)
    path = tmp_path / "key"
    built(Stub(), path)
    size = (path / "states.npy").stat().st_size
    with open(path / "states.npy", "r+b") as f:  # one byte of the last block
        f.seek(size - 1)
        last = f.read(1)
        f.seek(size - 1)
        f.write(bytes([last[0] ^ 1]))
    with caplog.at_level(logging.WARNING, logger="readlib.cache"):
        built(again := Stub(), path)
    assert again.calls == 3
    assert f"bytes {(size - 1) // 4096 * 4096:,}+ differs" in caplog.records[0].getMessage()


# --- end to end: fit() on real data with a disk cache -------------------------------------------------------------

RUN = dict(task="rte", method="read", backbone="minilm", max_train=32, max_eval=16, max_epochs=2, batch_size=16,
           micro_batch_size=16, max_length=32, cache="disk")


def scores(record: dict) -> tuple:
    return record["validation"], record["test"], [(r["train_loss"], r["val_score"]) for r in record["history"]]


def test_fit_on_a_corrupted_cache_gives_the_clean_results(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(readlib.paths, "OUTPUT_DIR", tmp_path)
    clean = fit(make_params("quick", **RUN), progress=False)
    train_cache = next(p for p in (tmp_path / "cache").iterdir()
                       if (p / "states.npy").stat().st_size == max(q.stat().st_size for q in
                                                                  (tmp_path / "cache").glob("*/states.npy")))
    overwrite_1_mib(train_cache / "states.npy")  # the largest split's states (train); 1 MiB at 200 kB
    with caplog.at_level(logging.WARNING, logger="readlib.cache"):
        again = fit(make_params("quick", **RUN), progress=False)
    assert [r.getMessage() for r in caplog.records if r.name == "readlib.cache"] != []
    assert scores(again) == scores(clean)


def test_changed_texts_with_the_same_token_counts_get_their_own_cache(tmp_path, monkeypatch):
    """sentence1 and sentence2 swapped: the same files, sizes and token counts, different inputs."""
    monkeypatch.setattr(readlib.paths, "OUTPUT_DIR", tmp_path / "out")
    data = tmp_path / "data" / "rte"
    data.mkdir(parents=True)
    for split in ("train", "validation"):
        pd.read_parquet(readlib.paths.BUNDLED_GLUE / "rte" / f"{split}.parquet").to_parquet(data / f"{split}.parquet")
    fit(make_params("quick", **RUN, data_dir=str(tmp_path / "data")), progress=False)
    for split in ("train", "validation"):
        frame = pd.read_parquet(data / f"{split}.parquet")
        frame[["sentence1", "sentence2"]] = frame[["sentence2", "sentence1"]].to_numpy()
        frame.to_parquet(data / f"{split}.parquet")
    fit(make_params("quick", **RUN, data_dir=str(tmp_path / "data")), progress=False)
    assert len(list((tmp_path / "out" / "cache").iterdir())) == 2 * 3  # train, validation, test: twice
