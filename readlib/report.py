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
