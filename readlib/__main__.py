"""Command line: a thin layer over the functions the notebooks call.

    python -m readlib --help                  every command, one line each; COMMAND --help: its options
    python -m readlib train --task mrpc --method read [--profile quick] [--lr 1e-3] [--max_train null] [--rnn lstm]
    python -m readlib worker --task cola [--method read,lora] [--storage URL] [--lr_rounds 32] [--seeds 3]
    python -m readlib train ... --save_dir models/mrpc_read
    python -m readlib predict --model models/mrpc_read[,models/rte_read] --input FILE.jsonl|FILE.csv|- [--output F]
    python -m readlib report [--storage URL] [--profile default]     outputs/REPORT.md: verdicts per paper claim
    python -m readlib export --output records.csv|records.jsonl [--storage URL]
    python -m readlib splits
    python -m readlib methods [read lora ...]

``worker`` runs the learning-rate search and seed runs of a task (every method by default) from and
into a study storage (``readlib.sweep``); start it on as many machines as you like, and again after a
crash: finished runs are never repeated. It prints one JSON line per method with the protocol's result.
``train`` prints progress to stderr and the result record as one JSON line, last, on stdout.
``methods`` lists every method's hyperparameters with type, default and meaning.

Options are made from dataclasses (``add_options``): one per field, typed by its annotation, its help text the
field's ``metadata["help"]`` (RunParams in readlib/params.py, each method's Config, WorkerOptions below), so the
meaning of an option lives in one place. An option not given keeps the profile's value; ``null`` sets a field
whose type admits None to None, lifting the profile's value (``--max_train null``: the whole training split);
booleans read true/false/1/0/yes/no. Options that are not run parameters are the method's hyperparameters
(``--rnn``, ``--hidden``, ...). Bad input exits with code 2 and a one-line message before any data or model is
loaded; ``--help`` exits 0.

Built on argparse and ``dataclasses.fields`` rather than transformers' ``HfArgumentParser``: that one fills every
option not given with the dataclass default (a profile's value could not survive), has no way to say None
(``null``), reports errors as usage plus message, and importing transformers costs a second that bad input
should not wait for.

Adding a command: a function ``name(argv: list[str]) -> int`` whose docstring's first line says what it does
(``--help`` shows it), that builds its options with ``command_parser(name)`` (plus ``add_options`` for a
dataclass) and raises ConfigError for bad input; then one entry in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from readlib import checkpoint, methods, report, serve, sweep, verdict
from readlib.data import get_task, split_table
from readlib.errors import ConfigError, DataNotFoundError
from readlib.params import NULL, NULLABLE, RunParams, check_storage, make_params
from readlib.train import fit, processes

EXIT_USAGE, EXIT_DIVERGED = 2, 1
ALIASES = {"max_epochs": ["--epochs"]}


@dataclass
class WorkerOptions:
    """The options of ``worker`` that are not run parameters."""

    lr_rounds: int | None = field(default=None, metadata={
        "help": "trials of the learning-rate search (null: the profile's sweep block)"})
    seeds: int | None = field(default=None, metadata={
        "help": "runs of the best learning rate, the search's own included (null: the profile's sweep block)"})
    storage: str | None = field(default=None, metadata={
        "help": "Optuna storage URL, e.g. sqlite:///my.db or postgresql://... (null: outputs/studies.db)"})
    heartbeat: int = field(default=30, metadata={
        "help": "seconds between a running trial's heartbeats; a trial silent for 3 beats + 2 s is run again"})
    prune: bool = field(default=False, metadata={
        "help": "true | false: median pruning of the learning-rate search's trials"})


@dataclass
class SaveOptions:
    """Where ``train`` and ``worker`` write trained models."""

    save_dir: str | None = field(default=None, metadata={
        "help": "write the trained model there (train: the best checkpoint; worker: each method's best run, in "
                "<save_dir>/<task>_<method>_<study hash>); python -m readlib predict --model reads it"})


@dataclass
class PredictOptions:
    """The options of ``predict``."""

    model: str | None = field(default=None, metadata={
        "help": "model folder(s) written by --save_dir, comma-separated: READ models on one backbone share its pass"})
    input: str | None = field(default=None, metadata={
        "help": "FILE.jsonl (one JSON object of text fields per line), FILE.csv (a header row), or - for stdin "
                "(JSON lines, or one text per line for single-sentence tasks)"})
    output: str | None = field(default=None, metadata={"help": "write the JSON lines there (null: stdout)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "inputs per forward pass (null: the run's evaluation batch, which reproduces its test predictions)"})
    device: str = field(default="auto", metadata={"help": "auto (a GPU if any) | cpu | cuda | cuda:N"})


class Parser(argparse.ArgumentParser):
    """argparse whose errors are ConfigError: one line, exit code 2 (via main), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def command_parser(name: str) -> Parser:
    """The parser of command ``name``; its description is the first line of the command's docstring."""
    return Parser(prog=f"python -m readlib {name}", description=summary(COMMANDS[name]), allow_abbrev=False)


def summary(command: Callable) -> str:
    return (command.__doc__ or "").strip().splitlines()[0]


def value_parser(name: str, kind: type, nullable: bool) -> Callable[[str], Any]:
    """Text -> ``kind`` (booleans: true/false/1/0/yes/no); "null" -> NULL where the field admits None."""
    def parse(text: str) -> Any:
        if nullable and text.lower() == "null":
            return NULL
        try:
            return methods.coerce(name, text, kind)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


def show(value: Any) -> str:
    """A default as it is typed on the command line: null, true, 0.1, gru."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def add_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One ``--name`` option per field of dataclass ``cls`` (``method_args`` aside), typed by its annotation, its
    help the field's ``metadata["help"]``; not given: None, so that the profile's value is kept."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "method_args":
            continue
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind, nullable = kinds[0], type(None) in kinds
        text = f.metadata["help"].replace("%", "%%") + f" (default: {show(f.default)})"
        extra = {"nargs": "?", "const": True} if kind is bool else {}  # a bare --flag means true
        group.add_argument(f"--{f.name}", *ALIASES.get(f.name, []), dest=f.name, default=None, help=text,
                           type=value_parser(f.name, kind, nullable), **extra,
                           metavar=kind.__name__.upper() + ("|null" if nullable else ""))


def given(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of dataclass ``cls`` that were given on the command line."""
    values = vars(namespace)
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if values.get(f.name) is not None}


def run_parser(name: str) -> Parser:
    """A command's parser with every RunParams field as an option; other options are method hyperparameters."""
    parser = command_parser(name)
    parser.epilog = ("Options not given take the profile's value (params/<profile>.yaml), else the default shown. "
                     f"null sets {', '.join(NULLABLE)} to None, lifting the profile's value. Any other --name value "
                     "is a hyperparameter of --method: python -m readlib methods lists them.")
    add_options(parser, RunParams, "run parameters (readlib.params.RunParams)")
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
    """Train and evaluate one run; the result record is the last line on stdout, as JSON."""
    parser = run_parser("train")
    add_options(parser, SaveOptions, "output")
    known, extra = parser.parse_known_args(argv)
    overrides, save_dir = given(known, RunParams), given(known, SaveOptions).get("save_dir")
    params = make_params(overrides.pop("profile", "default"), method_args=_method_args(extra), **overrides)
    record = fit(params, save_dir=None if save_dir is NULL else save_dir)
    if record.get("processes", 1) > 1 and not processes(params.device).is_main_process:
        return 0  # data-parallel run (accelerate launch): the first process reports
    print(json.dumps(record), flush=True)
    if record["status"] != "ok":
        print(f"readlib: {record['status']} (finished epochs are kept in the record)", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def worker(argv: list[str]) -> int:
    """Work on the learning-rate search and seed runs of one task (readlib.sweep); one JSON line per method."""
    parser = run_parser("worker")
    add_options(parser, WorkerOptions, "worker options")
    add_options(parser, SaveOptions, "output")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would draw its own trials: collectives hang
        raise ConfigError("worker runs in one process (one worker per GPU: CUDA_VISIBLE_DEVICES=N python -m readlib "
                          "worker ...); for one run on several GPUs use torchrun/accelerate launch with 'train'")
    known, extra = parser.parse_known_args(argv)
    opts = WorkerOptions(**{k: None if v is NULL else v for k, v in given(known, WorkerOptions).items()})
    overrides, save_dir = given(known, RunParams), given(known, SaveOptions).get("save_dir")
    task, profile = overrides.pop("task", None), overrides.pop("profile", "default")
    if task is None:
        raise ConfigError("worker needs --task")
    names = sweep.select_methods(overrides.pop("method", "all"), task, profile, **overrides)
    method_args = _method_args(extra)
    if method_args and len(names) > 1:
        raise ConfigError(f"method hyperparameters ({', '.join(method_args)}) need a single --method")
    backbone = overrides.pop("backbone", None)
    specs = [sweep.SweepSpec(task, name, profile, backbone, method_args, overrides, opts.lr_rounds, opts.seeds,
                             opts.prune) for name in names]
    check_storage(opts.storage)
    for spec in specs:  # every input problem before the first run
        spec.check()
    for spec in specs:
        def done(label: str, method: str = spec.method) -> None:
            print(f"readlib: {method}: {label} done", file=sys.stderr)

        save = None if save_dir in (None, NULL) else save_dir
        ran = sweep.run_worker(spec, opts.storage, opts.heartbeat, progress=True, on_trial=done, save_dir=save)
        result = sweep.summary(spec, opts.storage) or {}
        result.pop("record", None)
        if save is not None:
            result["model"] = str(sweep.model_dir(spec, save))
        print(json.dumps({"task": spec.task, "method": spec.method, "trials_run_here": ran, **result}), flush=True)
    return 0


def predict(argv: list[str]) -> int:
    """Apply trained model folders to raw text: one JSON line per input (label and label name, or score)."""
    parser = command_parser("predict")
    add_options(parser, PredictOptions, "predict options")
    opts = PredictOptions(**{k: None if v is NULL else v for k, v in given(parser.parse_args(argv),
                                                                           PredictOptions).items()})
    if not opts.model or not opts.input:
        raise ConfigError("predict needs --model FOLDER[,FOLDER...] and --input FILE|-")
    paths = [p for p in opts.model.split(",") if p]
    metas = [checkpoint.read_meta(p) for p in paths]  # bad folders and inputs fail before any model loads
    tasks = [get_task(meta["task"]) for meta in metas]
    fields = {task.text_fields for task in tasks}
    single = next(iter(fields))[0] if len(fields) == 1 and len(next(iter(fields))) == 1 else None
    rows = serve.read_inputs(opts.input, sys.stdin, single)
    serve.check_rows(rows, tasks)
    models = serve.load_many(paths, opts.device)
    answers = serve.predict_many(models, rows, opts.batch_size, progress=True)
    names = [Path(p).name for p in paths]
    keys = names if len(set(names)) == len(names) else paths
    lines = [json.dumps(row[0] if len(models) == 1 else dict(zip(keys, row, strict=True))) for row in answers]
    text = "\n".join(lines) + "\n"
    if opts.output is None:
        sys.stdout.write(text)
    else:
        Path(opts.output).expanduser().write_text(text)
    return 0


def report_command(argv: list[str]) -> int:
    """Write outputs/REPORT.md and REPORT.html: every table and figure, provenance, a verdict per paper claim."""
    parser = command_parser("report")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: outputs/studies.db)")
    parser.add_argument("--profile", default="default", help="the profile whose runs to report (default: default)")
    opts = parser.parse_args(argv)
    files = verdict.write_report(opts.storage, opts.profile)
    counts = next((line for line in files["md"].read_text().splitlines() if line.startswith("**")), "")
    print(counts.strip("*"))  # the verdict counts
    print(f"wrote {files['md']} and {files['html']}", file=sys.stderr)
    return 0


def export(argv: list[str]) -> int:
    """Write every result record in the storage as CSV (one row each) or JSON lines (whole records)."""
    parser = command_parser("export")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: outputs/studies.db)")
    parser.add_argument("--output", required=True, help="file to write, e.g. outputs/records.csv")
    parser.add_argument("--format", default=None, choices=report.EXPORT_FORMATS,
                        help="csv | jsonl (default: from the output's suffix, else csv)")
    opts = parser.parse_args(argv)
    fmt = opts.format or ("jsonl" if opts.output.endswith((".jsonl", ".json")) else "csv")
    count = report.export_records(opts.storage, Path(opts.output).expanduser(), fmt)
    print(f"wrote {count} records to {opts.output}", file=sys.stderr)
    return 0


def splits(argv: list[str]) -> int:
    """Split sizes of the paper recipe next to READ Table 5."""
    command_parser("splits").parse_args(argv)
    print(split_table().to_string(index=False))
    return 0


def method_lines(name: str) -> list[str]:
    """One method as text: default learning rate, formulations, then one line per hyperparameter (option, type,
    default, meaning)."""
    spec = methods.get_method(name)
    notes = [f"default lr {spec.default_lr:g}", f"formulations: {', '.join(spec.formulations)}"]
    notes += ["trains from the hidden-state cache"] * spec.trains_from_cache
    notes += ["gradient checkpointing applies"] * spec.checkpointing
    rows = [(f"--{f.name}", type(f.default).__name__, show(f.default), f.metadata["help"])
            for f in dataclasses.fields(spec.config)]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    return [f"{name}: {'; '.join(notes)}"] + [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows]


def methods_command(argv: list[str]) -> int:
    """Every method (or the ones named) with its hyperparameters: option, type, default, meaning."""
    parser = command_parser("methods")
    parser.add_argument("names", nargs="*", metavar="METHOD", help=f"methods to list (default: all: "
                        f"{', '.join(methods.METHODS)})")
    names = parser.parse_args(argv).names or list(methods.METHODS)
    blocks = ["\n".join(method_lines(name)) for name in names]
    print("\n\n".join(["hyperparameters go after the run parameters: python -m readlib train --method NAME --option "
                        "value", *blocks]))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train, "worker": worker, "predict": predict, "report": report_command, "export": export, "splits": splits,
    "methods": methods_command,
}


def usage() -> str:
    return f"usage: python -m readlib {{{','.join(COMMANDS)}}} [options]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        width = max(map(len, COMMANDS))
        print("\n".join([usage(), "", "commands:", *(f"  {name.ljust(width)}  {summary(command)}"
                                                     for name, command in COMMANDS.items()),
                         "", "python -m readlib COMMAND --help lists the command's options."]))
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[argv[0]](argv[1:])
    except SystemExit as stop:  # argparse after printing --help
        return stop.code or 0
    except (ConfigError, DataNotFoundError) as err:
        print(f"readlib: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
