"""The low-data study: READ vs full fine-tuning, LoRA and BitFit on 1 %, 10 % and 100 % of the training set.

    python bench/lowdata.py [--tasks sst2,cola] [--methods read,full,lora,bitfit] [--fractions 0.01,0.1,1]
                            [--lr_rounds 3] [--seeds 3] [--max_epochs 10] [--patience 3] [--max_eval 200]
                            [--storage sqlite:///outputs/lowdata.db] [--shard 0/1] [--threads 1]

``readlib.lowdata`` as sweep studies in one storage (MiniLM, default profile: "100 %" is its 4,000-example
``max_train`` cap): runs what is not finished (a killed run resumes, a finished one is skipped, so the same command
completes a study and then only prints), then prints the table (scores in points, epochs and cumulative training
FLOPs to each run's best validation epoch) and the verdict, and writes the compute figure per task (every run of
the study, dashed by training-set size; outputs/figures/lowdata_compute_<task>.png). ``--shard i/n``: n
processes with the same command and i = 0..n-1 share the work (each takes every n-th experiment first, then helps
with the rest). One intra-op thread per process by default: on a shared 2-core machine two OpenMP threads
spin-waiting on each other made MiniLM training 10x slower.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from readlib import lowdata, report, sweep
from readlib.errors import ConfigError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,cola")
    parser.add_argument("--methods", default=",".join(lowdata.METHODS))
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in lowdata.FRACTIONS))
    parser.add_argument("--profile", default="default")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--lr_rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3, help="seeds below 100 %% (1 at 100 %%)")
    parser.add_argument("--max_epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max_eval", type=int, default=200, help="validation and test examples each")
    parser.add_argument("--storage", default="sqlite:///outputs/lowdata.db")
    parser.add_argument("--shard", default="0/1", help="i/n: this process's share of n")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no_run", action="store_true", help="only print what the storage holds")
    args = parser.parse_args()

    index, _, count = args.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    if args.storage.startswith("sqlite:///"):
        Path(args.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    study = lowdata.specs(args.tasks.split(","), args.methods.split(","),
                          [float(f) for f in args.fractions.split(",")], args.profile, args.lr_rounds, args.seeds,
                          args.max_epochs, args.patience, max_eval=args.max_eval, backbone=args.backbone)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not args.no_run:
        mine = study[int(index)::int(count)]
        ran = lowdata.run(mine + [s for s in study if s not in mine], args.storage,
                          on_trial=lambda what: print(f"[{time.perf_counter() - start:7.0f} s] {what}", flush=True))
        print(f"{ran} runs in {time.perf_counter() - start:.0f} s")

    table = lowdata.table(study, args.storage)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.to_string(index=False, formatters={"lr": "{:.2e}".format, "flops_to_best": "{:.3g}".format},
                              float_format="{:.2f}".format))
    print()
    print(lowdata.verdict(table))
    curves = report.compute_curves([r for spec in study for r in sweep.records(spec, args.storage)])
    for task in sorted(set(curves["task"])):
        print(report.save_figure(report.compute_figure(curves, task), f"lowdata_compute_{task}"))


if __name__ == "__main__":
    main()
