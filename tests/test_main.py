"""The command line in process (readlib.__main__): exit codes and one-line errors before any data is loaded."""

import json

import readlib.data
from readlib.__main__ import main


def test_diverged_run_exits_1_and_still_prints_the_record(monkeypatch, capsys):
    import readlib.__main__
    from readlib.__main__ import main

    record = {"task": "rte", "status": "stopped: non-finite training loss at epoch 2", "history": [{"epoch": 1}]}
    monkeypatch.setattr(readlib.__main__, "fit", lambda params: record)
    assert main(["train", "--task", "rte", "--profile", "quick"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == record
    assert "non-finite training loss at epoch 2" in err


def test_text_to_text_needs_a_t5_before_any_data_is_loaded(monkeypatch, capsys):
    # readlib/__main__.py: "Bad input exits with code 2 and a one-line message before any data or
    # model is loaded"; readlib/params.py: validate() checks everything "before any data or model is loaded"
    loaded = []
    load_task = readlib.data.load_task

    def spy(*args, **kwargs):
        loaded.append(args)
        return load_task(*args, **kwargs)

    monkeypatch.setattr(readlib.data, "load_task", spy)
    argv = ["train", "--task", "rte", "--backbone", "minilm", "--formulation", "text-to-text", "--profile", "quick"]
    assert main(argv) == 2
    assert "text-to-text needs a T5 backbone" in capsys.readouterr().err
    assert loaded == []
