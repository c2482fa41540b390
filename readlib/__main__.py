"""Command line: a thin layer over the functions the notebooks call.

    python -m readlib train --task mrpc --method read [--profile quick] [--lr 1e-3] [--rnn lstm ...]
    python -m readlib splits

``train`` prints progress to stderr and the result record as one JSON line, last, on stdout.
Options that are not run parameters are the method's hyperparameters (``--rnn``, ``--hidden``, ...).
Bad input exits with code 2 and a one-line message before any data or model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing

from readlib.errors import ConfigError, DataNotFoundError

EXIT_USAGE, EXIT_DIVERGED = 2, 1


def _train_parser() -> argparse.ArgumentParser:
    from readlib.params import FIELDS, RunParams

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
        parser.add_argument(*flags, dest=name, type=kind[0], default=None)
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
    from readlib.params import make_params

    known, extra = _train_parser().parse_known_args(argv)
    overrides = {k: v for k, v in vars(known).items() if v is not None}
    params = make_params(overrides.pop("profile", "default"), method_args=_method_args(extra), **overrides)
    from readlib.train import fit

    record = fit(params)
    print(json.dumps(record), flush=True)
    if record["status"] != "ok":
        print(f"readlib: {record['status']} (finished epochs are kept in the record)", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def splits(argv: list[str]) -> int:
    from readlib.data import split_table

    parser = argparse.ArgumentParser(prog="python -m readlib splits",
                                     description="Split sizes of the paper recipe next to READ Table 5.")
    parser.parse_args(argv)
    print(split_table().to_string(index=False))
    return 0


COMMANDS = {"train": train, "splits": splits}


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
