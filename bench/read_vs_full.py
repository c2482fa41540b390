"""READ vs full fine-tuning on the same MiniLM batch, measured side by side in one run.

    python bench/read_vs_full.py [--batch 32] [--seq 128] [--repeats 5]

Prints, for each method, the median train-step time (forward + backward + AdamW step) and the
bytes autograd saves for backward, then READ / full ratios. Both methods see the same random batch
of full-length sequences; their steps are interleaved so machine noise hits both alike.
Targets (issue "Foundation"): time ratio <= 0.4, stored-activation ratio <= 0.2.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from readlib import backbones, methods
from readlib.costs import SavedTensorMeter


def make_step(model: torch.nn.Module, batch: dict, labels: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with SavedTensorMeter(model) as meter:
            loss = torch.nn.functional.cross_entropy(model(**batch), labels)
        loss.backward()
        optimizer.step()
        return meter.bytes

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    vocab = backbones.load("minilm").tokenizer.vocab_size
    batch = {
        "input_ids": torch.randint(1000, vocab, (args.batch, args.seq)),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
    }
    labels = torch.randint(0, 2, (args.batch,))
    steps, saved, times = {}, {}, {}
    variants = {"full": ("full", {}), "read": ("read", {}), "read/128": ("read", {"hidden": 128})}
    for name, (method, hparams) in variants.items():  # a fresh backbone each: full fine-tuning changes its weights
        model = methods.build(method, backbones.load("minilm"), 2, hparams).train()
        steps[name] = make_step(model, batch, labels)
        saved[name] = steps[name]()  # warm-up step, also the byte count (identical every step)
        times[name] = []
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    print(f"MiniLM-L6, batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} CPU threads, "
          f"median of {args.repeats} steps")
    print(f"{'method':9} {'step time (s)':>14} {'saved for backward (MiB)':>25}")
    for name in steps:
        print(f"{name:9} {statistics.median(times[name]):14.3f} {saved[name] / 2**20:25.1f}")
    for name in ("read", "read/128"):
        time_ratio = statistics.median(times[name]) / statistics.median(times["full"])
        print(f"{name} / full: time {time_ratio:.3f} (target <= 0.4), "
              f"stored activations {saved[name] / saved['full']:.3f} (target <= 0.2)")


if __name__ == "__main__":
    main()
