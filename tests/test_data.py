import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from readlib import data
from readlib.errors import ConfigError, DataNotFoundError

BUNDLED = ("cola", "sst2", "mrpc", "stsb", "rte")
# (train, validation, test) by the Section 3.2 recipe from the official GLUE sizes
EXPECTED = {
    "cola": (8551, 521, 522),  # 1043 validation rows -> 521 / 522
    "sst2": (66349, 1000, 872),  # 67349 >= 10k train rows -> 1k held out, validation is test
    "mrpc": (3668, 204, 204),
    "stsb": (5749, 750, 750),
    "rte": (2490, 138, 139),
}


@pytest.fixture(scope="module")
def raw():
    return {t: data.load_raw(t) for t in BUNDLED}


@pytest.fixture(scope="module")
def split(raw):
    return {t: data.paper_split(raw[t], t) for t in BUNDLED}


def idx(ds):
    return list(ds["idx"])


def test_registry():
    assert set(data.TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert data.PAPER_TASKS == ("cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb")
    assert [data.get_task(t).num_labels for t in ("cola", "stsb", "mnli")] == [2, 1, 3]
    assert data.get_task("stsb").is_regression and not data.get_task("sst2").is_regression
    assert data.BUNDLED_DIR.is_dir()


def test_unknown_task_lists_choices():
    with pytest.raises(ConfigError) as e:
        data.get_task("xyz")
    msg = str(e.value)
    assert "'xyz'" in msg and "\n" not in msg
    assert msg.endswith("cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb")


def test_raw_schema(raw):
    assert raw["cola"]["train"].column_names == ["sentence", "label", "idx"]
    assert raw["mrpc"]["validation"].column_names == ["sentence1", "sentence2", "label", "idx"]
    assert raw["cola"]["train"].features["label"].names == ["unacceptable", "acceptable"]
    assert raw["cola"]["train"].data.schema.field("label").type == "int64"
    assert raw["stsb"]["train"].data.schema.field("label").type == "float"


@pytest.mark.parametrize("task", BUNDLED)
def test_paper_split_sizes(split, task):
    sizes = tuple(len(split[task][s]) for s in ("train", "validation", "test"))
    assert sizes == EXPECTED[task]
    assert data.paper_split_sizes(task) == dict(zip(("train", "validation", "test"), sizes, strict=True))


def test_paper_split_sizes_large_and_mnli():
    assert data.paper_split_sizes("qqp") == {"train": 362846, "validation": 1000, "test": 40430}
    assert data.paper_split_sizes("qnli") == {"train": 103743, "validation": 1000, "test": 5463}
    assert data.paper_split_sizes("mnli") == {"train": 392702, "validation": 9832, "test": 9815}
    assert data.paper_split_sizes("cola", 9999, 11) == {"train": 9999, "validation": 5, "test": 6}
    assert data.paper_split_sizes("cola", 10000, 11) == {"train": 9000, "validation": 1000, "test": 11}


def test_small_task_halves_validation_exactly(raw, split):
    # validation = first floor(1043/2) rows of default_rng(42).permutation, in original order
    perm = np.random.default_rng(42).permutation(1043)
    val_idx = idx(raw["cola"]["validation"])
    assert idx(split["cola"]["validation"]) == [val_idx[i] for i in np.sort(perm[:521])]
    assert idx(split["cola"]["test"]) == [val_idx[i] for i in np.sort(perm[521:])]
    assert idx(split["cola"]["train"]) == idx(raw["cola"]["train"])


@pytest.mark.parametrize("task", ("cola", "mrpc", "stsb", "rte"))
def test_small_task_split_partitions_validation(raw, split, task):
    val, test = set(idx(split[task]["validation"])), set(idx(split[task]["test"]))
    assert not val & test
    assert val | test == set(idx(raw[task]["validation"]))


def test_large_task_holds_out_train(raw, split):
    train, val = set(idx(split["sst2"]["train"])), set(idx(split["sst2"]["validation"]))
    assert not train & val
    assert train | val == set(idx(raw["sst2"]["train"]))
    assert idx(split["sst2"]["test"]) == idx(raw["sst2"]["validation"])
    assert idx(split["sst2"]["validation"]) == sorted(val)  # sst2 idx is the row number


def test_paper_split_deterministic(raw, split):
    again = data.paper_split(raw["mrpc"], "mrpc", seed=42)
    other = data.paper_split(raw["mrpc"], "mrpc", seed=7)
    for s in ("train", "validation", "test"):
        assert idx(again[s]) == idx(split["mrpc"][s])
    assert idx(other["validation"]) != idx(split["mrpc"]["validation"])
    # rows keep their original relative order (mrpc idx has gaps but increases in the file)
    position = {i: p for p, i in enumerate(idx(raw["mrpc"]["validation"]))}
    positions = [position[i] for i in idx(split["mrpc"]["test"])]
    assert positions == sorted(positions)


def test_mnli_split_mapping():
    def ds(n, start):
        return data.datasets.Dataset.from_dict({"idx": list(range(start, start + n))})
    raw = data.datasets.DatasetDict(train=ds(5, 0), validation_matched=ds(3, 100),
                                    validation_mismatched=ds(2, 200))
    out = data.paper_split(raw, "mnli")
    assert idx(out["train"]) == [0, 1, 2, 3, 4]
    assert idx(out["validation"]) == [200, 201]
    assert idx(out["test"]) == [100, 101, 102]


def test_subsample(raw):
    ds = raw["rte"]["validation"]
    a, b = data.subsample(ds, 50, seed=3), data.subsample(ds, 50, seed=3)
    assert idx(a) == idx(b)
    assert idx(a) == [idx(ds)[i] for i in np.sort(np.random.default_rng(3).permutation(277)[:50])]
    assert idx(data.subsample(ds, 50, seed=4)) != idx(a)
    assert data.subsample(ds, None) is ds and data.subsample(ds, 277) is ds
    with pytest.raises(ConfigError):
        data.subsample(ds, 0)


def test_load_task_records_data():
    splits, info = data.load_task("cola", max_train=100, max_eval=50)
    assert info == {"task": "cola", "source": "local:data/glue", "split_seed": 42,
                    "sizes_full": {"train": 8551, "validation": 521, "test": 522},
                    "sizes_used": {"train": 100, "validation": 50, "test": 50}, "subsample_seed": 0}
    again, _ = data.load_task("cola", max_train=100, max_eval=50)
    assert all(idx(splits[s]) == idx(again[s]) for s in ("train", "validation", "test"))
    assert not set(idx(splits["validation"])) & set(idx(splits["test"]))


def test_load_task_validates_before_loading():
    with pytest.raises(ConfigError, match="max_train"):
        data.load_task("cola", max_train=0)
    with pytest.raises(ConfigError, match="unknown task"):
        data.load_task("glue")


def test_check_available(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert data.check_available("sst2") == "local:data/glue"
    assert data.local_files("qnli") is None  # validation only: train is missing
    assert data.check_available("qqp") == "hub"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    with pytest.raises(DataNotFoundError):
        data.check_available("qnli")


def test_missing_task_offline_explains(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as e:
        data.load_task("qqp", data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("'qqp'", "data_dir", "HF_HUB_OFFLINE", "nyu-mll/glue", "question1, question2, label, idx",
                 str(tmp_path / "qqp" / "train.parquet"), str(tmp_path / "qqp" / "validation.parquet"),
                 str(data.BUNDLED_DIR / "qqp" / "train.parquet"),
                 str(data.BUNDLED_DIR / "qqp" / "validation.parquet")):
        assert part in msg


def test_data_dir_override(tmp_path):
    # a trimmed rte (100 validation rows) with an extra column: proves data_dir wins over the bundle
    (tmp_path / "rte").mkdir()
    shutil.copy(data.BUNDLED_DIR / "rte" / "train.parquet", tmp_path / "rte" / "train.parquet")
    table = pq.read_table(data.BUNDLED_DIR / "rte" / "validation.parquet").slice(0, 100)
    pq.write_table(table.append_column("extra", table["idx"]), tmp_path / "rte" / "validation.parquet")
    splits, info = data.load_task("rte", data_dir=tmp_path)
    assert info["source"] == f"local:{tmp_path}"
    assert info["sizes_full"] == {"train": 2490, "validation": 50, "test": 50}
    assert splits["test"].column_names == ["sentence1", "sentence2", "label", "idx"]
    # a data_dir without the task falls back to the bundled copy
    assert data.check_available("cola", tmp_path) == "local:data/glue"


def test_split_table():
    t = data.split_table().set_index("task")
    cols = ["train_ours", "validation_ours", "test_ours", "train_paper", "validation_paper",
            "test_paper", "follows_recipe"]
    assert list(t.index) == [*data.PAPER_TASKS, "rte"]
    assert cols == list(t.columns[:7])
    # Table 5 (train, validation, test) in rows; the paper prints (train, test, validation) in k
    paper = {"cola": (8500, 520, 520), "mnli": (392700, 9800, 9800), "qnli": (99300, 1000, 5400),
             "mrpc": (3700, 200, 200), "qqp": (323400, 1000, 40400), "sst2": (66500, 1000, 900),
             "stsb": (5800, 800, 800)}
    for task, sizes in paper.items():
        assert tuple(t.loc[task, ["train_paper", "validation_paper", "test_paper"]]) == sizes
        ours = data.paper_split_sizes(task)
        assert tuple(t.loc[task, ["train_ours", "validation_ours", "test_ours"]]) == (
            ours["train"], ours["validation"], ours["test"])
    follows = t["follows_recipe"].drop("rte")
    assert sorted(follows[~follows].index) == ["qnli", "qqp", "sst2"]
    assert t.loc["rte", "note"] == "not in paper"
    assert pd.isna(t.loc["rte", "follows_recipe"]) and pd.isna(t.loc["rte", "train_paper"])
    assert tuple(t.loc["rte", ["train_ours", "validation_ours", "test_ours"]]) == EXPECTED["rte"]
