"""End to end: the command line in a fresh process (bad input exits 2 fast, real runs); torchrun: test_distributed."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from helpers import ENV

from readlib.params import RunParams

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "readlib", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def test_bad_input_exits_2_fast_with_one_line_in_a_fresh_process():
    # every case of bad input is in tests/test_main.py, in process; here the whole program, timed
    proc, seconds = cli("train", "--task", "xyz")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["readlib: error: unknown task 'xyz'; choose one of: cola, mnli, mrpc, "
                                                "qnli, qqp, rte, sst2, stsb"]
    assert seconds < 20 and "Loading weights" not in proc.stderr  # no model was loaded


def test_quick_train_run():
    proc, _ = cli("train", "--task", "rte", "--method", "read", "--profile", "quick",
                  "--max_train", "32", "--max_eval", "16", "--max_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (record["task"], record["method"], record["profile"], record["status"]) == ("rte", "read", "quick", "ok")
    assert record["data"]["sizes_used"] == {"train": 32, "validation": 16, "test": 16}
    assert record["epochs_run"] == 1 and record["micro_batch_size"] == 32  # the rest from quick.yaml
    assert set(record["test"]) == {"accuracy", "score"}


def test_splits_table():
    proc, _ = cli("splits")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert "follows_recipe" in lines[0] and "train_ours" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb", "rte"]
    qnli = lines[3].split()
    assert qnli[1:4] == ["103743", "1000", "5463"]  # the Section 3.2 recipe
    assert "False" in qnli  # Table 5 took QNLI's train differently


def test_cli_text_to_text_run():
    proc, _ = cli("train", "--task", "rte", "--method", "read", "--backbone", "random-t5-tiny", "--profile", "quick",
                  "--max_train", "16", "--max_eval", "8", "--max_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["formulation"] == "text-to-text"
    assert (record["task"], record["method"], record["backbone"], record["status"]) == (
        "rte", "read", "random-t5-tiny", "ok")
    assert record["data"]["sizes_used"] == {"train": 16, "validation": 8, "test": 8}
    assert record["epochs_run"] == 1 and record["trainable_params"] == 527_360


def test_help_exits_0_and_names_every_option():
    proc, _ = cli("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert all(f"  {name} " in proc.stdout for name in ("train", "worker", "splits", "methods"))
    proc, seconds = cli("train", "--help")
    assert proc.returncode == 0 and proc.stderr == "" and seconds < 20
    fields = [f.name for f in dataclasses.fields(RunParams) if f.name != "method_args"]
    assert len(fields) == 28 and all(f"--{name} " in proc.stdout for name in fields)
    assert "subsample the training split" in proc.stdout


def test_methods_lists_hyperparameters_with_defaults():
    proc, _ = cli("methods")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("lora: default lr 0.0005")))
    assert lines[start + 1].split()[:3] == ["--rank", "int", "32"]
    rnn = next(line for line in lines if line.strip().startswith("--rnn "))
    assert rnn.split()[:3] == ["--rnn", "str", "gru"] and "lstm" in rnn


def test_a_bad_boolean_exits_2_with_one_line():
    proc, _ = cli("train", "--task", "rte", "--gradient_checkpointing", "maybe")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["readlib: error: argument --gradient_checkpointing: "
                                                "gradient_checkpointing must be true or false, got 'maybe'"]


def test_train_save_dir_then_predict_from_a_file_and_stdin(tmp_path):
    proc, _ = cli("train", "--task", "sst2", "--method", "read", "--profile", "quick", "--max_train", "64",
                  "--max_eval", "32", "--max_epochs", "1", "--save_dir", str(tmp_path / "sst2_read"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["saved"]["dir"] == str(tmp_path / "sst2_read") and record["saved"]["bytes"] > 0
    texts = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés", "it is a film."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    from_file, _ = cli("predict", "--model", str(tmp_path / "sst2_read"), "--input", str(tmp_path / "in.jsonl"))
    assert from_file.returncode == 0, from_file.stderr[-2000:]
    answers = [json.loads(line) for line in from_file.stdout.splitlines()]
    assert len(answers) == 3 and all(set(a) == {"label", "label_name"} for a in answers)
    assert all(a["label_name"] == ["negative", "positive"][a["label"]] for a in answers)
    start = time.monotonic()
    from_stdin = subprocess.run([sys.executable, "-m", "readlib", "predict", "--model", str(tmp_path / "sst2_read"),
                                 "--input", "-"], input="\n".join(texts) + "\n", cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=300)
    assert from_stdin.returncode == 0 and time.monotonic() - start < 300
    assert [json.loads(line) for line in from_stdin.stdout.splitlines()] == answers
    # bad fields and corrupt folders: in process, tests/integration/test_save_load_predict.py and tests/test_main.py
