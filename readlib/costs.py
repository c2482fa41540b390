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


def trainable_parameters(method: str, backbone: str, method_args: dict | None = None, num_labels: int = 2,
                         text_to_text: bool | None = None) -> dict[str, int]:
    """Parameter counts of ``method`` on ``backbone``, without allocating weights.

    ``random-t5-*`` architectures are built on the meta device (T5-3B costs no memory). Returns
    ``trainable``, ``total`` (every parameter once; T5's tied embedding/LM head once) and ``backbone``
    (the frozen model's own parameters, with a tied LM head counted a second time, as READ Table 4's
    247.58 M for T5-base does — the denominator of the paper's "trainable params (%)").
    """
    from readlib import backbones, methods

    bb = backbones.load(backbone, text_to_text=text_to_text, meta=backbone.startswith("random-t5-"))
    own = sum(p.numel() for p in bb.model.parameters())
    head = getattr(bb.model, "lm_head", None)
    tied = head is not None and head.weight is bb.model.get_input_embeddings().weight
    model = methods.build(method, bb, num_labels, method_args)
    trainable, total = methods.count_parameters(model)
    return {"trainable": trainable, "total": total, "backbone": own + (head.weight.numel() if tied else 0)}
