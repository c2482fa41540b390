"""Workers that draw at the same moment draw different learning rates, and only distinct learning rates count as
search rounds. (Real worker processes on one storage: tests/integration/test_sweep_workers.py.)"""

import subprocess
import sys

import optuna
from helpers import spec
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import readlib.sweep
from readlib import sweep


def fake_fit(params, progress, on_epoch, save_dir):
    """A finished run whose validation score is its learning rate (no model)."""
    return {"validation": {"score": params.learning_rate}, "test": None}


def test_two_workers_drawing_at_once_get_different_learning_rates(tmp_path, monkeypatch):
    monkeypatch.setattr(readlib.sweep, "fit", fake_fit)
    s = spec(lr_rounds=8, seeds=1)
    store = sweep.storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1)
    first = sweep._study(s, store)  # worker A creates the study (queues the default learning rate)
    second = sweep._study(s, store)  # worker B loads it: both see the same study in the same state
    objective = sweep._objective(s, progress=False)
    default = first.ask()
    assert default.suggest_float("lr", *sweep.LR_RANGE, log=True) == sweep.default_lr("bitfit")
    for _ in range(3):  # three times, both workers start a trial before either has drawn
        a, b = first.ask(), second.ask()
        for study, trial in ((first, a), (second, b)):
            study.tell(trial, objective(trial))
    lrs = [t.params["lr"] for t in first.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    assert len(lrs) == 6 and len(set(lrs)) == 6


def test_one_worker_draws_reproducibly(tmp_path, monkeypatch):
    monkeypatch.setattr(readlib.sweep, "fit", fake_fit)
    drawn = []
    for run in range(2):
        s = spec(lr_rounds=3, seeds=1)
        sweep.run_worker(s, f"sqlite:///{tmp_path / f'{run}.db'}", heartbeat=1)
        drawn.append([t.params["lr"] for t in optuna.load_study(study_name=s.name, storage=f"sqlite:///"
                                                                 f"{tmp_path / f'{run}.db'}").get_trials()])
    assert drawn[0] == drawn[1] and len(set(drawn[0])) == 3


def completed(lr: float, value: float) -> optuna.trial.FrozenTrial:
    return create_trial(params={"lr": lr}, distributions={"lr": FloatDistribution(*sweep.LR_RANGE, log=True)},
                        value=value, user_attrs={"record": {"validation": {"score": value}}})


def test_a_repeated_learning_rate_is_not_a_search_round(tmp_path, monkeypatch):
    monkeypatch.setattr(readlib.sweep, "fit", fake_fit)
    s = spec(lr_rounds=3, seeds=1)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = sweep._study(s, sweep.storage(url))
    study.ask()  # take the queued default round out of the way: it is run below as an ordinary trial
    study.tell(0, state=TrialState.FAIL)
    for lr in (1e-4, 1e-4):  # two workers of an earlier readlib both drew 1e-4: one round, not two
        study.add_trial(completed(lr, 0.5))
    assert sweep.search_rounds(study.get_trials()) == 1
    sweep.run_worker(s, url, heartbeat=1)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 4 and len({t.params["lr"] for t in done}) == 3 == sweep.search_rounds(study.get_trials())


def test_a_killed_trials_saved_model_is_removed_but_a_running_ones_is_kept(tmp_path):
    s = spec(lr_rounds=3, seeds=1)
    store = sweep.storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1)
    study = sweep._study(s, store)
    running = study.ask()  # trial 0 runs (another worker's)
    killed = study.ask()  # trial 1 was killed: FAIL, as fail_stale_trials leaves it
    study.tell(killed, state=TrialState.FAIL)
    target = sweep.model_dir(s, tmp_path / "models")
    folders = {n: target.with_name(f".{target.name}.{phase}-{n}") for n, phase in ((0, "search"), (1, "search"),
                                                                                      (5, "seeds"))}
    for folder in folders.values():
        folder.mkdir(parents=True)
    assert sweep.remove_leftovers(s, tmp_path / "models", store) == [folders[1], folders[5]]
    assert folders[0].is_dir() and not folders[1].exists() and not folders[5].exists()
    assert running.number == 0


def test_keeping_the_best_model_holds_a_lock_other_processes_see(tmp_path):
    target = tmp_path / "models" / "rte_bitfit_0"
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")
    with sweep._locked(target):
        assert subprocess.run([sys.executable, "-c", probe, str(target.parent)]).returncode == 3  # held
    assert subprocess.run([sys.executable, "-c", probe, str(target.parent)]).returncode == 0  # released
