"""Use what was trained: load model folders (``readlib.checkpoint``) and predict from raw text.

READ's side network never changes the backbone's computation (READ Section 2, footnote 1: the backbone runs once,
without gradients, and its states are only read), so K READ models on the same frozen backbone answer K tasks
for one input with ONE backbone forward: ``load_many`` builds them on one shared backbone and ``predict_many``
computes φ_1..φ_N once per batch and runs each side network and head on it. Every other method changes what the
backbone computes (LoRA, adapters, prompts, full and selective fine-tuning, LST's ladder reads the backbone but
builds on a pruned copy of it) and needs its own pass. Models whose tasks read different text fields (CoLA's
``sentence`` vs MRPC's ``sentence1``/``sentence2``) see different token sequences and never share a pass.

Predictions are per input: ``{"label": id, "label_name": name}`` for classification, ``{"score": s}`` for STS-B;
text-to-text and decoder-only (causal-lm) models also give the ``generated`` string, and ``label`` null when it is no
valid target.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from readlib import backbones, checkpoint, data, quantize
from readlib.data import Encoded, TaskSpec
from readlib.errors import ConfigError
from readlib.train import autocast, greedy_continue, greedy_decode, resolve_device

SHARES_BACKBONE_PASS = ("read",)  # methods whose models only read the frozen backbone's states (classification)


@dataclass
class Model:
    """A trained model from a folder: ``predict`` takes raw text rows (dicts keyed by the task's text fields)."""

    path: Path
    meta: dict[str, Any]  # readlib.json
    task: TaskSpec
    net: nn.Module
    backbone: backbones.Backbone
    device: torch.device

    @property
    def batch_size(self) -> int:
        """The run's evaluation batch (2 × micro batch): the same batches give the same numbers as the run's test."""
        return 2 * self.meta.get("micro_batch_size", 32)

    @property
    def shares_backbone_pass(self) -> bool:
        return self.meta["method"] in SHARES_BACKBONE_PASS and self.meta["formulation"] == "classification"

    def predict(self, rows: Sequence[dict[str, Any]], batch_size: int | None = None,
                progress: bool = False) -> list[dict[str, Any]]:
        """One prediction per row (see module docstring)."""
        return [out[0] for out in predict_many([self], rows, batch_size, progress)]


def _backbone_key(meta: dict[str, Any]) -> tuple:
    """What makes two folders' frozen backbones the same model."""
    return (meta["backbone"], meta.get("backbone_source"), meta.get("backbone_revision"), meta.get("weights_seed"),
            meta["formulation"], meta.get("backbone_quant", "none"))


def load(path: str | Path, device: str = "auto") -> Model:
    """The trained model saved under ``path`` (``--save_dir``), ready to predict on ``device`` (auto: a GPU if any)."""
    return load_many([path], device)[0]


def load_many(paths: Sequence[str | Path], device: str = "auto") -> list[Model]:
    """Several model folders; READ classification models on the same backbone are built on one shared backbone
    (one copy in memory, one backbone pass per batch in ``predict_many``). Every folder is checked before any
    backbone loads."""
    metas = [checkpoint.read_meta(p) for p in paths]
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"unknown device '{device}'; choose one of: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but no CUDA GPU is visible; use auto or cpu")
    for meta in metas:  # an int8 backbone runs on the CPU only
        quantize.check(meta.get("backbone_quant", "none"), device)
    target = resolve_device(device)
    shared: dict[tuple, backbones.Backbone] = {}
    models = []
    for path, meta in zip(paths, metas, strict=True):
        if meta["method"] in SHARES_BACKBONE_PASS and meta["formulation"] == "classification":
            backbone = shared.get(_backbone_key(meta))
            if backbone is None:
                backbone = shared[_backbone_key(meta)] = checkpoint.build_backbone(meta)
        else:  # the method changes its backbone in place: a fresh one
            backbone = checkpoint.build_backbone(meta)
        net, meta = checkpoint.load_model(path, backbone)
        models.append(Model(Path(path), meta, data.get_task(meta["task"]), net.to(target), backbone, target))
    return models


# ---------------------------------------------------------------- inputs


def check_rows(rows: Sequence[dict[str, Any]], tasks: Iterable[TaskSpec]) -> None:
    """ConfigError naming the first row (1-based) that lacks a text field one of the tasks reads, or holds a
    non-text value there."""
    if not rows:
        raise ConfigError("no input rows")
    for task in tasks:
        for number, row in enumerate(rows, 1):
            for field in task.text_fields:
                if field not in row:
                    raise ConfigError(f"input row {number} has no field '{field}', which {task.name} reads "
                                      f"(fields: {', '.join(task.text_fields)}; the row has: {', '.join(row) or '-'})")
                if not isinstance(row[field], str):
                    raise ConfigError(f"input row {number}: field '{field}' must be text, got {row[field]!r}")


def read_inputs(source: str | Path, stdin: io.TextIOBase | None = None,
                single_field: str | None = None) -> list[dict[str, Any]]:
    """Rows from a ``.jsonl`` file (one JSON object per line), a ``.csv`` file with a header, or ``-`` (stdin: JSON
    lines, or one plain text per line when every model reads one field, ``single_field``)."""
    if str(source) == "-":
        text, name = (stdin.read() if stdin is not None else ""), "stdin"
        lines = [line for line in text.splitlines() if line.strip()]
        if lines and not lines[0].lstrip().startswith("{"):
            if single_field is None:
                raise ConfigError("plain text on stdin needs single-text tasks; give JSON lines with the fields")
            return [{single_field: line} for line in lines]
        return _json_lines(lines, name)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"input file '{path}' does not exist")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [dict(row) for row in csv.DictReader(f)]
    if path.suffix in (".jsonl", ".json"):
        return _json_lines([line for line in path.read_text().splitlines() if line.strip()], str(path))
    raise ConfigError(f"input '{path}': use a .jsonl or .csv file, or - for stdin")


def _json_lines(lines: list[str], name: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{name}, line {number}: not JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ConfigError(f"{name}, line {number}: expected a JSON object of text fields, got {line[:60]}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- prediction


def _encode(model: Model, rows: Sequence[dict[str, Any]]) -> Encoded:
    """The rows tokenized as the run tokenized its splits (labels are placeholders: only inputs are read)."""
    fields = {f: [row[f] for row in rows] for f in model.task.text_fields}
    label = 0.0 if model.task.is_regression else 0
    dataset = datasets.Dataset.from_dict(fields | {"label": [label] * len(rows)})
    formulation = model.meta["formulation"]
    eos = model.backbone.eos_id if formulation != "classification" else None
    return Encoded(dataset, model.backbone.tokenizer, model.task, model.meta["max_length"], eos,
                   model.meta.get("target_format") or "lst", causal=formulation == "causal-lm")


def _answer(task: TaskSpec, value: float | int | None, generated: str | None = None) -> dict[str, Any]:
    if task.is_regression:
        out = {"score": None if value is None else float(value)}
    else:
        out = {"label": None if value is None else int(value),
               "label_name": None if value is None else task.label_names[int(value)]}
    return out if generated is None else out | {"generated": generated}


def decode_steps(model: Model) -> int:
    """Tokens to generate: the longest valid target of the task (with end-of-sequence)."""
    task, style = model.task, model.meta.get("target_format") or "lst"
    labels = np.arange(0, 5.01, 0.1) if task.is_regression else range(task.num_labels)
    targets = [data.t5_target(task, label, style) for label in labels]
    return 1 + max(len(ids) for ids in model.backbone.tokenizer(targets, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def _generate(model: Model, split: Encoded, batch_size: int, bar: tqdm) -> list[dict[str, Any]]:
    """Text-to-text and causal-lm: greedy decoding, each string read back as a label (``data.t5_label``)."""
    out, steps, eos = [], decode_steps(model), model.backbone.eos_id
    style, tokenizer = model.meta.get("target_format") or "lst", model.backbone.tokenizer
    for start in range(0, len(split), batch_size):
        idx = list(range(start, min(start + batch_size, len(split))))
        with autocast(model.meta.get("precision", "fp32"), model.device):
            if split.formulation == "causal-lm":  # the prompt, then each generated token
                ids = greedy_continue(model.net, split, idx, steps, model.device).tolist()
            else:
                ids = greedy_decode(model.net, split.batch(idx, model.device)[0], split.pad_id, steps).cpu().tolist()
        for row in ids:
            text = tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True)
            out.append(_answer(model.task, data.t5_label(model.task, text, style), text))
        bar.update(len(ids))
    return out


@torch.no_grad()
def _classify(models: list[Model], split: Encoded, batch_size: int, bar: tqdm) -> list[list[dict[str, Any]]]:
    """Classification/regression of every row by each of ``models``; READ models in one group share the backbone
    pass (``net.features`` once, then each ``net.forward_features``)."""
    out: list[list[dict[str, Any]]] = [[] for _ in models]
    shared = len(models) > 1
    device, precision = models[0].device, models[0].meta.get("precision", "fp32")
    for start in range(0, len(split), batch_size):
        inputs, _ = split.batch(range(start, min(start + batch_size, len(split))), device)
        with autocast(precision, device):
            if shared:
                phi = models[0].net.features(**inputs)  # φ_1..φ_N: the one backbone pass
                logits = [m.net.forward_features(phi, inputs["attention_mask"]) for m in models]
            else:
                logits = [models[0].net(**inputs)]
        for k, (model, values) in enumerate(zip(models, logits, strict=True)):
            values = values.float()
            labels = values.squeeze(-1) if model.task.is_regression else values.argmax(-1)
            out[k].extend(_answer(model.task, v) for v in labels.cpu().tolist())
        bar.update(len(inputs["input_ids"]) * len(models))
    return out


def groups(models: Sequence[Model]) -> list[list[int]]:
    """Indices of ``models`` that share one backbone pass: READ classification models on the same backbone object
    reading the same text fields with the same length, precision and device; every other model alone."""
    keyed: dict[tuple, list[int]] = {}
    for i, model in enumerate(models):
        key = (id(model.backbone), model.task.text_fields, model.meta["max_length"], model.meta.get("precision"),
               str(model.device)) if model.shares_backbone_pass else ("alone", i)
        keyed.setdefault(key, []).append(i)
    return list(keyed.values())


def predict_many(models: Sequence[Model], rows: Sequence[dict[str, Any]], batch_size: int | None = None,
                 progress: bool = False) -> list[list[dict[str, Any]]]:
    """For each row, each model's prediction (``[row][model]``); rows are checked against every model's task
    first. ``batch_size`` (rows per forward pass): None, each group's first model's evaluation batch."""
    check_rows(rows, [m.task for m in models])
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    answers: list[list[dict[str, Any]] | None] = [None] * len(models)
    with tqdm(total=len(rows) * len(models), desc="predict", unit="answer", disable=not progress) as bar:
        for group in groups(models):
            members = [models[i] for i in group]
            split = _encode(members[0], rows)
            size = batch_size or members[0].batch_size
            if members[0].meta["formulation"] != "classification":
                results = [_generate(members[0], split, size, bar)]
            else:
                results = _classify(members, split, size, bar)
            for i, result in zip(group, results, strict=True):
                answers[i] = result
    return [[answers[k][r] for k in range(len(models))] for r in range(len(rows))]
