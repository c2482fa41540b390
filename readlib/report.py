"""Figures and result files built from result records; notebooks only call these and display."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

OUTPUT_DIR = Path(__file__).resolve().parents[1] / "outputs"
METRIC_LABEL = {"mcc": "Matthews correlation", "accuracy": "accuracy",
                "f1_accuracy": "mean of F1 and accuracy", "pearson_spearman": "mean of Pearson and Spearman"}


def run_name(record: dict) -> str:
    """File stem for a run: task, method, backbone, profile, seed."""
    return f"{record['task']}_{record['method']}_{record['backbone']}_{record['profile']}_seed{record['seed']}"


def save_record(record: dict, path: str | Path) -> Path:
    """Write one result record as JSON (creating folders); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def save_figure(fig: Figure, name: str) -> Path:
    """Save under outputs/figures/<name>.png (creating the folder); return the path."""
    path = OUTPUT_DIR / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def learning_curve(record: dict) -> Figure:
    """Training loss and validation score per epoch, the best epoch marked."""
    from readlib.data import get_task

    task = get_task(record["task"])
    history = pd.DataFrame(record["history"])
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    sns.lineplot(history, x="epoch", y="train_loss", marker="o", ax=ax_loss)
    loss = "mean squared error (score units²)" if task.is_regression else "cross-entropy (nats)"
    ax_loss.set(xlabel="epoch", ylabel=f"training loss, {loss}", title="training loss")
    sns.lineplot(history, x="epoch", y="val_score", marker="o", ax=ax_val, label=record["method"])
    baseline = record["majority_baseline"]["validation"]["score"]
    ax_val.axhline(baseline, ls="--", c="grey", label="majority class")
    if record["best_epoch"] is not None:
        ax_val.axvline(record["best_epoch"], ls=":", c="black", label="best epoch")
    ax_val.set(xlabel="epoch", ylabel="validation score (fraction)",
               title=f"validation {METRIC_LABEL[task.metric]}")
    ax_val.legend()
    for ax in (ax_loss, ax_val):
        ax.xaxis.get_major_locator().set_params(integer=True)
    used = record["data"]["sizes_used"]
    fig.suptitle(f"{record['method']} on {record['task']} — {record['backbone']}, profile {record['profile']}, "
                 f"train {used['train']} / val {used['validation']} examples, seed {record['seed']}")
    return fig


def result_table(record: dict) -> pd.DataFrame:
    """Validation and test metrics of the best checkpoint next to the majority-class baseline."""
    rows = {"validation (best epoch)": record["validation"], "test": record["test"],
            "majority class, validation": record["majority_baseline"]["validation"],
            "majority class, test": record["majority_baseline"]["test"]}
    table = pd.DataFrame({k: v for k, v in rows.items() if v is not None}).T
    return table.drop(columns=["prediction"], errors="ignore")


# READ Table 1 (T5-base; test scores in %, 3 seeds; trainable params %, an unlabeled column in the paper's text —
# 0.77 for full tuning, so not Table 4's 17.86 GB peak memory —, energy kWh) and
# Table 3 (LST vs READ). Keys are our method names; tasks as in readlib.data.PAPER_TASKS. "avg" is the paper's
# printed average, which is 0.4-1.5 points above the mean of its seven task columns in every row (full tuning:
# 84.10 vs 84.52); ours is the plain mean.
_T1_TASKS = ("cola", "mnli", "qnli", "mrpc", "qqp", "sst2", "stsb")
PAPER_TABLE1 = {
    method: dict(zip(("params_pct", "unlabeled", "energy_kwh", *_T1_TASKS, "avg"), values, strict=True))
    for method, values in {
        "full": (100, 0.77, 12.52, 53.97, 86.17, 90.87, 86.88, 89.71, 92.89, 88.19, 84.52),
        "adapter": (0.96, 0.50, 6.99, 52.56, 85.68, 92.89, 87.84, 88.95, 93.12, 87.51, 85.04),
        "lora": (0.48, 0.68, 10.58, 51.70, 85.20, 92.72, 88.07, 88.92, 93.46, 86.97, 84.89),
        "bitfit": (0.06, 0.47, 7.68, 50.92, 85.28, 92.58, 86.32, 88.70, 94.15, 86.94, 84.43),
        "prompt": (0.01, 0.50, 6.45, 42.71, 79.38, 91.73, 86.04, 88.74, 93.12, 84.96, 82.38),
        "read": (0.80, 0.43, 2.06, 52.59, 85.25, 92.93, 87.09, 89.10, 93.80, 87.77, 84.97),
    }.items()
}
PAPER_TABLE3 = {
    method: dict(zip((*_T1_TASKS, "avg"), values, strict=True))
    for method, values in {
        "full": (53.97, 86.17, 90.87, 86.88, 89.71, 92.89, 88.19, 84.52),
        "lst": (53.38, 84.53, 92.43, 87.38, 88.31, 92.09, 87.37, 84.58),
        "read": (52.59, 85.25, 92.93, 87.09, 89.10, 93.80, 87.77, 84.97),
    }.items()
}


def glue_table(summaries: list[dict], methods: list[str], tasks: tuple[str, ...] = _T1_TASKS,
               paper: dict[str, dict] | None = None) -> pd.DataFrame:
    """Methods x tasks test scores in % (mean over seeds, as the paper prints them), the average, trainable %.

    ``summaries`` are ``readlib.sweep.summary`` results. A task without a result is missing (NaN), never 0;
    the average is given only when every task has a result. With ``paper`` (PAPER_TABLE1/3), each method
    gets a second row with the paper's numbers (source column "paper").
    """
    from readlib.metrics import glue_average

    found = {(s["method"], s["task"]): s for s in summaries}
    rows = []
    for method in methods:
        scores = {t: 100 * found[method, t]["test_mean"] for t in tasks if (method, t) in found}
        any_run = next((found[method, t] for t in tasks if (method, t) in found), None)
        row = {"method": method, "source": "ours", **{t: scores.get(t, float("nan")) for t in tasks}}
        row["avg"] = glue_average(scores, tasks) if len(scores) == len(tasks) else float("nan")
        row["params_pct"] = any_run["record"]["trainable_percent"] if any_run else float("nan")
        rows.append(row)
        if paper is not None and method in paper:
            rows.append({"method": method, "source": "paper", **{k: paper[method].get(k, float("nan"))
                                                                  for k in (*tasks, "avg", "params_pct")}})
    return pd.DataFrame(rows, columns=["method", "source", *tasks, "avg", "params_pct"])


def write_table(table: pd.DataFrame, name: str, caption: str) -> dict[str, Path]:
    """``outputs/tables/<name>.{csv,md,tex}``; missing values print as "–" (Markdown/LaTeX) or empty (CSV)."""
    folder = OUTPUT_DIR / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {ext: folder / f"{name}.{ext}" for ext in ("csv", "md", "tex")}
    table.to_csv(paths["csv"], index=False, float_format="%.4g")
    shown = table.map(lambda v: "–" if isinstance(v, float) and v != v else (f"{v:.2f}" if isinstance(v, float) else v))
    paths["md"].write_text(f"{caption}\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n")
    paths["tex"].write_text(shown.to_latex(index=False, caption=caption, label=f"tab:{name}") + "\n")
    return paths


def lr_search_figure(records: list[dict]) -> Figure:
    """Validation score vs learning rate of every search trial, one colour per method."""
    runs = pd.DataFrame([{"method": r["method"], "lr": r["lr"], "val": r["validation"]["score"]}
                         for r in records if r["sweep"]["phase"] == "search" and r["validation"]])
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    if not runs.empty:
        sns.scatterplot(runs, x="lr", y="val", hue="method", style="method", s=60, ax=ax)
    ax.set(xscale="log", xlabel="learning rate (per step)", ylabel="best validation score (fraction)",
           title="learning-rate search")
    return fig


ENERGY_SOURCES = ("nvml_counter", "paper_eq4", "rapl")  # preferred first


def run_energy(record: dict) -> tuple[float | None, str]:
    """A run's training energy in kWh from the first source that measured it, and that source (or the reason)."""
    energy = record.get("energy") or {}
    for source in ENERGY_SOURCES:
        if (energy.get(source) or {}).get("kwh") is not None:
            return energy[source]["kwh"], source
    reasons = {(energy.get(s) or {}).get("reason") for s in ENERGY_SOURCES} - {None}
    return None, "; ".join(sorted(reasons)) or "no energy recorded"


def run_memory(record: dict) -> tuple[float | None, str]:
    """A run's training memory in bytes: the CUDA peak when measured, else the accounted total (None for records
    written before memory was recorded)."""
    memory = record.get("memory")
    if memory is None:
        return None, "not in the record (written by an older readlib)"
    if memory.get("cuda_peak_bytes") is not None:
        return memory["cuda_peak_bytes"], "CUDA peak allocated"
    return memory["accounted_total"], "accounted: weights + stored activations + gradients + optimizer state"


def cost_figure(summaries: list[dict]) -> Figure:
    """READ Figure 2: average test score vs training energy and vs training memory, relative to full tuning.

    Per method, over the tasks every method has: the mean test score (%) and the summed energy / memory of the
    reported runs (the best validation run per task), divided by full fine-tuning's. A panel whose quantity was
    not measured says why.
    """
    by_method: dict[str, dict[str, dict]] = {}
    for s in summaries:
        by_method.setdefault(s["method"], {})[s["task"]] = s
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    tasks = sorted(set.intersection(*(set(t) for t in by_method.values()))) if by_method else []
    if "full" not in by_method or not tasks:
        for ax in axes:
            ax.text(0.5, 0.5, "needs full fine-tuning and at least one task run by every method",
                    ha="center", va="center", transform=ax.transAxes)
        return fig
    rows = []
    for method, found in by_method.items():
        runs = [found[t]["record"] for t in tasks]
        energies = [run_energy(r) for r in runs]
        memories = [run_memory(r) for r in runs]
        rows.append({"method": method, "score": sum(100 * found[t]["test_mean"] for t in tasks) / len(tasks),
                     "energy": None if any(e is None for e, _ in energies) else sum(e for e, _ in energies),
                     "energy_source": energies[0][1],
                     "memory": None if any(m is None for m, _ in memories) else sum(m for m, _ in memories),
                     "memory_source": memories[0][1]})
    table = pd.DataFrame(rows).set_index("method")
    full = table.loc["full"]
    for ax, column, label in ((axes[0], "energy", "training energy"), (axes[1], "memory", "training memory")):
        missing = table[column].isna()
        if missing.any():
            reason = f"{', '.join(table.index[missing])}: {table.loc[missing, column + '_source'].iloc[0]}"
            ax.text(0.5, 0.5, f"{label} not measured\n{reason}", ha="center", va="center", wrap=True,
                    transform=ax.transAxes)
            ax.set(xticks=[], yticks=[], title=f"score vs {label}")
            continue
        relative = table[column] / full[column]
        sns.scatterplot(x=relative, y=table["score"], hue=table.index, s=80, ax=ax, legend=ax is axes[1])
        for method, x in relative.items():
            ax.annotate(method, (x, table.loc[method, "score"]), textcoords="offset points", xytext=(4, 4))
        ax.set(xlabel=f"{label} relative to full fine-tuning ({full[column + '_source']})",
               ylabel=f"mean test score over {', '.join(tasks)} (%)", title=f"score vs {label}")
    return fig


# ---------------------------------------------------------------- selective fine-tuning paper (TokenTune)

MIB = 2**20
# TokenTune Table 1: GPU memory (MiB) after each phase of one training step, seq 128; BERT-base batch 256, OPT-1.3B
# batch 1. Cumulative, with the 780 MiB CUDA context included in every row.
TOKENTUNE_CONTEXT_MIB = 780
PAPER_TOKENTUNE_TABLE1 = {
    ("bert", "full"): (1250, 2860, 24754, 25242, 25242),
    ("opt", "full"): (5806, 6050, 6290, 11258, 21390),
    ("bert", "lora"): (1250, 2860, 20554, 20948, 20948),
    ("opt", "lora"): (5828, 6072, 6294, 6322, 6322),
}
# TokenTune Section 3.3 / Figure 2 left, BERT-base on CoLA at batch 512: peak GPU memory (MiB), the values its text
# prints; Figure 2 right: mean dev score (%) over MRPC and STS-B against k, the values its text prints.
PAPER_TOKENTUNE_FIG2_LEFT = {"full": {512: 23196}, "selective": {512: 9952}, "selective+lora": {512: 7682}}
PAPER_TOKENTUNE_FIG2_RIGHT = {4: 84.8, 32: 88.4, 64: 88.8}


def phase_table(results: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """TokenTune Table 1 layout: one row per phase, one column per (model, method), cumulative MiB from
    ``costs.phase_memory`` results, each followed by the paper's value less its CUDA context (– where the paper
    has no column)."""
    from readlib.costs import PHASES

    table = pd.DataFrame({"phase": list(PHASES)})
    for (model, method), result in results.items():
        table[f"{model} {method}"] = [result["cumulative"][p] / MIB for p in PHASES]
        paper = PAPER_TOKENTUNE_TABLE1.get((model, method))
        table[f"{model} {method} (paper)"] = ([v - TOKENTUNE_CONTEXT_MIB for v in paper] if paper
                                              else [float("nan")] * len(PHASES))
    return table
