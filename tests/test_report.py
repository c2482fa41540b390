"""Paper-style tables and figures from sweep summaries: missing stays missing, costs relative to full tuning."""

import math

import numpy as np

from readlib import costs, paper, paths, report


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
