"""A READ training epoch from the hidden-state cache vs one that runs the backbone, side by side.

    python bench/cache_epoch.py [--task sst2] [--profile default] [--repeats 2]

Same model, same batches (profile's batch size and training subsample; MiniLM): the uncached epoch
runs the frozen backbone on every batch, the cached one reads φ_1..φ_N from memory. Epochs are
interleaved so machine noise hits both alike; the one-off cost of filling the cache is printed too.

The limit of the speed-up is the FLOP ratio (side network forward + backward) / (backbone forward +
side network forward + backward), counted with ``torch.utils.flop_counter`` on the first batches
(the backbone is switched to eager attention for the count: SDPA counts as zero FLOPs on CPU).
Target: a cached epoch at most 0.35x an uncached one, and within 1.3x of the FLOP limit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from readlib import backbones, cache, data, methods
from readlib.data import Encoded
from readlib.params import make_params
from readlib.train import forward, task_loss


def epoch(model, split: Encoded, batch_size: int, optimizer, regression: bool) -> float:
    """One training epoch in a fixed order; returns seconds."""
    start = time.perf_counter()
    for first in range(0, len(split), batch_size):
        optimizer.zero_grad(set_to_none=True)
        logits, labels = forward(model, split, range(first, min(first + batch_size, len(split))), torch.device("cpu"))
        task_loss(logits, labels, regression).backward()
        optimizer.step()
    return time.perf_counter() - start


def count_flops(model, split: Encoded, batch_size: int, n_batches: int, regression: bool) -> tuple[int, int]:
    """(backbone forward, side network forward + backward) FLOPs over the first ``n_batches`` batches."""
    backbone = side = 0
    for first in range(0, min(n_batches * batch_size, len(split)), batch_size):
        inputs, labels = split.batch(range(first, min(first + batch_size, len(split))), torch.device("cpu"))
        with FlopCounterMode(display=False) as counter:
            phi = model.features(**inputs)
        backbone += counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            task_loss(model.forward_features(phi, inputs["attention_mask"]), labels, regression).backward()
        side += counter.get_total_flops()
    return backbone, side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flop_batches", type=int, default=10)
    args = parser.parse_args()

    params = make_params(args.profile, task=args.task, method="read")
    spec = data.get_task(args.task)
    splits, info = data.load_task(args.task, max_train=params.max_train)
    torch.manual_seed(0)
    backbone = backbones.load("minilm")
    model = methods.build("read", backbone, spec.num_labels).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.learning_rate)
    plain = Encoded(splits["train"], backbone.tokenizer, spec, params.max_length)
    cached = Encoded(splits["train"], backbone.tokenizer, spec, params.max_length)
    start = time.perf_counter()
    cached.cache = cache.build(model, cached, backbone.num_layers, backbone.hidden_size, 2 * params.batch_size,
                               torch.device("cpu"), progress=False)
    fill = time.perf_counter() - start

    times = {"uncached": [], "cached": []}
    for _ in range(args.repeats):
        times["uncached"].append(epoch(model, plain, params.batch_size, optimizer, spec.is_regression))
        times["cached"].append(epoch(model, cached, params.batch_size, optimizer, spec.is_regression))

    backbone.model.set_attn_implementation("eager")
    backbone_flops, side_flops = count_flops(model, plain, params.batch_size, args.flop_batches, spec.is_regression)
    limit = side_flops / (backbone_flops + side_flops)

    uncached, cached_s = statistics.median(times["uncached"]), statistics.median(times["cached"])
    print(f"READ (GRU/256) on {args.task}, MiniLM, {info['sizes_used']['train']} training examples, "
          f"batch {params.batch_size}, {torch.get_num_threads()} CPU threads, median of {args.repeats} epochs")
    print(f"filling the cache: {fill:.1f} s ({cached.cache.nbytes / 2**20:.0f} MiB, float32)")
    print(f"epoch without cache: {uncached:.1f} s, from cache: {cached_s:.1f} s")
    print(f"cached / uncached epoch time: {cached_s / uncached:.3f} (target <= 0.35)")
    print(f"FLOP limit, side fwd+bwd / (backbone fwd + side fwd+bwd) over {args.flop_batches} batches: "
          f"{limit:.3f}; measured / limit: {cached_s / uncached / limit:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
