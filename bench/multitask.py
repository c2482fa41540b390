"""K tasks for one input: K READ models sharing one backbone pass vs K LoRA models, each its own pass.

    python bench/multitask.py                        # MiniLM, K = 1, 2, 4, 8, 64 SST-2 sentences, READ GRU/128 and /256
    python bench/multitask.py --ks 1,4 --rows 128 --repeats 5

READ's side networks only read the frozen backbone's states (READ Section 2, footnote 1), so ``readlib.serve``
answers K READ tasks with one backbone forward per batch and K side networks; a LoRA model changes the backbone's
own weights, so K LoRA tasks take K backbone passes. For each K this script times ``serve.predict_many`` on the
same rows: READ GRU/128 (on MiniLM, 128/384 is the width ratio of the paper's GRU/256 to T5-base), READ GRU/256 and
LoRA (rank 32, the paper's), interleaved so that machine noise hits them alike, median of ``--repeats``, and prints
READ's time as a ratio to LoRA's. It also checks that each READ model's answers in the shared pass are the ones it
gives alone. Weights are random (side networks and adapters moved off their zero initialisation): time depends only
on shapes. The table is written to ``outputs/tables/bench_multitask_<rows>.{csv,md,tex}``.

Target: K = 4 at <= 0.4x the time of four LoRA passes with READ GRU/128.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from readlib import backbones, data, methods, serve
from readlib.report import write_table

VARIANTS = {"read GRU/128": ("read", {"rnn": "gru", "hidden": 128}), "read GRU/256": ("read", {"rnn": "gru",
            "hidden": 256}), "lora r32": ("lora", {"rank": 32})}


def build_models(variant: str, k: int, task: data.TaskSpec, shared: backbones.Backbone) -> list[serve.Model]:
    """K models of one variant with random trained weights; READ on the ``shared`` backbone, LoRA each on its own."""
    method, args = VARIANTS[variant]
    models = []
    for i in range(k):
        backbone = shared if method == "read" else backbones.load("minilm")
        net = methods.build(method, backbone, task.num_labels, args).eval()
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        meta = {"method": method, "formulation": "classification", "max_length": 128, "precision": "fp32",
                "micro_batch_size": 32, "task": task.name}
        models.append(serve.Model(Path(f"{variant}-{i}"), meta, task, net, backbone, torch.device("cpu")))
    return models


def timed(models: list[serve.Model], rows: list[dict], batch: int) -> float:
    start = time.perf_counter()
    serve.predict_many(models, rows, batch_size=batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4,8", help="numbers of tasks, comma-separated")
    parser.add_argument("--rows", type=int, default=64, help="SST-2 validation sentences answered by every model")
    parser.add_argument("--batch", type=int, default=64, help="rows per forward pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = data.get_task("sst2")
    rows = [dict(r) for r in data.load_raw("sst2")["validation"].select(range(args.rows))]
    shared = backbones.load("minilm")
    out = []
    for k in [int(x) for x in args.ks.split(",")]:
        models = {variant: build_models(variant, k, task, shared) for variant in VARIANTS}
        for variant in ("read GRU/128", "read GRU/256"):  # the shared pass answers as each model alone
            together = serve.predict_many(models[variant], rows, batch_size=args.batch)
            alone = [serve.predict_many([m], rows, batch_size=args.batch) for m in models[variant]]
            assert all([row[j] for row in together] == [row[0] for row in alone[j]] for j in range(k)), variant
        for variant in VARIANTS:  # warm-up
            timed(models[variant], rows[: args.batch], args.batch)
        times = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                times[variant].append(timed(models[variant], rows, args.batch))
        median = {variant: statistics.median(t) for variant, t in times.items()}
        lora = median["lora r32"]
        out.append({"K tasks": k, "READ GRU/128 (s)": median["read GRU/128"], "READ GRU/256 (s)": median[
            "read GRU/256"], "K LoRA passes (s)": lora, "GRU/128 / LoRA": median["read GRU/128"] / lora,
            "GRU/256 / LoRA": median["read GRU/256"] / lora, "identical to alone": True})
        print(out[-1], flush=True)
    table = pd.DataFrame(out)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    write_table(table, f"bench_multitask_{args.rows}",
                f"K tasks on {args.rows} SST-2 sentences (batch {args.batch}, MiniLM, CPU, {torch.get_num_threads()} "
                f"threads): READ answers all K with one backbone pass, LoRA with K; median of {args.repeats} "
                "interleaved repeats, seconds")


if __name__ == "__main__":
    main()
