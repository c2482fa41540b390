"""One run (READ Section 3.3): AdamW (constant learning rate, or LST's linear warmup and decay), a total batch split
over processes and reached by gradient accumulation, early stopping on the validation score, the best validation
checkpoint scored once on test. The validation score before any step (the step-0 score) is recorded too.

``fit`` reads as its phases: load data → build model → build caches → train epochs → measure costs →
score test → assemble record. The record says how it was produced (README "Result record").
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from torch import nn
from tqdm.auto import tqdm

import readlib
from readlib import backbones, cache, checkpoint, costs, data, methods, paths, quantize
from readlib.data import Encoded, TaskSpec
from readlib.metrics import compute_metrics, majority_baseline
from readlib.params import RunParams, run_id

LATENCY_REPEATS = 3  # timed inference batches per run, after one warm-up


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def processes(device: str) -> PartialState:
    """accelerate's view of this run: one process, or one of several started by ``accelerate launch``/``torchrun``."""
    return PartialState(cpu=device == "cpu")


def sum_over_processes(trained: list[nn.Parameter], step_loss: float, device: torch.device) -> float:
    """Data parallelism: sum the gradients (and the step loss) of every process's share of the step.

    Each process's loss is already weighted by its examples' share of the step, so the sum is exactly the
    gradient of the whole step, and every process takes the same optimizer step (what DDP does, without
    wrapping the model: methods keep their own entry points such as ``forward_features``).
    """
    for p in trained:
        p.grad = reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="sum")
    return reduce(torch.tensor(step_loss, device=device, dtype=torch.float64), reduction="sum").item()


def shard(n: int, procs: PartialState) -> np.ndarray:
    """This process's contiguous share of ``n`` items (all of them in a single-process run)."""
    return np.array_split(np.arange(n), procs.num_processes)[procs.process_index]


def autocast(precision: str, device: torch.device):
    """Mixed precision of forward passes (fp32 | bf16 | fp16); a no-op context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: 1 (constant), or linear warmup over ``warmup_steps`` then linear
    decay to 0 at ``total_steps`` (transformers' ``get_linear_schedule_with_warmup``, which LST's scripts use)."""
    if schedule == "constant":
        return lambda step: 1.0

    def linear(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return linear


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """HEAD of the readlib checkout, with '-dirty' when tracked files changed; 'unknown' outside git."""
    try:
        run = dict(cwd=paths.REPO_ROOT, capture_output=True, text=True, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


# ---------------------------------------------------------------- forward, loss, prediction


def forward(model: nn.Module, split: Encoded, idx, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of examples ``idx``; from the split's hidden-state cache when it has one."""
    inputs, labels = split.batch(idx, device)
    if split.cache is not None:
        masks = {k: v for k, v in inputs.items() if k.endswith("_mask")}
        return model.forward_features(split.cache.gather(idx, device), **masks), labels
    return model(**inputs), labels


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Token cross-entropy for text-to-text (3-d logits), else MSE for STS-B and cross-entropy (classes, or a
    decoder-only LM's next tokens: ``regression`` False)."""
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


@torch.no_grad()
def greedy_continue(model: nn.Module, split: Encoded, idx: list[int], steps: int, device: torch.device) -> torch.Tensor:
    """Greedy continuation of ``steps`` tokens after each example's prompt with a decoder-only method (causal-lm):
    [examples, steps] token ids."""
    generated: list[list[int]] = [[] for _ in idx]
    for _ in range(steps):
        next_ids = model(**split.prompt_batch(idx, generated, device)).argmax(-1).tolist()  # [examples]
        generated = [tokens + [t] for tokens, t in zip(generated, next_ids, strict=True)]
    return torch.tensor(generated)


def parse_generated(task: TaskSpec, tokenizer, ids: torch.Tensor, eos_id: int, references,
                    target_format: str = "lst") -> np.ndarray:
    """Labels of generated targets (cut at end-of-sequence). A string that is no valid target counts
    as wrong, as in T5's GLUE evaluation: another class than the reference, or 0.0 for STS-B."""
    out = []
    for row, ref in zip(ids.tolist(), references, strict=True):
        row = row[: row.index(eos_id)] if eos_id in row else row
        label = data.t5_label(task, tokenizer.decode(row, skip_special_tokens=True), target_format)
        if label is None:
            label = 0.0 if task.is_regression else (int(ref) + 1) % task.num_labels
        out.append(label)
    return np.array(out)


@torch.no_grad()
def predict(model: nn.Module, split: Encoded, batch_size: int, device: torch.device, task: TaskSpec,
            tokenizer=None, eos_id: int | None = None, procs: PartialState | None = None) -> np.ndarray:
    """Predictions for a whole split, in order: class ids, or scores for regression.

    Text-to-text and causal-lm splits are decoded greedily for as many tokens as their longest target has (a
    decoder-only LM reads its prompt plus what it generated so far, one full forward per token). With several
    processes (``procs``), each predicts a contiguous share of the batches and the shares are gathered in order:
    every example is in the same batch as in a single-process run, so the predictions are the same.
    """
    model.eval()
    out = []
    text_to_text = split.formulation == "text-to-text"
    steps = max(map(len, split.targets)) if split.targets is not None else 0
    starts = range(0, len(split), batch_size)
    if procs is not None and procs.num_processes > 1:
        starts = [starts[i] for i in shard(len(starts), procs)]
    for start in starts:
        idx = range(start, min(start + batch_size, len(split)))
        if split.targets is not None:
            if text_to_text:
                ids = greedy_decode(model, split.batch(idx, device)[0], split.pad_id, steps).cpu()
            else:
                ids = greedy_continue(model, split, list(idx), steps, device)
            out.append(parse_generated(task, tokenizer, ids, eos_id, split.labels[list(idx)].tolist(),
                                       split.target_format))
            continue
        logits = forward(model, split, idx, device)[0].float()
        out.append((logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).cpu().numpy())
    if procs is not None and procs.num_processes > 1:
        gathered = gather_object([np.concatenate(out) if out else None])  # one entry per process, in rank order
        out = [part for part in gathered if part is not None]  # a process with no batch (more processes than batches)
    return np.concatenate(out)


# ---------------------------------------------------------------- the phases of a run


@dataclass
class Run:
    """What the phases of one run share: its parameters, data, model and where it runs."""

    params: RunParams
    task: TaskSpec
    data_info: dict
    procs: PartialState
    device: torch.device
    backbone: backbones.Backbone
    model: nn.Module
    splits: dict[str, Encoded]  # train, validation, test

    @property
    def eval_batch(self) -> int:
        return 2 * self.params.micro_batch_size

    @property
    def eos_id(self) -> int | None:
        return self.backbone.eos_id if self.backbone.formulation != "classification" else None

    @property
    def regression(self) -> bool:
        """Whether the loss is MSE on a score (STS-B under a head); text-to-text and causal-lm predict its tokens."""
        return self.task.is_regression and self.backbone.formulation == "classification"

    def autocast(self):
        return autocast(self.params.precision, self.device)

    def predictions(self, split: str) -> np.ndarray:
        with self.autocast():
            return predict(self.model, self.splits[split], self.eval_batch, self.device, self.task,
                           self.backbone.tokenizer, self.eos_id, self.procs)

    def score(self, split: str) -> dict:
        return compute_metrics(self.params.task, self.predictions(split), self.splits[split].labels.numpy())


@dataclass
class Training:
    """What ``train_epochs`` leaves: per-epoch history, the best validation checkpoint, what training measured."""

    history: list[dict]
    best_state: dict[str, torch.Tensor] | None
    best_validation: dict | None
    status: str
    optimizer: torch.optim.Optimizer
    activation_bytes: int | None  # bytes autograd stores for one micro-batch; None before the first step
    energy: dict
    step0_validation: dict  # validation metrics of the untrained model (frozen backbone + the method's init)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # fp16 loss scaling; a no-op for fp32 and bf16
    flops: float = 0.0  # training FLOPs so far: the train split's cache fill, then every optimizer step
    flops_per_token: float | None = None  # of a training step per padded token, counted on the first step


def load_data(params: RunParams) -> tuple[TaskSpec, dict, dict]:
    """(task, raw splits, data record); data problems surface here, before any model is loaded."""
    params.validate()
    splits, info = data.load_task(params.task, params.data_dir, params.split_seed, params.max_train, params.max_eval,
                                  split_recipe=params.split_recipe)
    return data.get_task(params.task), splits, info


def build_model(params: RunParams, task: TaskSpec, raw_splits: dict, data_info: dict) -> Run:
    """Seed, choose the device, load the frozen backbone, build the method's model and tokenize the splits."""
    set_seed(params.seed)
    procs = processes(params.device)
    device = procs.device if procs.num_processes > 1 else resolve_device(params.device)
    backbone = backbones.load(params.backbone, seed=params.seed, formulation=params.formulation)
    model = methods.build(params.method, backbone, task.num_labels, params.method_args)
    quantize.quantize(backbone, params.backbone_quant, device)  # after build: LST's pruned init reads float weights
    model = model.to(device)
    if params.gradient_checkpointing:
        methods.enable_gradient_checkpointing(params.method, model)
    eos_id = backbone.eos_id if backbone.formulation != "classification" else None
    causal = backbone.formulation == "causal-lm"
    splits = {name: Encoded(ds, backbone.tokenizer, task, params.max_length, eos_id, params.target_format, causal)
              for name, ds in raw_splits.items()}
    return Run(params, task, data_info, procs, device, backbone, model, splits)


def build_caches(run: Run, progress: bool) -> dict:
    """Hidden-state caches for every split when the method trains from them; what the record says about them:
    mode, dtype, bytes, seconds spent filling."""
    params, model, backbone = run.params, run.model, run.backbone
    if params.cache == "off" or not methods.get_method(params.method).trains_from_cache:
        return {"mode": "off"}
    # text-to-text and causal-lm evaluation generates (the input changes each token), so only training reads a cache
    splits = {name: s for name, s in run.splits.items() if name == "train" or s.formulation == "classification"}
    layouts = {name: model.cache_layout(split) for name, split in splits.items()}
    needed = sum(cache.layout_bytes(layout, params.cache_dtype) for layout in layouts.values())
    cache.check_fits(needed, params.cache, paths.output("cache"))  # all splits, before the first backbone pass
    start, total = time.time(), 0
    for name, split in splits.items():
        key = cache.cache_key(
            backbone=params.backbone, source=backbone.source, weights_seed=None if backbone.pretrained else params.seed,
            layers=backbone.num_layers, tokenizer=backbone.tokenizer.name_or_path, vocab=len(backbone.tokenizer),
            task=params.task, split=name, data=run.data_info, max_length=params.max_length, dtype=params.cache_dtype,
            formulation=backbone.formulation,
            # quantized states differ from float ones; "none" stays out so float caches keep their keys
            **({"quant": params.backbone_quant} if params.backbone_quant != "none" else {}),
            tokens=cache.fingerprint(split.input_ids, split.token_type_ids, split.targets),
        )
        # a disk cache is written by the first process and opened by the others once it is complete
        first = run.procs.main_process_first() if params.cache == "disk" else nullcontext()
        with first, run.autocast():
            caches = cache.build_set(model, split, layouts[name], run.eval_batch, run.device, params.cache,
                                     params.cache_dtype, paths.output("cache", key), progress)
        split.cache = caches if len(caches) > 1 else caches["phi"]
        total += split.cache.nbytes
    return {"mode": params.cache, "dtype": params.cache_dtype, "bytes": total, "seconds": time.time() - start,
            "fill_flops": run.splits["train"].cache.fill_flops}


def micro_batches(step: torch.Tensor, procs: PartialState, micro_batch_size: int, process: int | None = None):
    """The micro-batches one optimizer step is computed in: the step's examples split over the processes (a contiguous
    share each), each share in micro-batches of ``micro_batch_size``; only process ``process``'s when given."""
    shares = np.array_split(np.arange(len(step)), procs.num_processes)
    for rank, share in enumerate(shares):
        if process is None or rank == process:
            yield from step[torch.from_numpy(share)].split(micro_batch_size)


def step_tokens(run: Run, step: torch.Tensor, process: int | None = None) -> int:
    """Padded token positions of one optimizer step, over all processes (or one)."""
    split = run.splits["train"]
    return sum(split.padded_tokens(micro) for micro in micro_batches(step, run.procs, run.params.micro_batch_size,
                                                                      process))


def train_step(run: Run, step: torch.Tensor, trained: list[nn.Parameter], meter: costs.SavedTensorMeter | None,
               scaler: torch.amp.GradScaler | None = None) -> float:
    """Gradients of one optimizer step: the step's examples are split over the processes (a contiguous share each),
    each share in micro-batches, every micro-batch's loss weighted by its share of the whole step, and the processes'
    gradients summed; returns the step's loss. ``meter`` (the first step only) counts the activations one
    micro-batch stores; ``scaler`` scales the loss for fp16."""
    params, step_loss = run.params, 0.0
    for micro in micro_batches(step, run.procs, params.micro_batch_size, run.procs.process_index):
        with meter if meter is not None else nullcontext(), run.autocast():
            logits, labels = forward(run.model, run.splits["train"], micro, run.device)
            loss = task_loss(logits, labels, run.regression) * (len(micro) / len(step))
        meter = None
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += loss.item()
    if run.procs.num_processes > 1:
        step_loss = sum_over_processes(trained, step_loss, run.device)
    return step_loss


def run_epoch(run: Run, optimizer: torch.optim.Optimizer, order: torch.Generator, epoch: int, out: Training,
              progress: bool) -> list[float]:
    """One epoch of optimizer steps in a seeded order; the steps' losses. Stops at a non-finite loss (``out.status``
    says so); the first step also counts the activations one micro-batch stores (``out.activation_bytes``)."""
    trained = optimizer.param_groups[0]["params"]
    steps = torch.randperm(len(run.splits["train"]), generator=order).split(run.params.batch_size)
    losses = []
    for step in tqdm(steps, desc=f"epoch {epoch}", leave=False, disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        meter = costs.SavedTensorMeter(run.model) if out.activation_bytes is None else None
        if out.flops_per_token is None:  # the first step: FLOPs counted (this process's share), per padded token
            step_loss, flops = costs.counted(train_step, run, step, trained, meter, out.scaler)
            out.flops_per_token = flops / step_tokens(run, step, run.procs.process_index)
        else:
            step_loss = train_step(run, step, trained, meter, out.scaler)
        out.flops += out.flops_per_token * step_tokens(run, step)
        if meter is not None:
            out.activation_bytes = meter.bytes
        if not math.isfinite(step_loss):
            out.status = f"stopped: non-finite training loss at epoch {epoch}"
            break
        out.scaler.step(optimizer)  # optimizer.step(), after unscaling (and skipping on inf gradients) for fp16
        out.scaler.update()
        out.scheduler.step()
        losses.append(step_loss)
    return losses


def train_epochs(run: Run, progress: bool, on_epoch: Callable[[dict], None] | None,
                 start_flops: float = 0.0) -> Training:
    """Epochs until ``max_epochs`` or ``patience`` epochs without a better validation score; a non-finite loss
    stops training, keeping what finished. Energy is metered over training and validation (READ Table 1). Each
    epoch's row has the training FLOPs so far (``start_flops``: the cache fill, then every step; see ``run_epoch``).
    The learning-rate schedule spans ``max_epochs`` (an early stop ends it before its decay is over)."""
    params, model = run.params, run.model
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=params.learning_rate, weight_decay=params.weight_decay)
    total_steps = math.ceil(len(run.splits["train"]) / params.batch_size) * params.max_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(params.lr_schedule, params.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(run.device.type, enabled=params.precision == "fp16")
    order = torch.Generator().manual_seed(params.seed)
    out = Training([], None, None, "ok", optimizer, None, {}, run.score("validation"), scheduler, scaler, start_flops)
    best_score, bad_epochs = -math.inf, 0
    epochs = tqdm(range(1, params.max_epochs + 1), desc=f"{params.method} on {params.task}", disable=not progress)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    with costs.EnergyMeter(params.energy_interval, device=run.device) as energy:  # this process's GPU only
        for epoch in epochs:
            model.train()
            epoch_start = time.time()
            losses = run_epoch(run, optimizer, order, epoch, out, progress)
            if out.status != "ok":
                break
            val = run.score("validation")
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_score": val["score"],
                   "seconds": time.time() - epoch_start, "train_flops": out.flops}
            out.history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            epochs.set_postfix(loss=f"{row['train_loss']:.4f}", val=f"{val['score']:.4f}")
            if val["score"] > best_score:
                best_score, out.best_validation, bad_epochs = val["score"], val, 0
                out.best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            else:
                bad_epochs += 1
                if bad_epochs >= params.patience:
                    break
    out.energy = energy.result()
    if run.procs.num_processes > 1:  # every process's GPU, summed (RAPL: once per machine)
        out.energy = costs.sum_energy(gather_object([out.energy]))
    return out


def step_costs(run: Run) -> dict:
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
    model, device, train, validation = run.model, run.device, run.splits["train"], run.splits["validation"]
    micro = torch.arange(min(run.params.micro_batch_size, len(train)))
    model.zero_grad(set_to_none=True)
    model.train()

    def loss() -> torch.Tensor:
        with run.autocast():
            return task_loss(*forward(model, train, micro, device), run.regression)

    train_flops = costs.count_flops(lambda: loss().backward())
    model.zero_grad(set_to_none=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    phases = costs.phase_memory(model, loss, torch.optim.AdamW(trained, lr=0.0, weight_decay=0.0))
    model.zero_grad(set_to_none=True)
    model.eval()
    inputs, _ = validation.batch(torch.arange(min(run.eval_batch, len(validation))), device)
    with torch.no_grad(), run.autocast():
        inference_flops = costs.count_flops(lambda: model(**inputs))
        timing = costs.latency(lambda: model(**inputs), warmup=1, repeats=LATENCY_REPEATS)
    n = len(inputs["input_ids"])
    return {"flops": {"train_micro_batch": train_flops, "train_examples": len(micro), "inference_batch":
                      inference_flops, "inference_examples": n, "source": "torch.utils.flop_counter"},
            "latency": timing | {"examples": n, "device": device_description(device)},
            "phases": phases | {"examples": len(micro)}}


def measure_costs(run: Run, training: Training) -> dict:
    """The record's ``memory`` (training breakdown and phases), ``flops`` and ``latency``."""
    memory = costs.training_memory(run.model, training.optimizer, training.activation_bytes or 0,
                                   run.params.micro_batch_size, run.device)
    measured = step_costs(run)
    memory["phases"] = measured.pop("phases")
    return {"memory": memory, **measured}


def score_test(run: Run, training: Training) -> tuple[dict | None, dict | None]:
    """Test metrics of the best validation checkpoint and its per-example predictions next to the references
    (for bootstrap intervals over test examples); (None, None) when no epoch finished."""
    if training.best_state is None:
        return None, None
    with torch.no_grad():  # by name: a quantized backbone's modules refuse a state dict that lacks their weights
        for name, p in run.model.named_parameters():
            if name in training.best_state:
                p.copy_(training.best_state[name])
    predictions, references = run.predictions("test"), run.splits["test"].labels.numpy()
    examples = {"predictions": predictions.tolist(), "references": references.tolist()}
    return compute_metrics(run.params.task, predictions, references), examples


def assemble_record(run: Run, training: Training, measured: dict, test: dict | None, test_examples: dict | None,
                    cache_info: dict, seconds: float) -> dict:
    """The result record: scores, history, costs, and everything that produced them."""
    params, history = run.params, training.history
    trainable, total = methods.count_parameters(run.model)
    train_labels = run.splits["train"].labels.numpy()
    baseline = {name: majority_baseline(params.task, train_labels, run.splits[name].labels.numpy())
                for name in ("validation", "test")}
    return {
        "run_id": run_id(params, run.data_info.get("revision"), run.backbone.revision),
        "task": params.task,
        "method": params.method,
        "method_args": dataclasses.asdict(methods.make_config(params.method, params.method_args)),
        "lr": params.learning_rate,
        "seed": params.seed,
        "validation": training.best_validation,
        "test": test,
        "test_examples": test_examples,
        "step0_validation": training.step0_validation,
        "majority_baseline": baseline,
        "epochs_run": len(history),
        "best_epoch": max(history, key=lambda r: r["val_score"])["epoch"] if history else None,
        "history": history,
        "status": training.status,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "wall_time_s": seconds,
        "device": device_description(run.device),
        "processes": run.procs.num_processes,
        "energy": training.energy,
        **measured,
        "profile": params.profile,
        "backbone": params.backbone,
        "backbone_source": run.backbone.source,
        "backbone_pretrained": run.backbone.pretrained,
        "backbone_revision": run.backbone.revision,
        "backbone_quant": params.backbone_quant,
        "formulation": run.backbone.formulation,
        "target_format": params.target_format if run.backbone.formulation != "classification" else None,
        "cache": cache_info,
        "data": run.data_info,
        "batch_size": params.batch_size,
        "micro_batch_size": params.micro_batch_size,
        "max_length": params.max_length,
        "max_epochs": params.max_epochs,
        "patience": params.patience,
        "weight_decay": params.weight_decay,
        "lr_schedule": params.lr_schedule,
        "warmup_steps": params.warmup_steps if params.lr_schedule != "constant" else None,
        "precision": params.precision,
        "gradient_checkpointing": params.gradient_checkpointing,
        "git_commit": git_commit(),
        "readlib_version": readlib.__version__,
        "torch_version": torch.__version__,
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def save_model(run: Run, record: dict, save_dir: str | Path) -> dict:
    """Write the best checkpoint (loaded by ``score_test``) under ``save_dir`` (``readlib.checkpoint``); return the
    record's ``saved`` entry (folder, bytes on disk, trained weights' bytes). The first process writes; the others
    wait for it."""
    saved = {}
    if run.procs.is_main_process:
        meta = checkpoint.describe(run.params, run.backbone, run.task)
        saved = checkpoint.save(run.model, run.backbone, meta, record, save_dir)
    run.procs.wait_for_everyone()
    return saved


def fit(params: RunParams, progress: bool = True, on_epoch: Callable[[dict], None] | None = None,
        save_dir: str | Path | None = None) -> dict:
    """Train and evaluate one run; return its result record (see README "Result record"). ``save_dir``: also write
    the best validation checkpoint there (``readlib.checkpoint``; a run without a finished epoch writes nothing)."""
    start = time.time()
    task, raw_splits, data_info = load_data(params)
    run = build_model(params, task, raw_splits, data_info)
    cache_info = build_caches(run, progress)
    training = train_epochs(run, progress, on_epoch, cache_info.get("fill_flops", 0.0))
    measured = measure_costs(run, training)
    test, test_examples = score_test(run, training)
    record = assemble_record(run, training, measured, test, test_examples, cache_info, time.time() - start)
    if save_dir is not None and training.best_state is not None:
        record["saved"] = save_model(run, record, save_dir)
    return record
