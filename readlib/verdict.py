"""The reproduction report: every table and figure of both papers that the suite builds, ours beside the paper's,
provenance, and one verdict per paper claim (``CLAIMS``) — reproduced, differs, or not testable here.

It reads the study storage, the result files under outputs/results and the tables the notebooks wrote under
outputs/tables; it never trains and never downloads. The few shape-only numbers no notebook writes as a table
(``shape_scenarios``) are computed on the meta device, about 45 s on a shared 2-core CPU. Output: outputs/REPORT.md and
outputs/REPORT.html (``write_report``).
"""

from __future__ import annotations

import html
import importlib.metadata
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from readlib import data, derivation, methods, paper, paths, report, scaling, sweep
from readlib.metrics import compute_metrics
from readlib.train import git_commit

REPRODUCED, DIFFERS, NOT_TESTABLE = "reproduced", "differs", "not testable here"
RESAMPLES, BOOTSTRAP_SEED = 1000, 0
PACKAGES = ("torch", "transformers", "peft", "optuna", "accelerate", "datasets", "numpy", "pandas", "scipy",
            "scikit-learn")
# GPU-hours of the paper profile (T5-base, 7 tasks, 32 learning rates + 2 seeds) at the 30-epoch maximum, 40 % of
# an A100's bf16 peak: bench/paper_cost.py, as printed in the README
PAPER_PROFILE_COST = ("the paper profile (T5-base, all 7 tasks, 32 learning rates, 3 seeds, up to 30 epochs; a GPU "
                      "and the hub): about 194 A100 GPU-hours for full tuning and READ, 746 for all 7 methods, at "
                      "the 30-epoch maximum (251 at an assumed 10 epochs; `python bench/paper_cost.py`)")


# ---------------------------------------------------------------- bootstrap over test examples


def bootstrap_scores(groups: list[tuple[str, dict, dict | None]], resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``resamples`` bootstrap values of the mean over ``groups`` of score(a) − score(b) (score(a) where b is None),
    as fractions. A group is (task, a, b) with ``record["test_examples"]``-style dicts (``predictions``,
    ``references``); each resample draws every task's test examples with replacement, the same draw for a and b
    (paired) when their references agree, and recomputes the task metric (``compute_metrics``)."""
    rng = np.random.default_rng(seed)
    values = np.zeros(resamples)
    for task, a, b in groups:
        pred_a, ref_a = np.asarray(a["predictions"]), np.asarray(a["references"])
        draws = rng.integers(0, len(ref_a), size=(resamples, len(ref_a)))
        if b is not None:
            pred_b, ref_b = np.asarray(b["predictions"]), np.asarray(b["references"])
            paired = np.array_equal(ref_a, ref_b)
            draws_b = draws if paired else rng.integers(0, len(ref_b), size=(resamples, len(ref_b)))
        for i, idx in enumerate(draws):
            score = compute_metrics(task, pred_a[idx], ref_a[idx])["score"]
            if b is not None:
                score -= compute_metrics(task, pred_b[draws_b[i]], ref_b[draws_b[i]])["score"]
            values[i] += score / len(groups)
    return values


def bootstrap_interval(task: str, predictions: list, references: list, resamples: int = RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (fractions) of the task score over resampled test examples."""
    values = bootstrap_scores([(task, {"predictions": predictions, "references": references}, None)], resamples,
                              seed)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


# ---------------------------------------------------------------- what the report reads


@dataclass
class Evidence:
    """Everything the verdicts are computed from."""

    profile: str
    summaries: dict[tuple[str, str], dict] = field(default_factory=dict)  # (method, task) -> sweep.summary
    records: list[dict] = field(default_factory=list)  # every record of the profile: storage and outputs/results
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # outputs/tables/<name>.csv
    glue: dict[str, pd.DataFrame] = field(default_factory=dict)  # report.glue_tables of the summaries
    scenarios: dict[str, Any] = field(default_factory=dict)  # shape_scenarios()


def notebook_command(notebook: str, profile: str) -> str:
    """The command that runs one notebook headless, as ``make reproduce`` does."""
    return (f"`.venv/bin/papermill notebooks/{notebook}.ipynb outputs/notebooks/{notebook}.ipynb -p profile {profile}"
            " --cwd notebooks`")


def glue_template(profile: str) -> sweep.SweepSpec:
    """The studies notebook 03 runs on its defaults for ``profile`` (the profile's backbone and sweep block)."""
    return sweep.SweepSpec(paper.TABLE1_TASKS[0], "read", profile)


def read_tables(profile: str) -> dict[str, pd.DataFrame]:
    """The notebooks' tables the report uses, by name, where their CSV exists under outputs/tables."""
    names = ("table2_inference_memory", "table4_t5_base", "05_tokentune_table1", f"05_k_ablation_{profile}")
    files = {name: paths.output("tables", f"{name}.csv") for name in names}
    return {name: pd.read_csv(path) for name, path in files.items() if path.is_file()}


def shape_scenarios() -> dict[str, Any]:
    """Shape-only numbers that no notebook writes as a table, on the meta device (about 45 s on a shared 2-core CPU):
    trainable parameters per PETL method on T5-small and -large (Figure 5 left), accounted training memory of full
    tuning on T5-base and READ on T5-large without its last 4 layers (Figure 5 right, batch 48 x 128), TokenTune's
    peak memory at batch 512 (Figure 2 left), the derivation's log-log slopes (Appendix A), the split table."""
    petl = [m for m in ("read", "adapter", "lora", "bitfit", "prompt", "lst") if m in methods.METHODS]
    eps = derivation.eps_grid()
    slopes = {}
    for kind in derivation.KINDS:
        table = derivation.gap_vs_epsilon(eps, kind)
        slopes[kind] = derivation.loglog_slope(table.eps, table.gap)
    return {
        "parameters": {(m, size): scaling.trainable_parameters(m, f"random-t5-{size}")["trainable"]
                       for m in petl for size in ("small", "large")},
        "memory": {("full", "base"): scaling.computed_training_memory("full", "random-t5-base", 48, 128)[
                       "accounted_total"],
                   ("read", "large"): scaling.computed_training_memory("read", "random-t5-large", 48, 128,
                                                                       method_args={"drop_layers": 4})[
                       "accounted_total"]},
        "tokentune_512": {name: scaling.computed_phase_memory(method, "random-bert-base", 512, 128,
                                                              method_args=args)["cumulative"]["optimizer"]
                          for name, (method, args) in scaling.TOKENTUNE_VARIANTS.items()
                          if name in ("full", "selective", "selective+lora")},
        "derivation_slopes": slopes,
        "splits": data.split_table(),
    }


def collect(storage_url: str | None, profile: str, scenarios: dict[str, Any] | None = None) -> Evidence:
    """The evidence for ``profile``: notebook 03's studies (``glue_template``), every record of the profile in the
    storage and outputs/results, the notebooks' tables, and ``scenarios`` (computed when None)."""
    url = storage_url or sweep.default_storage()
    stored = report.stored_records(url)
    results = sorted(paths.output("results").glob("*.json"))
    records = [r for r in stored + [json.loads(p.read_text()) for p in results] if r.get("profile") == profile]
    glue, found = report.glue_tables(glue_template(profile), list(methods.METHODS), storage_url=url)
    return Evidence(profile, {(s["method"], s["task"]): s for s in found}, records, read_tables(profile),
                    glue, shape_scenarios() if scenarios is None else scenarios)


# ---------------------------------------------------------------- claims


Check = Callable[[Evidence], tuple[str, str]]


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: where it is, what it says, how we test it, the tolerance, and the check."""

    id: str
    source: str
    text: str
    test: str
    tolerance: str
    check: Check


def _setting(summaries: list[dict]) -> str:
    record = summaries[0]["record"]
    used = record["data"]["sizes_used"]
    return f"{record['backbone']}, {used['train']} training examples per task"


def _seeds(summary: dict) -> str:
    n = len(summary["seeds"])
    return f"{summary['method']} {n} seed{'s' if n > 1 else ''}" + (
        f" (sd {100 * summary['test_std']:.2f})" if n > 1 else " (no spread)")


def _interval(groups: list[tuple[str, dict | None, dict | None]], paired: bool, offset: float = 0.0) -> str:
    """The 95 % bootstrap interval in points (less ``offset`` points) of ``bootstrap_scores(groups)``, or why there
    is none."""
    if any(a is None or (paired and b is None) for _, a, b in groups):
        return "per-example predictions not recorded, no bootstrap interval"
    low, high = np.percentile(100 * bootstrap_scores(groups) - offset, [2.5, 97.5])
    return f"95 % bootstrap interval [{low:+.2f}, {high:+.2f}] over test examples ({RESAMPLES} resamples)"


def _examples(summary: dict) -> dict | None:
    return summary["record"].get("test_examples")


def _not_run(ev: Evidence, what: str) -> tuple[str, str]:
    return NOT_TESTABLE, (f"no {what} in the storage for profile {ev.profile}: run notebook 03 "
                          f"(`make reproduce PROFILE={ev.profile}`)")


def score_gap(a: str, others: tuple[str, ...], tolerance: float, paper_table: dict[str, dict]) -> Check:
    """Check: the mean test score (points) of ``a`` minus each of ``others`` over the tasks both ran is at least
    −``tolerance``; the worst comparison is reported, with the paper's gap over the same tasks."""

    def check(ev: Evidence) -> tuple[str, str]:
        gaps = []
        for b in others:
            tasks = [t for t in paper.TABLE1_TASKS if (a, t) in ev.summaries and (b, t) in ev.summaries]
            if tasks:
                ours = [100 * (ev.summaries[a, t]["test_mean"] - ev.summaries[b, t]["test_mean"]) for t in tasks]
                theirs = [paper_table[a][t] - paper_table[b][t] for t in tasks] if b in paper_table else None
                gaps.append((float(np.mean(ours)), b, tasks, theirs))
        if not gaps:
            return _not_run(ev, f"{a} runs and {'/'.join(others)} runs on a common task")
        gap, b, tasks, theirs = min(gaps)
        pairs = [(ev.summaries[a, t], ev.summaries[b, t]) for t in tasks]
        groups = [(t, _examples(x), _examples(y)) for t, (x, y) in zip(tasks, pairs, strict=True)]
        interval = _interval(groups, paired=True)
        paper_gap = f"paper {np.mean(theirs):+.2f}" if theirs else "paper: not in its table"
        detail = (f"{a} − {b} = {gap:+.2f} points over {', '.join(tasks)} ({paper_gap}); {interval}; seeds: "
                  f"{_seeds(pairs[0][0])}, {_seeds(pairs[0][1])}; {_setting([pairs[0][0]])}")
        return (REPRODUCED if gap >= -tolerance else DIFFERS), detail

    return check


def table1_absolute(ev: Evidence) -> tuple[str, str]:
    """Check: every method's mean test score over the tasks it ran is within 2 points of Table 1's over the same
    tasks, when the runs are T5-base on the full training sets."""
    found = [s for (m, _), s in ev.summaries.items() if m in paper.READ_TABLE1]
    if not found:
        return _not_run(ev, "GLUE runs")
    record = found[0]["record"]
    used, full = record["data"]["sizes_used"]["train"], record["data"]["sizes_full"]["train"]
    if record["backbone"] != "t5-base" or used < full:
        return NOT_TESTABLE, (f"the {ev.profile} profile runs {record['backbone']} on {used} of {full} training "
                              f"examples ({record['data']['task']}); Table 1's absolute scores are T5-base on the "
                              f"full training sets: {PAPER_PROFILE_COST}")
    worst = None
    for method in sorted({s["method"] for s in found}):
        tasks = [t for t in paper.TABLE1_TASKS if (method, t) in ev.summaries]
        delta = float(np.mean([100 * ev.summaries[method, t]["test_mean"] - paper.READ_TABLE1[method][t]
                               for t in tasks]))
        if worst is None or abs(delta) > abs(worst[0]):
            worst = (delta, method, tasks)
    delta, method, tasks = worst
    offset = float(np.mean([paper.READ_TABLE1[method][t] for t in tasks]))
    groups = [(t, _examples(ev.summaries[method, t]), None) for t in tasks]
    interval = _interval(groups, paired=False, offset=offset)
    detail = (f"largest difference: {method} {delta:+.2f} points from the paper over {', '.join(tasks)}; "
              f"{interval}; seeds: {_seeds(ev.summaries[method, tasks[0]])}")
    return (REPRODUCED if abs(delta) <= 2.0 else DIFFERS), detail


def cost_reduction(quantity: str, paper_pct: float, low: float, high: float) -> Check:
    """Check: READ's training ``quantity`` (energy or memory, summed over the tasks both ran) is ``low``..``high`` %
    below full tuning's; ``paper_pct`` is the paper's reduction."""
    meter = report.run_energy if quantity == "energy" else report.run_memory

    def check(ev: Evidence) -> tuple[str, str]:
        tasks = [t for t in paper.TABLE1_TASKS if ("read", t) in ev.summaries and ("full", t) in ev.summaries]
        if not tasks:
            return _not_run(ev, "READ and full fine-tuning runs on a common task")
        totals, source = {}, ""
        for method in ("read", "full"):
            measured = [meter(ev.summaries[method, t]["record"]) for t in tasks]
            if any(v is None for v, _ in measured):
                reason = next(s for v, s in measured if v is None)
                return NOT_TESTABLE, (f"training {quantity} was not measured ({method}: {reason}); a run on a GPU "
                                      f"(NVML) measures it: the {ev.profile} profile on one GPU, or for T5-base "
                                      f"{PAPER_PROFILE_COST}")
            totals[method], source = sum(v for v, _ in measured), measured[0][1]
        reduction = 100 * (1 - totals["read"] / totals["full"])
        detail = (f"READ {reduction:.1f} % below full tuning (paper {paper_pct:.0f} %; {reduction - paper_pct:+.1f} "
                  f"points) over {', '.join(tasks)}, {source}; {_setting([ev.summaries['read', tasks[0]]])}")
        return (REPRODUCED if low <= reduction <= high else DIFFERS), detail

    return check


def table_ratio(table: str, notebook: str, what: str, ours: Callable[[pd.DataFrame], float], theirs: float,
                tolerance: float, relative: bool = False) -> Check:
    """Check: ``ours(table)`` is within ``tolerance`` of ``theirs`` (a fraction of it when ``relative``); the table
    is a notebook's CSV under outputs/tables."""

    def check(ev: Evidence) -> tuple[str, str]:
        if table not in ev.tables:
            return NOT_TESTABLE, f"outputs/tables/{table}.csv is missing: run {notebook_command(notebook, ev.profile)}"
        value = ours(ev.tables[table])
        allowed = tolerance * abs(theirs) if relative else tolerance
        detail = f"{what}: ours {value:.3g}, paper {theirs:.3g} ({value - theirs:+.3g}; outputs/tables/{table}.csv)"
        return (REPRODUCED if abs(value - theirs) <= allowed else DIFFERS), detail

    return check


def _by_method(table: pd.DataFrame, column: str) -> pd.Series:
    return table.set_index("method")[column]


def inference_growth(ev: Evidence) -> tuple[str, str]:
    """Check: READ's inference memory over full tuning's is at most 6 % at every T5 size and falls with size."""
    if "table2_inference_memory" not in ev.tables:
        return NOT_TESTABLE, ("outputs/tables/table2_inference_memory.csv is missing: run "
                              f"{notebook_command('04_scaling', ev.profile)}")
    table = ev.tables["table2_inference_memory"]
    read = table[table.method == "read"]
    growth = dict(zip(read.backbone, read.growth_pct.round(2), strict=True))
    paper_growth = dict(zip(read.backbone, read.paper_growth_pct.round(2), strict=True))
    falls = bool((np.diff(read.growth_pct.to_numpy()) < 0).all())
    ok = falls and read.growth_pct.max() <= 6.0
    return (REPRODUCED if ok else DIFFERS), (f"READ over full tuning, % by size: ours {growth}, paper {paper_growth}; "
                                             f"falls with size: {falls} (computed, batch 1)")


def scenario_check(key: str, evaluate: Callable[[Any], tuple[bool, str]]) -> Check:
    """Check on a shape-only scenario (``shape_scenarios``): ``evaluate`` gives (holds, detail)."""

    def check(ev: Evidence) -> tuple[str, str]:
        if key not in ev.scenarios:
            return NOT_TESTABLE, f"the shape-only scenario {key!r} was not computed"
        holds, detail = evaluate(ev.scenarios[key])
        return (REPRODUCED if holds else DIFFERS), detail

    return check


def _params_growth(counts: dict) -> tuple[bool, str]:
    growth = {m: counts[m, "large"] / counts[m, "small"] for m, size in counts if size == "small"}
    slowest = min(growth, key=growth.get)
    shown = ", ".join(f"{m} ×{g:.2f}" for m, g in sorted(growth.items(), key=lambda kv: kv[1]))
    return slowest == "read", f"trainable parameters T5-small → T5-large: {shown} (computed, meta device)"


def _read_large_memory(memory: dict) -> tuple[bool, str]:
    ratio = memory["read", "large"] / memory["full", "base"]
    return abs(ratio - 17.74 / 17.86) <= 0.2, (f"READ on T5-large (last 4 layers dropped) / full tuning on T5-base: "
                                               f"ours {ratio:.2f}, paper {17.74 / 17.86:.2f} (Table 4); accounted "
                                               "bytes at batch 48 x 128, computed")


def _tokentune_512(peak: dict) -> tuple[bool, str]:
    context = paper.TOKENTUNE_CONTEXT_MIB
    full_paper = paper.TOKENTUNE_FIG2_LEFT_MIB["full"][512] - context
    parts, holds = [], True
    for name in ("selective", "selective+lora"):
        ours = peak[name] / peak["full"]
        theirs = (paper.TOKENTUNE_FIG2_LEFT_MIB[name][512] - context) / full_paper
        holds &= abs(ours - theirs) <= 0.1
        parts.append(f"{name}/full ours {ours:.2f}, paper {theirs:.2f}")
    return holds, "; ".join(parts) + " (BERT-base, batch 512 x 128, computed; paper less its CUDA context)"


def _derivation(slopes: dict) -> tuple[bool, str]:
    holds = all(1.8 <= s <= 2.2 for s in slopes.values())
    return holds, "log-log slope of the first-order gap: " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items())


def _splits(table: pd.DataFrame) -> tuple[bool, str]:
    known = table[table.follows_recipe.notna()]
    off = list(known.task[~known.follows_recipe.astype(bool)])
    return not off, (f"Section 3.2's recipe gives Table 5's sizes for {len(known) - len(off)} of {len(known)} tasks"
                     + (f"; not for {', '.join(off)} (Table 5's train = original train − test)" if off else ""))


def _tokentune_breakdown(table: pd.DataFrame) -> tuple[bool, str]:
    rows = table.set_index("phase")

    def step(column: str, later: str, earlier: str) -> float:
        return float(rows.loc[later, column] - rows.loc[earlier, column])

    found = {"BERT activations": step("bert full", "forward", "forward_no_grad"),
             "BERT gradients": step("bert full", "backward", "forward"),
             "OPT activations": step("opt full", "forward", "forward_no_grad"),
             "OPT gradients": step("opt full", "backward", "forward")}
    theirs = {k: step(c + " (paper)", *p) for k, (c, p) in {
        "BERT activations": ("bert full", ("forward", "forward_no_grad")),
        "OPT gradients": ("opt full", ("backward", "forward"))}.items()}
    holds = (all(abs(found[k] / theirs[k] - 1) <= 0.25 for k in theirs)
             and found["BERT gradients"] < 1024 and found["OPT activations"] < 1024)
    shown = ", ".join(f"{k} {v:.0f}" + (f" (paper {theirs[k]:.0f})" if k in theirs else "") for k, v in found.items())
    return holds, f"MiB: {shown}; paper text: BERT gradients and OPT activations < 1 GB (computed, meta device)"


def table_check(table: str, notebook: str, evaluate: Callable[[pd.DataFrame], tuple[bool, str]]) -> Check:
    """Check on a notebook's table under outputs/tables: ``evaluate`` gives (holds, detail)."""

    def check(ev: Evidence) -> tuple[str, str]:
        name = table.format(profile=ev.profile)
        if name not in ev.tables:
            return NOT_TESTABLE, f"outputs/tables/{name}.csv is missing: run {notebook_command(notebook, ev.profile)}"
        holds, detail = evaluate(ev.tables[name])
        return (REPRODUCED if holds else DIFFERS), detail

    return check


def _lora_ratios(table: pd.DataFrame) -> tuple[bool, str]:
    peak = table.max(numeric_only=True)
    parts, holds = [], True
    for model in ("opt", "bert"):
        ours = peak[f"{model} lora"] / peak[f"{model} full"]
        theirs = peak[f"{model} lora (paper)"] / peak[f"{model} full (paper)"]
        holds &= abs(ours - theirs) <= 0.10
        parts.append(f"{model} LoRA/full ours {ours:.2f}, paper {theirs:.2f}")
    return holds, "; ".join(parts) + " (computed; paper less its CUDA context)"


def _k_scores(table: pd.DataFrame) -> tuple[bool, str]:
    scores = dict(zip(table.k, table["mean"], strict=True))
    ks = sorted(scores)
    if len(ks) < 2:
        return False, f"only k = {ks} in the table"
    gain = scores[ks[-1]] - scores[ks[0]]
    theirs = paper.TOKENTUNE_FIG2_RIGHT
    paper_gain = theirs[max(theirs)] - theirs[min(theirs)]
    spread = ", ".join(f"k={k}: sd {s:.2f}" for k, s in zip(table.k, table["std"], strict=True) if s == s) or \
        "one seed, no spread"
    return gain > 0, (f"mean validation score k={ks[0]} → k={ks[-1]}: {gain:+.2f} points (paper k=4 → 64: "
                      f"{paper_gain:+.1f}); {spread}")


def memory_falls_with_k(ev: Evidence) -> tuple[str, str]:
    """Check: the recorded training memory of selective fine-tuning runs is lower at the smallest k than the
    largest."""
    by_k: dict[int, list[float]] = {}
    for record in ev.records:
        memory, _ = report.run_memory(record)
        if record["method"] == "selective" and "k" in record["method_args"] and memory is not None:
            by_k.setdefault(record["method_args"]["k"], []).append(memory)
    if len(by_k) < 2:
        return NOT_TESTABLE, (f"fewer than two values of k among the selective runs of profile {ev.profile}: run "
                              f"{notebook_command('05_lst_selective', ev.profile)}")
    mean = {k: float(np.mean(v)) / 2**20 for k, v in sorted(by_k.items())}
    ks = list(mean)
    holds = mean[ks[0]] < mean[ks[-1]]
    return (REPRODUCED if holds else DIFFERS), ("training memory (MiB, mean over runs) by k: "
                                                + ", ".join(f"k={k}: {v:.1f}" for k, v in mean.items()))


def not_testable(reason: str) -> Check:
    """Check for a claim no profile of this suite reaches: always not testable here, with ``reason``."""
    return lambda ev: (NOT_TESTABLE, reason)


T4 = paper.READ_TABLE4

CLAIMS: list[Claim] = [
    Claim("read-memory", "READ Abstract, Section 4, Figure 2 (right)",
          "READ reduces training memory by 56 % relative to full tuning",
          "READ's and full tuning's recorded training memory (CUDA peak on a GPU, else accounted bytes) summed over "
          "the GLUE tasks both ran", "reduction 46–66 %", cost_reduction("memory", 56, 46, 66)),
    Claim("read-energy", "READ Abstract, Section 4, Figure 2 (left), Table 1",
          "READ uses 84 % less training energy than full tuning (Table 1: 2.06 vs 12.52 kWh)",
          "recorded training energy (NVML counter, eq. 4 or RAPL) summed over the GLUE tasks both ran",
          "reduction ≥ 79 %", cost_reduction("energy", 84, 79, 100)),
    Claim("read-vs-full", "READ Abstract, Section 4, Table 1",
          "READ keeps full tuning's accuracy (GLUE average 84.97 vs 84.52)",
          "mean test score of READ minus full tuning over the tasks both ran", "≥ −1 point",
          score_gap("read", ("full",), 1.0, paper.READ_TABLE1)),
    Claim("read-vs-petl", "READ Section 4, Table 1",
          "other than Adapter, READ outperforms the parameter-efficient methods (LoRA, BitFit, Prompt tuning)",
          "mean test score of READ minus each of LoRA, BitFit and Prompt tuning; the worst is reported",
          "≥ −0.5 points", score_gap("read", ("lora", "bitfit", "prompt"), 0.5, paper.READ_TABLE1)),
    Claim("read-vs-lst", "READ Appendix C.1, Table 3",
          "READ outperforms LST on most tasks (average 84.97 vs 84.58)",
          "mean test score of READ minus LST over the tasks both ran", "≥ −0.5 points",
          score_gap("read", ("lst",), 0.5, paper.READ_TABLE3)),
    Claim("table1-absolute", "READ Table 1 and Table 3",
          "the absolute T5-base test scores of every method (e.g. READ: CoLA 52.59, SST-2 93.80)",
          "each method's mean test score over the tasks it ran against Table 1's over the same tasks",
          "every method within 2 points", table1_absolute),
    Claim("read-large", "READ Section 4, Tables 3 and 4",
          "READ on T5-large outperforms every T5-base method (average 85.73) with less energy than full tuning",
          "READ runs on T5-large next to the T5-base runs", "average above every T5-base method's",
          not_testable("needs READ runs on T5-large (`python -m readlib worker --profile paper --backbone t5-large "
                       "--method read`, last 4 layers dropped); not estimated by bench/paper_cost.py, which "
                       "counts T5-base")),
    Claim("read-params", "READ Table 4", "READ trains 1.97 M parameters on T5-base (0.80 %)",
          "READ's trainable parameters on T5-base's architecture (notebook 04's Table 4)", "within 5 %",
          table_ratio("table4_t5_base", "04_scaling", "READ trainable parameters (M)",
                      lambda t: _by_method(t, "trainable_M")["read"], T4["read"]["params_m"], 0.05, True)),
    Claim("lst-params", "READ Table 4, Appendix C.1", "LST trains 5.04 M parameters on T5-base (2.00 %)",
          "LST's trainable parameters on T5-base's architecture (notebook 04's Table 4)", "within 5 %",
          table_ratio("table4_t5_base", "04_scaling", "LST trainable parameters (M)",
                      lambda t: _by_method(t, "trainable_M")["lst"], T4["lst"]["params_m"], 0.05, True)),
    Claim("read-memory-t5-base", "READ Table 4",
          "READ's peak training memory on T5-base is 0.39 of full tuning's (6.90 vs 17.86 GB)",
          "accounted training memory per step, READ over full tuning, T5-base shapes (notebook 04's Table 4)",
          "±0.10", table_ratio("table4_t5_base", "04_scaling", "READ / full training memory",
                               lambda t: _by_method(t, "memory_vs_full")["read"],
                               T4["read"]["memory_gb"] / T4["full"]["memory_gb"], 0.10)),
    Claim("lst-vs-read-memory", "READ Appendix C.1, Table 4",
          "LST needs 15 % less peak training memory than READ (5.77 vs 6.90 GB)",
          "accounted training memory per step, LST over READ, T5-base shapes (notebook 04's Table 4)", "±0.10",
          table_ratio("table4_t5_base", "04_scaling", "LST / READ training memory",
                      lambda t: _by_method(t, "total_GiB")["lst"] / _by_method(t, "total_GiB")["read"],
                      T4["lst"]["memory_gb"] / T4["read"]["memory_gb"], 0.10)),
    Claim("read-large-memory", "READ Section 4, Figure 5 (right), Table 4",
          "READ on T5-large uses about the training memory of full tuning on T5-base (17.74 vs 17.86 GB)",
          "accounted training memory at batch 48 x 128, READ on T5-large without its last 4 layers over full "
          "tuning on T5-base, computed on the meta device", "ratio within ±0.2 of 0.99",
          scenario_check("memory", _read_large_memory)),
    Claim("read-params-growth", "READ Sections 2.1 and 4, Figure 5 (left)",
          "READ's trainable parameters grow more slowly with the backbone than the other PETL methods'",
          "trainable parameters on T5-large over T5-small per method, computed on the meta device",
          "READ's growth the smallest", scenario_check("parameters", _params_growth)),
    Claim("read-inference-memory", "READ Section 4, Table 2, Figure 6 (right)",
          "READ costs almost no inference memory: its growth over full tuning is small and decays with size",
          "peak inference memory at batch 1 per T5 size, READ over full tuning (notebook 04's Table 2)",
          "≤ 6 % at every size and falling with size", inference_growth),
    Claim("read-latency", "READ Section 4, Figure 6 (left), Table 4",
          "READ's inference latency is close to full tuning's on T5-base (0.093 vs 0.083 s)",
          "median latency at batch 1, READ over full tuning, T5-base with random weights on this machine "
          "(notebook 04's Table 4)", "ratio within ±0.15 of 1.12",
          table_ratio("table4_t5_base", "04_scaling", "READ / full latency",
                      lambda t: _by_method(t, "latency_s")["read"] / _by_method(t, "latency_s")["full"],
                      T4["read"]["inference_s"] / T4["full"]["inference_s"], 0.15)),
    Claim("lst-latency", "READ Appendix C.1, Table 4", "LST takes 77 % longer inference time than READ",
          "median latency at batch 1, LST over READ (notebook 04's Table 4)", "ratio within ±0.3 of 1.77",
          table_ratio("table4_t5_base", "04_scaling", "LST / READ latency",
                      lambda t: _by_method(t, "latency_s")["lst"] / _by_method(t, "latency_s")["read"],
                      T4["lst"]["inference_s"] / T4["read"]["inference_s"], 0.3)),
    Claim("table5-splits", "READ Section 3.2, Table 5",
          "the split sizes of Table 5 follow the Section 3.2 recipe",
          "the recipe applied to the official GLUE sizes (`python -m readlib splits`)",
          "equal up to Table 5's printed digits", scenario_check("splits", _splits)),
    Claim("derivation", "READ Section 2.2, Appendix A",
          "the READ recursion is the first-order correction of a fine-tuned transformer",
          "gap between the true correction and the recursion against the LoRA scale ε on a float64 toy "
          "transformer (notebook 01)", "log-log slope 1.8–2.2 (second order)",
          scenario_check("derivation_slopes", _derivation)),
    Claim("tokentune-breakdown", "TokenTune Section 1, Table 1",
          "BERT-base (batch 256) memory is stored activations (≈ 22 GB), its gradients < 1 GB; OPT-1.3B "
          "(batch 1) the reverse (activations < 1 GB, gradients ≈ 5 GB)",
          "phase differences of one computed training step (notebook 05's TokenTune Table 1)",
          "the two large items within 25 % of the paper's, the two small ones < 1 GiB",
          table_check("05_tokentune_table1", "05_lst_selective", _tokentune_breakdown)),
    Claim("tokentune-lora", "TokenTune Section 1, Table 1",
          "LoRA cuts OPT-1.3B's training memory drastically and BERT-base's much less",
          "peak memory of LoRA over full fine-tuning per model (notebook 05's TokenTune Table 1)", "±0.10 each",
          table_check("05_tokentune_table1", "05_lst_selective", _lora_ratios)),
    Claim("tokentune-batch-512", "TokenTune Section 3.3, Figure 2 (left)",
          "at batch 512 selective fine-tuning needs less than half of full fine-tuning's memory, with LoRA a third",
          "peak memory of one computed step of BERT-base at batch 512 x 128, over full fine-tuning's",
          "±0.10 each", scenario_check("tokentune_512", _tokentune_512)),
    Claim("tokentune-k-score", "TokenTune Section 3.2, Figure 2 (right)",
          "the dev score rises with k, the number of positions trained (84.8 at k = 4 to 88.8 at k = 64)",
          "mean validation score over the ablation's tasks at the smallest and the largest k (notebook 05)",
          "gain > 0", table_check("05_k_ablation_{profile}", "05_lst_selective", _k_scores)),
    Claim("tokentune-k-memory", "TokenTune Section 2, Figure 1",
          "only the k selected positions' activations are stored, so memory falls with k",
          "recorded training memory of the selective runs at the smallest and the largest k",
          "smaller at the smallest k", memory_falls_with_k),
    Claim("tokentune-on-par", "TokenTune Abstract, Table 2",
          "selective fine-tuning performs on par with full fine-tuning",
          "mean test score of selective minus full fine-tuning over the tasks both ran", "≥ −1 point",
          score_gap("selective", ("full",), 1.0, {})),
    Claim("tokentune-table2", "TokenTune Table 2",
          "BERT-large GLUE test-server scores of selective fine-tuning (k = 16) next to full fine-tuning",
          "the GLUE test server", "–",
          not_testable("BERT-large scored by the GLUE test server (hidden labels): no profile of this suite "
                       "submits to it; the tasks' comparison on our own test splits is tokentune-on-par")),
]


def verdicts(ev: Evidence, claims: list[Claim] = CLAIMS) -> list[dict]:
    """One row per claim: its fields, the verdict and the detail (numbers, tolerance, interval or reason)."""
    return [{"id": c.id, "source": c.source, "claim": c.text, "test": c.test, "tolerance": c.tolerance,
             **dict(zip(("verdict", "detail"), c.check(ev), strict=True))} for c in claims]


def counts_line(rows: list[dict]) -> str:
    """"Verdicts: n reproduced, n differs, n not testable here (of N claims)"."""
    n = {v: sum(r["verdict"] == v for r in rows) for v in (REPRODUCED, DIFFERS, NOT_TESTABLE)}
    return (f"Verdicts: {n[REPRODUCED]} reproduced, {n[DIFFERS]} differs, {n[NOT_TESTABLE]} not testable here "
            f"(of {len(rows)} claims)")


# ---------------------------------------------------------------- the document: blocks rendered as Markdown and HTML

Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", DataFrame) | ("img", src, alt)


def to_markdown(blocks: list[Block]) -> str:
    """Markdown: headings, paragraphs, bullet lists, pipe tables (missing values "–"), images."""
    out = []
    for kind, *body in blocks:
        if kind == "h":
            out.append("#" * body[0] + " " + body[1])
        elif kind == "p":
            out.append(body[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in body[0]))
        elif kind == "table":
            out.append(report.printed(body[0]).to_markdown(index=False, disable_numparse=True))
        else:
            out.append(f"![{body[1]}]({body[0]})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code` as HTML."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text, quote=False))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(blocks: list[Block], title: str) -> str:
    """A standalone HTML page of the same blocks (tables by pandas ``to_html``)."""
    out = []
    for kind, *body in blocks:
        if kind == "h":
            out.append(f"<h{body[0]}>{_inline(body[1])}</h{body[0]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(body[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in body[0]) + "</ul>")
        elif kind == "table":
            out.append(report.printed(body[0]).to_html(index=False, border=0))
        else:
            out.append(f'<p><img src="{html.escape(body[0])}" alt="{html.escape(body[1])}" style="max-width:100%"></p>')
    style = ("body{font-family:sans-serif;max-width:75em;margin:auto;padding:1em} table{border-collapse:collapse;"
             "font-size:90%} td,th{border:1px solid #ccc;padding:2px 6px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


# ---------------------------------------------------------------- the report's sections


def _verdict_blocks(rows: list[dict]) -> list[Block]:
    lines = [f"**{r['verdict']}** · `{r['id']}` ({r['source']}): {r['claim']} — tolerance {r['tolerance']}: "
             f"{r['detail']}" for r in rows]
    return [("h", 2, "Verdicts, one per claim"), ("ul", lines)]


def _table_block(title: str, table: pd.DataFrame | None, caption: str, missing: str) -> list[Block]:
    if table is None or table.empty:
        return [("h", 3, title), ("p", f"missing: {missing}")]
    return [("h", 3, title), ("p", caption), ("table", table)]


def _notebook_table(ev: Evidence, name: str, notebook: str) -> tuple[pd.DataFrame | None, str]:
    md = paths.output("tables", f"{name}.md")
    caption = md.read_text().split("\n", 1)[0] if md.is_file() else ""
    return ev.tables.get(name), f"{caption} (outputs/tables/{name}.csv, written by notebook {notebook})"


FIGURES = [  # (title, file under outputs/figures with {profile}, notebook, the paper's side)
    ("READ Figure 2: score vs training energy and memory", "figure2_{profile}.png", "03_glue",
     "paper: READ at 0.16 of full tuning's energy (Table 1: 2.06 / 12.52 kWh) and 0.39 of its memory "
     "(Table 4: 6.90 / 17.86 GB)"),
    ("READ Figure 5 (left): trainable parameters vs T5 size", "04_parameters_vs_size.png", "04_scaling",
     "paper: READ 1.97 M on T5-base (Table 4), growing log-linearly with size"),
    ("READ Figure 5 (right): training memory vs T5 size", "04_training_memory_vs_size.png", "04_scaling",
     "paper: READ on T5-large about full tuning on T5-base (17.74 vs 17.86 GB); savings up to 43 % at T5-3B"),
    ("READ Figure 6 (right): inference memory growth vs T5 size", "04_inference_memory_growth.png", "04_scaling",
     "paper: Table 2's growth over full tuning, READ 5.7 / 2.4 / 1.1 / 0.3 % (small / base / large / 3B); "
     "Figure 6 (left), latency by size, is not drawn: T5-base latency is in Table 4"),
    ("TokenTune Figure 2 (left): memory vs batch size", "05_memory_vs_batch_{profile}.png", "05_lst_selective",
     "paper at batch 512: full 23,196, selective 9,952, selective + LoRA 7,682 MiB (CUDA context included)"),
    ("TokenTune Figure 2 (right): score vs k", "05_k_ablation_{profile}.png", "05_lst_selective",
     "paper (BERT-base, MRPC and STS-B dev): 84.8 at k = 4, 88.4 at k = 32, 88.8 at k = 64"),
    ("Derivation check (READ Appendix A)", "01_derivation_slopes.png", "01_derivation",
     "paper: the recursion is exact to first order, so the gap falls as ε² (slope 2)"),
]


def _artifact_blocks(ev: Evidence, out_dir: Path) -> list[Block]:
    setting = f"profile {ev.profile}, notebook 03's studies"
    blocks: list[Block] = [("h", 2, "Tables and figures, ours beside the paper's")]
    glue_missing = f"no GLUE runs for profile {ev.profile}: {notebook_command('03_glue', ev.profile)} per task"
    found = list(ev.summaries.values())
    blocks += _table_block("READ Table 1: GLUE test scores (%)", ev.glue["table1"] if found else None,
                           f"Ours ({setting}; {_setting(found) if found else ''}) next to the paper's (T5-base). "
                           "Step 0: the untrained model's validation score.", glue_missing)
    scaling_missing = notebook_command("04_scaling", ev.profile)
    blocks += _table_block("READ Table 2: inference memory (GB)",
                           *_notebook_table(ev, "table2_inference_memory", "04_scaling"), scaling_missing)
    blocks += _table_block("READ Table 3: LST vs READ (%)", ev.glue["table3"] if found else None,
                           f"Ours ({setting}) next to the paper's (T5-base).", glue_missing)
    blocks += _table_block("READ Table 4: T5-base efficiency", *_notebook_table(ev, "table4_t5_base", "04_scaling"),
                           scaling_missing)
    splits = ev.scenarios.get("splits")
    blocks += _table_block("READ Table 5: split sizes", splits, "Section 3.2's recipe on the official GLUE sizes "
                           "next to Table 5's (`python -m readlib splits`).", "not computed")
    blocks += _table_block("TokenTune Table 1: memory by training phase (MiB)",
                           *_notebook_table(ev, "05_tokentune_table1", "05_lst_selective"),
                           notebook_command("05_lst_selective", ev.profile))
    name = f"05_k_ablation_{ev.profile}"
    blocks += _table_block("TokenTune Figure 2 (right) as a table", *_notebook_table(ev, name, "05_lst_selective"),
                           notebook_command("05_lst_selective", ev.profile))
    slopes = ev.scenarios.get("derivation_slopes")
    if slopes:
        blocks += [("h", 3, "Derivation check (READ Appendix A)"),
                   ("p", "Log-log slope of the gap between the true correction and the first-order recursion, "
                         "computed here: " + ", ".join(f"{k}-attention {v:.3f}" for k, v in slopes.items())
                    + " (2 expected).")]
    for title, file, notebook, theirs in FIGURES:
        path = paths.output("figures", file.format(profile=ev.profile))
        blocks.append(("h", 3, title))
        if path.is_file():
            blocks += [("p", f"`{path.name}` (notebook {notebook}); {theirs}."),
                       ("img", os.path.relpath(path, out_dir).replace(os.sep, "/"), title)]
        else:
            blocks.append(("p", f"missing: {notebook_command(notebook, ev.profile)}; {theirs}."))
    return blocks


def _distinct(records: list[dict], get: Callable[[dict], Any]) -> str:
    values = sorted({str(v) for r in records if (v := get(r)) is not None})
    return ", ".join(values) if values else "not recorded"


def _backbone(record: dict) -> str:
    parts = (record.get("backbone"), record.get("backbone_source"), record.get("backbone_revision"))
    return " ".join(str(p) for p in parts if p)


def _provenance_blocks(ev: Evidence, storage_url: str) -> list[Block]:
    records = ev.records
    installed = []
    for name in PACKAGES:
        try:
            installed.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            installed.append(f"{name} not installed")
    lines = [
        f"storage: `{re.sub(r'//[^/@]*@', '//***@', storage_url)}`; {len(records)} records of profile {ev.profile}",
        f"commits of the runs: {_distinct(records, lambda r: r.get('git_commit'))}; readlib "
        f"{_distinct(records, lambda r: r.get('readlib_version'))}; torch "
        f"{_distinct(records, lambda r: r.get('torch_version'))}",
        f"installed where this report was written (commit {git_commit()}): {', '.join(installed)}",
        f"backbones: {_distinct(records, _backbone)}",
        f"precision: {_distinct(records, lambda r: r.get('precision'))}; formulation: "
        f"{_distinct(records, lambda r: r.get('formulation'))}",
        f"machines: {_distinct(records, lambda r: r.get('device'))}; processes per run: "
        f"{_distinct(records, lambda r: r.get('processes'))}",
        f"runs finished between {min((r['finished_at'] for r in records if r.get('finished_at')), default='?')} and "
        f"{max((r['finished_at'] for r in records if r.get('finished_at')), default='?')}",
    ]
    sizes = {}
    for r in records:
        d = r.get("data") or {}
        sizes.setdefault(r["task"], set()).add(f"{d.get('source')}, full {d.get('sizes_full')}, used "
                                              f"{d.get('sizes_used')}" + (f", revision {d['revision']}"
                                                                          if d.get("revision") else ""))
    lines += [f"data {task}: {'; '.join(sorted(v))}" for task, v in sorted(sizes.items())]
    return [("h", 2, "Provenance"), ("ul", lines)]


def write_report(storage_url: str | None = None, profile: str = "default", out_dir: Path | None = None,
                 scenarios: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``REPORT.md`` and ``REPORT.html`` into ``out_dir`` (default outputs/) for ``profile`` from the
    storage (default outputs/studies.db), outputs/results and outputs/tables; return {"md": path, "html": path}.
    ``scenarios``: precomputed ``shape_scenarios()`` (None: computed here, about 45 s)."""
    url = storage_url or sweep.default_storage()
    sweep.SweepSpec(paper.TABLE1_TASKS[0], "read", profile)  # an unknown profile fails here, before any work
    out_dir = Path(out_dir) if out_dir is not None else paths.OUTPUT_DIR
    ev = collect(url, profile, scenarios)
    rows = verdicts(ev)
    title = f"Reproduction report: READ and TokenTune, profile {profile}"
    blocks: list[Block] = [
        ("h", 1, title),
        ("p", f"**{counts_line(rows)}**"),
        ("p", f"Written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} "
              "from the study storage, outputs/results and outputs/tables (no training, no download). A verdict "
              "holds for this profile's backbone and data (see Provenance): relative claims are tested on our "
              "runs, absolute T5-base numbers only by the paper profile."),
        *_verdict_blocks(rows),
        *_artifact_blocks(ev, out_dir),
        *_provenance_blocks(ev, url),
        ("h", 2, "The claims and how each is tested"),
        ("table", pd.DataFrame(rows)[["id", "source", "claim", "test", "tolerance"]]),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"md": out_dir / "REPORT.md", "html": out_dir / "REPORT.html"}
    files["md"].write_text(to_markdown(blocks))
    files["html"].write_text(to_html(blocks, title))
    return files
