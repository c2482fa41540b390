"""The command line in process (readlib.__main__): exit codes and one-line errors before any data is loaded."""

import json

import pytest

import readlib.__main__
import readlib.backbones
import readlib.data
from readlib.__main__ import main


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if any data or model is loaded."""
    def refuse(*args, **kwargs):
        pytest.fail("bad input must be refused before any data or model is loaded")

    monkeypatch.setattr(readlib.data, "load_task", refuse)
    monkeypatch.setattr(readlib.data, "load_raw", refuse)
    monkeypatch.setattr(readlib.backbones, "load", refuse)


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith("readlib: error: ")
    return lines[0]




def test_diverged_run_exits_1_and_still_prints_the_record(monkeypatch, capsys):
    record = {"task": "rte", "status": "stopped: non-finite training loss at epoch 2", "history": [{"epoch": 1}]}
    monkeypatch.setattr(readlib.__main__, "fit", lambda params: record)
    assert main(["train", "--task", "rte", "--profile", "quick"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == record
    assert "non-finite training loss at epoch 2" in err


def test_text_to_text_needs_a_t5_before_any_data_is_loaded(nothing_loads, capsys):
    argv = ["train", "--task", "rte", "--backbone", "minilm", "--formulation", "text-to-text", "--profile", "quick"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "text-to-text needs a T5 backbone" in line and "'minilm'" in line


@pytest.mark.parametrize("args, needles", [
    pytest.param(["--task", "xyz"], ["'xyz'", "cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb"], id="task"),
    pytest.param(["--task", "rte", "--method", "lora-ish"], ["'lora-ish'", "full", "read"], id="method"),
    pytest.param(["--task", "rte", "--lr", "-1"], ["lr must be in (0, 1)", "got -1.0"], id="lr"),
    pytest.param(["--task", "rte", "--epochs", "0"], ["max_epochs must be >= 1", "got 0"], id="epochs"),
    pytest.param(["--task", "rte", "--foo", "3"],
                 ["'foo'", "run parameters: task, method", "'read' parameters: rnn, hidden, dropout"], id="foo"),
    pytest.param(["--task", "rte", "--hidden", "abc"], ["read.hidden", "'abc'"], id="hidden"),
    pytest.param(["--task", "rte", "--rnn=transformer"], ["'transformer'", "rnn, lstm, gru"], id="rnn"),
    pytest.param(["--task", "rte", "--backbone", "random-t5-tiny:num_layers=0"],
                 ["'num_layers=0'", "d_model, num_layers"], id="backbone"),
])
def test_bad_input_exits_2_with_one_line(args, needles, nothing_loads, capsys):
    assert main(["train", *args]) == 2
    line = one_error_line(capsys)
    assert all(needle in line for needle in needles), line


def test_unparsable_number_is_one_line(nothing_loads, capsys):
    assert main(["train", "--task", "rte", "--lr", "abc"]) == 2
    one_error_line(capsys)


@pytest.mark.parametrize("args", [[], ["fit"]])
def test_unknown_command(args, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "usage: python -m readlib {train,worker,splits} [options]"


@pytest.mark.parametrize("args, needles", [
    pytest.param(["--method", "read"], ["worker needs --task"], id="no-task"),
    pytest.param(["--task", "qqq"], ["unknown task 'qqq'"], id="task"),
    pytest.param(["--task", "rte", "--method", "read,nope"], ["unknown method 'nope'"], id="method"),
    pytest.param(["--task", "rte", "--method", "read,lora", "--rank", "8"], ["need a single --method"], id="args"),
    pytest.param(["--task", "rte", "--lr_rounds", "0"], ["lr_rounds must be >= 1"], id="rounds"),
    pytest.param(["--task", "rte", "--method", "read", "--heartbeat", "0"], ["heartbeat must be >= 1"], id="heartbeat"),
])
def test_worker_bad_input_is_one_line_before_any_model(args, needles, nothing_loads, capsys):
    assert main(["worker", *args]) == 2
    line = one_error_line(capsys)
    assert all(n in line for n in needles), line


def test_worker_refuses_to_run_under_torchrun(nothing_loads, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["worker", "--task", "rte"]) == 2
    assert "one worker per GPU" in one_error_line(capsys)
