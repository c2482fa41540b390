"""The command line in process (readlib.__main__): exit codes and one-line errors before any data is loaded."""

import dataclasses
import json

import pytest
from helpers import one_error_line

import readlib.__main__
import readlib.backbones
import readlib.data
from readlib import methods, sweep
from readlib.__main__ import COMMANDS, WorkerOptions, main
from readlib.params import RunParams


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if any data or model is loaded."""
    def refuse(*args, **kwargs):
        pytest.fail("bad input must be refused before any data or model is loaded")

    monkeypatch.setattr(readlib.data, "load_task", refuse)
    monkeypatch.setattr(readlib.data, "load_raw", refuse)
    monkeypatch.setattr(readlib.backbones, "load", refuse)






def test_diverged_run_exits_1_and_still_prints_the_record(monkeypatch, capsys):
    record = {"task": "rte", "status": "stopped: non-finite training loss at epoch 2", "history": [{"epoch": 1}]}
    monkeypatch.setattr(readlib.__main__, "fit", lambda params, save_dir=None: record)
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
    err = capsys.readouterr().err.strip()
    assert err == f"usage: python -m readlib {{{','.join(COMMANDS)}}} [options]"
    assert err.startswith("usage: python -m readlib {train,worker,predict,report,export,splits,methods}")


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


def normalised(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def wide(monkeypatch):
    """argparse wraps help at the terminal's width (breaking at hyphens too): one line per option instead."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_command_and_exits_0(flag, capsys):
    assert main([flag]) == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert f"  {name} " in out and command.__doc__.strip().splitlines()[0] in out


def run_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RunParams) if f.name != "method_args"]


def test_train_help_has_every_run_parameter_with_its_help_text(wide, nothing_loads, capsys):
    assert main(["train", "--help"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and len(run_fields()) == 28
    for f in run_fields():
        assert f"--{f.name} " in out and normalised(f.metadata["help"]) in normalised(out), f.name
    assert "--max_epochs INT, --epochs INT" in out
    assert "--max_train INT|null subsample the training split" in normalised(out)
    assert "python -m readlib methods" in normalised(out)  # where the method hyperparameters are listed


@pytest.mark.parametrize("command", ["worker", "splits", "methods"])
def test_every_command_has_help(command, wide, nothing_loads, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m readlib {command} ")
    if command == "worker":
        for f in [*run_fields(), *dataclasses.fields(WorkerOptions)]:
            assert f"--{f.name} " in out and normalised(f.metadata["help"]) in normalised(out), f.name


@pytest.fixture
def captured(monkeypatch):
    """fit replaced by a function that keeps the run parameters it was given."""
    runs = []

    def fake_fit(params, save_dir=None):
        runs.append(params)
        return {"status": "ok"}

    monkeypatch.setattr(readlib.__main__, "fit", fake_fit)
    return runs


def test_null_lifts_the_profiles_value(captured, capsys):
    quick = ["train", "--task", "rte", "--profile", "quick"]
    assert main(quick) == 0
    assert (captured[0].max_train, captured[0].max_eval) == (256, 128)  # params/quick.yaml
    assert main([*quick, "--max_train", "null", "--max_eval", "NULL", "--lr", "null"]) == 0
    assert (captured[1].max_train, captured[1].max_eval, captured[1].lr) == (None, None, None)
    assert main([*quick, "--max_train", "64", "--formulation", "null"]) == 0
    assert (captured[2].max_train, captured[2].formulation) == (64, "classification")  # null: the backbone's


@pytest.mark.parametrize("args, expected", [
    (["--gradient_checkpointing", "false"], False),
    (["--gradient_checkpointing", "False"], False),
    (["--gradient_checkpointing", "0"], False),
    (["--gradient_checkpointing", "no"], False),
    (["--gradient_checkpointing", "true"], True),
    (["--gradient_checkpointing", "1"], True),
    (["--gradient_checkpointing", "yes"], True),
    (["--gradient_checkpointing"], True),
    (["--gradient_checkpointing=false"], False),
    ([], False),
])
def test_booleans_parse(args, expected, captured, capsys):
    assert main(["train", "--task", "rte", "--method", "full", "--profile", "quick", *args]) == 0
    assert captured[0].gradient_checkpointing is expected


def test_method_hyperparameters_reach_the_run(captured, capsys):
    assert main(["train", "--task", "rte", "--profile", "quick", "--rnn", "lstm", "--hidden=128",
                 "--gradient_checkpointing", "false"]) == 0
    assert captured[0].method_args == {"rnn": "lstm", "hidden": "128"}
    assert methods.make_config("read", captured[0].method_args).hidden == 128


@pytest.mark.parametrize("args, needles", [
    pytest.param(["--gradient_checkpointing", "maybe"], ["gradient_checkpointing must be true or false", "'maybe'"],
                 id="bool"),
    pytest.param(["--max_epochs", "null"], ["max_epochs must be a int", "'null'"], id="not-nullable"),
    pytest.param(["--seed", "1.5"], ["seed must be a int", "'1.5'"], id="int"),
    pytest.param(["--max_train"], ["--max_train", "expected one argument"], id="no-value"),
])
def test_bad_values_exit_2_with_one_line(args, needles, nothing_loads, capsys):
    assert main(["train", "--task", "rte", *args]) == 2
    line = one_error_line(capsys)
    assert all(needle in line for needle in needles), line


def test_worker_passes_null_booleans_and_hyperparameters_to_the_sweep(nothing_loads, monkeypatch, capsys):
    specs = []
    monkeypatch.setattr(sweep, "run_worker", lambda spec, *args, **kwargs: specs.append((spec, args)) or 0)
    monkeypatch.setattr(sweep, "summary", lambda spec, storage: None)
    argv = ["worker", "--task", "rte", "--method", "read", "--profile", "quick", "--max_train", "null",
            "--hidden", "64", "--prune", "true", "--seeds", "2", "--storage", "sqlite:///x.db", "--heartbeat", "7"]
    assert main(argv) == 0
    (spec, (storage, heartbeat)), = specs
    params = spec.params(1e-3, 0)
    assert (params.max_train, params.max_eval, params.method_args) == (None, 128, {"hidden": "64"})
    assert (spec.prune, spec.seeds, spec.lr_rounds, storage, heartbeat) == (True, 2, 2, "sqlite:///x.db", 7)
    assert json.loads(capsys.readouterr().out) == {"task": "rte", "method": "read", "trials_run_here": 0}


def method_rows(out: str) -> dict[str, dict[str, list[str]]]:
    """``methods`` output as {method: {option: [type, default]}}."""
    rows, current = {}, None
    for line in out.splitlines():
        if line and not line.startswith(" ") and ": default lr" in line:
            current = rows.setdefault(line.partition(":")[0], {})
        elif line.startswith("  --"):
            option, kind, default = line.split()[:3]
            current[option] = [kind, default]
    return rows


def test_methods_lists_every_hyperparameter_with_default_and_meaning(nothing_loads, capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    rows = method_rows(out)
    assert list(rows) == list(methods.METHODS)
    assert rows["read"]["--rnn"] == ["str", "gru"] and rows["read"]["--hidden"] == ["int", "256"]
    assert rows["lora"]["--rank"] == ["int", "32"] and rows["adapter"]["--attention"] == ["bool", "true"]
    assert "read: default lr 0.001; formulations: classification, text-to-text" in out
    assert "selective: default lr 5e-05; formulations: classification, causal-lm" in out
    for name, spec in methods.METHODS.items():
        fields = dataclasses.fields(spec.config)
        assert list(rows[name]) == [f"--{f.name}" for f in fields]
        assert all(f.metadata["help"] in out for f in fields), name


def test_methods_names_some_or_refuses_an_unknown_one(nothing_loads, capsys):
    assert main(["methods", "lora", "read"]) == 0
    assert list(method_rows(capsys.readouterr().out)) == ["lora", "read"]
    assert main(["methods", "nope"]) == 2
    assert "unknown method 'nope'" in one_error_line(capsys)
    assert main(["methods", "--rank", "3"]) == 2
    assert "unrecognized arguments: --rank" in one_error_line(capsys)


def test_save_dir_reaches_fit(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(readlib.__main__, "fit", lambda params, save_dir=None: seen.update(dir=save_dir) or
                        {"status": "ok"})
    assert main(["train", "--task", "rte", "--profile", "quick", "--save_dir", str(tmp_path / "m")]) == 0
    assert seen["dir"] == str(tmp_path / "m")


@pytest.mark.parametrize("argv, needle", [
    (["predict", "--input", "x.jsonl"], "predict needs --model FOLDER[,FOLDER...] and --input FILE|-"),
    (["predict", "--model", "{tmp}/no_model", "--input", "-"], "model folder '{tmp}/no_model' does not exist"),
    (["export"], "the following arguments are required: --output"),
    (["report", "--profile", "nope"], "unknown profile 'nope'"),
])
def test_predict_export_report_bad_input_is_one_line(nothing_loads, capsys, tmp_path, argv, needle):
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    assert needle.format(tmp=tmp_path) in one_error_line(capsys)
