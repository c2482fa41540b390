"""Training and evaluation of one run (READ Section 3.3): AdamW at a constant learning rate, a total
batch reached by gradient accumulation, early stopping on the validation score, and the best
validation checkpoint evaluated once on the test split. Returns one result record that says how it
was produced.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import random
import subprocess
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import readlib
from readlib import backbones, cache, costs, data, methods
from readlib.metrics import compute_metrics, majority_baseline
from readlib.params import RunParams

REPO_ROOT = Path(__file__).resolve().parents[1]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def processes(device: str):
    """accelerate's view of this run: one process, or one of several started by ``accelerate launch``/``torchrun``."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


def sum_over_processes(trained: list[nn.Parameter], step_loss: float, device: torch.device) -> float:
    """Data parallelism: sum the gradients (and the step loss) of every process's micro-batches.

    Each process's loss is already weighted by its micro-batches' share of the step, so the sum is exactly
    the gradient of the whole step, and every process takes the same optimizer step (what DDP does, without
    wrapping the model: methods keep their own entry points such as ``forward_features``).
    """
    from accelerate.utils import reduce

    for p in trained:
        p.grad = reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="sum")
    return reduce(torch.tensor(step_loss, device=device, dtype=torch.float64), reduction="sum").item()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """HEAD of the readlib checkout, with '-dirty' when tracked files changed; 'unknown' outside git."""
    try:
        run = dict(cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


class Encoded:
    """A tokenized split: token id lists plus a label tensor; ``batch(idx)`` pads on the fly.

    With ``eos_id`` given, the split is text-to-text (T5): sources are ``data.t5_source`` strings and
    each example also has target ids (``data.t5_target`` + end-of-sequence); ``batch`` then returns
    ``decoder_input_ids`` (targets shifted right behind the pad id, T5's decoder start) and token
    labels with -100 on padding.
    """

    def __init__(self, dataset, tokenizer, task: data.TaskSpec, max_length: int, eos_id: int | None = None):
        self.pad_id = tokenizer.pad_token_id or 0
        self.text_to_text = eos_id is not None
        dtype = torch.float32 if task.is_regression else torch.long
        self.labels = torch.tensor(list(dataset["label"]), dtype=dtype)
        self.targets = None
        if self.text_to_text:
            sources = [data.t5_source(task, row) for row in dataset]
            enc = tokenizer(sources, truncation=True, max_length=max_length)
            targets = [data.t5_target(task, label) for label in self.labels.tolist()]
            self.targets = [ids + [eos_id] for ids in tokenizer(targets, add_special_tokens=False)["input_ids"]]
        else:
            enc = tokenizer(*[list(dataset[name]) for name in task.text_fields], truncation=True,
                            max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.token_type_ids = None if self.text_to_text else enc.get("token_type_ids")
        self.cache = None  # a readlib.cache.HiddenStateCache once built

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: torch.Tensor | list[int], device: torch.device) -> tuple[dict, torch.Tensor]:
        idx = [int(i) for i in idx]
        width = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        types = torch.zeros((len(idx), width), dtype=torch.long) if self.token_type_ids else None
        for row, i in enumerate(idx):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.tensor(self.token_type_ids[i])
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if types is not None:
            inputs["token_type_ids"] = types.to(device)
        if not self.text_to_text:
            return inputs, self.labels[idx].to(device)
        width = max(len(self.targets[i]) for i in idx)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            labels[row, : len(self.targets[i])] = torch.tensor(self.targets[i])
        decoder_input_ids = torch.cat([torch.full((len(idx), 1), self.pad_id), labels[:, :-1]], 1)
        inputs["decoder_input_ids"] = decoder_input_ids.masked_fill(decoder_input_ids == -100, self.pad_id).to(device)
        inputs["decoder_attention_mask"] = (labels != -100).long().to(device)
        return inputs, labels.to(device)


def forward(model: nn.Module, split: Encoded, idx, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of examples ``idx``; from the split's hidden-state cache when it has one."""
    inputs, labels = split.batch(idx, device)
    if split.cache is not None:
        masks = {k: v for k, v in inputs.items() if k.endswith("attention_mask")}
        return model.forward_features(split.cache.gather(idx, device), **masks), labels
    return model(**inputs), labels


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Token cross-entropy for text-to-text (3-d logits), else MSE for STS-B and cross-entropy."""
    if logits.dim() == 3:
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    if regression:
        return nn.functional.mse_loss(logits.squeeze(-1), labels)
    return nn.functional.cross_entropy(logits, labels)


@torch.no_grad()
def greedy_decode(model: nn.Module, inputs: dict, start_id: int, steps: int) -> torch.Tensor:
    """Greedy generation of ``steps`` tokens with any seq2seq method (the model sees the whole prefix)."""
    inputs = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
    decoded = torch.full((inputs["input_ids"].shape[0], 1), start_id, device=inputs["input_ids"].device)
    for _ in range(steps):
        next_ids = model(**inputs, decoder_input_ids=decoded)[:, -1].argmax(-1, keepdim=True)
        decoded = torch.cat([decoded, next_ids], 1)
    return decoded[:, 1:]


def parse_generated(task: data.TaskSpec, tokenizer, ids: torch.Tensor, eos_id: int, references) -> np.ndarray:
    """Labels of generated targets (cut at end-of-sequence). A string that is no valid target counts
    as wrong, as in T5's GLUE evaluation: another class than the reference, or 0.0 for STS-B."""
    out = []
    for row, ref in zip(ids.tolist(), references, strict=True):
        row = row[: row.index(eos_id)] if eos_id in row else row
        label = data.t5_label(task, tokenizer.decode(row, skip_special_tokens=True))
        if label is None:
            label = 0.0 if task.is_regression else (int(ref) + 1) % task.num_labels
        out.append(label)
    return np.array(out)


@torch.no_grad()
def predict(model: nn.Module, split: Encoded, batch_size: int, device: torch.device, task: data.TaskSpec,
            tokenizer=None, eos_id: int | None = None):
    """Predictions for a whole split, in order: class ids, or scores for regression.

    Text-to-text splits are decoded greedily for as many tokens as their longest target has.
    """
    model.eval()
    out = []
    steps = max(map(len, split.targets)) if split.text_to_text else 0
    for start in range(0, len(split), batch_size):
        idx = range(start, min(start + batch_size, len(split)))
        if split.text_to_text:
            inputs, _ = split.batch(idx, device)
            ids = greedy_decode(model, inputs, split.pad_id, steps).cpu()
            out.append(parse_generated(task, tokenizer, ids, eos_id, split.labels[list(idx)].tolist()))
            continue
        logits = forward(model, split, idx, device)[0].float()
        out.append((logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).cpu().numpy())
    return np.concatenate(out)


LATENCY_REPEATS = 3  # timed inference batches per run, after one warm-up


def step_costs(model: nn.Module, train: Encoded, validation: Encoded, micro_batch: int, eval_batch: int,
               device: torch.device, regression: bool) -> dict:
    """What one step costs, measured after training on the trained model:

    - ``flops``: one training micro-batch (forward and backward, as the run trained: from the hidden-state cache
      when it had one) and one inference batch (the first validation examples, forward through the whole model,
      cache bypassed; text-to-text: the decoder over the reference target, one pass);
    - ``latency``: that inference batch (``costs.latency``: 1 warm-up, median of ``LATENCY_REPEATS``);
    - ``phases``: ``costs.phase_memory`` of one training micro-batch (CUDA allocator peaks on a GPU, live
      storages elsewhere), its optimizer step taken by a fresh AdamW with lr 0 (it allocates the state and
      changes no weight).

    Leaves no gradient behind and draws no random number the training used.
    """
    micro = torch.arange(min(micro_batch, len(train)))
    model.zero_grad(set_to_none=True)
    model.train()

    def loss() -> torch.Tensor:
        return task_loss(*forward(model, train, micro, device), regression)

    train_flops = costs.count_flops(lambda: loss().backward())
    model.zero_grad(set_to_none=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    phases = costs.phase_memory(model, loss, torch.optim.AdamW(trained, lr=0.0, weight_decay=0.0))
    model.zero_grad(set_to_none=True)
    model.eval()
    inputs, _ = validation.batch(torch.arange(min(eval_batch, len(validation))), device)
    with torch.no_grad():
        inference_flops = costs.count_flops(lambda: model(**inputs))
        timing = costs.latency(lambda: model(**inputs), warmup=1, repeats=LATENCY_REPEATS)
    n = len(inputs["input_ids"])
    return {"flops": {"train_micro_batch": train_flops, "train_examples": len(micro), "inference_batch":
                      inference_flops, "inference_examples": n, "source": "torch.utils.flop_counter"},
            "latency": timing | {"examples": n, "device": device_description(device)},
            "phases": phases | {"examples": len(micro)}}


def build_caches(params: RunParams, model: nn.Module, backbone, encoded: dict[str, Encoded], data_info: dict,
                 batch_size: int, device: torch.device, progress: bool) -> dict:
    """Hidden-state caches for every split when the method can train from them (``forward_features``).

    Returns what the record says about it: mode, dtype, bytes, seconds spent filling.
    """
    if params.cache == "off" or not hasattr(model, "forward_features"):
        return {"mode": "off"}
    from readlib.report import OUTPUT_DIR

    # text-to-text evaluation generates (the decoder input changes), so only training reads a cache there
    splits = {name: split for name, split in encoded.items() if name == "train" or not split.text_to_text}
    layouts = {
        name: model.cache_layout(split) if hasattr(model, "cache_layout")
        else {"phi": ([len(ids) for ids in split.input_ids], backbone.num_layers, backbone.hidden_size)}
        for name, split in splits.items()
    }
    needed = sum(cache.layout_bytes(layout, params.cache_dtype) for layout in layouts.values())
    cache.check_fits(needed, params.cache, OUTPUT_DIR / "cache")  # all splits, before the first backbone pass
    start, total = time.time(), 0
    for name, split in splits.items():
        key = cache.cache_key(
            backbone=params.backbone, source=backbone.source, weights_seed=None if backbone.pretrained else params.seed,
            layers=backbone.num_layers, tokenizer=backbone.tokenizer.name_or_path, vocab=len(backbone.tokenizer),
            task=params.task, split=name, data=data_info, max_length=params.max_length, dtype=params.cache_dtype,
            formulation=backbone.kind,
        )
        caches = cache.build_set(model, split, layouts[name], batch_size, device, params.cache, params.cache_dtype,
                                 OUTPUT_DIR / "cache" / key, progress)
        split.cache = caches if len(caches) > 1 else caches["phi"]
        total += split.cache.nbytes
    return {"mode": params.cache, "dtype": params.cache_dtype, "bytes": total, "seconds": time.time() - start}


def fit(params: RunParams, progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train and evaluate one run; return its result record (see README "Result record")."""
    start = time.time()
    params.validate()
    task = data.get_task(params.task)
    splits, data_info = data.load_task(
        params.task, params.data_dir, params.split_seed, params.max_train, params.max_eval
    )  # data problems surface here, before any model is loaded
    set_seed(params.seed)
    procs = processes(params.device)
    device = procs.device if procs.num_processes > 1 else resolve_device(params.device)
    backbone = backbones.load(params.backbone, seed=params.seed, text_to_text=params.text_to_text)
    model = methods.build(params.method, backbone, task.num_labels, params.method_args).to(device)
    trainable, total = methods.count_parameters(model)
    eos_id = backbone.eos_id if backbone.kind == "seq2seq" else None
    encoded = {name: Encoded(ds, backbone.tokenizer, task, params.max_length, eos_id) for name, ds in splits.items()}
    train, eval_batch = encoded["train"], 2 * params.micro_batch_size
    cache_info = build_caches(params, model, backbone, encoded, data_info, eval_batch, device, progress)

    def predictions(split: str):
        return predict(model, encoded[split], eval_batch, device, task, backbone.tokenizer, eos_id)

    lr = params.learning_rate
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=params.weight_decay)
    order = torch.Generator().manual_seed(params.seed)
    history: list[dict] = []
    best_score, best_state, best_val, bad_epochs, status = -math.inf, None, None, 0, "ok"
    epochs = tqdm(
        range(1, params.max_epochs + 1), desc=f"{params.method} on {params.task}", disable=not progress
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    activation_bytes = None
    with costs.EnergyMeter(params.energy_interval) as energy:  # training and validation, as READ Table 1
        for epoch in epochs:
            model.train()
            epoch_start, losses = time.time(), []
            perm = torch.randperm(len(train), generator=order)
            steps = perm.split(params.batch_size)
            for step in tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not progress):
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                micros = step.split(params.micro_batch_size)
                for micro in micros[procs.process_index::procs.num_processes]:  # this process's share of the step
                    # the activations one micro-batch stores, counted once (memory breakdown of the record)
                    with costs.SavedTensorMeter(model) if activation_bytes is None else nullcontext() as meter:
                        logits, labels = forward(model, train, micro, device)
                        loss = task_loss(logits, labels, task.is_regression) * (len(micro) / len(step))
                    activation_bytes = meter.bytes if activation_bytes is None else activation_bytes
                    loss.backward()
                    step_loss += loss.item()
                if procs.num_processes > 1:
                    step_loss = sum_over_processes(trained, step_loss, device)
                if not math.isfinite(step_loss):
                    status = f"stopped: non-finite training loss at epoch {epoch}"
                    break
                optimizer.step()
                losses.append(step_loss)
            if status != "ok":
                break
            val_pred = predictions("validation")
            val = compute_metrics(params.task, val_pred, encoded["validation"].labels.numpy())
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_score": val["score"],
                   "seconds": time.time() - epoch_start}
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            epochs.set_postfix(loss=f"{row['train_loss']:.4f}", val=f"{val['score']:.4f}")
            if val["score"] > best_score:
                best_score, best_val, bad_epochs = val["score"], val, 0
                best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            else:
                bad_epochs += 1
                if bad_epochs >= params.patience:
                    break

    memory = costs.training_memory(model, optimizer, activation_bytes or 0, params.micro_batch_size, device)
    measured = step_costs(model, train, encoded["validation"], params.micro_batch_size, eval_batch, device,
                          task.is_regression)
    memory["phases"] = measured.pop("phases")
    test = None
    if best_state is not None:  # evaluate the best validation checkpoint on test
        model.load_state_dict(best_state, strict=False)
        test_pred = predictions("test")
        test = compute_metrics(params.task, test_pred, encoded["test"].labels.numpy())
    baseline = {name: majority_baseline(params.task, train.labels.numpy(), encoded[name].labels.numpy())
                for name in ("validation", "test")}
    return {
        "task": params.task,
        "method": params.method,
        "method_args": dataclasses.asdict(methods.make_config(params.method, params.method_args)),
        "lr": lr,
        "seed": params.seed,
        "validation": best_val,
        "test": test,
        "majority_baseline": baseline,
        "epochs_run": len(history),
        "best_epoch": max(history, key=lambda r: r["val_score"])["epoch"] if history else None,
        "history": history,
        "status": status,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "wall_time_s": time.time() - start,
        "device": device_description(device),
        "processes": procs.num_processes,
        "energy": energy.result(),
        "memory": memory,
        **measured,
        "profile": params.profile,
        "backbone": params.backbone,
        "backbone_source": backbone.source,
        "backbone_pretrained": backbone.pretrained,
        "formulation": "text-to-text" if eos_id is not None else "classification",
        "cache": cache_info,
        "data": data_info,
        "batch_size": params.batch_size,
        "micro_batch_size": params.micro_batch_size,
        "max_length": params.max_length,
        "max_epochs": params.max_epochs,
        "patience": params.patience,
        "weight_decay": params.weight_decay,
        "git_commit": git_commit(),
        "readlib_version": readlib.__version__,
        "torch_version": torch.__version__,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
