"""The paper's learning-rate search and seed protocol as Optuna studies; the study storage is the results store.

READ Section 3.3 / Appendix C.3: per task and method, a Bayesian (TPE) search of the learning rate, log-uniform
in [1e-6, 3e-3], for up to 32 rounds (round 1: the method's default), each run early-stopped on validation; then
the best learning rate with more seeds; the test score is the mean over seeds. Every finished run's record is a
trial attribute, so tables are built from the storage only. Workers are resumable and distributed: any number
share one storage, a killed trial is retried, a finished one never. See docs/sweep.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import socket
import statistics
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from readlib import checkpoint, data, methods, paper, paths
from readlib.errors import ConfigError
from readlib.params import RunParams, check_storage, load_sweep, make_params, result_fields
from readlib.train import fit

LR_RANGE = (1e-6, 3e-3)  # READ Section 3.3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ACTIVE = (TrialState.RUNNING, TrialState.WAITING)


def default_storage() -> str:
    """SQLite under the output folder (created)."""
    paths.OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{paths.output('studies.db')}"


@dataclass
class SweepSpec:
    """One (task, method) experiment: its run parameters and the size of the search."""

    task: str
    method: str
    profile: str = "default"
    backbone: str | None = None  # None: the profile's backbone
    method_args: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # other run parameters (max_epochs, max_train, ...)
    lr_rounds: int | None = None  # None: the profile's sweep block (params/<profile>.yaml)
    seeds: int | None = None
    prune: bool = False

    def __post_init__(self) -> None:
        plan = load_sweep(self.profile)
        self.lr_rounds = plan["lr_rounds"] if self.lr_rounds is None else self.lr_rounds
        self.seeds = plan["seeds"] if self.seeds is None else self.seeds
        self._runs = plan["runs"]

    def params(self, lr: float, seed: int) -> RunParams:
        """A trial's run parameters: the profile, its sweep block's ``runs``, then ``overrides`` (None keeps)."""
        overrides = self._runs | {k: v for k, v in self.overrides.items() if v is not None}
        return make_params(self.profile, task=self.task, method=self.method, backbone=self.backbone,
                           method_args=self.method_args, lr=lr, seed=seed, **overrides)

    def check(self) -> None:
        """Every input problem (parameters, missing data) as ConfigError/DataNotFoundError, before any model."""
        if self.lr_rounds < 1:
            raise ConfigError(f"lr_rounds must be >= 1, got {self.lr_rounds}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")
        params = self.params(LR_RANGE[0], 0)
        if data.check_available(params.task, params.data_dir) == "hub":
            data.load_raw(params.task, params.data_dir)  # download once (or fail with the paragraph) before any trial

    @property
    def name(self) -> str:
        """The search study's name: everything that changes a run's result, and nothing else."""
        fixed = result_fields(self.params(LR_RANGE[0], 0))
        for searched in ("lr", "seed"):  # searched, or varied per seed run
            del fixed[searched]
        return "|".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(fixed.items()))


def storage(url: str | None = None, heartbeat: int = 30) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats every ``heartbeat`` seconds (killed trials are detected and retried);
    SQLite under outputs/ by default."""
    if heartbeat < 1:
        raise ConfigError(f"heartbeat must be >= 1 second, got {heartbeat}")
    check_storage(url)
    url = url or default_storage()
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    return _retried(lambda: optuna.storages.RDBStorage(
        url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat + 2,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
    ))


def _retried(make: Callable[[], Any], attempts: int = 5) -> Any:
    """``make()``, retried when workers starting together race to create the same tables or study."""
    for attempt in range(1, attempts + 1):
        try:
            return make()
        except SQLAlchemyError:
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)


def _sampler(spec: SweepSpec, trial_number: int) -> optuna.samplers.TPESampler:
    """The sampler one trial draws its learning rate with, seeded by the study and the trial's number. The storage
    hands out each number once, so workers drawing at the same moment get different seeds (a seed from what a worker
    has seen, such as the trial count, is the same for two workers that looked at once), and one worker's draws are
    reproducible. ``constant_liar``: running trials count as (pessimistic) results, so TPE avoids them."""
    return optuna.samplers.TPESampler(seed=(zlib.crc32(spec.name.encode()) + trial_number) % 2**31,
                                      constant_liar=True)


def _study(spec: SweepSpec, store, suffix: str = "") -> optuna.Study:
    """Load the study, or create it; the one worker whose creation succeeds queues round 1 of a search: the
    method's default learning rate (creation is atomic in the storage, so it is queued exactly once)."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1) if spec.prune else None
    kwargs = dict(study_name=spec.name + suffix, storage=store, direction="maximize", pruner=pruner,
                  sampler=_sampler(spec, 0))

    def create_or_load() -> optuna.Study:
        try:
            study = optuna.create_study(**kwargs)
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(**{k: v for k, v in kwargs.items() if k != "direction"})
        if not suffix:
            study.enqueue_trial({"lr": default_lr(spec.method)})
        return study

    return _retried(create_or_load)


def default_lr(method: str) -> float:
    """The method's default learning rate (its spec's ``default_lr``), inside the search range."""
    return min(max(methods.get_method(method).default_lr, LR_RANGE[0]), LR_RANGE[1])


def _consumed(trial: optuna.trial.FrozenTrial) -> bool:
    """A unit of the search that is done or being done (a killed trial is replaced by its queued retry)."""
    return trial.state in FINISHED + ACTIVE or (trial.state == TrialState.FAIL and "record" in trial.user_attrs)


def search_rounds(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Rounds of the search done or under way: distinct learning rates among consumed trials (drawn, or queued), plus
    running trials that have not drawn yet (each will draw a new one)."""
    lrs = [t.params.get("lr", t.system_attrs.get("fixed_params", {}).get("lr")) for t in trials if _consumed(t)]
    return len({lr for lr in lrs if lr is not None}) + lrs.count(None)


def model_dir(spec: SweepSpec, save_dir: str | Path) -> Path:
    """Where a worker with ``save_dir`` keeps the best run of ``spec`` (``readlib.checkpoint`` folder):
    ``<save_dir>/<task>_<method>_<8 hex digits of the study name>`` (the study name covers the method's
    hyperparameters and every run parameter that changes a result)."""
    return Path(save_dir).expanduser() / f"{spec.task}_{spec.method}_{zlib.crc32(spec.name.encode()):08x}"


def _keep_if_best(trial_dir: Path, target: Path, score: float | None) -> bool:
    """Move a trial's saved model to ``target`` when its validation score beats the one kept there (the best run
    over the search and seed runs), else delete it; whether it was kept. Workers on one machine (or on a file system
    with working ``flock``) take turns, so two finishing at once cannot replace a better model with a worse one."""
    with _locked(target):
        kept = None
        if (target / checkpoint.META).is_file():
            kept = ((json.loads((target / checkpoint.META).read_text())["record"].get("validation") or {})
                    .get("score"))
        if score is None or not trial_dir.is_dir() or (kept is not None and kept >= score):
            shutil.rmtree(trial_dir, ignore_errors=True)
            return False
        old = target.with_name(target.name + f".replaced-{os.getpid()}")
        if target.exists():
            target.rename(old)
        trial_dir.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return True


@contextlib.contextmanager
def _locked(target: Path):
    """An exclusive lock on the folder that holds ``target`` (``flock`` on the folder itself: no lock file left),
    held for the block."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(spec: SweepSpec, save_dir: str | Path, store) -> list[Path]:
    """Delete the saved models of trials that are not running (a worker killed mid-trial leaves its trial's folder
    ``.<model folder>.<phase>-<trial>``; the retry has another number); return what was deleted."""
    target = model_dir(spec, save_dir)
    removed = []
    with _locked(target):
        for phase, suffix in (("search", ""), ("seeds", "|seeds")):
            folders = sorted(target.parent.glob(f".{target.name}.{phase}-*"))
            if not folders:
                continue
            try:
                trials = optuna.load_study(study_name=spec.name + suffix, storage=store).get_trials(deepcopy=False)
            except KeyError:  # no such study in this storage
                trials = []
            running = {t.number for t in trials if t.state == TrialState.RUNNING}
            for folder in folders:
                number = folder.name.rpartition("-")[2]
                if not (number.isdigit() and int(number) in running):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
    return removed


def _objective(spec: SweepSpec, progress: bool, best_lr: float | None = None,
               save_dir: str | Path | None = None) -> Callable[[optuna.Trial], float]:
    """Search trials (``best_lr`` None) draw the learning rate; seed runs get it and the seed from the queue.
    ``save_dir``: each run is saved, and kept in ``model_dir`` while it is the best run of ``spec``."""
    phase = "search" if best_lr is None else "seeds"

    def objective(trial: optuna.Trial) -> float:
        trial.study.sampler = _sampler(spec, trial.number)  # read by suggest_float, when lr is not queued
        lr = trial.suggest_float("lr", *LR_RANGE, log=True)
        seed = trial.suggest_int("seed", 0, max(spec.seeds - 1, 0)) if best_lr is not None else 0
        if best_lr is not None and lr != best_lr:  # drawn, not queued: another worker took the last seed run
            raise optuna.TrialPruned("no seed run left")
        if best_lr is not None and _earlier_twin(trial, {"lr": lr, "seed": seed}):
            raise optuna.TrialPruned("a raced duplicate of an earlier seed run")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

        def on_epoch(row: dict) -> None:
            trial.report(row["val_score"], row["epoch"])  # every trial: learning curves in optuna-dashboard
            if phase == "search" and spec.prune and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {row['epoch']}")

        target = None if save_dir is None else model_dir(spec, save_dir)
        trial_dir = None if target is None else target.with_name(f".{target.name}.{phase}-{trial.number}")
        record = fit(spec.params(lr, seed), progress=progress, on_epoch=on_epoch, save_dir=trial_dir)
        record = json.loads(json.dumps(record, default=float))
        record["sweep"] = {"study": spec.name, "phase": phase, "trial": trial.number}
        score = (record["validation"] or {}).get("score")
        if "saved" in record:  # where the model is: the kept best run's folder, or nowhere (a better run exists)
            record["saved"]["dir"] = str(target) if _keep_if_best(trial_dir, target, score) else None
        trial.set_user_attr("record", record)
        return float("nan") if score is None else score  # NaN: Optuna marks the trial FAIL (record kept)

    return objective


def _earlier_twin(trial: optuna.Trial, params: dict) -> bool:
    """Whether a lower-numbered trial of the study runs or ran the same parameters: two workers enqueueing the seed
    runs at once can both queue one (``enqueue_trial``'s ``skip_if_exists`` is no lock); the first one runs it."""
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if other.number < trial.number and other.system_attrs.get("fixed_params", other.params) == params:
            return True
    return False


def _run_one(study: optuna.Study, objective, on_trial: Callable[[str], None] | None, label: str) -> None:
    study.optimize(objective, n_trials=1, catch=(), gc_after_trial=True)
    if on_trial is not None:
        on_trial(label)


def run_worker(spec: SweepSpec, storage_url: str | None = None, heartbeat: int = 30, progress: bool = False,
               on_trial: Callable[[str], None] | None = None, save_dir: str | Path | None = None) -> int:
    """Work on ``spec`` until its search and seed runs are all finished; return the number of trials run here.

    Safe to run in many processes on one storage at once, and to re-run after a crash (module docstring).
    ``on_trial`` is called with a short label after each trial this worker finishes. ``save_dir``: the best run
    (highest validation score over search and seed runs) is kept as a model folder in ``model_dir(spec, save_dir)``.
    """
    check_storage(storage_url)
    spec.check()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retry
    store = storage(storage_url, heartbeat)
    ran = 0
    while True:
        search = _study(spec, store)
        optuna.storages.fail_stale_trials(search)  # killed workers' trials -> FAIL + a queued retry
        if save_dir is not None and ran == 0:
            remove_leftovers(spec, save_dir, store)
        trials = search.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if waiting or search_rounds(trials) < spec.lr_rounds:
            number = sum(t.state != TrialState.WAITING for t in trials) + 1
            _run_one(search, _objective(spec, progress, save_dir=save_dir), on_trial, f"search {number}")
            ran += 1
            continue
        if any(t.state == TrialState.RUNNING for t in trials):  # another worker's (or a stale) search trial
            time.sleep(heartbeat)
            continue
        best = best_trial(search)
        if best is None or spec.seeds == 1:
            return ran
        seeds = _study(spec, store, "|seeds")
        optuna.storages.fail_stale_trials(seeds)
        for seed in range(1, spec.seeds):
            seeds.enqueue_trial({"lr": best.params["lr"], "seed": seed}, skip_if_exists=True)
        states = [t.state for t in seeds.get_trials(deepcopy=False)  # queued trials keep their params aside
                  if t.system_attrs.get("fixed_params", t.params).get("lr") == best.params["lr"]]
        if TrialState.WAITING in states:
            _run_one(seeds, _objective(spec, progress, best.params["lr"], save_dir), on_trial, "seed run")
            ran += 1
        elif TrialState.RUNNING in states:
            time.sleep(heartbeat)
        else:
            return ran


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The search trial with the best validation score (COMPLETE trials only), or None."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if math.isfinite(t.value)]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def records(spec: SweepSpec, storage_url: str | None = None) -> list[dict]:
    """Every finished run's record of ``spec`` (search and seed phases), read from the storage."""
    store = storage(storage_url)
    out = []
    for suffix in ("", "|seeds"):
        try:
            study = optuna.load_study(study_name=spec.name + suffix, storage=store)
        except KeyError:
            continue
        out += [t.user_attrs["record"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return out


def summary(spec: SweepSpec, storage_url: str | None = None) -> dict | None:
    """The protocol's result for ``spec``: best learning rate, its validation score, and the test score of
    each seed run at that learning rate (mean and standard deviation over seeds), the best run's step-0 validation
    score (the untrained model; None in records from before it was recorded); None before any run finished."""
    runs = records(spec, storage_url)
    search = [r for r in runs if r["sweep"]["phase"] == "search" and r["validation"]]
    if not search:
        return None
    best = max(search, key=lambda r: (r["validation"]["score"], -r["sweep"]["trial"]))
    by_seed = {0: best}
    for r in runs:  # one run per seed: the first finished one (a raced duplicate is ignored)
        if r["sweep"]["phase"] == "seeds" and r["lr"] == best["lr"] and r["test"]:
            by_seed.setdefault(r["seed"], r)
    tests = [r["test"]["score"] for _, r in sorted(by_seed.items())]
    return {
        "task": spec.task, "method": spec.method, "method_args": best["method_args"], "lr": best["lr"],
        "validation": best["validation"]["score"], "test_mean": statistics.fmean(tests),
        "step0_validation": (best.get("step0_validation") or {}).get("score"),
        "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "seeds": sorted(by_seed),
        "test_by_seed": tests, "search_runs": len(search), "record": best,
    }


ARCHITECTURES = paper.READ_TABLE7_CANDIDATES


def architecture_scores(spec: SweepSpec, tasks: list[str], storage_url: str | None = None) -> list[dict]:
    """Appendix C.3's architecture selection for ``spec.method``: each Table 7 candidate's best validation score
    per task (its learning-rate search) and their mean over the tasks where every candidate has a result.

    Returns one row per candidate, best first; ``selected`` marks the winner (None when no task is complete).
    """
    candidates = ARCHITECTURES.get(spec.method, [spec.method_args])
    found = {}
    for i, args in enumerate(candidates):
        for task in tasks:
            result = summary(dataclasses.replace(spec, task=task, method_args=args), storage_url)
            if result is not None:
                found[i, task] = result["validation"]
    complete = [t for t in tasks if all((i, t) in found for i in range(len(candidates)))]
    rows = [{"method_args": args, "tasks": complete, **{t: found.get((i, t)) for t in tasks},
             "mean_validation": statistics.fmean(found[i, t] for t in complete) if complete else None}
            for i, args in enumerate(candidates)]
    rows.sort(key=lambda r: math.inf if r["mean_validation"] is None else -r["mean_validation"])
    for rank, row in enumerate(rows):
        row["selected"] = rank == 0 and row["mean_validation"] is not None
    return rows


def select_methods(selection: str, task: str, profile: str = "default", **overrides: Any) -> list[str]:
    """Method names from ``selection``: "all" (every registered method that trains in the formulation of the runs
    ``overrides`` describe, e.g. no selective fine-tuning on T5 text-to-text) or a comma-separated list, each
    checked."""
    if selection == "all":
        formulation = make_params(profile, task=task, **overrides).formulation
        return [name for name in methods.METHODS if methods.supports(name, formulation)]
    names = [name.strip() for name in selection.split(",") if name.strip()]
    for name in names:
        methods.get_method(name)
    return names


def summaries(template: SweepSpec, names: list[str], tasks: list[str] | tuple[str, ...],
              method_args: dict[str, dict] | None = None, storage_url: str | None = None) -> list[dict]:
    """``summary`` of every (method, task) that has a result, for studies like ``template`` (same profile, backbone,
    overrides and search size); ``method_args`` per method (default: the method's defaults)."""
    args = method_args or {}
    specs = (dataclasses.replace(template, task=task, method=name, method_args=args.get(name, {}))
             for name in names for task in tasks)
    found = (summary(spec, storage_url) for spec in specs)
    return [result for result in found if result is not None]
