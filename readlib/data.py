"""GLUE tasks for READ: registry, loading (data_dir | bundled copy | hub), the paper's splits and T5 strings.

GLUE hides its test labels, so READ (Section 3.2) cuts new validation and test splits out of
the public train and validation data; Appendix C.2, Table 5, lists the sizes the paper used.
READ's code base is LST's (github.com/ylsung/Ladder-Side-Tuning), whose ``seq2seq/data/tasks.py``
(inherited from Compacter) makes these splits and the text-to-text strings; the "lst" recipe and
format below reproduce it.
"""

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from readlib.errors import ConfigError, DataError, DataNotFoundError
from readlib.paper import READ_TABLE5_K, TABLE1_TASKS
from readlib.paths import BUNDLED_GLUE, REPO_ROOT


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: its columns, labels, metric and split sizes."""

    name: str
    text_fields: tuple[str, ...]  # input columns, in the order they are fed to the model
    label_names: tuple[str, ...]  # class names in label order; () for STS-B (regression)
    metric: str  # "mcc" | "accuracy" | "f1_accuracy" | "pearson_spearman"
    hub_splits: tuple[str, ...]  # split names in nyu-mll/glue
    official_sizes: dict[str, int]  # rows per hub split

    @property
    def num_labels(self) -> int:
        """Size of the model's output: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.metric == "pearson_spearman"


SPLITS = ("train", "validation")
MNLI_SPLITS = ("train", "validation_matched", "validation_mismatched")
NLI = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"), "mcc", SPLITS,
             {"train": 8551, "validation": 1043}),
    TaskSpec("sst2", ("sentence",), ("negative", "positive"), "accuracy", SPLITS,
             {"train": 67349, "validation": 872}),
    TaskSpec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1_accuracy",
             SPLITS, {"train": 3668, "validation": 408}),
    TaskSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "f1_accuracy",
             SPLITS, {"train": 363846, "validation": 40430}),
    TaskSpec("stsb", ("sentence1", "sentence2"), (), "pearson_spearman", SPLITS,
             {"train": 5749, "validation": 1500}),
    TaskSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             "accuracy", MNLI_SPLITS,
             {"train": 392702, "validation_matched": 9815, "validation_mismatched": 9832}),
    TaskSpec("qnli", ("question", "sentence"), NLI, "accuracy", SPLITS,
             {"train": 104743, "validation": 5463}),
    TaskSpec("rte", ("sentence1", "sentence2"), NLI, "accuracy", SPLITS,
             {"train": 2490, "validation": 277}),
)}
PAPER_TASKS: tuple[str, ...] = TABLE1_TASKS
BUNDLED_DIR = BUNDLED_GLUE
HUB_DATASET = "nyu-mll/glue"
SMALL_TRAIN = 10_000  # Section 3.2: below this many train rows, halve the original validation
HOLDOUT = 1_000  # Section 3.2: otherwise hold this many train rows out as validation
SPLIT_RECIPES = ("lst", "numpy")  # which rows paper_split draws: LST's torch.randperm slices | a numpy permutation
TARGET_FORMATS = ("lst", "t5")  # text-to-text strings: LST's (label index) | T5's GLUE recipe (class name)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def get_task(name: str) -> TaskSpec:
    """The TaskSpec for a GLUE config name (e.g. "sst2"); ConfigError if unknown."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _root(data_dir: str | Path | None) -> Path:
    """Where local files are looked for: data_dir when given (and only there), else the bundled copy."""
    return BUNDLED_DIR if data_dir is None else Path(data_dir).expanduser()


def split_files(folder: Path, split: str) -> list[Path]:
    """The parquet files of one split in a task folder: ``<split>.parquet``, or the hub's shards
    ``<split>-00000-of-0000N.parquet`` (all N of them, in order); [] when neither is complete."""
    single = folder / f"{split}.parquet"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].parquet"))
    count = {int(f.stem.rpartition("-of-")[2]) for f in shards}
    return shards if len(count) == 1 and len(shards) == count.pop() else []


def local_files(task: str, data_dir: str | Path | None = None) -> dict[str, list[Path]] | None:
    """Parquet files per hub split in data_dir (when given: only there), else in BUNDLED_DIR; None unless every
    split is there."""
    spec = get_task(task)
    files = {s: split_files(_root(data_dir) / spec.name, s) for s in spec.hub_splits}
    return files if all(files.values()) else None


def _incomplete_data_dir(spec: TaskSpec, data_dir: str | Path) -> str:
    """One line: what a data_dir lacks for ``spec`` (data_dir is never completed from elsewhere)."""
    folder = Path(data_dir).expanduser() / spec.name
    where = "does not exist" if not Path(data_dir).expanduser().is_dir() else (
        f"has no folder {spec.name}/" if not folder.is_dir() else "")
    missing = [s for s in spec.hub_splits if not split_files(folder, s)]
    wanted = ", ".join(f"{folder / s}.parquet" for s in missing)
    layout = ", ".join(f"<data_dir>/{spec.name}/{s}.parquet" for s in spec.hub_splits)
    return (f"data_dir {data_dir} {where or 'lacks splits of ' + repr(spec.name)}: missing {wanted} (or all of its "
            f"hub shards <split>-0000K-of-0000N.parquet); a data_dir must hold the whole task ({layout}), it is "
            "never completed from the bundled data or the hub")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_table(spec: TaskSpec, table: pa.Table, where: str) -> None:
    """DataError naming ``where``, the column and the first bad row (0-based) unless every text field is a string
    column without nulls and every label is in the task's label space: an integer class id in [0, classes), or
    for STS-B a finite score in [0, 5]. Whole-numbered float class ids (1.0) count as integers."""
    needed = (*spec.text_fields, "label", "idx")
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (task {spec.name!r} reads "
                        f"{', '.join(needed)}; the file has {', '.join(table.column_names) or 'none'})")
    for name in spec.text_fields:
        column = table[name]
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{where}: column {name!r} holds {column.type}, not text")
        if column.null_count:
            raise DataError(f"{where}: column {name!r} is empty (null) in row {_first(column.is_null().to_numpy())}")
    labels = table["label"]
    if labels.null_count:
        raise DataError(f"{where}: column 'label' is empty (null) in row {_first(labels.is_null().to_numpy())}")
    if not (pa.types.is_integer(labels.type) or pa.types.is_floating(labels.type)):
        raise DataError(f"{where}: column 'label' holds {labels.type}, not numbers")
    values = labels.to_numpy().astype(np.float64)
    if spec.is_regression:
        bad, allowed = ~np.isfinite(values) | (values < 0) | (values > 5), "a similarity score in [0, 5]"
    else:
        bad = (values != np.round(values)) | (values < 0) | (values >= spec.num_labels)
        allowed = f"a class id 0..{spec.num_labels - 1} ({', '.join(spec.label_names)})"
    if bad.any():
        row = _first(bad)
        raise DataError(f"{where}: column 'label' is {values[row]:g} in row {row}; {spec.name} labels are {allowed}")


def check_files(spec: TaskSpec, files: dict[str, list[Path]]) -> None:
    """``check_table`` on every local file (texts and labels only are read); an unreadable file is a DataError."""
    for paths in files.values():
        for path in paths:
            try:
                present = pq.read_schema(path).names
                table = pq.read_table(path, columns=[c for c in (*spec.text_fields, "label", "idx") if c in present])
            except (OSError, pa.ArrowException) as e:
                first_line = (str(e).strip().splitlines() or [""])[0]
                raise DataError(f"{path}: cannot be read as parquet ({type(e).__name__}: {first_line})") from e
            check_table(spec, table, str(path))


def _source(files: dict[str, list[Path]]) -> str:
    root = next(iter(files.values()))[0].parents[1]
    return f"local:{root.relative_to(REPO_ROOT) if root == BUNDLED_DIR else root}"


def _hub_off() -> str | None:
    """The environment setting that keeps datasets off the hub, if any."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def _not_found(spec: TaskSpec, reason: str) -> str:
    """One paragraph: what was looked for, why the hub was no help, and how to supply the data."""
    paths = [BUNDLED_DIR / spec.name / f"{s}.parquet" for s in spec.hub_splits]
    looked = ", ".join(f"{p} (present)" if p.is_file() else str(p) for p in paths)
    layout = ", ".join(f"<data_dir>/{spec.name}/{s}.parquet" for s in spec.hub_splits)
    columns = ", ".join((*spec.text_fields, "label", "idx"))
    return (
        f"No data for GLUE task {spec.name!r}: the bundled data does not have all its splits (looked for "
        f"{looked}, or the hub's shards <split>-00000-of-0000N.parquet) and {reason}. Supply it either with hub "
        f"access (unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE; dataset {HUB_DATASET}, config {spec.name!r}), "
        f"a datasets cache that holds it, or a data_dir in the GLUE parquet layout: {layout}, columns {columns}."
    )


def _from_hub(spec: TaskSpec) -> datasets.DatasetDict:
    """The task from the hub, or offline from the ``datasets`` cache (``datasets`` falls back to it by itself
    under HF_HUB_OFFLINE=1 when an earlier run downloaded it). ``datasets`` reads the offline switch once, when it is
    imported; a switch set later (``os.environ`` in a notebook) is applied here too, so that it never waits on an
    unreachable network."""
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or _hub_off() is not None
    try:
        return datasets.load_dataset(HUB_DATASET, spec.name)
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def check_available(task: str, data_dir: str | Path | None = None) -> str:
    """Where load_raw would read the task from: "local:<dir>", "hub", or "hub-cache" (offline, from the
    ``datasets`` cache); no model, and no download.

    Raises DataNotFoundError when a data_dir lacks a split (no fallback), or there are no local files and the hub is
    switched off with nothing cached; DataError when a local file is unreadable or holds a bad text or label
    (``check_files``).
    """
    spec = get_task(task)
    files = local_files(spec.name, data_dir)
    if files is not None:
        check_files(spec, files)
        return _source(files)
    if data_dir is not None:
        raise DataNotFoundError(_incomplete_data_dir(spec, data_dir))
    off = _hub_off()
    if off is None:
        return "hub"
    try:
        _from_hub(spec)  # memory-maps the cached Arrow files: cheap
    except Exception as e:  # datasets raises several kinds (ConnectionError, FileNotFoundError, ValueError)
        raise DataNotFoundError(_not_found(spec, f"the Hugging Face hub is off ({off}) and the "
                                           f"datasets cache does not hold it ({type(e).__name__})")) from e
    return "hub-cache"


def load_raw(task: str, data_dir: str | Path | None = None) -> datasets.DatasetDict:
    """The task's original GLUE splits, keyed by hub split name, with text fields, label, idx."""
    spec = get_task(task)
    columns = [*spec.text_fields, "label", "idx"]
    files = local_files(spec.name, data_dir)
    if files is not None:
        # columns= also lets a user's files carry extra columns
        raw = datasets.load_dataset("parquet", data_files={s: [str(f) for f in fs] for s, fs in files.items()},
                                    columns=columns)
    elif data_dir is not None:
        raise DataNotFoundError(_incomplete_data_dir(spec, data_dir))
    else:
        try:
            raw = _from_hub(spec)
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            reason = f"loading {HUB_DATASET} from the hub failed ({type(e).__name__}: {first_line})"
            raise DataNotFoundError(_not_found(spec, reason)) from e
        for s in spec.hub_splits:
            check_table(spec, raw[s].data.table, f"{HUB_DATASET} {spec.name} {s}")
    return datasets.DatasetDict({s: raw[s].select_columns(columns) for s in spec.hub_splits})


def revision(task: str, data_dir: str | Path | None = None) -> str:
    """The data's version: ``sha256:<16 hex>`` of the local parquet files' bytes, or the hub dataset's commit (the
    folder name ``datasets`` caches it under)."""
    files = local_files(task, data_dir)
    if files is not None:
        digest = hashlib.sha256()
        for f in sorted(f for fs in files.values() for f in fs):
            digest.update(f.read_bytes())
        return f"sha256:{digest.hexdigest()[:16]}"
    cached = _from_hub(get_task(task))
    return Path(next(iter(cached.values())).cache_files[0]["filename"]).parent.name


def paper_split_sizes(task: str, n_train: int | None = None, n_val: int | None = None) -> dict[str, int]:
    """Rows per split that the Section 3.2 recipe makes from n_train/n_val original rows.

    Defaults are the official GLUE sizes. For MNLI, n_val is the size of validation_mismatched
    (the new validation); the new test is validation_matched at its official size.
    """
    spec = get_task(task)
    official = spec.official_sizes
    n_train = official["train"] if n_train is None else n_train
    if spec.name == "mnli":
        n_val = official["validation_mismatched"] if n_val is None else n_val
        return {"train": n_train, "validation": n_val, "test": official["validation_matched"]}
    n_val = official["validation"] if n_val is None else n_val
    if n_train < SMALL_TRAIN:
        return {"train": n_train, "validation": n_val // 2, "test": n_val - n_val // 2}
    return {"train": n_train - HOLDOUT, "validation": HOLDOUT, "test": n_val}


def _lst_shuffled_indices(n: int, seed: int) -> list[int]:
    """LST's AbstractTask.shuffled_indices: torch.randperm(n) under a torch.Generator seeded with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def paper_split(raw: datasets.DatasetDict, task: str, seed: int = 42, recipe: str = "lst") -> datasets.DatasetDict:
    """READ Section 3.2 train/validation/test splits from the original GLUE splits.

    Train < 10k rows: a seeded permutation of the original validation split gives its first
    half (floor) to validation and the rest to test. Otherwise the original validation is the
    test set, the first 1k rows of a seeded permutation of train are validation and the other
    rows train. MNLI: validation_mismatched is validation, validation_matched is test.

    recipe "lst" is LST's AbstractTask.get / get_split_indices (seed 42 is its data_seed default): the
    permutation is torch.randperm under torch.Generator().manual_seed(seed), and the rows it selects stay in
    the permuted order, as LST's dataset.select(indices) leaves them. recipe "numpy" permutes with
    np.random.default_rng(seed) and keeps the selected rows in their original order. Untouched splits
    (small tasks' train, large tasks' test, all of MNLI) are the original splits in their original order.
    At GLUE's sizes the tasks under 10k train rows are those LST lists as small (cola, rte, mrpc, stsb).
    """
    spec = get_task(task)
    _check_choice("split recipe", recipe, SPLIT_RECIPES)
    if spec.name == "mnli":
        return datasets.DatasetDict(train=raw["train"], validation=raw["validation_mismatched"],
                                    test=raw["validation_matched"])
    train, val = raw["train"], raw["validation"]
    k = paper_split_sizes(spec.name, len(train), len(val))["validation"]
    small = len(train) < SMALL_TRAIN
    n = len(val) if small else len(train)  # the split that is permuted and cut in two
    if recipe == "lst":
        perm = _lst_shuffled_indices(n, seed)
        first, rest = perm[:k], perm[k:]
    else:
        perm = np.random.default_rng(seed).permutation(n)
        first, rest = np.sort(perm[:k]), np.sort(perm[k:])
    if small:
        return datasets.DatasetDict(train=train, validation=val.select(first), test=val.select(rest))
    return datasets.DatasetDict(train=train.select(rest), validation=train.select(first), test=val)


def check_subsample(name: str, n: int | None) -> None:
    """ConfigError unless ``n`` is a subsample size: >= 1, or None for all rows."""
    if n is not None and n < 1:
        raise ConfigError(f"{name} must be >= 1 or null (no subsampling), got {n}")


def subsample(ds: datasets.Dataset, n: int | None, seed: int = 0) -> datasets.Dataset:
    """n rows drawn without replacement (seeded), in the order ``ds`` has them; all rows if n is None."""
    check_subsample("subsample size", n)
    if n is None or n >= len(ds):
        return ds
    return ds.select(np.sort(np.random.default_rng(seed).permutation(len(ds))[:n]))


def load_task(task: str, data_dir: str | Path | None = None, split_seed: int = 42,
              max_train: int | None = None, max_eval: int | None = None,
              subsample_seed: int = 0, split_recipe: str = "lst") -> tuple[datasets.DatasetDict, dict]:
    """Paper splits of a task (``paper_split`` with ``split_recipe``), optionally subsampled, and a record
    of what data produced them.

    max_train caps the train split, max_eval caps validation and test each. Returns (splits, info) with
    info = {task, source, split_seed, split_recipe, sizes_full, sizes_used, subsample_seed}.
    """
    spec = get_task(task)
    check_subsample("max_train", max_train)
    check_subsample("max_eval", max_eval)
    _check_choice("split recipe", split_recipe, SPLIT_RECIPES)
    source = check_available(spec.name, data_dir)
    splits = paper_split(load_raw(spec.name, data_dir), spec.name, split_seed, split_recipe)
    sizes_full = {s: len(d) for s, d in splits.items()}
    caps = {"train": max_train, "validation": max_eval, "test": max_eval}
    splits = datasets.DatasetDict({s: subsample(d, caps[s], subsample_seed) for s, d in splits.items()})
    info = {"task": spec.name, "source": source, "revision": revision(spec.name, data_dir), "split_seed": split_seed,
            "split_recipe": split_recipe,
            "sizes_full": sizes_full, "sizes_used": {s: len(d) for s, d in splits.items()},
            "subsample_seed": subsample_seed}
    return splits, info


def _agrees(rows: int, paper_k: float) -> bool:
    """Whether a Table 5 size (thousands) matches a row count up to how it was printed.

    The paper truncates some sizes (CoLA 8551 -> 8.5) and rounds others (MRPC 3668 -> 3.7),
    so a size agrees when it is within one unit of its last printed digit.
    """
    decimals = len(repr(paper_k).split(".")[1])
    return abs(rows / 1000 - paper_k) < 10.0 ** -decimals


def split_table() -> pd.DataFrame:
    """Split sizes from the Section 3.2 recipe (official GLUE sizes) next to Table 5's.

    follows_recipe is False where Table 5 differs from the recipe by more than its printing
    (QNLI, QQP, SST-2 train: there the paper's train is the original train minus the test
    size). RTE is not in the paper: its paper columns and follows_recipe are missing.
    """
    rows = []
    for name in (*PAPER_TASKS, "rte"):
        spec, ours = TASKS[name], paper_split_sizes(name)
        row = {"task": name, **{f"{s}_ours": n for s, n in ours.items()}}
        if name not in READ_TABLE5_K:
            row |= {"train_paper": pd.NA, "validation_paper": pd.NA, "test_paper": pd.NA,
                    "follows_recipe": pd.NA, "note": "not in paper"}
        else:
            paper = dict(zip(("train", "test", "validation"), READ_TABLE5_K[name], strict=True))
            row |= {f"{s}_paper": round(paper[s] * 1000) for s in ("train", "validation", "test")}
            row["follows_recipe"] = all(_agrees(ours[s], paper[s]) for s in ours)
            # where Table 5 departs from the recipe, say how its train size was made, if we can tell
            minus_test = _agrees(spec.official_sizes["train"] - ours["test"], paper["train"])
            explained = minus_test and not row["follows_recipe"]
            row["note"] = "paper train = original train - test" if explained else ""
        rows.append(row)
    df = pd.DataFrame(rows)
    paper_cols = ["train_paper", "validation_paper", "test_paper"]
    return df.astype({c: "Int64" for c in paper_cols} | {"follows_recipe": "boolean"})


# --- text-to-text (T5) formulation: LST's strings ("lst") or T5's GLUE recipe ("t5") ---
#
# "lst" is LST's seq2seq/data/tasks.py (each task's preprocessor and AbstractTask.seq2seq_format, with the
# task-name prefix that run_seq2seq.py switches on for every method but task adapters): "<task> field: text ...",
# fields in the task's order, and the label index as the target ("0", "1", ...). MNLI's hypothesis key is written
# without its colon there, kept here. "t5" is T5's t5/data/preprocessors.py (glue, stsb): "<task> field: text ...",
# fields sorted by name (MNLI: hypothesis before premise), and the class name as the target, the format public T5
# checkpoints were multi-task pre-trained on.

LST_FIELD_KEYS = {("mnli", "hypothesis"): "hypothesis"}  # LST's keys that differ from "<field>:"
STSB_STEP = 0.2  # "t5": STS-B targets are scores rounded to the nearest 0.2, written "3.8"
# decoder-only LMs (causal-lm): the prompt is the text-to-text source, then this cue; the target follows as next tokens
PROMPT_CUE = " answer:"


def t5_source(spec: TaskSpec, row: dict, style: str = "lst") -> str:
    """The input string: task prefix, then each text field as "field: text" (e.g. "rte sentence1: ...")."""
    _check_choice("target format", style, TARGET_FORMATS)
    if style == "t5":  # T5 orders the fields by name
        keyed = [(f"{field}:", field) for field in sorted(spec.text_fields)]
    else:
        keyed = [(LST_FIELD_KEYS.get((spec.name, field), f"{field}:"), field) for field in spec.text_fields]
    return " ".join([spec.name] + [f"{key} {row[field]}" for key, field in keyed])


def t5_target(spec: TaskSpec, label: float, style: str = "lst") -> str:
    """The target string: "lst" the label index, or the STS-B score rounded to 0.1 ("3.9");
    "t5" the class name, or the STS-B score rounded to 0.2 ("3.8")."""
    _check_choice("target format", style, TARGET_FORMATS)
    if not spec.is_regression:
        return str(int(label)) if style == "lst" else spec.label_names[int(label)]
    if style == "lst":  # LST's round_stsb_target, np.round((label * 5) / 5, decimals=1): the * 5 / 5 cancels, so
        # the score is rounded to one decimal, numpy's way: rint(10 x) / 10, ties to even (0.25 -> "0.2")
        return str(np.round(float(label) * 5 / 5, decimals=1))
    # T5's recipe: round(5 x) / 5, ties to even (as tf.round)
    return f"{round(float(label) * round(1 / STSB_STEP)) * STSB_STEP:.1f}"


def t5_label(spec: TaskSpec, text: str, style: str = "lst") -> float | int | None:
    """The label a generated string stands for, or None if it is no valid target (STS-B: clipped to [0, 5]).

    Whitespace is ignored, so word-piece decodings such as "not _ entailment" or "3. 8" still match.
    """
    _check_choice("target format", style, TARGET_FORMATS)
    text = "".join(text.split())
    if spec.is_regression:
        if re.fullmatch(r"-?\d+(\.\d+)?", text) is None:  # float() would also take "nan", "1_0", "1e3"
            return None
        return min(max(float(text), 0.0), 5.0)
    names = ["".join(t5_target(spec, i, style).split()) for i in range(spec.num_labels)]
    return names.index(text) if text in names else None


class Encoded:
    """A tokenized split: token id lists plus a label tensor; ``batch(idx)`` pads on the fly.

    With ``eos_id`` given, the split is text-to-text (T5): sources are ``t5_source`` strings and each example
    also has target ids (``t5_target`` + end-of-sequence), both in ``target_format`` ("lst" | "t5");
    ``batch`` then returns ``decoder_input_ids`` (targets shifted right behind the pad id, T5's decoder
    start) and token labels with -100 on padding.

    With ``causal`` too, the split is for a decoder-only LM: each example is one sequence, the prompt
    (``t5_source`` + ``PROMPT_CUE``, cut to leave room for the target) followed by the target ids; ``batch`` returns
    ``target_mask`` [batch, tokens] (True where the next token is a target token) and, as labels, those next
    tokens [targets in the batch], in row order. ``prompt_batch`` feeds a prompt plus tokens generated so far.
    """

    def __init__(self, dataset, tokenizer, task: TaskSpec, max_length: int, eos_id: int | None = None,
                 target_format: str = "lst", causal: bool = False):
        _check_choice("target format", target_format, TARGET_FORMATS)
        if causal and eos_id is None:
            raise ValueError("a causal-lm split needs eos_id: its targets end with end-of-sequence")
        self.pad_id = tokenizer.pad_token_id or 0
        self.formulation = "classification" if eos_id is None else "causal-lm" if causal else "text-to-text"
        self.target_format = target_format  # how generated text is read back: t5_label(task, text, target_format)
        dtype = torch.float32 if task.is_regression else torch.long
        self.labels = torch.tensor(list(dataset["label"]), dtype=dtype)
        self.targets = self.prompts = None
        if eos_id is not None:
            sources = [t5_source(task, row, target_format) for row in dataset]
            # float32 labels, as LST's datasets hand them to round_stsb_target (its STS-B ties depend on it)
            targets = [t5_target(task, label, target_format) for label in self.labels.tolist()]
            self.targets = [ids + [eos_id] for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]]
        if causal:
            cue = tokenizer(PROMPT_CUE, add_special_tokens=False)["input_ids"]
            room = max_length - len(cue) - max(map(len, self.targets), default=0)
            if room < 2:
                raise ConfigError(f"max_length {max_length} leaves no room for a prompt before the '{PROMPT_CUE}' "
                                  f"cue and the longest target of {task.name}; raise max_length")
            enc = tokenizer(sources, truncation=True, max_length=room)
            self.prompts = [ids + cue for ids in enc["input_ids"]]
            self.input_ids = [p + t for p, t in zip(self.prompts, self.targets, strict=True)]
            self.token_type_ids = None
        elif eos_id is not None:
            enc = tokenizer(sources, truncation=True, max_length=max_length)
        else:
            enc = tokenizer(*[list(dataset[name]) for name in task.text_fields], truncation=True,
                            max_length=max_length)
        if not causal:
            self.input_ids = enc["input_ids"]
            self.token_type_ids = None if eos_id is not None else enc.get("token_type_ids")
        self.cache = None  # a readlib.cache.HiddenStateCache (or CacheSet) once built

    def __len__(self) -> int:
        return len(self.input_ids)

    def padded_tokens(self, idx) -> int:
        """Token positions a batch of examples ``idx`` occupies once padded (``batch``): examples × the longest input,
        plus examples × the longest target for text-to-text (a causal-lm input holds its target)."""
        idx = [int(i) for i in idx]
        tokens = len(idx) * max(len(self.input_ids[i]) for i in idx)
        if self.formulation == "text-to-text":
            tokens += len(idx) * max(len(self.targets[i]) for i in idx)
        return tokens

    def target_rows(self) -> list[int]:
        """Causal-lm: the positions per example whose next token is a target (its target's length)."""
        return [len(t) for t in self.targets]

    def batch(self, idx: torch.Tensor | list[int], device: torch.device) -> tuple[dict, torch.Tensor]:
        """(model inputs, labels) of examples ``idx``, padded to the longest of them, on ``device``."""
        idx = [int(i) for i in idx]
        inputs = self._padded([self.input_ids[i] for i in idx], device)
        if self.token_type_ids:
            types = torch.zeros_like(inputs["input_ids"], device="cpu")
            for row, i in enumerate(idx):
                types[row, : len(self.token_type_ids[i])] = torch.tensor(self.token_type_ids[i])
            inputs["token_type_ids"] = types.to(device)
        if self.formulation == "causal-lm":
            target_mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
            for row, i in enumerate(idx):  # position p predicts token p + 1: the last prompt token predicts target 0
                start = len(self.prompts[i]) - 1
                target_mask[row, start : start + len(self.targets[i])] = True
            inputs["target_mask"] = target_mask.to(device)
            labels = torch.tensor([t for i in idx for t in self.targets[i]], dtype=torch.long)
            return inputs, labels.to(device)
        if self.targets is None:
            return inputs, self.labels[idx].to(device)
        width = max(len(self.targets[i]) for i in idx)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            labels[row, : len(self.targets[i])] = torch.tensor(self.targets[i])
        decoder_input_ids = torch.cat([torch.full((len(idx), 1), self.pad_id), labels[:, :-1]], 1)
        inputs["decoder_input_ids"] = decoder_input_ids.masked_fill(decoder_input_ids == -100, self.pad_id).to(device)
        inputs["decoder_attention_mask"] = (labels != -100).long().to(device)
        return inputs, labels.to(device)

    def _padded(self, rows: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` [len(rows), longest row], padded on the right."""
        ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def prompt_batch(self, idx: list[int], generated: list[list[int]], device: torch.device) -> dict:
        """Causal-lm decoding: each example's prompt plus its tokens generated so far, with ``target_mask`` on the last
        position only (the one that predicts the next token)."""
        rows = [self.prompts[i] + tokens for i, tokens in zip(idx, generated, strict=True)]
        inputs = self._padded(rows, device)
        target_mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
        target_mask[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])] = True
        return inputs | {"target_mask": target_mask.to(device)}
