"""Command line: a thin layer over the functions the notebooks call.

    python -m readlib train --task mrpc --method read [--profile quick] [--lr 1e-3] [--rnn lstm ...]
    python -m readlib worker --task cola [--method read,lora] [--storage URL] [--lr_rounds 32] [--seeds 3]
    python -m readlib splits

``worker`` runs the learning-rate search and seed runs of a task (every method by default) from and
into a study storage (``readlib.sweep``); start it on as many machines as you like, and again after a
crash: finished runs are never repeated. It prints one JSON line per method with the protocol's result.
``train`` prints progress to stderr and the result record as one JSON line, last, on stdout.
Options that are not run parameters are the method's hyperparameters (``--rnn``, ``--hidden``, ...).
Bad input exits with code 2 and a one-line message before any data or model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from readlib import methods, sweep
from readlib.data import split_table
from readlib.errors import ConfigError, DataNotFoundError
from readlib.params import FIELDS, RunParams, make_params
from readlib.train import fit, processes

EXIT_USAGE, EXIT_DIVERGED = 2, 1


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m readlib train", description="Train and evaluate one run.", allow_abbrev=False
    )
    hints = typing.get_type_hints(RunParams)
    def error(message: str) -> None:  # one line, exit code 2 (via main), like every other bad input
        raise ConfigError(message)

    parser.error = error
    for name in FIELDS:
        if name == "method_args":
            continue
        kind = typing.get_args(hints[name]) or (hints[name],)
        flags = [f"--{name}"] + (["--epochs"] if name == "max_epochs" else [])
        # booleans stay strings here ("false" would be True under type=bool); RunParams.validate parses them
        parser.add_argument(*flags, dest=name, type=str if kind[0] is bool else kind[0], default=None)
    return parser


def _method_args(extra: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs that are not run parameters."""
    args, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument '{token}'")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(extra):
                raise ConfigError(f"option '--{key}' needs a value")
            value, i = extra[i + 1], i + 1
        args[key.replace("-", "_")] = value
        i += 1
    return args


def train(argv: list[str]) -> int:
    known, extra = _train_parser().parse_known_args(argv)
    overrides = {k: v for k, v in vars(known).items() if v is not None}
    params = make_params(overrides.pop("profile", "default"), method_args=_method_args(extra), **overrides)
    record = fit(params)
    if record.get("processes", 1) > 1 and not processes(params.device).is_main_process:
        return 0  # data-parallel run (accelerate launch): the first process reports
    print(json.dumps(record), flush=True)
    if record["status"] != "ok":
        print(f"readlib: {record['status']} (finished epochs are kept in the record)", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def worker(argv: list[str]) -> int:
    parser = _train_parser()
    parser.prog = "python -m readlib worker"
    parser.description = "Work on the learning-rate search and seed runs of one task (readlib.sweep)."
    for name, kind, default in (("lr_rounds", int, None), ("seeds", int, None), ("storage", str, None),
                                ("heartbeat", int, 30), ("prune", str, "false")):
        parser.add_argument(f"--{name}", type=kind, default=default)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would draw its own trials: collectives hang
        raise ConfigError("worker runs in one process (one worker per GPU: CUDA_VISIBLE_DEVICES=N python -m readlib "
                          "worker ...); for one run on several GPUs use torchrun/accelerate launch with 'train'")
    known, extra = parser.parse_known_args(argv)
    opts = vars(known)
    worker_opts = {k: opts.pop(k) for k in ("lr_rounds", "seeds", "storage", "heartbeat", "prune")}
    overrides = {k: v for k, v in opts.items() if v is not None}
    task, profile = overrides.pop("task", None), overrides.pop("profile", "default")
    if task is None:
        raise ConfigError("worker needs --task")
    names = sweep.select_methods(overrides.pop("method", "all"), task, profile, **overrides)
    method_args = _method_args(extra)
    if method_args and len(names) > 1:
        raise ConfigError(f"method hyperparameters ({', '.join(method_args)}) need a single --method")
    backbone, prune = overrides.pop("backbone", None), methods.coerce("prune", worker_opts["prune"], bool)
    specs = [sweep.SweepSpec(task, name, profile, backbone, method_args, overrides, worker_opts["lr_rounds"],
                             worker_opts["seeds"], prune) for name in names]
    for spec in specs:  # every input problem before the first run
        spec.check()
    for spec in specs:
        def done(label: str, method: str = spec.method) -> None:
            print(f"readlib: {method}: {label} done", file=sys.stderr)

        ran = sweep.run_worker(spec, worker_opts["storage"], worker_opts["heartbeat"], progress=True, on_trial=done)
        result = sweep.summary(spec, worker_opts["storage"]) or {}
        result.pop("record", None)
        print(json.dumps({"task": spec.task, "method": spec.method, "trials_run_here": ran, **result}), flush=True)
    return 0


def splits(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m readlib splits",
                                     description="Split sizes of the paper recipe next to READ Table 5.")
    parser.parse_args(argv)
    print(split_table().to_string(index=False))
    return 0


COMMANDS = {"train": train, "worker": worker, "splits": splits}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m readlib {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataNotFoundError) as err:
        print(f"readlib: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
