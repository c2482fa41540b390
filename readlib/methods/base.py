"""The method contract: the spec every method module declares, and the frozen-backbone base class.

A method module ends with ``SPEC = MethodSpec(...)``; ``readlib.methods`` registers it and checks it at
import. Nothing outside a method reads its module's other names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from readlib.backbones import FORMULATIONS, Backbone


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, for everything outside its module.

    ``config``: a dataclass of the method's hyperparameters (every field has a default) with ``validate()``,
    raising ConfigError. ``build(backbone, num_labels, config)`` returns the model: exactly the parameters the
    method trains have ``requires_grad``. ``trains_from_cache``: the model has ``cache_layout(split)``,
    ``features(**batch)`` and ``forward_features(features, **masks)`` (``readlib.cache``). ``not_in_name``:
    config fields that change only memory or time, kept out of sweep study names. ``checkpointing``: the method
    back-propagates through the backbone's own layers, so gradient checkpointing of those layers applies
    (``readlib.methods.enable_gradient_checkpointing``). ``quantizable``: under a head (classification) the loss's
    gradient never enters the backbone, which runs without autograd and hands over constant states, so its weights
    may be stored quantized (run parameter ``backbone_quant``, ``readlib.quantize``).
    """

    name: str
    config: type
    default_lr: float  # per optimizer step
    build: Callable[[Backbone, int, Any], nn.Module]
    formulations: tuple[str, ...] = ("classification", "text-to-text")
    trains_from_cache: bool = False
    not_in_name: tuple[str, ...] = ()
    checkpointing: bool = False
    quantizable: bool = False

    def check(self) -> MethodSpec:
        """TypeError naming what is wrong with the spec itself (a programming error, found at import)."""
        problems = []
        if not dataclasses.is_dataclass(self.config) or not callable(getattr(self.config, "validate", None)):
            problems.append("config must be a dataclass with validate()")
        elif any(f.default is dataclasses.MISSING for f in dataclasses.fields(self.config)):
            problems.append("every config field needs a default")
        else:
            unknown = set(self.not_in_name) - {f.name for f in dataclasses.fields(self.config)}
            if unknown:
                problems.append(f"not_in_name names no config field: {sorted(unknown)}")
        if not 0 < self.default_lr < 1:
            problems.append(f"default_lr must be in (0, 1), got {self.default_lr}")
        if not self.formulations or set(self.formulations) - set(FORMULATIONS):
            problems.append(f"formulations must be a non-empty subset of {FORMULATIONS}, got {self.formulations}")
        if self.checkpointing and self.trains_from_cache:  # from the cache, nothing runs through the backbone's layers
            problems.append("a method that trains from the cache cannot checkpoint the backbone's layers")
        if self.checkpointing and self.quantizable:  # checkpointing needs gradients through the backbone's layers
            problems.append("a method that checkpoints the backbone's layers back-propagates through them: it cannot "
                            "be quantizable")
        if problems:
            raise TypeError(f"method '{self.name}': " + "; ".join(problems))
        return self


class FrozenBackbone(nn.Module):
    """A method that keeps ``backbone.model`` frozen beside its own modules, as ``self.frozen``.

    The backbone stays in eval mode whatever mode the method is in: no dropout inside it, so its states are a
    deterministic function of the input (what lets READ cache them). Registered as a submodule, so ``.to(device)``
    moves it; it never trains.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.frozen = backbone.model

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.frozen.eval()
        return self
