"""The low-data study: READ against full fine-tuning, LoRA and BitFit on 1 %, 10 % and 100 % of the training set.

READ Section 6 says READ "tends to require more epochs to converge" when training data is scarce and leaves it as
future work. Here each (task, method, fraction) is one ``readlib.sweep`` experiment (a ``SweepSpec`` whose
``max_train`` is the fraction's size), so every run lands in the study storage, a killed study resumes and a
finished run is never redone: the sweep is the runner. ``table`` reads the runs back (epochs and cumulative training
FLOPs to each run's best validation epoch), ``verdict`` answers the question from the table.

The training set. "100 %" is the training set a default run of the profile uses: the profile's ``max_train`` cap
(default profile: 4,000 examples), or the task's whole training split when it is smaller or the profile has no cap;
a fraction f trains on n = max(1, round(f x pool)) examples. ``readlib.data.subsample`` draws them with seed 0 for
every run (``readlib.train`` passes no subsample seed; the run's ``seed`` changes initialisation, data order and
dropout only), as the first n of one permutation of the training split: the 1 % set lies inside the 10 % set, which
lies inside the 100 % pool, and the seeds of one fraction all train on the same examples. Their spread is therefore
the spread over initialisation and order, not over subsets (a per-seed subset would need a new run parameter, which
would change the name of every stored study).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable

import pandas as pd

from readlib import data, sweep
from readlib.errors import ConfigError
from readlib.methods import get_method
from readlib.params import load_profile
from readlib.sweep import SweepSpec

FRACTIONS = (0.01, 0.1, 1.0)
METHODS = ("read", "full", "lora", "bitfit")
COLUMNS = ["task", "method", "fraction", "n_train", "lr", "val_mean", "val_std", "test_mean", "test_std",
           "epochs_to_best", "flops_to_best", "epochs_run", "seeds"]


def pool_size(task: str, profile: str = "default") -> int:
    """The "100 %" training set of ``task`` in examples: the profile's ``max_train`` cap (default profile: 4,000),
    or the task's whole training split (Section 3.2 recipe) when that is smaller or the profile has no cap."""
    whole = data.paper_split_sizes(data.get_task(task).name)["train"]
    cap = load_profile(profile).get("max_train")
    return whole if cap is None else min(cap, whole)


def train_size(fraction: float, pool: int) -> int:
    """Training examples for ``fraction`` of a pool of ``pool`` examples: max(1, round(fraction x pool))."""
    if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise ConfigError(f"a training fraction must be in (0, 1], got {fraction!r}")
    if pool < 1:
        raise ConfigError(f"the training pool must hold >= 1 example, got {pool}")
    return max(1, round(fraction * pool))


def specs(tasks: Iterable[str], methods: Iterable[str] = METHODS, fractions: Iterable[float] = FRACTIONS,
          profile: str = "default", lr_rounds: int = 3, seeds: int = 3, max_epochs: int = 10, patience: int = 3,
          full_seeds: int = 1, max_eval: int | None = None, backbone: str | None = None) -> list[SweepSpec]:
    """The study as sweep experiments, cheapest first: fraction by fraction (ascending), task by task, method by
    method. Each trains on ``train_size(fraction, pool_size(task, profile))`` examples,
    searches ``lr_rounds`` learning rates (round 1: the method's default) and reruns the best with ``seeds`` seeds
    below 100 % and ``full_seeds`` at 100 %; ``max_epochs`` and ``patience`` (epochs) bound each run; ``max_eval``
    (examples) caps validation and test (None: the profile's sweep value). Other run parameters are the profile's
    ``sweep.runs`` (default profile: batches of 8). The study names differ per fraction (``max_train`` is part of
    them). Every input is checked here, before any model is loaded."""
    tasks, names, fractions = list(tasks), list(methods), sorted(fractions)
    if not tasks or not names or not fractions:
        raise ConfigError(f"the study needs a task, a method and a fraction; got {tasks}, {names}, {fractions}")
    if len(set(fractions)) != len(fractions):
        raise ConfigError(f"fractions repeat: {fractions}")
    for name in names:
        get_method(name)
    if full_seeds < 1:
        raise ConfigError(f"full_seeds must be >= 1, got {full_seeds}")
    out = []
    for fraction in fractions:
        for task in tasks:
            n = train_size(fraction, pool_size(task, profile))
            for name in names:
                spec = SweepSpec(task, name, profile, backbone=backbone, lr_rounds=lr_rounds,
                                 seeds=full_seeds if fraction == 1 else seeds,
                                 overrides={"max_train": n, "max_epochs": max_epochs, "patience": patience,
                                            "max_eval": max_eval})
                spec.check()  # every run parameter and the data (ConfigError / DataNotFoundError)
                out.append(spec)
    return out


def run(study: list[SweepSpec], storage_url: str | None = None, progress: bool = False,
        on_trial: Callable[[str], None] | None = None) -> int:
    """Run every experiment of ``study`` in order with ``readlib.sweep.run_worker`` (resumable; finished runs are
    skipped, so a second call runs nothing); return the number of trials run. Any number of processes may run the
    same study on one storage at once (the sweep shares the work)."""
    ran = 0
    for spec in study:
        label = f"{spec.task} {spec.method} n={spec.overrides['max_train']}"
        ran += sweep.run_worker(spec, storage_url, progress=progress,
                                on_trial=None if on_trial is None else (lambda what, label=label: on_trial(
                                    f"{label}: {what}")))
    return ran


def _best_flops(record: dict) -> float | None:
    """Cumulative training FLOPs at the record's best validation epoch (its history row), None if not counted."""
    row = next((r for r in record["history"] if r["epoch"] == record["best_epoch"]), None)
    return None if row is None else row.get("train_flops")


def protocol_runs(runs: list[dict]) -> list[dict]:
    """The runs that make one experiment's result, as ``readlib.sweep.summary`` picks them: the search run with the
    best validation score (ties: the earlier trial), then one run per further seed at its learning rate (the first
    finished; a raced duplicate is ignored); seed order. Empty before a search run finished."""
    search = [r for r in runs if r["sweep"]["phase"] == "search" and r["validation"]]
    if not search:
        return []
    best = max(search, key=lambda r: (r["validation"]["score"], -r["sweep"]["trial"]))
    by_seed = {best["seed"]: best}
    for r in sorted(runs, key=lambda r: r["sweep"]["trial"]):
        if r["sweep"]["phase"] == "seeds" and r["lr"] == best["lr"] and r["validation"] and r["test"]:
            by_seed.setdefault(r["seed"], r)
    return [by_seed[seed] for seed in sorted(by_seed)]


def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0.0 for one value), as ``readlib.sweep.summary`` reports seeds."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(study: list[SweepSpec] | list[dict], storage_url: str | None = None) -> pd.DataFrame:
    """One row per (task, method, fraction) from the study's specs (read from ``storage_url``) or from result records
    (e.g. ``readlib.report.stored_records``; grouped by study). Columns: ``fraction``, the share of the pool trained on
    (n_train / ``pool_size`` of the record's task and profile; NaN above the pool), ``n_train`` (examples), the best
    ``lr``; over the seed runs at that lr (``protocol_runs``): validation and test score mean and sample std in
    points (x 100, as ``readlib.report.glue_table``), ``epochs_to_best`` (the best validation epoch, 1-based, mean),
    ``flops_to_best`` (cumulative training FLOPs of that epoch's history row: READ's cache fill once plus every
    optimizer step; mean), ``epochs_run`` (mean) and ``seeds`` (the seeds counted). Experiments without a finished
    run have no row."""
    if study and isinstance(study[0], SweepSpec):
        groups = [sweep.records(spec, storage_url) for spec in study]
    else:
        by_study: dict[str, list[dict]] = {}
        for record in study:
            name = (record.get("sweep") or {}).get("study")
            if name is not None:
                by_study.setdefault(name, []).append(record)
        groups = list(by_study.values())
    rows = []
    for runs in groups:
        chosen = protocol_runs(runs)
        if not chosen:
            continue
        first = chosen[0]
        n = first["data"]["sizes_used"]["train"]
        pool = pool_size(first["task"], first["profile"])
        flops = [_best_flops(r) for r in chosen]
        val = _spread([100 * r["validation"]["score"] for r in chosen])
        test = _spread([100 * r["test"]["score"] for r in chosen])
        rows.append({
            "task": first["task"], "method": first["method"],
            "fraction": n / pool if n <= pool else math.nan,
            "n_train": n, "lr": first["lr"], "val_mean": val[0], "val_std": val[1], "test_mean": test[0],
            "test_std": test[1], "epochs_to_best": statistics.fmean(r["best_epoch"] for r in chosen),
            "flops_to_best": math.nan if None in flops else statistics.fmean(flops),
            "epochs_run": statistics.fmean(r["epochs_run"] for r in chosen), "seeds": [r["seed"] for r in chosen],
        })
    out = pd.DataFrame(rows, columns=COLUMNS)
    order = {name: i for i, name in enumerate(METHODS)}
    return out.sort_values(["fraction", "task", "method"], key=lambda col: col.map(order).fillna(len(order))
                           if col.name == "method" else col, ignore_index=True)


LABEL = {"read": "READ", "full": "full fine-tuning", "lora": "LoRA", "bitfit": "BitFit"}


def _label(method: str) -> str:
    return LABEL.get(method, method)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def verdict(rows: pd.DataFrame) -> str:
    """The paper's low-data question answered from ``table`` in plain sentences with its numbers: at each fraction and
    task, does READ need more epochs to its best validation epoch than each other method, and are its training FLOPs
    to that epoch still below theirs (or does needing more epochs erase its cheaper steps)? Each method's best
    validation score (points) and seed count are quoted: a run that never improves has its best at epoch 1, cheaply.
    Then, per fraction, how many comparisons go each way."""
    if rows.empty or "read" not in set(rows["method"]):
        return "No READ result in the table: nothing to compare yet."
    lines = []
    for fraction, at_fraction in rows.groupby("fraction", sort=True, dropna=False):
        more = fewer_flops = compared = 0
        for task, of_task in at_fraction.groupby("task", sort=True):
            read = of_task[of_task["method"] == "read"]
            others = of_task[of_task["method"] != "read"]
            n = int(of_task["n_train"].iloc[0])
            where = f"{task} at {_percent(fraction) if pd.notna(fraction) else 'an unknown fraction'} ({n} examples)"
            if read.empty or others.empty:
                lines.append(f"{where}: {'no READ result' if read.empty else 'no other method'} to compare.")
                continue
            r = read.iloc[0]
            parts, costs = [], []
            for _, o in others.iterrows():
                compared += 1
                relation = ("more than" if r["epochs_to_best"] > o["epochs_to_best"] else
                            "fewer than" if r["epochs_to_best"] < o["epochs_to_best"] else "as many as")
                more += relation == "more than"
                parts.append(f"{relation} {_label(o['method'])} ({o['epochs_to_best']:.3g}; {o['val_mean']:.1f} "
                             f"points, {len(o['seeds'])} seed(s))")
                ratio = r["flops_to_best"] / o["flops_to_best"]
                fewer_flops += ratio < 1
                costs.append(f"{'below' if ratio < 1 else 'not below'} {_label(o['method'])}'s "
                             f"{o['flops_to_best']:.3g} ({ratio:.2g}x)")
            lines.append(f"{where}: READ reached its best validation epoch ({r['val_mean']:.1f} points) after "
                         f"{r['epochs_to_best']:.3g} epochs (mean over {len(r['seeds'])} seed(s)), "
                         f"{', '.join(parts)}; its {r['flops_to_best']:.3g} "
                         f"training FLOPs to that epoch are {', '.join(costs)}.")
        if compared:
            erased = compared - fewer_flops
            lines.append(f"At {_percent(fraction)}: READ needed more epochs to its best in {more} of {compared} "
                         f"comparisons, and reached it with fewer training FLOPs in {fewer_flops} of {compared}: "
                         + ("more epochs did not erase its cheaper steps." if erased == 0 else
                            f"in {erased} of {compared} its cheaper steps were outweighed."))
    return "\n".join(lines)
