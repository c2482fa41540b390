"""A quantized frozen backbone: READ never back-propagates through it, so its weights may be stored in 8 or 4 bits.

READ runs the backbone under ``torch.inference_mode`` and trains only its side network on the states it hands over
(LST's encoder path runs it under ``torch.no_grad``), so none of QLoRA's machinery for gradients through quantized
weights is needed: the backbone's forward pass is all that must work. Modes (run parameter ``backbone_quant``):

- ``none``: the float weights as loaded (float32: 4 bytes per weight).
- ``int8`` (CPU only): PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``). Every
  ``nn.Linear`` stores int8 weights (1 byte each) with one float64 scale and one int64 zero point per output row
  (16 bytes per row; per-channel: more accurate than one scale per matrix, as fast), keeps a float32 bias, and
  quantizes its input activations to 8 bits per batch at run time (one scale per tensor). Every ``nn.Embedding``
  (MiniLM's word embeddings are half its weights) stores uint8 weights with a float32 scale and zero point per row
  (1 byte per weight + 8 bytes per row) and looks rows up as floats. Layer norms stay float32. Kernels: PyTorch's
  ``x86`` quantized engine, the default on x86 CPUs (``INT8_ENGINE``).
- ``nf4`` (CUDA + ``pip install 'bitsandbytes>=0.45'``, not a readlib dependency): every ``nn.Linear`` becomes
  bitsandbytes' ``Linear4bit`` with 4-bit NormalFloat weights (0.5 byte each, plus one absmax per 64 weights)
  computed in bfloat16; embeddings and norms stay as loaded. Written to run on a CUDA GPU, but not yet run on
  one: the tests cover its guards only.

Written here because no library quantizes a frozen READ backbone end to end: torch.ao quantizes modules, not a
READ run, and bitsandbytes' transformers integration quantizes while loading from the hub only.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import nn
from torch.ao.nn.quantized import Embedding as QuantizedEmbedding
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from readlib.backbones import Backbone
from readlib.errors import ConfigError

MODES = ("none", "int8", "nf4")
# of torch.backends.quantized.supported_engines; MiniLM forward vs float32 on a 2-core AMD EPYC: x86 0.70x, fbgemm
# 0.69x (x86 runs fbgemm's kernels there), onednn 0.86x
INT8_ENGINE = "x86"


def check(mode: str, device: str) -> None:
    """ConfigError for an unknown ``mode``, or one that cannot run on ``device`` (auto | cpu | cuda | cuda:N)."""
    if mode not in MODES:
        raise ConfigError(f"unknown backbone_quant '{mode}'; choose one of: {', '.join(MODES)}")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if mode == "int8" and cuda:
        raise ConfigError(f"backbone_quant int8 runs on the CPU only (PyTorch's dynamic quantization kernels), but "
                          f"the device is '{device}'{' (a GPU is visible)' if device == 'auto' else ''}; use "
                          "--device cpu, or nf4 on a GPU")
    if mode == "nf4":
        needs = (("a CUDA GPU", torch.cuda.is_available() and device != "cpu"),
                 ("bitsandbytes (pip install 'bitsandbytes>=0.45')", has_bitsandbytes()))
        missing = [what for what, ok in needs if not ok]
        if missing:
            raise ConfigError(f"backbone_quant nf4 needs {' and '.join(missing)}; use int8 on the CPU")


def has_bitsandbytes() -> bool:
    """Whether bitsandbytes is installed (not a readlib dependency: it needs a CUDA GPU); nothing is imported."""
    return importlib.util.find_spec("bitsandbytes") is not None


def quantize(backbone: Backbone, mode: str, device: torch.device) -> Backbone:
    """Quantize ``backbone.model`` in place (see the module docstring) for a run on ``device``; return ``backbone``.

    Only the backbone's own modules change: a method's side network built on it stays float."""
    check(mode, str(device))
    if mode == "int8" and device.type != "cpu":
        raise ConfigError(f"backbone_quant int8 runs on the CPU only, not on {device}")
    if mode == "int8":
        _int8(backbone.model)
    elif mode == "nf4":
        _nf4(backbone.model, device)
    return backbone


def _int8(model: nn.Module) -> None:
    torch.backends.quantized.engine = INT8_ENGINE
    specs = {nn.Linear: per_channel_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig}
    if not any(type(m) in specs for m in model.modules()):  # quantized already (serve: models sharing a backbone)
        return
    # torch.ao.quantization warns that it is deprecated in favour of torchao, which has no CPU dynamic int8 path
    # for nn.Embedding and needs an extra install; the API works and is tested here, so its notices are hidden
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        quantize_dynamic(model, specs, inplace=True)
    for module in model.modules():  # its kernel needs contiguous ids; BERT expands a buffer of token type ids
        if isinstance(module, QuantizedEmbedding):
            module.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


def _nf4(model: nn.Module, device: torch.device) -> None:
    import bitsandbytes as bnb  # optional, GPU only; check() made sure it is installed

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                four = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                         compute_dtype=torch.bfloat16, quant_type="nf4")
                four.load_state_dict(child.state_dict())  # float weights, quantized by the move below
                setattr(parent, name, four.requires_grad_(False))
    model.to(device)  # Linear4bit quantizes its weight when it moves to the GPU (bitsandbytes' documented way)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quantized_bytes(t: torch.Tensor) -> int:
    """Bytes of a per-row quantized tensor (the only kind ``_int8`` makes): its integers, scales and zero points."""
    return _tensor_bytes(t) + _tensor_bytes(t.q_per_channel_scales()) + _tensor_bytes(t.q_per_channel_zero_points())


def _packed_tensors(model: nn.Module):
    """The quantized weights and float biases of every torch.ao quantized Linear and Embedding in ``model``: held in
    packed parameters, outside ``model.parameters()``."""
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            yield from (t for t in module._weight_bias() if t is not None)
        elif isinstance(module, QuantizedEmbedding):
            yield module.weight()


def quantized_numel(model: nn.Module) -> int:
    """Weights and biases of ``model`` held by torch.ao quantized modules (not in ``model.parameters()``)."""
    return sum(t.numel() for t in _packed_tensors(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s weights as stored: quantized integers with their scales and zero points (torch.ao's
    packed parameters, bitsandbytes' packed 4-bit weights and absmax), float tensors at their dtype; buffers that
    are no weights (position ids) are left out. Shared tensors count once."""
    total = sum(_quantized_bytes(t) if t.is_quantized else _tensor_bytes(t) for t in _packed_tensors(model))
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: packed uint8 plus its absmax
            total += _tensor_bytes(p) + (_tensor_bytes(state.absmax) if state is not None else 0)
    return total
