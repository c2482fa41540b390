"""Tables, figures and result files, built from result records, the study storage and ``readlib.scaling``;
notebooks only call these and display. The papers' numbers come from ``readlib.paper``."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from readlib import paper, paths, sweep
from readlib.costs import PHASES, in_unit
from readlib.data import PAPER_TASKS, get_task
from readlib.errors import ConfigError
from readlib.metrics import glue_average

METRIC_LABEL = {"mcc": "Matthews correlation", "accuracy": "accuracy",
                "f1_accuracy": "mean of F1 and accuracy", "pearson_spearman": "mean of Pearson and Spearman"}


def run_name(record: dict) -> str:
    """File stem for a run: task, method, backbone, profile, seed, and the record's ``run_id`` (a hash of every
    parameter that changes the result), so that two different runs never share a file and a rerun replaces its own."""
    backbone = record["backbone"].replace("/", "--")  # a hub id org/model, or a local folder
    return (f"{record['task']}_{record['method']}_{backbone}_{record['profile']}_seed{record['seed']}_"
            f"{record['run_id']}")


def save_record(record: dict, path: str | Path) -> Path:
    """Write one result record as JSON (creating folders); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def save_figure(fig: Figure, name: str) -> Path:
    """Save under outputs/figures/<name>.png (creating the folder); return the path."""
    path = paths.output("figures", f"{name}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def learning_curve(record: dict) -> Figure:
    """Training loss and validation score per epoch, the best epoch marked."""
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
    """Validation and test metrics of the best checkpoint next to the untrained model's (step 0: what the frozen
    backbone already knows) and the majority-class baseline."""
    rows = {"validation (best epoch)": record["validation"], "test": record["test"],
            "step 0 (untrained), validation": record.get("step0_validation"),
            "majority class, validation": record["majority_baseline"]["validation"],
            "majority class, test": record["majority_baseline"]["test"]}
    table = pd.DataFrame({k: v for k, v in rows.items() if v is not None}).T
    return table.drop(columns=["prediction"], errors="ignore")


def glue_table(summaries: list[dict], methods: list[str], tasks: tuple[str, ...] = paper.TABLE1_TASKS,
               paper: dict[str, dict] | None = None) -> pd.DataFrame:
    """Methods x tasks test scores in % (mean over seeds, as the paper prints them), the average, trainable %.

    ``summaries`` are ``readlib.sweep.summary`` results. A task without a result is missing (NaN), never 0;
    the average is given only when every task has a result. Each method's row is followed by its step-0 row
    (source "step 0"): the validation score of the untrained model (frozen backbone plus the method's initial state)
    of its best run, so a backbone that already answers the task (pre-trained on it) shows. With ``paper``
    (``readlib.paper.READ_TABLE1``/``3``), each method also gets a row with the paper's numbers (source "paper").
    """
    found = {(s["method"], s["task"]): s for s in summaries}
    rows = []
    for method in methods:
        scores = {t: 100 * found[method, t]["test_mean"] for t in tasks if (method, t) in found}
        any_run = next((found[method, t] for t in tasks if (method, t) in found), None)
        row = {"method": method, "source": "ours", **{t: scores.get(t, float("nan")) for t in tasks}}
        row["avg"] = glue_average(scores, tasks) if len(scores) == len(tasks) else float("nan")
        row["params_pct"] = any_run["record"]["trainable_percent"] if any_run else float("nan")
        rows.append(row)
        step0 = {t: 100 * found[method, t]["step0_validation"] for t in tasks
                 if (method, t) in found and found[method, t].get("step0_validation") is not None}
        rows.append({"method": method, "source": "step 0", **{t: step0.get(t, float("nan")) for t in tasks},
                     "avg": glue_average(step0, tasks) if len(step0) == len(tasks) else float("nan"),
                     "params_pct": float("nan")})
        if paper is not None and method in paper:
            rows.append({"method": method, "source": "paper", **{k: paper[method].get(k, float("nan"))
                                                                  for k in (*tasks, "avg", "params_pct")}})
    return pd.DataFrame(rows, columns=["method", "source", *tasks, "avg", "params_pct"])


def printed(table: pd.DataFrame) -> pd.DataFrame:
    """The table as printed: floats with two decimals, missing values as "–"."""
    return table.map(lambda v: "–" if isinstance(v, float) and v != v else (f"{v:.2f}" if isinstance(v, float) else v))


TABLE3_METHODS = ["full", "lst", "read"]


def glue_tables(template: sweep.SweepSpec, names: list[str], method_args: dict[str, dict] | None = None,
                storage_url: str | None = None) -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """READ Tables 1 (``names``) and 3 (full, LST, READ) over the seven GLUE tasks from the studies like
    ``template`` (``sweep.summaries``), next to the paper's; and the summaries they are built from."""
    found = sweep.summaries(template, list(dict.fromkeys([*names, *TABLE3_METHODS])), PAPER_TASKS, method_args,
                            storage_url)
    tables = {"table1": glue_table(found, names, paper=paper.READ_TABLE1),
              "table3": glue_table(found, TABLE3_METHODS, paper=paper.READ_TABLE3)}
    return tables, found


def runs_complete(spec: sweep.SweepSpec, storage_url: str | None = None) -> bool:
    """Whether the storage holds every run of ``spec``: ``lr_rounds`` search runs and a test score for each of the
    ``seeds`` seeds at the best learning rate (then a worker has nothing to do)."""
    result = sweep.summary(spec, storage_url)
    return result is not None and result["search_runs"] >= spec.lr_rounds and len(result["seeds"]) >= spec.seeds


def write_table(table: pd.DataFrame, name: str, caption: str) -> dict[str, Path]:
    """``outputs/tables/<name>.{csv,md,tex}``; missing values print as "–" (Markdown/LaTeX) or empty (CSV)."""
    folder = paths.output("tables")
    folder.mkdir(parents=True, exist_ok=True)
    files = {ext: folder / f"{name}.{ext}" for ext in ("csv", "md", "tex")}
    table.to_csv(files["csv"], index=False, float_format="%.4g")
    shown = printed(table)
    files["md"].write_text(f"{caption}\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n")
    files["tex"].write_text(shown.to_latex(index=False, caption=caption, label=f"tab:{name}") + "\n")
    return files


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



# ---------------------------------------------------------------- READ Section 4: scaling figures


def _size_figure(table: pd.DataFrame, y: str, ylabel: str, title: str, logy: bool = True) -> Figure:
    """One line per method against backbone parameters (millions, ``backbone_M``), log x."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(table, x="backbone_M", y=y, hue="method", marker="o", ax=ax)
    ax.set(xscale="log", yscale="log" if logy else "linear", ylabel=ylabel, title=title,
           xlabel="backbone parameters (millions, LM head counted as in READ Table 4)")
    return fig


def _with_backbone_size(table: pd.DataFrame, parameters: pd.DataFrame) -> pd.DataFrame:
    sizes = parameters[parameters.method == "full"][["backbone", "backbone_M"]]
    return table.merge(sizes, on="backbone")


def parameters_figure(parameters: pd.DataFrame) -> Figure:
    """READ Figure 5 (left): trainable parameters vs T5 size (``scaling.parameters_by_size``)."""
    return _size_figure(parameters, "trainable_M", "trainable parameters (millions)",
                        "Figure 5 (left): trainable parameters vs T5 size")


def training_memory_figure(memory: pd.DataFrame, parameters: pd.DataFrame, batch: int, seq: int) -> Figure:
    """READ Figure 5 (right): computed training memory (GiB) vs T5 size (``scaling.training_memory_by_size``)."""
    computed = _with_backbone_size(memory[memory.source == "computed (meta)"], parameters)
    return _size_figure(computed, "total_GiB", f"training memory per step (GiB), batch {batch} x {seq} tokens",
                        "Figure 5 (right): accounted training memory vs T5 size (computed)")


def inference_growth_figure(inference: pd.DataFrame, parameters: pd.DataFrame) -> Figure:
    """READ Figure 6 (right): inference memory over full fine-tuning (%) vs T5 size
    (``scaling.inference_memory_by_size``)."""
    growth = _with_backbone_size(inference[inference.method != "full"], parameters)
    return _size_figure(growth, "growth_pct", "inference memory over full fine-tuning (%)",
                        "Figure 6 (right): inference memory growth vs T5 size (computed)", logy=False)


# ---------------------------------------------------------------- TokenTune (selective fine-tuning)


def phase_table(results: dict[tuple[str, str], dict]) -> pd.DataFrame:
    """TokenTune Table 1 layout: one row per phase, one column per (model, method), cumulative MiB from
    ``costs.phase_memory`` results, each followed by the paper's value less its CUDA context (– where the paper
    has no column)."""
    table = pd.DataFrame({"phase": list(PHASES)})
    for (model, method), result in results.items():
        table[f"{model} {method}"] = [in_unit(result["cumulative"][p], "MiB") for p in PHASES]
        theirs = paper.TOKENTUNE_TABLE1_MIB.get((model, method))
        table[f"{model} {method} (paper)"] = ([v - paper.TOKENTUNE_CONTEXT_MIB for v in theirs] if theirs
                                              else [float("nan")] * len(PHASES))
    return table


def memory_vs_batch_figure(memory: pd.DataFrame, encoder: str) -> Figure:
    """TokenTune Figure 2 (left): peak training memory (MiB) vs batch size (``scaling.memory_vs_batch``), the
    paper's three points at batch 512 as crosses, less its CUDA context."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(memory.assign(peak_mib=in_unit(memory.peak_bytes, "MiB")), x="batch", y="peak_mib", hue="method",
                 marker="o", ax=ax)
    for name, points in paper.TOKENTUNE_FIG2_LEFT_MIB.items():
        for b, mib in points.items():
            ax.scatter([b], [mib - paper.TOKENTUNE_CONTEXT_MIB], marker="x", s=80, color="black")
            ax.annotate(f"paper {name}", (b, mib - paper.TOKENTUNE_CONTEXT_MIB), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    ax.set(xscale="log", xlabel="batch size (sequences of 128 tokens)", ylabel="peak training memory (MiB)",
           title=f"{encoder}: computed on the meta device")
    return fig


def k_ablation(specs: dict[tuple[str, int], sweep.SweepSpec], lr: float,
               storage_url: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """TokenTune Figure 2 (right) from the storage: (one row per run: task, k, seed, best validation score in %;
    per k the mean over tasks, then mean and standard deviation over seeds)."""
    runs = pd.DataFrame([{"task": task, "k": k, "seed": r["seed"], "val": 100 * r["validation"]["score"]}
                         for (task, k), spec in specs.items() for r in sweep.records(spec, storage_url)
                         if r["validation"] and r["lr"] == lr], columns=["task", "k", "seed", "val"])
    per_k = runs.groupby(["k", "seed"]).val.mean().groupby("k").agg(["mean", "std"])  # mean over the tasks
    return runs, per_k


def k_ablation_figure(per_k: pd.DataFrame, tasks: list[str]) -> Figure:
    """TokenTune Figure 2 (right): mean validation score (%) vs k, ours next to the values the paper prints."""
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(per_k.index, per_k["mean"], yerr=per_k["std"].fillna(0), marker="o", capsize=3,
                label="ours (MiniLM)")
    theirs = paper.TOKENTUNE_FIG2_RIGHT
    ax.plot(list(theirs), list(theirs.values()), "kx--", label="paper (BERT-base)")
    ks = list(per_k.index)
    ax.set(xscale="log", xticks=ks, xticklabels=ks, xlabel="selected positions k",
           ylabel=f"mean validation score over {'/'.join(tasks)} (%)")
    ax.legend()
    return fig


# ---------------------------------------------------------------- every record, outside the notebooks


def compute_curves(records: list[dict]) -> pd.DataFrame:
    """Validation score against training compute: one row per (run, epoch) with task, method, lr, seed, profile,
    ``n_train`` (training examples), epoch, ``train_flops`` (cumulative, the record's history) and ``best_so_far``
    (the run's best validation score up to that epoch: what early stopping would keep at that budget). Records from
    before readlib counted training FLOPs (no ``train_flops`` in their history) are left out."""
    rows = []
    for record in records:
        best = -float("inf")
        for row in record.get("history") or []:
            if row.get("train_flops") is None:
                break
            best = max(best, row["val_score"])
            rows.append({"task": record["task"], "method": record["method"], "lr": record["lr"],
                         "seed": record["seed"], "profile": record.get("profile"),
                         "n_train": ((record.get("data") or {}).get("sizes_used") or {}).get("train"),
                         "epoch": row["epoch"],
                         "train_flops": row["train_flops"], "val_score": row["val_score"], "best_so_far": best})
    columns = ["task", "method", "lr", "seed", "profile", "n_train", "epoch", "train_flops", "val_score",
               "best_so_far"]
    return pd.DataFrame(rows, columns=columns)


def best_at_budget(curves: pd.DataFrame, budgets: list[float]) -> pd.DataFrame:
    """For each task and budget (FLOPs): each method's best validation score among the epochs of any of its runs
    whose cumulative training FLOPs fit in the budget (NaN when none does), and the method that is best there."""
    rows = []
    for task, of_task in curves.groupby("task", sort=True):
        for budget in budgets:
            fit_in = of_task[of_task["train_flops"] <= budget]
            scores = {m: fit_in.loc[fit_in["method"] == m, "val_score"].max()
                      for m in sorted(of_task["method"].unique())}
            reached = {m: v for m, v in scores.items() if pd.notna(v)}
            rows.append({"task": task, "budget_flops": budget, **scores,
                         "best": max(reached, key=reached.get) if reached else None})
    return pd.DataFrame(rows)


def compute_figure(curves: pd.DataFrame, task: str) -> Figure:
    """Best validation score so far against cumulative training FLOPs (log scale), one line per run, coloured by
    method (and dashed by training-set size when the runs differ in it): which method is best at each compute budget
    on ``task``."""
    data = curves[curves["task"] == task]
    if data.empty:
        raise ConfigError(f"no runs of {task!r} with training FLOPs per epoch (records from before they were counted "
                          "have none); run notebook 03 or a worker")
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    data = data.assign(run=data["method"] + " lr=" + data["lr"].map("{:.1e}".format) + " seed="
                       + data["seed"].astype(str) + " n=" + data["n_train"].map(str),
                       examples=data["n_train"].map(lambda n: f"{n} examples"))
    style = "examples" if data["n_train"].nunique() > 1 else None
    sns.lineplot(data, x="train_flops", y="best_so_far", hue="method", style=style, units="run", estimator=None,
                 marker="o", drawstyle="steps-post", ax=ax)
    ax.set_xscale("log")
    metric = METRIC_LABEL[get_task(task).metric]
    ax.set(xlabel="cumulative training compute (FLOPs, torch.utils.flop_counter)",
           ylabel=f"best validation {metric} so far (fraction)", title=f"{task}: accuracy per unit of training compute")
    return fig


def stored_records(storage_url: str | None = None) -> list[dict]:
    """Every result record in the storage (all studies, any trial state that kept one), in study and trial order.
    A SQLite file that does not exist is a ConfigError (rather than a new, empty storage)."""
    url = storage_url or sweep.default_storage()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no study storage at {url}: run notebook 03 or a worker first, or pass --storage URL")
    store = sweep.storage(url)
    return [t.user_attrs["record"] for name in optuna.get_all_study_names(store)
            for t in optuna.load_study(study_name=name, storage=store).get_trials(deepcopy=False)
            if "record" in t.user_attrs]


def record_row(record: dict) -> dict:
    """One record as flat scalar columns (scores as fractions, energy in kWh, memory in bytes, times in s)."""
    energy, energy_source = run_energy(record)
    memory, memory_source = run_memory(record)
    used = (record.get("data") or {}).get("sizes_used") or {}
    sweep_info = record.get("sweep") or {}
    return {
        "task": record["task"], "method": record["method"], "method_args": json.dumps(record["method_args"]),
        "lr": record["lr"], "seed": record["seed"], "phase": sweep_info.get("phase"),
        "trial": sweep_info.get("trial"), "status": record.get("status"),
        "validation_score": (record.get("validation") or {}).get("score"),
        "test_score": (record.get("test") or {}).get("score"),
        "step0_validation_score": (record.get("step0_validation") or {}).get("score"),
        "epochs_run": record.get("epochs_run"), "best_epoch": record.get("best_epoch"),
        "trainable_params": record.get("trainable_params"), "trainable_percent": record.get("trainable_percent"),
        "energy_kwh": energy, "energy_source": energy_source, "memory_bytes": memory, "memory_source": memory_source,
        "wall_time_s": record.get("wall_time_s"), "latency_median_s": (record.get("latency") or {}).get("median_s"),
        "train_size": used.get("train"), "validation_size": used.get("validation"),
        "test_size": used.get("test"), "backbone": record.get("backbone"),
        "backbone_source": record.get("backbone_source"), "profile": record.get("profile"),
        "formulation": record.get("formulation"), "precision": record.get("precision"),
        "device": record.get("device"), "processes": record.get("processes"), "git_commit": record.get("git_commit"),
        "readlib_version": record.get("readlib_version"), "torch_version": record.get("torch_version"),
        "finished_at": record.get("finished_at"), "study": sweep_info.get("study"),
    }


EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_COLUMNS = list(record_row({"task": None, "method": None, "method_args": {}, "lr": None, "seed": None}))


def export_records(storage_url: str | None, path: Path, fmt: str = "csv") -> int:
    """Write every record in the storage to ``path``: CSV (one row per record, ``record_row``'s columns) or JSONL
    (one whole record per line); return the number of records."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    found = stored_records(storage_url)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        pd.DataFrame([record_row(r) for r in found], columns=EXPORT_COLUMNS).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in found))
    return len(found)


def decoder_memory_figure(table: pd.DataFrame) -> Figure:
    """Training memory per part (GiB) of each setting of ``scaling.decoder_training_memory``, stacked bars."""
    parts = ["weights", "activations", "gradients", "optimizer"]
    gib = table.set_index("setting")[parts].apply(lambda column: in_unit(column, "GiB"))
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    gib.iloc[::-1].plot.barh(stacked=True, ax=ax)
    first = table.iloc[0]
    ax.set_xlabel(f"training memory of one step (GiB), batch {first['batch']} x {first['seq']} tokens")
    ax.set_ylabel("")
    ax.set_title(f"{first['backbone']}: computed from shapes (meta device)")
    return fig
