"""The ``paper`` profile rehearsed on CPU: a tiny random T5 saved with ``save_pretrained`` into a local folder stands
in for T5-base from the hub, and the whole protocol runs from it, offline: text-to-text in LST's format on LST's
splits, the learning-rate search (2 rounds instead of 32) and seed runs (2 instead of 3) by two concurrent workers on
one storage (the cluster recipe: one worker per GPU), early stopping, the hidden-state cache on, and one run in two
data-parallel processes (torchrun). Only the sizes are smaller (stated in OVERRIDES); everything else is
params/paper.yaml.
"""

import json
import subprocess
import sys

import optuna
import pytest
from helpers import ENV
from optuna.trial import TrialState

from readlib import backbones, params

OVERRIDES = ["--max_train", "48", "--max_eval", "16", "--max_epochs", "3", "--batch_size", "16",
             "--micro_batch_size", "8", "--max_length", "48", "--warmup_steps", "2", "--cache", "memory"]
METHODS = ("read", "lora")


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A folder as ``from_pretrained`` reads it: the tiny T5's weights and config, and a tokenizer."""
    folder = tmp_path_factory.mktemp("hub") / "t5-rehearsal"
    backbone = backbones.load("random-t5-tiny", seed=7)
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    return folder


def test_paper_protocol_from_a_local_t5(hub_folder, tmp_path):
    profile = params.load_profile("paper")
    assert profile["lr_schedule"] == "linear_warmup" and profile["patience"] == 1  # what the rehearsal exercises
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    worker = [sys.executable, "-m", "readlib", "worker", "--task", "rte", "--method", ",".join(METHODS),
              "--profile", "paper", "--backbone", str(hub_folder), "--lr_rounds", "2", "--seeds", "2",
              "--storage", url, "--heartbeat", "1", *OVERRIDES]
    procs = [subprocess.Popen(worker, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    # on failure: the end of each failed worker's stderr, where its traceback is
    failed = [f"worker {i} exit {p.returncode}: ...{out[1][-2500:]}"
              for i, (p, out) in enumerate(zip(procs, outs, strict=True)) if p.returncode]
    assert not failed, "\n".join(failed)

    summaries = [json.loads(line) for out, _ in outs for line in out.strip().splitlines()]
    for method in METHODS:
        mine = [s for s in summaries if s["method"] == method]
        assert len(mine) == 2 and all(s["seeds"] == [0, 1] for s in mine)  # both workers see the finished protocol
    records = []
    for name in optuna.study.get_all_study_names(url):
        study = optuna.load_study(study_name=name, storage=url)
        records += [t.user_attrs["record"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    for method in METHODS:  # 2 search rounds (a worker may start one more while the other finishes) + 1 seed run
        phases = [r["sweep"]["phase"] for r in records if r["method"] == method]
        assert phases.count("search") in (2, 3) and phases.count("seeds") == 1
    for r in records:
        assert (r["profile"], r["formulation"], r["target_format"]) == ("paper", "text-to-text", "lst")
        assert r["backbone_source"] == f"local:{hub_folder}" and r["backbone_pretrained"]
        assert r["data"]["split_recipe"] == "lst" and r["data"]["sizes_used"] == {
            "train": 48, "validation": 16, "test": 16}
        assert (r["lr_schedule"], r["warmup_steps"], r["batch_size"]) == ("linear_warmup", 2, 16)
        assert r["step0_validation"] is not None and r["test"] is not None
        scores = [row["val_score"] for row in r["history"]]
        if r["epochs_run"] < 3:  # early stop after one epoch without improvement (patience 1)
            assert scores[-1] <= max(scores[:-1])
        assert r["cache"]["mode"] == ("memory" if r["method"] == "read" else "off")

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "readlib", "train", "--task", "rte", "--method", "read", "--profile", "paper", "--backbone",
                str(hub_folder), "--device", "cpu", *OVERRIDES]
    run = subprocess.run(torchrun, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1  # records from the first process only
    record = json.loads(lines[0])
    assert record["processes"] == 2 and record["status"] == "ok" and record["profile"] == "paper"
