"""Bad task data stops `python -m readlib train` with exit code 2 and one line naming the file, the column and the first
bad row, before any model loads; a data_dir holds the whole task or is an error (never the bundled data)."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import one_error_line

import readlib.backbones
from readlib import data
from readlib.__main__ import main

BUNDLED_RTE = data.BUNDLED_DIR / "rte"


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a backbone is loaded."""
    def refuse(*args, **kwargs):
        pytest.fail("bad data must be refused before any model loads")

    monkeypatch.setattr(readlib.backbones, "load", refuse)


def train(capsys, data_dir) -> str:
    """Run `train` on quick RTE from ``data_dir``; assert exit code 2 and one error line; return it."""
    assert main(["train", "--task", "rte", "--profile", "quick", "--data_dir", str(data_dir)]) == 2
    return one_error_line(capsys)


def rte_copy(tmp_path, change=None, split="validation"):
    """A data_dir with the bundled RTE; ``change(table) -> table`` applied to ``split``'s file."""
    folder = tmp_path / "glue" / "rte"
    folder.mkdir(parents=True)
    for name in ("train", "validation"):
        table = pq.read_table(BUNDLED_RTE / f"{name}.parquet")
        pq.write_table(change(table) if change and name == split else table, folder / f"{name}.parquet")
    return tmp_path / "glue", folder / f"{split}.parquet"


def with_label(table: pa.Table, row: int, value, kind: pa.DataType | None = None) -> pa.Table:
    labels = table["label"].to_pylist()
    labels[row] = value
    return table.set_column(table.column_names.index("label"), "label", pa.array(labels, kind or pa.int64()))


@pytest.mark.parametrize("case", ["missing", "empty", "only train"])
def test_an_incomplete_data_dir_is_an_error_not_the_bundled_data(tmp_path, capsys, no_model, case):
    root = tmp_path / "glue"
    if case != "missing":
        (root / "rte").mkdir(parents=True)
    if case == "only train":
        shutil.copy(BUNDLED_RTE / "train.parquet", root / "rte" / "train.parquet")
    line = train(capsys, root)
    assert str(root / "rte" / "validation.parquet") in line and "never completed from the bundled data" in line
    assert ("does not exist" in line) == (case == "missing")
    assert (str(root / "rte" / "train.parquet") in line) == (case != "only train")


BAD_LABELS = {
    "validation label 7 in a binary task": ("validation", lambda t: with_label(t, 5, 7), "is 7 in row 5",
                                            "class id 0..1"),
    "fractional validation label 0.6": ("validation", lambda t: with_label(t, 3, 0.6, pa.float64()),
                                        "is 0.6 in row 3", "class id 0..1"),
    "train label out of range": ("train", lambda t: with_label(t, 100, -1), "is -1 in row 100", "class id"),
    "null train label": ("train", lambda t: with_label(t, 17, None), "empty (null) in row 17", "'label'"),
    "no label column": ("train", lambda t: t.drop_columns(["label"]), "no column 'label'", "the file has"),
    "null text": ("validation", lambda t: t.set_column(0, "sentence1", pa.array(
        [None] + t["sentence1"].to_pylist()[1:], pa.string())), "'sentence1' is empty (null) in row 0", "rte"),
}


@pytest.mark.parametrize("case", BAD_LABELS)
def test_bad_labels_and_columns_name_file_column_and_row(tmp_path, capsys, no_model, case):
    split, change, where, allowed = BAD_LABELS[case]
    root, file = rte_copy(tmp_path, change, split)
    line = train(capsys, root)
    assert f"error: {file}: " in line and where in line and allowed in line


@pytest.mark.parametrize("case", ["zero bytes", "truncated"])
def test_unreadable_parquet_is_named(tmp_path, capsys, no_model, case):
    root, file = rte_copy(tmp_path, split="train")
    if case == "zero bytes":
        file.write_bytes(b"")
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    line = train(capsys, root)
    assert f"error: {file}: cannot be read as parquet" in line


def test_good_data_dir_passes_the_checks(tmp_path):
    root, _ = rte_copy(tmp_path)
    assert data.check_available("rte", root) == f"local:{root}"
    assert data.check_available("stsb") == "local:data/glue"  # STS-B: float scores in [0, 5]
