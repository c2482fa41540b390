"""Run parameters: one dataclass, filled from a YAML profile (params/<profile>.yaml) plus overrides.

Everything a run needs is validated here, before any data or model is loaded, so bad input fails in
milliseconds with a one-line message that names the bad value and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from readlib import backbones, data, methods
from readlib.cache import DTYPES, MODES
from readlib.errors import ConfigError
from readlib.paths import PROFILE_DIR

PROFILES = ("quick", "default", "paper")
LR_SCHEDULES = ("constant", "linear_warmup")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RunParams:
    """One training run. Sizes are in examples, lengths in tokens, learning rates per step."""

    task: str = "mrpc"
    method: str = "read"
    backbone: str = "minilm"
    lr: float | None = None  # None: the method's DEFAULT_LR
    max_epochs: int = 30
    patience: int = 1  # epochs without validation improvement before stopping
    batch_size: int = 96  # total batch per optimizer step (READ Appendix C.2: 96)
    micro_batch_size: int = 32  # examples per forward pass; batch_size / micro = accumulation steps
    max_length: int = 128
    formulation: str | None = None  # classification | text-to-text; None: text-to-text on T5, else classification
    target_format: str = "lst"  # text-to-text strings: "lst" (LST/Compacter: label index) | "t5" (T5: class name)
    split_recipe: str = "lst"  # validation/test rows: "lst" (LST's torch.randperm slices) | "numpy" (our first recipe)
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | linear_warmup (warmup_steps up, then linear decay to 0: LST's scripts)
    warmup_steps: int = 500  # optimizer steps of linear warmup (lr_schedule=linear_warmup)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of forward passes (fp16 with a gradient scaler)
    gradient_checkpointing: bool = False  # recompute the backbone's layers in backward (methods that train through it)
    seed: int = 0
    split_seed: int = 42  # fixes the paper split; the same for every run of a task
    max_train: int | None = None  # subsample the training split (None: all of it)
    max_eval: int | None = None  # subsample validation and test (None: all of them)
    data_dir: str | None = None
    cache: str = "memory"  # hidden-state cache for methods that train from backbone states: off|memory|disk
    cache_dtype: str = "float32"  # float16 halves the cache; float32 gives the same numbers as no cache
    device: str = "auto"
    energy_interval: float = 60.0  # seconds between GPU-utilisation samples for READ eq. (4) (the paper: 1 min)
    profile: str = "default"
    method_args: dict[str, Any] = field(default_factory=dict)

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
        if self.backbone.startswith("random-opt-"):
            raise ConfigError(f"'{self.backbone}' is a decoder-only LM, for memory accounting only "
                              "(readlib.scaling.computed_phase_memory); GLUE runs need an encoder or a T5")
        self.formulation = backbones.check_formulation(self.backbone, self.formulation)
        if not methods.supports(self.method, self.formulation):
            raise ConfigError(f"method '{self.method}' does not train text-to-text (T5 encoder-decoder); use "
                              "--formulation classification (a T5 encoder with a head) or an encoder backbone")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        for name in ("max_epochs", "batch_size", "micro_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        for name in ("max_train", "max_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or null (no subsampling), got {value}")
        if self.energy_interval <= 0:
            raise ConfigError(f"energy_interval must be > 0 seconds, got {self.energy_interval}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
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
        return self

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used: the given one, else the method's default."""
        return self.lr if self.lr is not None else methods.get_method(self.method).default_lr


FIELDS = {f.name: f for f in dataclasses.fields(RunParams)}


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
    """Profile values, then overrides (None means "keep the profile's value"), validated.

    Override keys that are not RunParams fields are method hyperparameters (e.g. ``rnn="gru"``);
    the method's own config checks them. They go over the profile's ``method_defaults`` for the method.
    """
    values = load_profile(profile)
    method = overrides.get("method") or values.get("method", RunParams.method)
    method_args = method_defaults(profile, method) | dict(values.pop("method_args", None) or {})
    for key, value in overrides.items():
        if key == "method_args":
            method_args.update(value or {})
        elif key in FIELDS:
            if value is not None:
                values[key] = value
        elif value is not None:
            method_args[key] = value
    methods.make_config(method, method_args, run_parameters=tuple(n for n in FIELDS if n != "method_args"))
    return RunParams(**values, profile=profile, method_args=method_args).validate()
