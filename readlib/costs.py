"""Cost accounting that works on any device.

``SavedTensorMeter`` counts the bytes autograd stores for backward (the "forward with gradient"
activations of the selective fine-tuning paper's Table 1) with
``torch.autograd.graph.saved_tensors_hooks``. Parameters saved by layers (a linear layer keeps its
weight) are not activations and are left out. Bytes are counted per storage: a tensor saved twice,
or several views of one buffer, count once, at the size of the buffer they keep alive.
"""

from __future__ import annotations

import torch
from torch import nn


class SavedTensorMeter:
    """Context manager: ``meter.bytes`` = activation bytes saved for backward inside the block."""

    def __init__(self, model: nn.Module | None = None):
        params = model.parameters() if model is not None else ()
        self._seen = {p.untyped_storage().data_ptr() for p in params}
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def parameter_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes held by the model's parameters (all of them, or only those with requires_grad)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)
