"""READ vs full fine-tuning on the same batch, measured side by side in one run.

    python bench/read_vs_full.py                                   # MiniLM, batch 32 x 128 tokens
    python bench/read_vs_full.py --backbone random-t5-base --batch 8 --seq 128 --target 4 --repeats 3

Prints, for each method, the median train-step time (forward + backward + AdamW step) and the
bytes autograd saves for backward, then READ / full ratios. All methods see the same random batch
of full-length sequences; their steps are interleaved so machine noise hits them alike. READ is
measured with its default GRU/256 and with GRU/128 (Table 7 candidates; on MiniLM, 128/384 is the
RNN-to-model width ratio of the paper's final GRU/256 on T5-base, 256/768).

T5 backbones run text-to-text (encoder–decoder READ, Algorithm 1) with ``--target`` decoder tokens;
``random-t5-*`` are the real architectures with random weights (timing and memory depend only on
shapes). Targets: MiniLM time <= 0.4 and bytes <= 0.2 (issue "Foundation"); T5-base time <= 0.5 and
bytes <= 0.1 (issue "READ complete").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from readlib import backbones, methods
from readlib.costs import SavedTensorMeter
from readlib.train import task_loss


def make_step(model: torch.nn.Module, batch: dict, labels: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with SavedTensorMeter(model) as meter:
            loss = task_loss(model(**batch), labels, regression=False)
        loss.backward()
        optimizer.step()
        return meter.bytes

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128, help="source tokens per example")
    parser.add_argument("--target", type=int, default=4, help="decoder tokens per example (T5 only)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    probe = backbones.load(args.backbone)
    batch = {
        "input_ids": torch.randint(1000, probe.tokenizer.vocab_size, (args.batch, args.seq)),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
    }
    labels = torch.randint(0, 2, (args.batch,))
    if probe.kind == "seq2seq":
        labels = torch.randint(1000, probe.tokenizer.vocab_size, (args.batch, args.target))
        batch["decoder_input_ids"] = torch.cat([torch.zeros(args.batch, 1, dtype=torch.long), labels[:, :-1]], 1)
    del probe
    steps, saved, times = {}, {}, {}
    variants = {"full": ("full", {}), "read": ("read", {}), "read/128": ("read", {"hidden": 128})}
    for name, (method, hparams) in variants.items():  # a fresh backbone each: full fine-tuning changes its weights
        model = methods.build(method, backbones.load(args.backbone), 2, hparams).train()
        steps[name] = make_step(model, batch, labels)
        saved[name] = steps[name]()  # warm-up step, also the byte count (identical every step)
        times[name] = []
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    shape = f"batch {args.batch} x {args.seq} tokens" + (f" -> {args.target}" if "decoder_input_ids" in batch else "")
    print(f"{args.backbone}, {shape}, {torch.get_num_threads()} CPU threads, median of {args.repeats} steps")
    print(f"{'method':9} {'step time (s)':>14} {'saved for backward (MiB)':>25}")
    for name in steps:
        print(f"{name:9} {statistics.median(times[name]):14.3f} {saved[name] / 2**20:25.1f}")
    for name in ("read", "read/128"):
        time_ratio = statistics.median(times[name]) / statistics.median(times["full"])
        print(f"{name} / full: time {time_ratio:.3f}, stored activations {saved[name] / saved['full']:.3f}")


if __name__ == "__main__":
    main()
