"""Run parameters: one dataclass, filled from a YAML profile (params/<profile>.yaml) plus overrides.

Everything a run needs is validated here, before any data or model is loaded, so bad input fails in
milliseconds with a one-line message that names the bad value and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
import torch
import yaml

from readlib import backbones, data, methods, quantize
from readlib.cache import DTYPES, MODES
from readlib.errors import ConfigError
from readlib.paths import PROFILE_DIR

PROFILES = ("quick", "default", "paper")
# GLUE as a prompt and next tokens on a decoder-only LM. Selective also trains decoder-only LMs, on the next-token loss
# over whole sequences (TokenTune Table 1's memory accounting, readlib.scaling), not on a prompt's target tokens.
CAUSAL_GLUE_METHODS = ("full", "lora", "read")
LR_SCHEDULES = ("constant", "linear_warmup")
PRECISIONS = ("fp32", "bf16", "fp16")


class Null(enum.Enum):
    """``NULL``: an override that sets a field to None, lifting the profile's value (``--max_train null``).

    An override of None keeps the profile's value (notebooks and the sweep pass None for "not given")."""

    NULL = "null"


NULL = Null.NULL


@dataclass
class RunParams:
    """One training run. Sizes are in examples, lengths in tokens, learning rates per step."""

    task: str = field(default="mrpc", metadata={"help": "GLUE task: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb"})
    method: str = field(default="read", metadata={"help": "fine-tuning method (python -m readlib methods lists them)"})
    backbone: str = field(default="minilm", metadata={
        "help": "minilm (bundled), t5-small/base/large/3b, random-t5-* / random-bert-* (random weights, "
                "[:key=value,...]), a hub id org/model or a local save_pretrained folder"})
    backbone_quant: str = field(default="none", metadata={
        "help": "none | int8 (CPU: int8 linear and embedding weights, 8-bit activations per batch) | nf4 (CUDA + "
                "bitsandbytes: 4-bit NormalFloat linear weights): the frozen backbone's weights, for methods that "
                "never back-propagate through it (read, lst)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate per step; null: the method's default"})
    max_epochs: int = field(default=30, metadata={"help": "epochs at most (early stopping may end sooner)"})
    patience: int = field(default=1, metadata={"help": "epochs without validation improvement before stopping"})
    batch_size: int = field(default=96, metadata={
        "help": "total batch per optimizer step, in examples (READ Appendix C.2: 96)"})
    micro_batch_size: int = field(default=32, metadata={
        "help": "examples per forward pass; batch_size / micro_batch_size = accumulation steps (memory only)"})
    max_length: int = field(default=128, metadata={"help": "tokens per input; longer inputs are truncated"})
    formulation: str | None = field(default=None, metadata={
        "help": "classification | text-to-text; null: text-to-text on T5, else classification"})
    target_format: str = field(default="lst", metadata={
        "help": "text-to-text strings: lst (LST/Compacter: label index) | t5 (T5: class name)"})
    split_recipe: str = field(default="lst", metadata={
        "help": "validation/test rows: lst (LST's torch.randperm slices) | numpy (our first recipe)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "constant | linear_warmup (warmup_steps up, then linear decay to 0: LST's scripts)"})
    warmup_steps: int = field(default=500, metadata={
        "help": "optimizer steps of linear warmup (lr_schedule linear_warmup)"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32 | bf16 | fp16: autocast of forward passes (fp16 with a gradient scaler)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "true | false: recompute the backbone's layers in backward (methods that train through them)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout"})
    split_seed: int = field(default=42, metadata={"help": "fixes the paper split; the same for every run of a task"})
    max_train: int | None = field(default=None, metadata={
        "help": "subsample the training split to this many examples (null: all of it)"})
    max_eval: int | None = field(default=None, metadata={
        "help": "subsample validation and test to this many examples each (null: all of them)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder with <task>/<split>.parquet files (null: the bundled data/glue, else the hub)"})
    cache: str = field(default="memory", metadata={
        "help": "hidden-state cache for methods that train from backbone states: off | memory | disk"})
    cache_dtype: str = field(default="float32", metadata={
        "help": "float32 | float16: float16 halves the cache; float32 gives the same numbers as no cache"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    energy_interval: float = field(default=60.0, metadata={
        "help": "seconds between GPU-utilisation samples for READ eq. (4) (the paper: 60)"})
    profile: str = field(default="default", metadata={
        "help": "quick | default | paper: params/<profile>.yaml gives the values of the options not given"})
    method_args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the method's hyperparameters (its Config fields; on the command line: --name value)"})

    def validate(self) -> RunParams:
        """Check every field that can be checked without loading data or models; return self."""
        hints = typing.get_type_hints(RunParams)
        for name in FIELDS:
            value = getattr(self, name)
            kinds = [k for k in typing.get_args(hints[name]) or (hints[name],) if k is not type(None)]
            if value is not None and name != "method_args":
                setattr(self, name, methods.coerce(name, value, kinds[0]))
        data.get_task(self.task)
        methods.make_config(self.method, self.method_args)
        backbones.check_name(self.backbone)
        self.formulation = backbones.check_formulation(self.backbone, self.formulation)
        if self.formulation == "causal-lm" and self.method not in CAUSAL_GLUE_METHODS:
            raise ConfigError(f"method '{self.method}' does not train GLUE on a decoder-only LM ('{self.backbone}'); "
                              f"those runs take: {', '.join(CAUSAL_GLUE_METHODS)}")
        if not methods.supports(self.method, self.formulation):
            raise ConfigError(f"method '{self.method}' does not train text-to-text (T5 encoder-decoder); use "
                              "--formulation classification (a T5 encoder with a head) or an encoder backbone")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        for name in ("seed", "split_seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_epochs", "batch_size", "micro_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        for name in ("max_train", "max_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null (no subsampling), got {value}")
        if not (0 < self.energy_interval < math.inf):
            raise ConfigError(f"energy_interval must be a finite number of seconds > 0, got {self.energy_interval}")
        if not (0 <= self.weight_decay < math.inf):
            raise ConfigError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS),
                              ("target_format", data.TARGET_FORMATS), ("split_recipe", data.SPLIT_RECIPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} '{getattr(self, name)}'; choose one of: {', '.join(allowed)}")
        if self.gradient_checkpointing:
            methods.check_checkpointing(self.method)
        if self.cache not in MODES:
            raise ConfigError(f"unknown cache '{self.cache}'; choose one of: {', '.join(MODES)}")
        if self.cache_dtype not in DTYPES:
            raise ConfigError(f"unknown cache_dtype '{self.cache_dtype}'; choose one of: {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"unknown device '{self.device}'; choose one of: auto, cpu, cuda, cuda:N")
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device '{self.device}' requested but no CUDA GPU is visible; use auto or cpu")
        self.check_quantization()
        return self

    def check_quantization(self) -> None:
        """ConfigError unless ``backbone_quant`` is known, the method's gradient never enters the backbone, and the
        mode can run here (int8: the CPU; nf4: a CUDA GPU and bitsandbytes)."""
        quantize.check(self.backbone_quant, "cpu")  # an unknown mode first
        if self.backbone_quant == "none":
            return
        if not methods.get_method(self.method).quantizable:
            able = ", ".join(n for n, spec in methods.METHODS.items() if spec.quantizable)
            raise ConfigError(f"backbone_quant {self.backbone_quant} needs a method that never back-propagates "
                              f"through the backbone ({able}); '{self.method}' does")
        if self.formulation != "classification":  # READ's and LST's text-to-text output goes through T5's LM head
            raise ConfigError(f"backbone_quant {self.backbone_quant} needs --formulation classification: "
                              f"{self.formulation} back-propagates through the backbone's LM head")
        quantize.check(self.backbone_quant, self.device)

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used: the given one, else the method's default."""
        return self.lr if self.lr is not None else methods.get_method(self.method).default_lr


FIELDS = {f.name: f for f in dataclasses.fields(RunParams)}
# run parameters that change how a run is computed or measured, not its result (float32 caches give the same numbers
# as none; the energy meter's sampling interval changes no score)
NEUTRAL = ("device", "cache", "energy_interval")


def result_fields(params: RunParams) -> dict[str, Any]:
    """Every run parameter that changes a run's result: the learning rate actually used, the method's hyperparameters
    with their defaults spelt out (less its memory/speed-only switches), the rest as given; ``NEUTRAL`` left out, and
    ``backbone_quant`` when "none" (so runs, study names and caches from before it existed keep their names)."""
    fixed = {k: v for k, v in dataclasses.asdict(params).items() if k not in NEUTRAL}
    if params.backbone_quant == "none":
        del fixed["backbone_quant"]
    fixed["lr"] = params.learning_rate
    neutral = methods.get_method(params.method).not_in_name
    fixed["method_args"] = {k: v for k, v in dataclasses.asdict(methods.make_config(params.method, params.method_args))
                            .items() if k not in neutral}
    return fixed


def run_id(params: RunParams, data_revision: str | None = None, backbone_revision: str | None = None) -> str:
    """8 hex digits naming a run's result: ``result_fields`` plus the data's content hash and the backbone's revision
    (the same data_dir path may hold other files tomorrow). Equal for reruns, different when any of them changes."""
    content = result_fields(params) | {"data_revision": data_revision, "backbone_revision": backbone_revision}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:8]


def check_storage(url: str | None) -> None:
    """ConfigError unless ``url`` (None: the default SQLite file) is an SQLAlchemy database URL whose driver is
    installed and, for an SQLite file, whose folder exists; nothing is connected to or created."""
    if url is None:
        return
    try:
        parsed = sqlalchemy.engine.make_url(url)
        parsed.get_dialect().import_dbapi()
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"storage {url!r} is not a database URL; use e.g. sqlite:///outputs/studies.db or "
                          "postgresql://user:password@host/db") from None
    except (sqlalchemy.exc.NoSuchModuleError, ImportError) as e:
        raise ConfigError(f"storage {url!r}: its database driver is not installed ({e}); for postgresql:// "
                          "install readlib[postgres]") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise ConfigError(f"storage {url!r}: folder {folder} does not exist (create it, or choose another)")
NULLABLE = tuple(name for name, hint in typing.get_type_hints(RunParams).items() if type(None) in typing.get_args(hint))


def load_profile(profile: str) -> dict[str, Any]:
    """Read params/<profile>.yaml as a dict of RunParams fields."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    values = yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text()) or {}
    values.pop("sweep", None)  # the sweep's own settings, see load_sweep
    values.pop("method_defaults", None)  # per-method hyperparameters, see method_defaults
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"params/{profile}.yaml: unknown field(s) {unknown}; allowed: {sorted(FIELDS)}")
    return values


def load_sweep(profile: str) -> dict[str, Any]:
    """The profile's ``sweep:`` block: ``lr_rounds`` (learning-rate search trials), ``seeds`` (runs of the best
    learning rate) and ``runs`` (run parameters that sweep trials override, e.g. a smaller ``max_train``)."""
    load_profile(profile)  # unknown profile: the usual error
    values = yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text()) or {}
    sweep = {"lr_rounds": 32, "seeds": 3, "runs": {}} | (values.get("sweep") or {})  # READ Section 3.3 by default
    sizes = [sweep.get("lr_rounds"), sweep.get("seeds")]
    if set(sweep) != {"lr_rounds", "seeds", "runs"} or not all(isinstance(v, int) and v >= 1 for v in sizes):
        raise ConfigError(f"params/{profile}.yaml: sweep must be {{lr_rounds: int >= 1, seeds: int >= 1, "
                          f"runs: {{run parameters}}}}, got {sweep}")
    unknown = sorted(set(sweep["runs"]) - set(FIELDS))
    if unknown:
        raise ConfigError(f"params/{profile}.yaml: unknown field(s) {unknown} in sweep.runs")
    return sweep


def method_defaults(profile: str, method: str) -> dict[str, Any]:
    """The profile's hyperparameters for one method (``method_defaults: {method: {field: value}}``), e.g. the paper
    profile's LST without layer dropping; a method the block does not name gets {}."""
    load_profile(profile)  # unknown profile: the usual error
    block = (yaml.safe_load((PROFILE_DIR / f"{profile}.yaml").read_text()) or {}).get("method_defaults") or {}
    if not isinstance(block, dict) or not all(isinstance(v, dict) for v in block.values()):
        raise ConfigError(f"params/{profile}.yaml: method_defaults must be {{method: {{field: value}}}}, got {block}")
    for name in block:
        methods.get_method(name)
    return dict(block.get(method) or {})


def make_params(profile: str = "default", **overrides: Any) -> RunParams:
    """Profile values, then overrides (None keeps the profile's value, ``NULL`` sets None), validated.

    Override keys that are not RunParams fields are method hyperparameters (e.g. ``rnn="gru"``);
    the method's own config checks them. They go over the profile's ``method_defaults`` for the method.
    """
    values = load_profile(profile)
    method = overrides.get("method") or values.get("method", RunParams.method)
    method_args = method_defaults(profile, method) | dict(values.pop("method_args", None) or {})
    for key, value in overrides.items():
        if key == "method_args":
            method_args.update(value or {})
        elif value is NULL:
            if key not in NULLABLE:
                raise ConfigError(f"{key} cannot be null; only {', '.join(NULLABLE)} can")
            values[key] = None
        elif key in FIELDS:
            if value is not None:
                values[key] = value
        elif value is not None:
            method_args[key] = value
    methods.make_config(method, method_args, run_parameters=tuple(n for n in FIELDS if n != "method_args"))
    return RunParams(**values, profile=profile, method_args=method_args).validate()
