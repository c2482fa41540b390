"""readlib.data: the GLUE registry, loading, the paper's splits, the T5 text-to-text strings and Encoded splits."""

import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import ids_of, rte_rows

from readlib import data
from readlib.data import Encoded
from readlib.errors import ConfigError, DataNotFoundError
from readlib.train import parse_generated

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
    """Splits by the "numpy" recipe (np.random.default_rng permutation, rows in original order)."""
    return {t: data.paper_split(raw[t], t, recipe="numpy") for t in BUNDLED}


@pytest.fixture(scope="module")
def lst_split(raw):
    """Splits by the default "lst" recipe (LST's torch.randperm slices)."""
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
def test_paper_split_sizes(split, lst_split, task):
    for splits in (split, lst_split):
        sizes = tuple(len(splits[task][s]) for s in ("train", "validation", "test"))
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
    again = data.paper_split(raw["mrpc"], "mrpc", seed=42, recipe="numpy")
    other = data.paper_split(raw["mrpc"], "mrpc", seed=7, recipe="numpy")
    for s in ("train", "validation", "test"):
        assert idx(again[s]) == idx(split["mrpc"][s])
    assert idx(other["validation"]) != idx(split["mrpc"]["validation"])
    # rows keep their original relative order (mrpc idx has gaps but increases in the file)
    position = {i: p for p, i in enumerate(idx(raw["mrpc"]["validation"]))}
    positions = [position[i] for i in idx(split["mrpc"]["test"])]
    assert positions == sorted(positions)


@pytest.mark.parametrize("recipe", data.SPLIT_RECIPES)
def test_mnli_split_mapping(recipe):
    # LST's MNLI.split_to_data_split: validation_mismatched is validation, validation_matched is test, no shuffling
    def ds(n, start):
        return data.datasets.Dataset.from_dict({"idx": list(range(start, start + n))})
    raw = data.datasets.DatasetDict(train=ds(5, 0), validation_matched=ds(3, 100),
                                    validation_mismatched=ds(2, 200))
    out = data.paper_split(raw, "mnli", recipe=recipe)
    assert idx(out["train"]) == [0, 1, 2, 3, 4]
    assert idx(out["validation"]) == [200, 201]
    assert idx(out["test"]) == [100, 101, 102]


def lst_indices(n, seed=42):
    """LST's AbstractTask.shuffled_indices (ylsung/Ladder-Side-Tuning seq2seq/data/tasks.py), written out again."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


@pytest.mark.parametrize("task", BUNDLED)
def test_lst_split_is_lsts_procedure(raw, lst_split, task):
    # LST's AbstractTask.get / get_split_indices with split_validation_test and data_seed 42: small tasks
    # (cola, rte, mrpc, stsb) shuffle the original validation, its first len // 2 rows are validation and the
    # rest test, train untouched; large ones (sst2, qnli, qqp) shuffle train, its first 1000 rows are validation
    # and the rest train, the original validation is test. Rows in the shuffled order (dataset.select(indices)).
    train, val = idx(raw[task]["train"]), idx(raw[task]["validation"])
    if task == "sst2":
        perm = lst_indices(len(train))
        expected = {"train": [train[i] for i in perm[1000:]], "validation": [train[i] for i in perm[:1000]],
                    "test": val}
    else:
        perm, k = lst_indices(len(val)), len(val) // 2
        expected = {"train": train, "validation": [val[i] for i in perm[:k]], "test": [val[i] for i in perm[k:]]}
    for s in ("train", "validation", "test"):
        assert idx(lst_split[task][s]) == expected[s]
        assert len(set(expected[s])) == len(expected[s]) == data.paper_split_sizes(task)[s]
    # the two halves of the shuffled split share no row (idx numbers each original split from 0)
    halves = ("train", "validation") if task == "sst2" else ("validation", "test")
    assert set(idx(lst_split[task][halves[0]])).isdisjoint(idx(lst_split[task][halves[1]]))


# the first selected ids (GLUE idx column) of LST's splits, pinned: PyTorch keeps its old CPU randperm algorithm for
# n < 2**32 / 20 (randperm_cpu in ATen's TensorFactories.cpp), so these hold across versions
LST_FIRST_IDS = {
    "cola": ([911, 408, 813, 657, 710], [334, 85, 10, 327, 486]),
    "sst2": ([6677, 49712, 38268, 32909, 23395], [0, 1, 2, 3, 4]),
    "mrpc": ([334, 601, 3423, 3251, 54], [83, 1083, 796, 2396, 617]),  # rows 30, 63, 342, ...: mrpc idx has gaps
    "stsb": ([42, 340, 1028, 766, 1150], [895, 1352, 773, 165, 179]),
    "rte": ([207, 84, 253, 243, 190], [152, 221, 79, 245, 103]),
}


@pytest.mark.parametrize("task", BUNDLED)
def test_lst_split_first_ids(split, lst_split, task):
    validation, test = LST_FIRST_IDS[task]
    assert idx(lst_split[task]["validation"])[:5] == validation
    assert idx(lst_split[task]["test"])[:5] == test
    # other rows than the numpy recipe, out of the same ones
    assert set(idx(lst_split[task]["validation"])) != set(idx(split[task]["validation"]))
    def all_ids(splits):
        return sorted(i for s in ("train", "validation", "test") for i in idx(splits[task][s]))
    assert all_ids(lst_split) == all_ids(split)


def test_unknown_recipe_and_format():
    rte = data.get_task("rte")
    with pytest.raises(ConfigError, match="lst, numpy"):
        data.paper_split(datasets.DatasetDict(), "rte", recipe="torch")
    with pytest.raises(ConfigError, match="split recipe"):
        data.load_task("rte", split_recipe="LST")
    for call in (lambda: data.t5_source(rte, {"sentence1": "a", "sentence2": "b"}, "T5"),
                 lambda: data.t5_target(rte, 0, "compacter"), lambda: data.t5_label(rte, "0", "index"),
                 lambda: Encoded(rte_rows(), None, rte, 8, eos_id=1, target_format="name")):
        with pytest.raises(ConfigError, match="lst, t5"):
            call()


def test_subsample(raw):
    ds = raw["rte"]["validation"]
    a, b = data.subsample(ds, 50, seed=3), data.subsample(ds, 50, seed=3)
    assert idx(a) == idx(b)
    assert idx(a) == [idx(ds)[i] for i in np.sort(np.random.default_rng(3).permutation(277)[:50])]
    assert idx(data.subsample(ds, 50, seed=4)) != idx(a)
    assert data.subsample(ds, None) is ds and data.subsample(ds, 277) is ds
    with pytest.raises(ConfigError):
        data.subsample(ds, 0)


def test_load_task_records_data(lst_split, split):
    splits, info = data.load_task("cola", max_train=100, max_eval=50)
    assert info == {"task": "cola", "source": "local:data/glue", "revision": data.revision("cola"), "split_seed": 42,
                    "split_recipe": "lst",
                    "sizes_full": {"train": 8551, "validation": 521, "test": 522},
                    "sizes_used": {"train": 100, "validation": 50, "test": 50}, "subsample_seed": 0}
    again, _ = data.load_task("cola", max_train=100, max_eval=50)
    assert all(idx(splits[s]) == idx(again[s]) for s in ("train", "validation", "test"))
    assert not set(idx(splits["validation"])) & set(idx(splits["test"]))
    assert set(idx(splits["validation"])) <= set(idx(lst_split["cola"]["validation"]))
    full, info = data.load_task("cola", split_recipe="numpy")
    assert info["split_recipe"] == "numpy"
    assert all(idx(full[s]) == idx(split["cola"][s]) for s in ("train", "validation", "test"))


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


def test_missing_task_offline_explains(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as e:
        data.load_task("qqp")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("'qqp'", "data_dir", "HF_HUB_OFFLINE", "nyu-mll/glue", "question1, question2, label, idx",
                 str(data.BUNDLED_DIR / "qqp" / "train.parquet"),
                 str(data.BUNDLED_DIR / "qqp" / "validation.parquet")):
        assert part in msg


def test_a_data_dir_without_the_task_names_what_is_missing(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        data.load_task("qqp", data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "never completed from the bundled data or the hub" in msg
    assert str(tmp_path / "qqp" / "train.parquet") in msg and str(tmp_path / "qqp" / "validation.parquet") in msg


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
    # a data_dir without the task is an error, never the bundled copy
    with pytest.raises(DataNotFoundError, match="has no folder cola/"):
        data.check_available("cola", tmp_path)


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


# ---------------------------------------------------------------- source and target strings


def bundled_row(task, split, i):
    return pq.read_table(data.BUNDLED_DIR / task / f"{split}.parquet").slice(i, 1).to_pylist()[0]


# One row per task -> (source, target) as
# "lst": ylsung/Ladder-Side-Tuning seq2seq/data/tasks.py, <Task>.preprocessor + AbstractTask.seq2seq_format with
#        add_prefix=True (run_seq2seq.py: add_prefix=False only with train_task_adapters), target str(label), STS-B
#        str(round_stsb_target(label)) = str(np.round((label * 5) / 5, decimals=1)); MNLI's key "hypothesis" has no
#        colon there;
# "t5":  T5's t5/data/preprocessors.py glue() (fields sorted by name, target the class name) and stsb()
#        (round(5 x) / 5).
# QQP and MNLI are not bundled: hand-built rows in their GLUE schema. QNLI: its bundled validation split.
MRPC_1 = 'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .'
MRPC_2 = ('Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting his '
          'evidence .')
QNLI_Q = "What came into force after the new constitution was herald?"
QNLI_S = "As of that day, the new constitution heralding the Second Republic came into force."
ROWS = {
    "cola": (bundled_row("cola", "train", 0),
             ("cola sentence: Our friends won't buy this analysis, let alone the next one we propose.", "1"),
             ("cola sentence: Our friends won't buy this analysis, let alone the next one we propose.", "acceptable")),
    "sst2": (bundled_row("sst2", "train", 0),  # GLUE's SST-2 text keeps its trailing space
             ("sst2 sentence: hide new secretions from the parental units ", "0"),
             ("sst2 sentence: hide new secretions from the parental units ", "negative")),
    "mrpc": (bundled_row("mrpc", "train", 0),
             (f"mrpc sentence1: {MRPC_1} sentence2: {MRPC_2}", "1"),
             (f"mrpc sentence1: {MRPC_1} sentence2: {MRPC_2}", "equivalent")),
    "qqp": ({"question1": "How do I learn Python?", "question2": "What is the best way to learn Python?",
             "label": 1, "idx": 5},
            ("qqp question1: How do I learn Python? question2: What is the best way to learn Python?", "1"),
            ("qqp question1: How do I learn Python? question2: What is the best way to learn Python?", "duplicate")),
    "stsb": (bundled_row("stsb", "train", 12),  # label 3.867 (float32 3.867000102996826)
             ("stsb sentence1: A man is playing a flute. sentence2: A man is playing a bamboo flute.", "3.9"),
             ("stsb sentence1: A man is playing a flute. sentence2: A man is playing a bamboo flute.", "3.8")),
    "mnli": ({"premise": "The cat sat on the mat.", "hypothesis": "A cat is sitting.", "label": 0, "idx": 3},
             ("mnli premise: The cat sat on the mat. hypothesis A cat is sitting.", "0"),
             ("mnli hypothesis: A cat is sitting. premise: The cat sat on the mat.", "entailment")),
    "qnli": (bundled_row("qnli", "validation", 0),
             (f"qnli question: {QNLI_Q} sentence: {QNLI_S}", "0"),
             (f"qnli question: {QNLI_Q} sentence: {QNLI_S}", "entailment")),
    "rte": (bundled_row("rte", "train", 0),
            ("rte sentence1: No Weapons of Mass Destruction Found in Iraq Yet. sentence2: Weapons of Mass Destruction "
             "Found in Iraq.", "1"),
            ("rte sentence1: No Weapons of Mass Destruction Found in Iraq Yet. sentence2: Weapons of Mass Destruction "
             "Found in Iraq.", "not_entailment")),
}


def test_rows_cover_every_task():
    assert set(ROWS) == set(data.TASKS)
    assert data.TARGET_FORMATS == ("lst", "t5")


@pytest.mark.parametrize("task", sorted(ROWS))
def test_source_and_target_strings(task):
    spec, (row, lst, t5) = data.get_task(task), ROWS[task]
    assert (data.t5_source(spec, row), data.t5_target(spec, row["label"])) == lst  # "lst" is the default
    assert (data.t5_source(spec, row, "lst"), data.t5_target(spec, row["label"], "lst")) == lst
    assert (data.t5_source(spec, row, "t5"), data.t5_target(spec, row["label"], "t5")) == t5
    # and back: the label index, or the rounded score
    assert data.t5_label(spec, lst[1], "lst") == (pytest.approx(3.9) if spec.is_regression else row["label"])
    assert data.t5_label(spec, t5[1], "t5") == (pytest.approx(3.8) if spec.is_regression else row["label"])


@pytest.mark.parametrize("task", sorted(CLASS_NAMES))
def test_t5_target_classes(task):
    spec = data.get_task(task)
    for label in (*range(spec.num_labels), *map(float, range(spec.num_labels))):
        assert data.t5_target(spec, label, "t5") == CLASS_NAMES[task][int(label)]
        assert data.t5_target(spec, label, "lst") == "012"[int(label)]


# STS-B "t5": T5's recipe round(5 * score) / 5, where round() breaks ties to the even integer
# ("banker's rounding", as tf.round does)
STSB_T5_TARGETS = [
    (3.87, "3.8"),  # 19.35 -> 19 -> 3.8
    (3.9, "4.0"),  # 19.5 -> tie -> even 20 -> 4.0
    (3.7, "3.6"),  # 18.5 -> tie -> even 18 -> 3.6 (not 3.8)
    (0.5, "0.4"),  # 2.5 -> even 2 -> 0.4
    (1.1, "1.2"),  # 5.5 -> even 6 -> 1.2
    (0.3, "0.4"),  # 1.5 -> even 2 -> 0.4 (dividing by 0.2 instead gives 1.4999999999999998 -> 0.2)
    (0.1, "0.0"),  # 0.5 -> even 0 -> 0.0
    (4.25, "4.2"),  # 21.25 -> 21 -> 4.2
    (4.99, "5.0"),  # 24.95 -> 25 -> 5.0
    (0.09, "0.0"),  # 0.45 -> 0
    (5.0, "5.0"),
    (0.0, "0.0"),
    (2, "2.0"),  # an integer label
]

# STS-B "lst": LST's round_stsb_target, np.round((x * 5) / 5, decimals=1) = rint(10 x) / 10 (numpy: ties to even,
# after 10 x is rounded to a double). GLUE's STS-B labels are float32; 335 of the bundled train labels are ties
# (0.25, 0.75, 0.85, 1.25, ..., 4.75)
F32 = float(np.float32(0.85))  # 0.8500000238418579
STSB_LST_TARGETS = [
    (3.87, "3.9"),  # 38.7 -> 39
    (3.867000102996826, "3.9"),  # a bundled label (float32)
    (2.6, "2.6"), (3.8, "3.8"), (0.1, "0.1"), (0.3, "0.3"),  # already one decimal: no tie at 0.1 / 0.3 here
    (0.25, "0.2"),  # 2.5 -> tie -> even 2
    (0.75, "0.8"),  # 7.5 -> even 8
    (3.75, "3.8"),  # 37.5 -> even 38
    (4.25, "4.2"),  # 42.5 -> even 42
    (F32, "0.9"),  # 8.500000238... -> 9: float32 0.85 is just above the tie
    (float(np.float32(0.35)), "0.3"),  # 3.4999999403... -> 3: float32 0.35 is just below it
    (0.35, "0.4"),  # the float64 0.35 = 0.34999999999999997...: 10 x rounds to exactly 3.5 -> even 4
    (4.99, "5.0"), (5.0, "5.0"), (0.0, "0.0"), (2, "2.0"),
]


@pytest.mark.parametrize("score, expected", STSB_T5_TARGETS, ids=[s for _, s in STSB_T5_TARGETS])
def test_t5_target_stsb_rounds_to_0_2(score, expected):
    assert data.STSB_STEP == 0.2
    assert data.t5_target(data.get_task("stsb"), score, "t5") == expected


@pytest.mark.parametrize("score, expected", STSB_LST_TARGETS, ids=[f"{x!r}" for x, _ in STSB_LST_TARGETS])
def test_lst_target_stsb_rounds_to_0_1(score, expected):
    assert data.t5_target(data.get_task("stsb"), score) == expected


def test_lst_targets_of_the_bundled_stsb_labels():
    # every train label's target is one of 0.0, 0.1, ..., 5.0, and within 0.05 of the label
    spec = data.get_task("stsb")
    labels = pq.read_table(data.BUNDLED_DIR / "stsb" / "train.parquet")["label"].to_pylist()
    targets = [data.t5_target(spec, x) for x in labels]
    assert set(targets) <= {f"{k // 10}.{k % 10}" for k in range(51)}
    assert max(abs(float(t) - x) for t, x in zip(targets, labels, strict=True)) <= 0.05 + 1e-6
    assert targets.count("3.9") == 11 and targets.count("3.8") == 345  # 3.75 (a tie) goes to 3.8


@pytest.mark.parametrize("style", data.TARGET_FORMATS)
@pytest.mark.parametrize("task", sorted(CLASS_NAMES))
def test_t5_label_round_trips_every_class_through_the_tokenizer(task, style, tokenizer):
    spec = data.get_task(task)
    for i in range(spec.num_labels):
        target = data.t5_target(spec, i, style)
        assert data.t5_label(spec, target, style) == i
        decoded = tokenizer.decode(ids_of(tokenizer, target))  # e.g. "not _ entailment"
        assert data.t5_label(spec, decoded, style) == i, decoded
        # a class name is no valid "lst" target, an index no valid "t5" one
        other = "t5" if style == "lst" else "lst"
        assert data.t5_label(spec, data.t5_target(spec, i, other), style) is None


@pytest.mark.parametrize("style, steps, step", [("t5", 26, 0.2), ("lst", 51, 0.1)])
def test_t5_label_stsb_round_trips_every_step(style, steps, step, tokenizer):
    spec = data.get_task("stsb")
    for k in range(steps):  # 0.0, 0.2, ..., 5.0 or 0.0, 0.1, ..., 5.0
        target = data.t5_target(spec, k * step, style)
        assert float(target) == pytest.approx(k * step, abs=1e-12) and len(target) == 3
        decoded = tokenizer.decode(ids_of(tokenizer, target))  # e.g. "3. 8"
        assert data.t5_label(spec, decoded, style) == pytest.approx(k * step, abs=1e-12)
    for score in (0.0, 2.6, 3.8, 5.0):
        assert data.t5_label(spec, data.t5_target(spec, score, style), style) == pytest.approx(score, abs=1e-12)


def test_t5_label_tolerates_word_piece_spacing():
    rte, mnli = data.get_task("rte"), data.get_task("mnli")
    assert data.t5_label(rte, "not _ entailment", "t5") == 1
    assert data.t5_label(rte, " entailment \n", "t5") == 0
    assert data.t5_label(mnli, "contra diction", "t5") == 2
    assert data.t5_label(mnli, " 2 ") == 2
    assert data.t5_label(data.get_task("stsb"), "3. 8") == pytest.approx(3.8)


@pytest.mark.parametrize("task, text, style", [
    ("rte", "", "t5"), ("rte", "entail", "t5"), ("rte", "yes", "t5"), ("rte", "not entailment x", "t5"),
    ("rte", "neutral", "t5"), ("mnli", "not_entailment", "t5"), ("sst2", "positive negative", "t5"),
    ("cola", "[UNK]", "t5"), ("rte", "", "lst"), ("rte", "2", "lst"), ("rte", "01", "lst"), ("rte", "1.0", "lst"),
    ("rte", "-1", "lst"), ("mnli", "3", "lst"), ("sst2", "1 0", "lst"), ("cola", "acceptable", "lst"),
    ("stsb", "", "lst"), ("stsb", "abc", "lst"), ("stsb", "3.8.1", "t5"), ("stsb", "entailment", "lst"),
])
def test_t5_label_junk_is_none(task, text, style):
    assert data.t5_label(data.get_task(task), text, style) is None


@pytest.mark.parametrize("style", data.TARGET_FORMATS)
@pytest.mark.parametrize("text, value", [("7.5", 5.0), ("5.2", 5.0), ("- 1. 2", 0.0), ("-0.1", 0.0),
                                         ("2.6", 2.6), ("0", 0.0), ("5", 5.0), ("12", 5.0)])
def test_t5_label_clamps_stsb_to_0_5(text, value, style):
    assert data.t5_label(data.get_task("stsb"), text, style) == pytest.approx(value)


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


def test_encoded_text_to_text_sources_and_targets(tokenizer):
    spec = data.get_task("rte")
    enc = Encoded(rte_rows(), tokenizer, spec, max_length=64, eos_id=SEP)
    assert enc.formulation == "text-to-text" and enc.token_type_ids is None and enc.pad_id == PAD
    assert enc.target_format == "lst"
    assert enc.input_ids[0] == tokenizer("rte sentence1: A cat sat. sentence2: A cat is sitting.")["input_ids"]
    assert enc.targets == [ids_of(tokenizer, "0") + [SEP], ids_of(tokenizer, "1") + [SEP]]
    assert enc.labels.tolist() == [0, 1] and enc.labels.dtype == torch.long
    t5 = Encoded(rte_rows(), tokenizer, spec, max_length=64, eos_id=SEP, target_format="t5")
    assert t5.target_format == "t5" and t5.input_ids == enc.input_ids  # RTE's fields are in name order already
    entailment, not_entailment = ids_of(tokenizer, "entailment"), ids_of(tokenizer, "not_entailment")
    assert (len(entailment), len(not_entailment)) == (3, 5)  # word pieces: en ##tail ##ment; not _ ...
    assert t5.targets == [entailment + [SEP], not_entailment + [SEP]]


def test_encoded_text_to_text_batch(tokenizer):
    enc = Encoded(rte_rows(), tokenizer, data.get_task("rte"), max_length=64, eos_id=SEP, target_format="t5")
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
    rows = datasets.Dataset.from_dict({"sentence1": ["a", "b", "c"], "sentence2": ["c", "d", "e"],
                                       "label": [3.87, 5.0, 0.85], "idx": [0, 1, 2]})
    spec = data.get_task("stsb")
    enc = Encoded(rows, tokenizer, spec, max_length=16, eos_id=SEP)
    assert enc.labels.dtype == torch.float32
    # float32 labels, as LST gets them: 0.85 is float32 0.8500000238... -> "0.9" (float64 0.85 would give "0.8")
    assert enc.targets == [ids_of(tokenizer, t) + [SEP] for t in ("3.9", "5.0", "0.9")]
    t5 = Encoded(rows, tokenizer, spec, max_length=16, eos_id=SEP, target_format="t5")
    assert t5.targets == [ids_of(tokenizer, t) + [SEP] for t in ("3.8", "5.0", "0.8")]


def test_encoded_mnli_sources(tokenizer):
    row = ROWS["mnli"][0]
    rows = datasets.Dataset.from_dict({k: [v] for k, v in row.items()})
    spec = data.get_task("mnli")
    for style, (source, _) in (("lst", ROWS["mnli"][1]), ("t5", ROWS["mnli"][2])):
        enc = Encoded(rows, tokenizer, spec, max_length=64, eos_id=SEP, target_format=style)
        assert enc.input_ids == [tokenizer(source)["input_ids"]]


# ---------------------------------------------------------------- Encoded


class WordTokenizer:
    """A stand-in tokenizer: one id per word (100 + its length), pad id 7, truncation at max_length."""

    pad_token_id = 7

    def __call__(self, texts, truncation, max_length):
        ids = [[100 + len(w) for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids}


def test_encoded_batch_pads_with_pad_id_and_zero_mask():
    ds = datasets.Dataset.from_dict({"sentence": ["aa b", "a bb ccc dddd", "x y z"], "label": [1, 0, 1]})
    enc = Encoded(ds, WordTokenizer(), data.get_task("sst2"), max_length=3)
    assert len(enc) == 3 and enc.token_type_ids is None
    inputs, labels = enc.batch([2, 0], torch.device("cpu"))
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].tolist() == [[101, 101, 101], [102, 101, 7]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [1, 1] and labels.dtype == torch.long
    inputs, _ = enc.batch([1], torch.device("cpu"))  # 4 words truncated to 3
    assert inputs["input_ids"].tolist() == [[101, 102, 103]]


def test_encoded_pairs_and_regression(minilm):
    ds = datasets.Dataset.from_dict({"sentence1": ["A man plays.", "Two dogs run in the park today."],
                                     "sentence2": ["Someone plays.", "Dogs run."], "label": [3.8, 2.5]})
    enc = Encoded(ds, minilm.tokenizer, data.get_task("stsb"), max_length=64)
    inputs, labels = enc.batch([0, 1], torch.device("cpu"))
    assert labels.dtype == torch.float32 and labels.tolist() == pytest.approx([3.8, 2.5])
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    n0 = len(enc.input_ids[0])
    assert n0 < ids.shape[1] == len(enc.input_ids[1])
    assert ids[0, n0:].eq(minilm.tokenizer.pad_token_id).all() and mask[0, n0:].eq(0).all()
    assert mask[0, :n0].eq(1).all() and mask[1].eq(1).all()
    assert types[0].tolist() == enc.token_type_ids[0] + [0] * (ids.shape[1] - n0)
    assert types[1].max() == 1  # the second sentence is segment 1
    assert minilm.tokenizer.decode(ids[0, :n0]) == "[CLS] a man plays. [SEP] someone plays. [SEP]"


def test_data_dir_in_the_hubs_shard_layout(tmp_path):
    # nyu-mll/glue's parquet files: <config>/<split>-00000-of-0000N.parquet; shards are read in order
    (tmp_path / "rte").mkdir()
    train = pq.read_table(data.BUNDLED_DIR / "rte" / "train.parquet")
    pq.write_table(train.slice(0, 1000), tmp_path / "rte" / "train-00000-of-00002.parquet")
    pq.write_table(train.slice(1000), tmp_path / "rte" / "train-00001-of-00002.parquet")
    shutil.copy(data.BUNDLED_DIR / "rte" / "validation.parquet", tmp_path / "rte" / "validation-00000-of-00001.parquet")
    raw = data.load_raw("rte", tmp_path)
    assert raw["train"]["idx"] == train["idx"].to_pylist() and len(raw["validation"]) == 277
    assert data.check_available("rte", tmp_path) == f"local:{tmp_path}"
    (tmp_path / "rte" / "train-00001-of-00002.parquet").unlink()  # an incomplete set of shards is not the task
    assert data.split_files(tmp_path / "rte", "train") == []


def cache_like_the_hub(home: Path, task: str) -> str:
    """Fill a datasets cache under ``home`` as a download of nyu-mll/glue would leave it; returns its commit."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    commit = "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c"
    files = {s: str(f) for s, (f,) in data.local_files(task).items()}
    builder = Parquet(cache_dir=str(home), dataset_name="glue", config_name=task, hash=commit, data_files=files)
    builder.download_and_prepare()
    (home / "nyu-mll___glue").mkdir()
    next((home / "glue").glob(f"{task}-*")).rename(home / "nyu-mll___glue" / task)
    return commit


def test_offline_glue_comes_from_the_datasets_cache(tmp_path, monkeypatch):
    commit = cache_like_the_hub(tmp_path / "datasets", "cola")
    monkeypatch.setattr(data, "BUNDLED_DIR", tmp_path / "nothing")  # only the cache has it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert data.check_available("cola") == "hub-cache"
    splits, info = data.load_task("cola")
    assert (info["source"], info["revision"]) == ("hub-cache", commit)
    assert info["sizes_full"] == {"train": 8551, "validation": 521, "test": 522}
    with pytest.raises(DataNotFoundError, match="datasets cache does not hold it"):
        data.check_available("sst2")


def test_local_data_revision_is_a_content_hash(tmp_path):
    (tmp_path / "rte").mkdir()
    for split in ("train", "validation"):
        shutil.copy(data.BUNDLED_DIR / "rte" / f"{split}.parquet", tmp_path / "rte" / f"{split}.parquet")
    same = data.revision("rte", tmp_path)
    assert same == data.revision("rte") and same.startswith("sha256:") and len(same) == 7 + 16
    table = pq.read_table(tmp_path / "rte" / "validation.parquet")
    swapped = table.rename_columns(["sentence2", "sentence1", *table.column_names[2:]])  # same sizes, new texts
    pq.write_table(swapped.select(table.column_names), tmp_path / "rte" / "validation.parquet")
    assert data.revision("rte", tmp_path) != same


def test_an_offline_switch_set_after_import_reaches_datasets(monkeypatch):
    """datasets reads HF_HUB_OFFLINE at import; set later (a notebook's os.environ), it must still keep datasets off
    the network (which it otherwise waits on until a timeout), and the global setting is restored afterwards."""
    seen = []

    def load_dataset(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError):
        data.check_available("qqp")
    assert seen == [True] and datasets.config.HF_HUB_OFFLINE is False


def test_encoded_causal_lm_batch(tokenizer):
    """A decoder-only LM's example: prompt ([CLS] source [SEP] + " answer:") then the target; target_mask marks the
    positions whose next token is a target token, labels are those tokens in row order."""
    enc = Encoded(rte_rows(), tokenizer, data.get_task("rte"), max_length=64, eos_id=SEP, causal=True)
    cue = ids_of(tokenizer, data.PROMPT_CUE)
    assert cue == [3437, 1024]  # "answer", ":"
    source = tokenizer(data.t5_source(data.get_task("rte"), rte_rows()[0]))["input_ids"]
    assert enc.prompts[0] == source + cue
    assert enc.targets == [ids_of(tokenizer, "0") + [SEP], ids_of(tokenizer, "1") + [SEP]]
    assert enc.input_ids[1] == enc.prompts[1] + enc.targets[1]
    inputs, labels = enc.batch([0, 1], torch.device("cpu"))
    assert set(inputs) == {"input_ids", "attention_mask", "target_mask"}
    n0, n1 = len(enc.prompts[0]), len(enc.prompts[1])
    assert inputs["target_mask"][0].nonzero().flatten().tolist() == [n0 - 1, n0]
    assert inputs["target_mask"][1].nonzero().flatten().tolist() == [n1 - 1, n1]
    # the marked positions' next tokens are the labels
    ids = inputs["input_ids"]
    assert [ids[r, p + 1].item() for r, p in inputs["target_mask"].nonzero().tolist()] == labels.tolist()
    assert labels.tolist() == enc.targets[0] + enc.targets[1] == [1014, SEP, 1015, SEP]
    assert inputs["attention_mask"].sum(1).tolist() == [n0 + 2, n1 + 2]
    assert enc.padded_tokens([0, 1]) == 2 * (max(n0, n1) + 2)  # the target is inside the sequence
    assert enc.target_rows() == [2, 2]
    # decoding: the prompt and what was generated so far, the last real position marked
    step = enc.prompt_batch([0, 1], [[1014], []], torch.device("cpu"))
    assert step["input_ids"][0, : n0 + 1].tolist() == enc.prompts[0] + [1014]
    assert step["target_mask"].nonzero().tolist() == [[0, n0], [1, n1 - 1]]


def test_causal_lm_prompt_is_cut_to_leave_room_for_cue_and_target(tokenizer):
    enc = Encoded(rte_rows(), tokenizer, data.get_task("rte"), max_length=12, eos_id=SEP, causal=True)
    assert [len(ids) for ids in enc.input_ids] == [12, 12]  # 8 prompt tokens + 2 cue + 2 target
    assert all(p[-2:] == [3437, 1024] for p in enc.prompts)  # the cue survives the cut
    with pytest.raises(ConfigError, match="max_length 5 leaves no room for a prompt"):
        Encoded(rte_rows(), tokenizer, data.get_task("rte"), max_length=5, eos_id=SEP, causal=True)
