"""Every fine-tuning method on the same batch, measured side by side in one run, as ratios to full fine-tuning.

    python bench/methods.py                                          # MiniLM, batch 32 x 128 tokens, every method
    python bench/methods.py --methods full,read,read:hidden=128      # chosen variants (method:key=value,...)
    python bench/methods.py --methods full,full+gc,lora,lora+gc,read,read:hidden=128   # +gc: with checkpointing
    python bench/methods.py --backbone random-t5-base --batch 8 --seq 128 --target 4 --repeats 3 \\
        --methods full,read,read:hidden=128

A variant is ``method[+gc][:key=value,...]``; ``+gc`` trains it with gradient checkpointing of the backbone's
layers (``readlib.methods.enable_gradient_checkpointing``; methods that back-propagate through the backbone only),
e.g. ``lora+gc:rank=8``.

For each variant: the median train-step time (forward + backward + AdamW step, seconds), the bytes autograd
saves for backward (stored activations, ``readlib.costs.SavedTensorMeter``; parameters excluded), the peak
training memory of each phase of a step (``readlib.costs.phase_memory``, MiB: the weights; the forward with its
stored activations; backward, whose peak holds the activations not yet freed, the gradients and backward's
transient buffers; the AdamW step, which adds the optimizer state to the gradients) and the peak over the phases,
and the trainable parameters; time, saved bytes, peak and parameters are also divided by full fine-tuning's. All
variants see the same random batch of full-length sequences; their steps are interleaved so machine noise hits
them alike. The phase memory is measured once per variant, on a fresh optimizer, outside the timed steps (on CPU
it counts the storages alive, ``readlib.costs.LiveBytes``, which slows the step it watches). The table is also
written to ``outputs/tables/bench_methods_<backbone>_<batch>x<seq>.{csv,md,tex}``.

Without ``--methods``: every registered method at its defaults, plus READ GRU/128 (on MiniLM, 128/384 is the
RNN-to-model width ratio of the paper's GRU/256 on T5-base), full fine-tuning and LoRA with gradient
checkpointing, selective fine-tuning at k = 4 and 64 and with LoRA (rank 32). A variant that does not apply to
the backbone (e.g. selective fine-tuning on a T5 encoder–decoder) is listed with its reason. T5 backbones run
text-to-text with ``--target`` decoder tokens; ``random-t5-*`` are the real architectures with random weights
(time and memory depend only on shapes).

Targets, as ratios to full fine-tuning: READ on MiniLM time <= 0.4 and bytes <= 0.2; READ on T5-base time <= 0.5
and bytes <= 0.1; selective (k = 16) bytes <= 0.25 and LST bytes <= 0.3. Against gradient checkpointing, the
memory saving a user would pick instead of READ (MiniLM, 32 x 128): READ's peak training memory below full+gc's
and lora+gc's, and READ's step faster than both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import pandas as pd
import torch

from readlib import backbones, methods
from readlib.costs import SavedTensorMeter, phase_memory
from readlib.errors import ConfigError
from readlib.report import write_table
from readlib.train import task_loss

GC = "+gc"  # after the method name: trained with gradient checkpointing
SHOWN_PHASES = ("weights", "forward", "backward", "optimizer")  # readlib.costs.PHASES less inference's
EXTRA_VARIANTS = ["full+gc", "lora+gc", "read:hidden=128", "lst:recompute_attention=false", "selective:k=4",
                  "selective:k=64", "selective:lora_rank=32"]


def default_variants() -> list[str]:
    return list(methods.METHODS) + [
        v for v in EXTRA_VARIANTS if v.partition(":")[0].removesuffix(GC) in methods.METHODS
    ]


def parse(spec: str) -> tuple[str, dict[str, str], bool]:
    """'method[+gc][:key=value,...]' -> (method, {key: value}, gradient checkpointing), checked before any model
    is built."""
    name, sep, rest = spec.partition(":")
    method, hparams = methods.parse_variant(name.removesuffix(GC) + sep + rest)
    if name.endswith(GC):
        methods.check_checkpointing(method)
    return method, hparams, name.endswith(GC)


def make_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], int]:
    """A closure running one training step; returns the bytes saved for backward during it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with SavedTensorMeter(model) as meter:
            value = loss()
        value.backward()
        optimizer.step()
        return meter.bytes

    return step


def phase_peaks(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Peak bytes of each phase of one training step with a fresh AdamW (``readlib.costs.phase_memory``); the
    gradients it leaves are cleared."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    peaks = phase_memory(model, loss, optimizer)["peak"]
    model.zero_grad(set_to_none=True)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128, help="source tokens per example")
    parser.add_argument("--target", type=int, default=4, help="decoder tokens per example (T5 only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default="", help="comma-separated variants; default: all (see above)")
    args = parser.parse_args()
    specs = args.methods.split(",") if args.methods else default_variants()
    specs = ["full"] + [s for s in specs if s != "full"]  # the reference of every ratio
    variants = {spec: parse(spec) for spec in specs}

    torch.manual_seed(0)
    probe = backbones.load(args.backbone)
    batch = {
        "input_ids": torch.randint(1000, probe.tokenizer.vocab_size, (args.batch, args.seq)),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
    }
    labels = torch.randint(0, 2, (args.batch,))
    if probe.formulation == "text-to-text":
        labels = torch.randint(1000, probe.tokenizer.vocab_size, (args.batch, args.target))
        batch["decoder_input_ids"] = torch.cat([torch.zeros(args.batch, 1, dtype=torch.long), labels[:, :-1]], 1)
    del probe
    steps, rows, skipped = {}, {}, {}
    # a fresh backbone each: several methods change it in place
    for spec, (method, hparams, checkpointing) in variants.items():
        try:
            model = methods.build(method, backbones.load(args.backbone), 2, hparams).train()
        except ConfigError as err:
            skipped[spec] = str(err)
            continue
        if checkpointing:
            methods.enable_gradient_checkpointing(method, model)

        def loss(model=model) -> torch.Tensor:
            return task_loss(model(**batch), labels, regression=False)

        trainable, _ = methods.count_parameters(model)
        peaks = phase_peaks(model, loss)
        steps[spec] = make_step(model, loss)
        rows[spec] = {"variant": spec, "trainable_params": trainable, "peaks": peaks, "saved_bytes": steps[spec](),
                      "times": []}
    for _ in range(args.repeats):  # the warm-up step above also gave the byte count (the same every step)
        for spec, step in steps.items():
            start = time.perf_counter()
            step()
            rows[spec]["times"].append(time.perf_counter() - start)

    full = rows["full"]
    full_time = statistics.median(full["times"])
    table = pd.DataFrame([
        {
            "variant": row["variant"],
            "step_s": statistics.median(row["times"]),
            "step_vs_full": statistics.median(row["times"]) / full_time,
            "saved_MiB": row["saved_bytes"] / 2**20,
            "saved_vs_full": row["saved_bytes"] / full["saved_bytes"],
            **{f"{phase}_peak_MiB": row["peaks"][phase] / 2**20 for phase in SHOWN_PHASES},
            "peak_MiB": max(row["peaks"].values()) / 2**20,
            "peak_vs_full": max(row["peaks"].values()) / max(full["peaks"].values()),
            "trainable_params": row["trainable_params"],
            "params_vs_full": row["trainable_params"] / full["trainable_params"],
        }
        for row in rows.values()
    ])
    shape = f"batch {args.batch} x {args.seq} tokens" + (f" -> {args.target}" if "decoder_input_ids" in batch else "")
    print(f"{args.backbone}, {shape}, {torch.get_num_threads()} CPU threads, median of {args.repeats} steps")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    for spec, reason in skipped.items():
        print(f"{spec}: not applicable: {reason}")
    paths = write_table(table, f"bench_methods_{args.backbone}_{args.batch}x{args.seq}",
                        f"Every method vs full fine-tuning: {args.backbone}, {shape}, {torch.get_num_threads()} CPU "
                        f"threads, median of {args.repeats} steps")
    print(f"written: {paths['csv']} (and .md, .tex)")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # bad method, variant or backbone: one line, before any model is built
        sys.exit(f"error: {err}")
