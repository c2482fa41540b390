"""Reading prediction inputs (JSON lines, CSV, stdin) and checking them against a task's text fields."""

import io

import pytest

from readlib import data, serve
from readlib.errors import ConfigError


def test_inputs_from_jsonl_csv_and_stdin(tmp_path):
    rows = [{"sentence": "It is good."}, {"sentence": "Bad, \"very\" bad."}]
    (tmp_path / "in.jsonl").write_text('{"sentence": "It is good."}\n\n{"sentence": "Bad, \\"very\\" bad."}\n')
    (tmp_path / "in.csv").write_text('sentence\nIt is good.\n"Bad, ""very"" bad."\n')
    assert serve.read_inputs(tmp_path / "in.jsonl") == rows
    assert serve.read_inputs(tmp_path / "in.csv") == rows
    assert serve.read_inputs("-", io.StringIO("It is good.\nBad, \"very\" bad.\n"), single_field="sentence") == rows
    assert serve.read_inputs("-", io.StringIO('{"sentence": "It is good."}\n')) == rows[:1]


@pytest.mark.parametrize("source, text, needle", [
    ("in.jsonl", '{"sentence": "a"}\n{"sentence": \n', "in.jsonl, line 2: not JSON"),
    ("in.jsonl", '["a"]\n', "line 1: expected a JSON object"),
    ("in.txt", "a\n", "use a .jsonl or .csv file"),
    ("-", "plain text\n", "plain text on stdin needs single-text tasks"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, source, text, needle):
    if source != "-":
        (tmp_path / source).write_text(text)
    with pytest.raises(ConfigError, match=needle) as err:
        serve.read_inputs(tmp_path / source if source != "-" else "-", io.StringIO(text))
    assert "\n" not in str(err.value)


def test_missing_input_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="input file .*nope.jsonl' does not exist"):
        serve.read_inputs(tmp_path / "nope.jsonl")


def test_rows_are_checked_against_every_task():
    mrpc, cola = data.get_task("mrpc"), data.get_task("cola")
    serve.check_rows([{"sentence1": "a", "sentence2": "b", "sentence": "c"}], [mrpc, cola])
    with pytest.raises(ConfigError, match=r"input row 1 has no field 'sentence', which cola reads \(fields: "
                                          r"sentence; the row has: sentence1, sentence2\)"):
        serve.check_rows([{"sentence1": "a", "sentence2": "b"}], [mrpc, cola])
    with pytest.raises(ConfigError, match="input row 1: field 'sentence2' must be text, got None"):
        serve.check_rows([{"sentence1": "a", "sentence2": None}], [mrpc])
    with pytest.raises(ConfigError, match="no input rows"):
        serve.check_rows([], [mrpc])


def test_readlib_load_is_serve_load():
    import readlib

    assert readlib.load is serve.load
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        readlib.lod  # noqa: B018
