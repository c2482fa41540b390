"""Paper-style tables and figures from sweep summaries: missing stays missing, costs relative to full tuning."""

import json
import math

import numpy as np
import optuna
import pandas as pd
import pytest

from readlib import costs, paper, paths, report, sweep, verdict
from readlib.errors import ConfigError


def summary(method, task, score, memory, kwh=None):
    not_measured = {"kwh": None, "reason": "NVML unavailable"}
    energy = {"nvml_counter": not_measured, "paper_eq4": not_measured, "rapl": {"kwh": None, "reason": "no RAPL"}}
    if kwh is not None:
        energy["paper_eq4"] = {"kwh": kwh, "samples": 3}
    memory = {"cuda_peak_bytes": None, "accounted_total": memory}
    record = {"trainable_percent": 1.0, "energy": energy, "memory": memory}
    return {"method": method, "task": task, "test_mean": score, "record": record}


def test_glue_table_keeps_missing_tasks_missing_and_adds_the_papers_rows():
    cola = summary("read", "cola", 0.5, 1) | {"step0_validation": 0.125}
    table = report.glue_table([cola, summary("read", "mrpc", 0.8, 1)], ["read", "lora"], paper=paper.READ_TABLE1)
    assert list(table.source) == ["ours", "step 0", "paper"] * 2
    step0 = table[table.source == "step 0"].set_index("method")
    assert step0.loc["read", "cola"] == 12.5 and math.isnan(step0.loc["read", "mrpc"])  # not recorded: missing
    ours = table[table.source == "ours"].set_index("method")
    assert ours.loc["read", "cola"] == 50.0 and ours.loc["read", "mrpc"] == 80.0
    assert math.isnan(ours.loc["read", "sst2"]) and math.isnan(ours.loc["read", "avg"])  # no average of 2 of 7
    assert ours.loc["lora"].drop("source").isna().all()  # not run: missing, never 0
    theirs = table[table.source == "paper"].set_index("method")
    assert theirs.loc["read", "avg"] == 84.97 and theirs.loc["lora", "cola"] == 51.70
    assert theirs.loc["read", "params_pct"] == 0.8


def test_write_table_prints_missing_as_a_dash(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "OUTPUT_DIR", tmp_path)
    table = report.glue_table([summary("read", "cola", 0.5, 1)], ["read"], tasks=("cola", "mrpc"))
    files = report.write_table(table, "t", "caption")
    md, tex, csv = (files[k].read_text() for k in ("md", "tex", "csv"))
    assert md.startswith("caption") and "| –" in md and "50.00" in md
    assert "\\caption{caption}" in tex and "–" in tex
    assert csv.splitlines()[1].startswith("read,ours,50,,")
    assert csv.splitlines()[2].startswith("read,step 0,,,")


def test_energy_source_preference_and_reason():
    assert report.run_energy(summary("read", "cola", 0.5, 1, kwh=0.02)["record"]) == (0.02, "paper_eq4")
    assert report.run_energy(summary("read", "cola", 0.5, 1)["record"]) == (None, "NVML unavailable; no RAPL")


def test_cost_figure_is_relative_to_full_tuning():
    runs = [summary("full", t, 0.8, 400, kwh=2.0) for t in ("cola", "mrpc")]
    runs += [summary("read", t, s, 100, kwh=0.5) for t, s in (("cola", 0.7), ("mrpc", 0.9))]
    runs.append(summary("read", "sst2", 0.9, 100, kwh=0.5))  # a task full tuning lacks: left out
    fig = report.cost_figure(runs)
    energy_ax, memory_ax = fig.axes[:2]
    points = {tuple(np.round(p, 6)) for p in energy_ax.collections[0].get_offsets()}
    assert points == {(1.0, 80.0), (0.25, 80.0)}  # read: 1.0 of 4.0 kWh over cola and mrpc, mean score 80
    assert {tuple(np.round(p, 6)) for p in memory_ax.collections[0].get_offsets()} == {(1.0, 80.0), (0.25, 80.0)}
    assert "cola, mrpc" in energy_ax.get_ylabel()


def test_cost_figure_says_when_energy_was_not_measured():
    fig = report.cost_figure([summary("full", "cola", 0.8, 400), summary("read", "cola", 0.7, 100)])
    assert "not measured" in fig.axes[0].texts[0].get_text() and "NVML unavailable" in fig.axes[0].texts[0].get_text()
    assert len(fig.axes[1].collections[0].get_offsets()) == 2
    old = summary("read", "cola", 0.7, 100)
    del old["record"]["memory"]
    fig = report.cost_figure([summary("full", "cola", 0.8, 400), old])
    assert "not in the record" in fig.axes[1].texts[0].get_text()


def test_phase_table_puts_the_paper_beside_ours_less_its_cuda_context():
    ours = {"cumulative": dict(zip(costs.PHASES, [1, 2, 3, 4, 5], strict=True))}
    table = report.phase_table({("bert", "full"): {"cumulative": {k: v * 2**20 for k, v in
                                                                  ours["cumulative"].items()}},
                                ("bert", "selective"): {"cumulative": {k: 0 for k in costs.PHASES}}})
    assert list(table["bert full"]) == [1, 2, 3, 4, 5]
    assert list(table["bert full (paper)"]) == [470, 2080, 23974, 24462, 24462]  # Table 1 less 780 MiB
    assert table["bert selective (paper)"].isna().all()  # the paper has no such column: missing, not zero


# ---------------------------------------------------------------- verdicts, the report, export


def record(task, method, test, memory=100, examples=None, profile="quick", lr=1e-3):
    """A hand-built result record with what the report reads."""
    sizes = {"train": 500, "validation": 400, "test": 400}
    return {"task": task, "method": method, "method_args": {}, "lr": lr, "seed": 0, "profile": profile,
            "validation": {"score": test}, "test": {"score": test}, "test_examples": examples,
            "step0_validation": None, "trainable_percent": 1.0, "backbone": "minilm", "status": "ok",
            "memory": {"cuda_peak_bytes": None, "accounted_total": memory},
            "energy": {"rapl": {"kwh": None, "reason": "no RAPL"}},
            "data": {"task": task, "source": "local", "sizes_full": dict(sizes, train=8551), "sizes_used": sizes},
            "sweep": {"phase": "search", "trial": 0, "study": "s"}, "git_commit": "abc", "finished_at": "2026"}


def stored(url, records):
    """Each record as the single search trial of the study notebook 03 runs for it on its profile's defaults."""
    for r in records:
        name = sweep.SweepSpec(r["task"], r["method"], r["profile"]).name
        study = optuna.create_study(study_name=name, storage=url, direction="maximize")
        study.add_trial(optuna.trial.create_trial(
            params={"lr": r["lr"]}, distributions={"lr": optuna.distributions.FloatDistribution(1e-6, 3e-3, log=True)},
            value=r["validation"]["score"], user_attrs={"record": r}))


def summaries(*records):
    return {(r["method"], r["task"]): {"method": r["method"], "task": r["task"], "test_mean": r["test"]["score"],
                                       "test_std": 0.0, "seeds": [0], "record": r} for r in records}


def examples(correct, n=100):
    """Binary predictions of which the first ``correct`` are right."""
    references = [i % 2 for i in range(n)]
    return {"predictions": [r if i < correct else 1 - r for i, r in enumerate(references)], "references": references}


def test_bootstrap_interval_of_an_accuracy_has_the_binomial_width():
    ex = examples(70)
    low, high = verdict.bootstrap_interval("sst2", ex["predictions"], ex["references"])
    assert low < 0.70 < high
    binomial = 2 * 1.96 * math.sqrt(0.7 * 0.3 / 100)  # 0.180
    assert abs((high - low) - binomial) < 0.04
    assert verdict.bootstrap_interval("sst2", ex["predictions"], ex["references"]) == (low, high)  # fixed seed


def test_paired_bootstrap_of_a_difference_draws_the_same_examples_for_both():
    a, b = examples(70), examples(60)  # a is right wherever b is, and on 10 more examples
    values = verdict.bootstrap_scores([("sst2", a, b)], resamples=200)
    assert (values >= 0).all() and abs(values.mean() - 0.10) < 0.01  # paired: never negative


def test_a_claim_that_holds_is_reproduced_and_one_that_does_not_differs_by_the_right_amount():
    check = verdict.score_gap("read", ("full",), 1.0, paper.READ_TABLE1)
    ev = verdict.Evidence("quick", summaries(record("cola", "read", 0.50), record("cola", "full", 0.505)))
    assert check(ev)[0] == verdict.REPRODUCED  # -0.5 points: within 1
    ev = verdict.Evidence("quick", summaries(record("cola", "read", 0.40), record("cola", "full", 0.55),
                                             record("sst2", "read", 0.80), record("sst2", "full", 0.85)))
    outcome, detail = check(ev)
    assert outcome == verdict.DIFFERS
    assert "read − full = -10.00 points over cola, sst2" in detail  # mean of -15 and -5
    assert "(paper -0.23)" in detail  # Table 1: (52.59 - 53.97 + 93.80 - 92.89) / 2 = -0.235
    assert "per-example predictions not recorded" in detail


def test_a_difference_gets_a_bootstrap_interval_where_predictions_are_recorded():
    check = verdict.score_gap("read", ("full",), 1.0, paper.READ_TABLE1)
    ev = verdict.Evidence("quick", summaries(record("sst2", "read", 0.60, examples=examples(60)),
                                             record("sst2", "full", 0.70, examples=examples(70))))
    outcome, detail = check(ev)
    low, high = (float(x) for x in detail.split("interval [")[1].split("]")[0].split(", "))
    assert outcome == verdict.DIFFERS and low < -10.0 < high <= 0.0


def test_missing_data_is_not_testable_here_with_the_command_that_makes_it():
    ev = verdict.Evidence("quick")
    rows = {r["id"]: r for r in verdict.verdicts(ev)}
    assert rows["read-vs-full"]["verdict"] == verdict.NOT_TESTABLE
    assert "make reproduce PROFILE=quick" in rows["read-vs-full"]["detail"]
    assert rows["read-params"]["verdict"] == verdict.NOT_TESTABLE and "04_scaling" in rows["read-params"]["detail"]
    assert rows["derivation"]["verdict"] == verdict.NOT_TESTABLE
    assert all(r["verdict"] == verdict.NOT_TESTABLE for r in rows.values())


def test_absolute_scores_need_t5_base_on_the_full_training_set():
    ev = verdict.Evidence("quick", summaries(record("cola", "read", 0.50)))
    outcome, detail = verdict.table1_absolute(ev)
    assert outcome == verdict.NOT_TESTABLE and "minilm on 500 of 8551" in detail and "GPU-hours" in detail
    full = record("cola", "read", 0.5359) | {"backbone": "t5-base"}
    full["data"]["sizes_used"] = full["data"]["sizes_full"]
    outcome, detail = verdict.table1_absolute(verdict.Evidence("paper", summaries(full)))
    assert outcome == verdict.REPRODUCED and "read +1.00 points" in detail  # 53.59 vs 52.59


def test_memory_reduction_from_the_records():
    check = verdict.cost_reduction("memory", 56, 46, 66)
    ev = verdict.Evidence("quick", summaries(record("cola", "read", 0.5, memory=45), record("cola", "full", 0.5)))
    outcome, detail = check(ev)
    assert outcome == verdict.REPRODUCED and "READ 55.0 % below full tuning" in detail
    ev = verdict.Evidence("quick", summaries(record("cola", "read", 0.5, memory=10), record("cola", "full", 0.5)))
    assert check(ev)[0] == verdict.DIFFERS
    outcome, detail = verdict.cost_reduction("energy", 84, 79, 100)(ev)
    assert outcome == verdict.NOT_TESTABLE and "no RAPL" in detail


def test_write_report_from_a_small_storage(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "OUTPUT_DIR", tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    stored(url, [record("cola", "read", 0.50, memory=40), record("cola", "full", 0.60),
                 record("cola", "lora", 0.45, profile="default")])  # another profile: not in this report
    files = verdict.write_report(url, "quick", tmp_path / "out", scenarios={})
    md = files["md"].read_text()
    n = len(verdict.CLAIMS)
    assert f"Verdicts: 1 reproduced, 1 differs, {n - 2} not testable here (of {n} claims)" in md
    assert "read − full = -10.00 points over cola" in md and "READ 60.0 % below full tuning" in md
    assert "| read     | ours     | 50.00  |" in md  # Table 1 from the storage
    assert "missing: " in md and "3 records" not in md and "2 records of profile quick" in md
    assert "<strong>Verdicts: 1 reproduced" in files["html"].read_text()
    with pytest.raises(ConfigError, match="profile"):
        verdict.write_report(url, "nope", tmp_path / "out", scenarios={})


def test_runs_complete_reads_the_study_state(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = sweep.SweepSpec("cola", "read", "quick", lr_rounds=1, seeds=1)
    assert not report.runs_complete(spec, url)
    stored(url, [record("cola", "read", 0.5)])
    assert report.runs_complete(spec, url)
    assert not report.runs_complete(sweep.SweepSpec("cola", "read", "quick", lr_rounds=2, seeds=1), url)


def test_export_records_as_csv_and_jsonl(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    stored(url, [record("cola", "read", 0.5, memory=40), record("sst2", "full", 0.75, profile="default")])
    assert report.export_records(url, tmp_path / "r.csv") == 2
    table = pd.read_csv(tmp_path / "r.csv").set_index("task")
    assert table.loc["sst2", "test_score"] == 0.75 and table.loc["cola", "memory_bytes"] == 40
    assert table.loc["cola", "profile"] == "quick" and table.loc["cola", "train_size"] == 500
    assert list(table.columns[:5]) == ["method", "method_args", "lr", "seed", "phase"]
    assert report.export_records(url, tmp_path / "r.jsonl", "jsonl") == 2
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert {r["task"]: r for r in lines}["cola"] == record("cola", "read", 0.5, memory=40)
    with pytest.raises(ConfigError, match="export format"):
        report.export_records(url, tmp_path / "r.xml", "xml")
    with pytest.raises(ConfigError, match="no study storage"):
        report.export_records(f"sqlite:///{tmp_path / 'none.db'}", tmp_path / "r.csv")


# ---------------------------------------------------------------- accuracy per unit of training compute


def run_record(method, lr, flops_and_scores, task="mrpc", seed=0):
    history = [{"epoch": i + 1, "train_loss": 0.5, "val_score": v, "seconds": 1.0, "train_flops": f}
               for i, (f, v) in enumerate(flops_and_scores)]
    return {"task": task, "method": method, "lr": lr, "seed": seed, "profile": "quick", "history": history}


COMPUTE_RUNS = [
    run_record("read", 1e-3, [(3e12, 0.60), (4e12, 0.70), (5e12, 0.65)]),  # a cache fill of ~2e12, 1e12 per epoch
    run_record("full", 1e-5, [(8e12, 0.55), (16e12, 0.75)]),
    run_record("full", 1e-4, [(8e12, 0.62), (16e12, 0.58)]),
    {"task": "mrpc", "method": "lora", "lr": 5e-4, "seed": 0, "history": [{"epoch": 1, "val_score": 0.9}]},  # no flops
]


def test_compute_curves_keep_the_best_so_far_and_skip_records_without_flops():
    curves = report.compute_curves(COMPUTE_RUNS)
    assert len(curves) == 7 and "lora" not in set(curves.method)
    read = curves[curves.method == "read"]
    assert list(read.best_so_far) == [0.60, 0.70, 0.70] and list(read.train_flops) == [3e12, 4e12, 5e12]


def test_best_method_at_each_budget():
    table = report.best_at_budget(report.compute_curves(COMPUTE_RUNS), [1e12, 3e12, 1e13, 2e13]).set_index(
        "budget_flops")
    assert pd.isna(table.loc[1e12, "best"]) and math.isnan(table.loc[1e12, "read"])  # nothing fits in 1e12
    assert table.loc[3e12, "best"] == "read" and math.isnan(table.loc[3e12, "full"])
    assert (table.loc[1e13, "read"], table.loc[1e13, "full"], table.loc[1e13, "best"]) == (0.70, 0.62, "read")
    assert (table.loc[2e13, "full"], table.loc[2e13, "best"]) == (0.75, "full")  # full overtakes with 4x the compute


def test_compute_curves_carry_the_training_set_size():
    records = [run | {"data": {"sizes_used": {"train": n}}}
               for run, n in zip(COMPUTE_RUNS[:2], (40, 4000), strict=True)]
    curves = report.compute_curves(records)
    assert curves.groupby("method")["n_train"].first().to_dict() == {"full": 4000, "read": 40}
    ax = report.compute_figure(curves, "mrpc").axes[0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"40 examples", "4000 examples"}


def test_compute_figure_has_log_flops_and_one_line_per_run():
    fig = report.compute_figure(report.compute_curves(COMPUTE_RUNS), "mrpc")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "FLOPs" in ax.get_xlabel() and "fraction" in ax.get_ylabel()
    assert len([line for line in ax.get_lines() if len(line.get_xdata()) > 1]) == 3  # 3 runs
    with pytest.raises(ConfigError, match="no runs of 'sst2'"):
        report.compute_figure(report.compute_curves(COMPUTE_RUNS), "sst2")


def test_decoder_memory_figure_stacks_the_four_parts_in_gib():
    gib = 2**30
    table = pd.DataFrame({"setting": ["full fine-tuning", "READ, 4-bit backbone"], "weights": [4 * gib, gib],
                          "activations": [2 * gib, 0], "gradients": [4 * gib, 0], "optimizer": [8 * gib, 0],
                          "backbone": "random-llama-7b", "batch": 8, "seq": 512})
    ax = report.decoder_memory_figure(table).axes[0]
    widths = [[bar.get_width() for bar in container] for container in ax.containers]  # one container per part
    assert widths == [[1, 4], [0, 2], [0, 4], [0, 8]]  # rows bottom-up: READ then full
    assert "GiB" in ax.get_xlabel() and "8 x 512" in ax.get_xlabel()
