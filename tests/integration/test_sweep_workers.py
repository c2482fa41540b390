"""End to end: sweep workers in separate processes (kill -9 and resume, two workers on one storage)."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import ENV, TINY, spec, trials
from optuna.trial import TrialState


def worker_cmd(url, rounds, seeds, epochs=1, heartbeat=1):
    return [sys.executable, "-m", "readlib", "worker", "--task", "rte", "--method", "bitfit", "--profile", "quick",
            "--max_train", "16", "--max_eval", "8", "--max_epochs", str(epochs), "--lr_rounds", str(rounds),
            "--seeds", str(seeds), "--storage", url, "--heartbeat", str(heartbeat)]


def test_kill_9_mid_trial_then_the_same_command_resumes(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    name = spec(overrides=TINY | {"max_epochs": 3}).name
    cmd = worker_cmd(url, rounds=3, seeds=1, epochs=3)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline, killed = time.monotonic() + 240, None
    while killed is None and time.monotonic() < deadline:  # kill while the second trial runs
        time.sleep(0.2)
        try:
            found = trials(url, name)
        except KeyError:  # study not created yet
            continue
        states = [t.state for t in found]
        # mid-trial: the second trial has drawn its learning rate (a kill before that leaves no params to retry)
        if states[:1] == [TrialState.COMPLETE] and states[1:] == [TrialState.RUNNING] and "lr" in found[1].params:
            os.kill(proc.pid, signal.SIGKILL)
            killed = 1
    proc.wait(timeout=30)
    assert killed == 1 and proc.returncode == -signal.SIGKILL
    assert [t.state for t in trials(url, name)] == [TrialState.COMPLETE, TrialState.RUNNING]
    first_lr = trials(url, name)[0].params["lr"]

    rerun = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    out = json.loads(rerun.stdout.strip().splitlines()[-1])
    after = trials(url, name)
    killed_trial = after[1]
    assert killed_trial.state == TrialState.FAIL and "record" not in killed_trial.user_attrs
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and all("record" in t.user_attrs for t in complete)  # no half-written result
    assert complete[0].params["lr"] == first_lr  # the finished trial was kept, not re-run
    retry = [t for t in complete if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].params == killed_trial.params  # the interrupted run was redone
    assert out["trials_run_here"] == 2 and out["search_runs"] == 3  # the retry + the third round


def test_two_workers_share_one_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    name = spec(overrides=TINY | {"max_epochs": 2}).name
    # heartbeat 5 s: on a loaded 2-core machine a 1 s heartbeat can be missed, and the other worker then fails the
    # live trial as stale and re-runs it (a duplicate); stale detection itself is test_kill_9_mid_trial_...
    cmd = worker_cmd(url, rounds=4, seeds=2, epochs=2, heartbeat=5)
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    ran = [json.loads(out.strip().splitlines()[-1])["trials_run_here"] for out, _ in outs]
    search = [t for t in trials(url, name) if t.state == TrialState.COMPLETE]
    seeds = [t for t in trials(url, name + "|seeds") if t.state == TrialState.COMPLETE]
    workers = {t.user_attrs["worker"] for t in search + seeds}
    assert min(ran) >= 1 and len(workers) == 2  # both did work
    assert 4 <= len(search) <= 5  # a worker may start one extra round while the other finishes the last
    assert len({t.params["lr"] for t in search}) == len(search)  # never the same learning rate twice
    best_lr = max(search, key=lambda t: (t.value, -t.number)).params["lr"]
    assert [t.params for t in seeds if t.params["lr"] == best_lr] == [{"lr": best_lr, "seed": 1}]
    assert sum(ran) == len(search) + len(seeds) + sum(  # every trial a worker counted is in the storage
        t.state == TrialState.PRUNED for t in trials(url, name + "|seeds"))
    print(f"trials per worker: {ran}")
