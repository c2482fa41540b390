"""GPU-hours of the paper profile's whole protocol per task and method, estimated from counted FLOPs.

    python bench/paper_cost.py                                  # A100 bf16 peak (312 TFLOP/s) at 40 %
    python bench/paper_cost.py --tflops 989 --utilization 0.35 --expected_epochs 6 --target 3

Nothing here runs on a GPU: FLOPs are counted, the throughput is assumed. Assumptions and units:

- FLOPs (floating-point operations; a multiply-add is 2) are counted by ``readlib.costs.count_flops``
  (``torch.utils.flop_counter``: matmuls and attention; element-wise ops, norms, softmax, the loss and the optimizer
  step are not counted) on ``random-t5-base``, T5-base's architecture built on the meta device (FLOPs depend only
  on shapes; meta counts equal counts on real tensors), text-to-text as in the paper. Every example is counted at
  ``--seq`` source tokens (default: the profile's ``max_length``, 128; an upper bound, as batches are padded to
  their longest example) and ``--target`` target tokens, end-of-sequence included (default 2: a label of one
  SentencePiece token, as a class index is; STS-B scores such as "3.8" and class names such as "not_entailment"
  take more).
- One run: E epochs over the training split (forward and backward); the validation split scored before training
  and after every epoch (E + 1 times); the test split scored once. Scoring is greedy decoding of ``--target`` steps,
  and ``readlib.train.greedy_decode`` keeps no key/value cache: step t is a full forward pass with a decoder prefix
  of t tokens, so a scored example costs the sum of forward passes at prefix lengths 1..target.
- ``read`` trains from its hidden-state cache: the backbone pass over the training split once per run (filling the
  cache), the side network (RNNs, joiner, frozen LM head) forward and backward every epoch. Scoring runs the whole
  model (text-to-text scoring generates, so only training reads the cache). ``read (cache off)`` is the paper
  profile's own setting (``cache: "off"``): the backbone pass every epoch. With ``--cache disk`` all runs of a task
  share one cache (its key has no seed for pretrained weights), so the backbone pass is once per task instead.
- Runs per task and method: ``lr_rounds + seeds - 1`` from the profile's ``sweep:`` block, 32 + 3 - 1 = 34 (the
  seed-0 run at the best learning rate is the search trial itself, docs/sweep.md; READ Section 3.3 read as 32
  search runs and 3 more seed runs would be 35, 3 % more). Concurrent workers can add up to one search trial each.
- Epochs: the profile's ``max_epochs`` (30), the upper bound; and ``--expected_epochs`` (default 10), an assumed
  typical early stop (patience 1), not a measurement.
- Examples: ``readlib.data.paper_split_sizes`` (READ Section 3.2 splits of the official GLUE sizes) for the seven
  tasks of READ Table 1.
- Throughput: ``--tflops`` (peak dense TFLOP/s; default 312, an A100's bf16 tensor peak) x ``--utilization``
  (sustained fraction of the peak, default 0.4), the same for every method (READ's and LST's small side-network
  matmuls likely run at a lower fraction, so their hours are optimistic). V100 (125 TFLOP/s fp16 tensor peak, the
  paper's GPU) at the same utilization is the last row. Both peaks are tensor-core peaks of 16-bit matmuls: runs
  with ``--precision bf16`` (fp16 on a V100); fp32 matmuls peak at 19.5 TFLOP/s on an A100, 16x slower.
  GPU-hours = FLOPs / (TFLOP/s x 1e12 x utilization) / 3600 s; N data-parallel GPUs divide the wall time, not the
  GPU-hours.

Output, printed and written to ``outputs/tables/`` (CSV, Markdown, LaTeX): ``paper_cost_gflop`` (GFLOP per example
per method: training per epoch, READ's cache fill per run, one scoring pass) and ``paper_cost_hours_<E>_epochs``
(GPU-hours per task and method for E = max_epochs and expected_epochs; a total per method, the same on a V100, and
a column "7 methods" over the seven methods with READ from its cache).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from readlib import costs, data, paper, params, scaling
from readlib.report import write_table

BACKBONE = "random-t5-base"
METHODS = ("full", "read", "lora", "adapter", "bitfit", "prompt", "lst")
READ_NO_CACHE = "read (cache off)"
BATCH = 4  # examples per counted pass; on the meta device a batch costs no memory, and FLOPs are linear in it
V100_TFLOPS = 125.0  # fp16 tensor-core peak, dense


def meta_batch(batch: int, seq: int, target: int) -> dict[str, torch.Tensor]:
    """A text-to-text batch on the meta device: ``batch`` x ``seq`` real source tokens, ``target`` decoder tokens."""
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "decoder_input_ids": torch.zeros(batch, target, dtype=torch.long, device="meta")}


def method_flops(method: str, backbone: str, seq: int, target: int) -> dict[str, dict[str, float]]:
    """FLOPs per example of ``method`` on ``backbone``: ``train`` (one epoch's forward and backward), ``once`` (per
    run: READ's cache fill, else 0) and ``score`` (greedy decoding of ``target`` tokens). READ gives two entries:
    ``read`` (from the cache) and ``read (cache off)``; every other method one."""
    with scaling.shape_only_forward():
        model, run, loss = scaling.meta_step(method, backbone, BATCH, seq, target)
        train = costs.count_flops(lambda: loss(run()).backward())
        model.eval()
        with torch.no_grad():  # step t of greedy decoding: source and a t-token prefix, through the whole model
            score = sum(costs.count_flops(lambda t=t: model(**meta_batch(BATCH, seq, t))) for t in range(1, target + 1))
        out = {method: {"train": train / BATCH, "once": 0.0, "score": score / BATCH}}
        if method == "read":
            inputs = meta_batch(BATCH, seq, target)
            once = costs.count_flops(lambda: model.cached_states(**inputs))  # Algorithm 1, line 2
            phi_e, phi_d, sigma = model.cached_states(**inputs)
            model.train()
            mask = inputs["attention_mask"]
            side = costs.count_flops(lambda: loss(model.adapt(phi_e, phi_d, sigma, mask)).backward())  # every epoch
            out = {"read": {"train": side / BATCH, "once": once / BATCH, "score": score / BATCH},
                   READ_NO_CACHE: out["read"]}
    return out


def gpu_hours(flops_per_example: float, examples: int, epochs: int, runs: int, tflops: float) -> float:
    """Hours of one GPU sustaining ``tflops`` TFLOP/s to process ``examples`` examples ``epochs`` times in each of
    ``runs`` runs, at ``flops_per_example`` FLOPs each."""
    return flops_per_example * examples * epochs * runs / (tflops * 1e12) / 3600


def task_hours(flops: dict[str, float], sizes: dict[str, int], epochs: int, runs: int, tflops: float) -> float:
    """GPU-hours of ``runs`` runs of ``epochs`` epochs on one task (split ``sizes``): training, the cache fill,
    validation scored E + 1 times, test once."""
    return (gpu_hours(flops["train"], sizes["train"], epochs, runs, tflops)
            + gpu_hours(flops["once"], sizes["train"], 1, runs, tflops)
            + gpu_hours(flops["score"], sizes["validation"], epochs + 1, runs, tflops)
            + gpu_hours(flops["score"], sizes["test"], 1, runs, tflops))


def hours_table(flops: dict[str, dict[str, float]], epochs: int, runs: int, peak: float, utilization: float
                ) -> pd.DataFrame:
    """GPU-hours per task (rows) and method (columns) at ``utilization`` of ``peak`` TFLOP/s; a ``total`` row, the
    same total on a V100 at the same utilization, and a column over the seven methods (READ from its cache)."""
    rows = [{"task": task, **{m: task_hours(f, data.paper_split_sizes(task), epochs, runs, peak * utilization)
                              for m, f in flops.items()}} for task in paper.TABLE1_TASKS]
    table = pd.DataFrame(rows)
    total = table[list(flops)].sum()
    table.loc[len(table)] = {"task": "total", **total}
    table.loc[len(table)] = {"task": "total on V100", **total * peak / V100_TFLOPS}
    table["7 methods"] = table[list(METHODS)].sum(axis=1)
    return table


def main() -> None:
    profile, sweep = params.load_profile("paper"), params.load_sweep("paper")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=312.0, help="peak dense TFLOP/s of the GPU (A100 bf16)")
    parser.add_argument("--utilization", type=float, default=0.4, help="sustained fraction of the peak")
    parser.add_argument("--expected_epochs", type=int, default=10, help="assumed typical early stop")
    parser.add_argument("--seq", type=int, default=profile["max_length"], help="source tokens per example")
    parser.add_argument("--target", type=int, default=2, help="target tokens per example, end-of-sequence included")
    args = parser.parse_args()
    runs = sweep["lr_rounds"] + sweep["seeds"] - 1  # seed 0 of the seed phase is the best search trial

    flops = {}
    for method in METHODS:
        flops |= method_flops(method, BACKBONE, args.seq, args.target)
    gflop = pd.DataFrame([{"method": m, "train_GFLOP": f["train"] / 1e9, "once_per_run_GFLOP": f["once"] / 1e9,
                           "score_GFLOP": f["score"] / 1e9} for m, f in flops.items()])
    shape = f"T5-base, {args.seq} source and {args.target} target tokens"
    print(f"GFLOP per example ({shape}): training per epoch, once per run, one scoring pass")
    print(gflop.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    write_table(gflop, "paper_cost_gflop", f"GFLOP per example, {shape}: training (forward and backward, per epoch), "
                "READ's cache fill (per run), one scoring pass (greedy decoding)")

    for epochs in (profile["max_epochs"], args.expected_epochs):
        table = hours_table(flops, epochs, runs, args.tflops, args.utilization)
        caption = (f"GPU-hours of the paper profile, {runs} runs per task and method, {epochs} epochs each "
                   f"({'the maximum' if epochs == profile['max_epochs'] else 'assumed early stop'}), {shape}, "
                   f"{args.utilization:.0%} of {args.tflops:g} TFLOP/s (V100: of {V100_TFLOPS:g})")
        print(f"\n{caption}")
        print(table.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
        paths = write_table(table, f"paper_cost_hours_{epochs}_epochs", caption)
        print(f"written: {paths['csv']} (and .md, .tex)")


if __name__ == "__main__":
    main()
