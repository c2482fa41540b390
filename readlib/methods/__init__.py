"""Fine-tuning methods, one module each, one registry (the shape of peft's tuners).

Each method module declares ``SPEC``, a ``readlib.methods.base.MethodSpec``: its Config, default learning
rate, formulations, build function, whether it trains from the hidden-state cache, which hyperparameters
stay out of study names, and whether gradient checkpointing of the backbone's layers applies. Specs are
checked here at import. Adding a method is one module plus one line in ``METHODS``. See docs/methods/.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from readlib import quantize
from readlib.backbones import Backbone
from readlib.errors import ConfigError
from readlib.methods import adapter, bitfit, full, lora, lst, prompt, read, selective
from readlib.methods.base import MethodSpec

METHODS: dict[str, MethodSpec] = {
    m.SPEC.name: m.SPEC.check() for m in (full, read, bitfit, lora, prompt, selective, adapter, lst)
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def supports(name: str, formulation: str) -> bool:
    """Whether the method trains in that formulation ("classification", "text-to-text", "causal-lm")."""
    return formulation in get_method(name).formulations


def check_formulation(name: str, formulation: str) -> None:
    """ConfigError when the method does not train in that formulation."""
    if not supports(name, formulation):
        spec = get_method(name)
        raise ConfigError(f"method '{name}' does not train {formulation}; it takes: {', '.join(spec.formulations)}")


def coerce(label: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (strings from the CLI are parsed; ints are accepted for floats)."""
    if isinstance(value, str) and kind is bool:
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if value.lower() not in words:
            raise ConfigError(f"{label} must be true or false, got '{value}'")
        value = words[value.lower()]
    if isinstance(value, str) and kind is not str:
        try:
            value = kind(value)
        except ValueError as err:
            raise ConfigError(f"{label} must be a {kind.__name__}, got '{value}'") from err
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{label} must be a {kind.__name__}, got {value!r}")
    return value


def make_config(name: str, args: dict[str, Any] | None = None, run_parameters: tuple[str, ...] = ()):
    """The method's Config from ``args`` (strings from the CLI are converted to the field's type).

    ``run_parameters``: where ``args`` came mixed with run parameters (a profile plus overrides), an unknown key's
    error lists both kinds."""
    config_cls = get_method(name).config
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values = {}
    for key, value in (args or {}).items():
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            if run_parameters:
                raise ConfigError(f"unknown parameter '{key}'; run parameters: {', '.join(run_parameters)}; "
                                  f"'{name}' parameters: {allowed}")
            raise ConfigError(f"unknown hyperparameter '{key}' for method '{name}'; allowed: {allowed}")
        values[key] = coerce(f"{name}.{key}", value, type(fields[key].default))
    config = config_cls(**values)
    config.validate()
    return config


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'method:key=value,key=value' -> (method, {key: value}), checked against the method's Config."""
    name, _, rest = spec.partition(":")
    args = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bad variant '{spec}': use method:key=value,...")
        args[key] = value
    make_config(name, args)  # unknown method or hyperparameter: fail before any model is built
    return name, args


def build(name: str, backbone: Backbone, num_labels: int, args: dict[str, Any] | None = None) -> nn.Module:
    """The model of method ``name`` on ``backbone`` (changed in place by methods that adapt it: load a fresh one
    per run); ConfigError for hyperparameters out of range or a formulation the method does not train."""
    config = make_config(name, args)
    check_formulation(name, backbone.formulation)
    return get_method(name).build(backbone, num_labels, config)


def check_checkpointing(name: str) -> None:
    """ConfigError when the method does not back-propagate through the backbone's layers (nothing to checkpoint)."""
    if not get_method(name).checkpointing:
        able = ", ".join(n for n, spec in METHODS.items() if spec.checkpointing)
        raise ConfigError(f"gradient checkpointing applies to methods that back-propagate through the backbone's "
                          f"layers ({able}), not to '{name}'")


def enable_gradient_checkpointing(name: str, model: nn.Module) -> None:
    """Recompute the activations of each backbone layer in backward instead of storing them, for ``model`` built by
    method ``name``; ConfigError for methods that do not back-propagate through the backbone's layers.

    transformers checkpoints a layer only while it is in training mode; in eval mode nothing changes. Stored
    activations drop to each layer's input, at the cost of a second forward pass through the layers in backward.
    """
    check_checkpointing(name)
    # heavy (seconds to import): loaded when a model is built, so bad input fails fast
    from transformers import PreTrainedModel

    found = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    if not found:
        raise ConfigError(f"no transformers model inside {type(model).__name__} to checkpoint")
    # the outermost one (modules() lists parents first) switches on the layers of all its submodels (T5's two stacks).
    # Non-reentrant: it back-propagates into whatever a layer uses, however the tensor reaches it; reentrant
    # checkpointing silently returns no gradient through a layer whose inputs do not require grad (frozen
    # embeddings), which transformers only patches over with a hook on the input embeddings.
    found[0].activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once, a quantized backbone's weights too."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    return sum(n for n, g in seen.values() if g), sum(n for n, _ in seen.values()) + quantize.quantized_numel(model)
