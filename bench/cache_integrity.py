"""What checking a disk cache costs: opening and verifying a complete hidden-state cache vs rebuilding it.

    python bench/cache_integrity.py [--task sst2] [--profile default] [--repeats 3]

Builds the disk caches a READ run of the profile fills (train, validation, test; MiniLM) under a temporary output
folder, timing the backbone pass that fills them (what a damaged cache costs to rebuild), then opens them again
``--repeats`` times: each open re-reads every block of ``states.npy`` and compares its xxh3 checksum. Reads come
from the page cache when the files were just written (the usual case: the same machine, soon after); the first
open after a reboot reads the disk, at the disk's speed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import readlib.paths
from readlib import cache
from readlib.params import make_params
from readlib.train import build_caches, build_model, load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        readlib.paths.OUTPUT_DIR = Path(out)
        params = make_params(args.profile, task=args.task, method="read", cache="disk")
        task, raw, info = load_data(params)
        run = build_model(params, task, raw, info)
        start = time.perf_counter()
        built = build_caches(run, progress=True)
        build_s = time.perf_counter() - start
        folders = sorted(Path(out, "cache").iterdir())
        opens = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for name, split in run.splits.items():
                reopened = cache.HiddenStateCache(list(map(len, split.input_ids)), *split.cache.states.shape[1:],
                                                  params.cache_dtype, split.cache.path)
                assert reopened.complete, f"{name}: the cache did not verify"
            opens.append(time.perf_counter() - start)
    verify_s = statistics.median(opens)
    gib = built["bytes"] / 2**30
    print(f"{args.task}, profile {args.profile}: {len(folders)} caches, {built['bytes']:,} bytes ({gib:.2f} GiB), "
          f"{sum(len(s) for s in run.splits.values()):,} examples")
    print(f"build (backbone pass + write + checksums): {build_s:.1f} s")
    print(f"open + verify every block (median of {args.repeats}): {verify_s:.2f} s ({gib / verify_s:.2f} GiB/s)")
    print(f"verify / rebuild: {verify_s / build_s:.4f}")


if __name__ == "__main__":
    main()
