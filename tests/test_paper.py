"""readlib.paper: the papers' numbers as printed, checked for transcription against what they must satisfy."""

import pytest

from readlib import paper


@pytest.mark.parametrize("method", list(paper.READ_TABLE1))
def test_paper_table1_average_is_not_the_mean_of_its_columns(method):
    # transcription check, and a finding: READ Table 1's printed "Avg." is 0.4-1.5 points above the mean of the
    # seven task columns in every row (full tuning: mean 84.10, printed 84.52); we print the paper's number as
    # printed and compute ours as the plain mean (readlib.metrics.glue_average)
    row = paper.READ_TABLE1[method]
    mean = sum(row[t] for t in ("cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb")) / 7
    assert 0.4 < row["avg"] - mean < 1.5


def test_read_tables_cover_the_same_tasks_and_methods():
    rows = (*paper.READ_TABLE1.values(), *paper.READ_TABLE3.values())
    assert all(set(paper.TABLE1_TASKS) <= set(row) for row in rows)
    for method in ("full", "read"):  # Table 3 repeats Table 1's rows for full tuning and READ
        assert all(paper.READ_TABLE3[method][t] == paper.READ_TABLE1[method][t] for t in (*paper.TABLE1_TASKS, "avg"))
    assert set(paper.READ_TABLE5_K) == set(paper.TABLE1_TASKS)
    assert all(len(v) == len(paper.TABLE2_SIZES) for v in paper.READ_TABLE2_GB.values())


def test_tokentune_table1_rows_are_cumulative():
    for column in paper.TOKENTUNE_TABLE1_MIB.values():
        assert list(column) == sorted(column) and column[0] > paper.TOKENTUNE_CONTEXT_MIB
