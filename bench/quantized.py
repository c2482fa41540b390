"""READ on an int8 MiniLM backbone vs a float32 one, side by side in one run.

    python bench/quantized.py                          # sst2 and cola: step time, weight bytes, test scores
    python bench/quantized.py --tasks sst2 --no_scores # step time and weight bytes only (a few minutes)

Per task, on the real bundled MiniLM (``readlib.quantize``, run parameter ``backbone_quant``):

- step time: a READ training step *without* the hidden-state cache (backbone forward + READ forward/backward +
  AdamW step) on the same ``--batches`` training batches of the default profile's batch size, the float32 and int8
  models' steps interleaved (order alternating per repeat), each repeat's total over the batches, median of
  ``--repeats``; the ratio int8 / float32. Beside it, the backbone forward alone (the same batches, inference
  mode), the rest of the step (step - backbone forward: READ's RNN, head, backward, AdamW) and the cache fill per
  example (``readlib.cache.build`` over those batches' examples, eval batches of twice the batch size);
- weight bytes: ``readlib.quantize.weight_bytes`` of each backbone, and the ratio;
- test score: ``readlib.train.fit`` of the default profile (at most 4,000 training examples, 3 epochs, hidden-state
  cache in memory), seed 0, ``backbone_quant`` none vs int8; the difference in points (percent).

Targets: int8 step <= 0.7x float32, weight bytes <= 0.3x, test score within 1 point. Times are machine-dependent;
only the ratios measured in one run are meaningful.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from readlib import backbones, cache, data, methods, quantize
from readlib.data import Encoded
from readlib.params import make_params
from readlib.train import fit, forward, task_loss

MODES = ("none", "int8")
CPU = torch.device("cpu")


def read_model(num_labels: int, mode: str) -> tuple[torch.nn.Module, backbones.Backbone]:
    """READ (defaults) on a fresh MiniLM quantized by ``mode``; seed 0, so both modes start from the same side
    network."""
    torch.manual_seed(0)
    backbone = backbones.load("minilm")
    model = methods.build("read", backbone, num_labels)
    quantize.quantize(backbone, mode, CPU)
    return model.train(), backbone


def step(model, optimizer, split: Encoded, idx: range, regression: bool) -> float:
    """Seconds of one training step without the cache: backbone forward, READ forward and backward, AdamW."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    logits, labels = forward(model, split, idx, CPU)
    task_loss(logits, labels, regression).backward()
    optimizer.step()
    return time.perf_counter() - start


def backbone_forward(model, split: Encoded, idx: range) -> float:
    """Seconds of the backbone's forward pass alone (READ's ``features``: φ_1..φ_N of the real tokens)."""
    inputs, _ = split.batch(idx, CPU)
    start = time.perf_counter()
    model.features(**inputs)
    return time.perf_counter() - start


def speed(task: str, batches: int, repeats: int) -> dict:
    """Step, backbone-forward and cache-fill times (median seconds per repeat) and weight bytes of both modes."""
    params = make_params("default", task=task, method="read")
    spec = data.get_task(task)
    splits, _ = data.load_task(task, max_train=params.max_train)
    models = {mode: read_model(spec.num_labels, mode) for mode in MODES}
    tokenizer = models["none"][1].tokenizer
    train = Encoded(splits["train"], tokenizer, spec, params.max_length)
    n = min(batches * params.batch_size, len(train))
    chunks = [range(i, min(i + params.batch_size, n)) for i in range(0, n, params.batch_size)]
    optimizers = {mode: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=params.learning_rate)
                  for mode, (m, _) in models.items()}
    for mode, (model, _) in models.items():  # warm-up: one step each
        step(model, optimizers[mode], train, chunks[0], spec.is_regression)
    steps = {mode: [] for mode in MODES}
    forwards = {mode: [] for mode in MODES}
    for r in range(repeats):
        order = MODES if r % 2 == 0 else MODES[::-1]
        totals = {mode: 0.0 for mode in MODES}
        for idx in chunks:
            for mode in order:
                totals[mode] += step(models[mode][0], optimizers[mode], train, idx, spec.is_regression)
        for mode in MODES:
            steps[mode].append(totals[mode])
        with torch.inference_mode():
            totals = {mode: 0.0 for mode in MODES}
            for idx in chunks:
                for mode in order:
                    totals[mode] += backbone_forward(models[mode][0], train, idx)
        for mode in MODES:
            forwards[mode].append(totals[mode])
    fills = {}
    for mode, (model, backbone) in models.items():
        part = Encoded(splits["train"].select(range(n)), tokenizer, spec, params.max_length)
        start = time.perf_counter()
        cache.build(model, part, backbone.num_layers, backbone.hidden_size, 2 * params.batch_size, CPU,
                    progress=False)
        fills[mode] = (time.perf_counter() - start) / n
    return {"examples": n, "batch": params.batch_size,
            "step": {m: statistics.median(v) for m, v in steps.items()},
            "forward": {m: statistics.median(v) for m, v in forwards.items()},
            "fill": fills, "bytes": {m: quantize.weight_bytes(b.model) for m, (_, b) in models.items()}}


def scores(task: str) -> dict[str, float]:
    """Test score (percent) of a default-profile READ run, seed 0, per mode."""
    out = {}
    for mode in MODES:
        record = fit(make_params("default", task=task, method="read", backbone_quant=mode, seed=0), progress=False)
        out[mode] = 100 * record["test"]["score"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,cola")
    parser.add_argument("--batches", type=int, default=8, help="training batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_scores", action="store_true", help="skip the training runs (test scores)")
    args = parser.parse_args()

    rows = []
    for task in args.tasks.split(","):
        s = speed(task, args.batches, args.repeats)
        step_fp, step_q = s["step"]["none"], s["step"]["int8"]
        fwd_fp, fwd_q = s["forward"]["none"], s["forward"]["int8"]
        print(f"{task}: {s['examples']} examples in batches of {s['batch']}, {torch.get_num_threads()} CPU threads, "
              f"median of {args.repeats} repeats (seconds per repeat, float32 / int8)")
        print(f"  training step without cache: {step_fp:.2f} / {step_q:.2f}  ratio {step_q / step_fp:.3f}")
        print(f"  backbone forward alone:      {fwd_fp:.2f} / {fwd_q:.2f}  ratio {fwd_q / fwd_fp:.3f}")
        print(f"  rest of the step (READ fwd+bwd, AdamW): {step_fp - fwd_fp:.2f} / {step_q - fwd_q:.2f}")
        print(f"  cache fill per example: {1e3 * s['fill']['none']:.2f} / {1e3 * s['fill']['int8']:.2f} ms  "
              f"ratio {s['fill']['int8'] / s['fill']['none']:.3f}")
        print(f"  backbone weight bytes: {s['bytes']['none']:,} / {s['bytes']['int8']:,}  "
              f"ratio {s['bytes']['int8'] / s['bytes']['none']:.3f}", flush=True)
        score = {"none": float("nan"), "int8": float("nan")} if args.no_scores else scores(task)
        rows.append((task, score["none"], score["int8"], score["int8"] - score["none"], step_q / step_fp,
                     s["bytes"]["int8"] / s["bytes"]["none"]))
    print("\n| task | score fp32 | score int8 | difference (points) | step time int8/fp32 | weight bytes int8/fp32 |")
    print("|---|---|---|---|---|---|")
    for task, fp, q, diff, step_ratio, byte_ratio in rows:
        print(f"| {task} | {fp:.2f} | {q:.2f} | {diff:+.2f} | {step_ratio:.3f} | {byte_ratio:.3f} |")
    print("targets: step time <= 0.7, weight bytes <= 0.3, |difference| <= 1 point")


if __name__ == "__main__":
    main()
