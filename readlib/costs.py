"""Cost accounting that works on any device.

``EnergyMeter`` records a run's energy from every source the machine has, side by side, and says why a
source is missing instead of inventing a number: NVIDIA's total-energy counter (NVML, Volta and newer),
READ's estimate from sampled GPU utilisation (eq. 3/4), and Intel RAPL package energy (Linux powercap).
Written here because no maintained library reports these three together with per-source reasons
(codecarbon estimates from TDP when sensors are missing; we never estimate what was not measured).

``SavedTensorMeter`` counts the bytes autograd stores for backward (the "forward with gradient"
activations of the selective fine-tuning paper's Table 1) with
``torch.autograd.graph.saved_tensors_hooks``. Parameters saved by layers (a linear layer keeps its
weight) are not activations and are left out. Bytes are counted per storage: a tensor saved twice,
or several views of one buffer, count once, at the size of the buffer they keep alive.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop,
    sdpa_flop,
)

from readlib.paper import V100_P0_KW

BYTE_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "GB": 10**9}  # GB: the papers' tables


def in_unit(n_bytes: float, unit: str) -> float:
    """``n_bytes`` bytes in ``unit`` (one of BYTE_UNITS)."""
    return n_bytes / BYTE_UNITS[unit]


class SavedTensorMeter:
    """Context manager: ``meter.bytes`` = activation bytes saved for backward inside the block."""

    def __init__(self, model: nn.Module | None = None):
        params = model.parameters() if model is not None else ()
        self._seen = {p.untyped_storage()._cdata for p in params}
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # keyed by the storage object itself (not its data pointer), so that tensors on the meta device, which
        # all have pointer 0, are counted too: shape-only accounting of models that do not fit in memory
        storage = tensor.untyped_storage()
        if storage._cdata not in self._seen:
            self._seen.add(storage._cdata)
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


def paper_energy_kwh(utilization_percent: list[float], interval_s: float, p0_kw: float = V100_P0_KW) -> float:
    """READ eq. (3) as a sum: E = sum_i u_i / 100 * p0 * dt, in kWh, for utilisation samples u_i (percent, summed
    over GPUs) taken every ``interval_s`` seconds. With one-minute samples this is eq. (4): U_bar * p0 / 6000."""
    return sum(utilization_percent) * p0_kw * interval_s / 360_000  # one division: exact for exact inputs


def rapl_kwh(start_uj: dict[str, int], end_uj: dict[str, int], max_uj: dict[str, int]) -> float:
    """Package energy between two RAPL readings (microjoules per domain, counters wrap at ``max_uj``), in kWh."""
    total = 0
    for domain, begin in start_uj.items():
        delta = end_uj[domain] - begin
        total += delta if delta >= 0 else delta + max_uj[domain]
    return total / 3.6e12


class EnergyMeter:
    """Context manager: ``meter.result()`` has one entry per source, each ``{"kwh": float}`` or
    ``{"kwh": None, "reason": str}``, plus the sampling settings.

    ``interval_s`` is the utilisation sampling period (the paper samples once a minute); ``p0_kw`` the power
    at full utilisation for eq. (4); ``gpus`` the NVML device indices (default: all); ``rapl_root`` the powercap
    folder (default: the environment variable ``READLIB_RAPL_ROOT``, else the Linux kernel's sysfs location).
    """

    def __init__(self, interval_s: float = 60.0, p0_kw: float = V100_P0_KW, gpus: list[int] | None = None,
                 rapl_root: str | Path | None = None):
        self.interval_s, self.p0_kw, self.gpus = interval_s, p0_kw, gpus
        self.rapl_root = Path(rapl_root or os.environ.get("READLIB_RAPL_ROOT") or Path("/sys", "class", "powercap"))
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._handles: list = []
        self._nvml_reason: str | None = None
        self._counter_reason: str | None = None

    # ---------------------------------------------------------------- NVML
    def _nvml_start(self) -> None:
        try:
            import pynvml  # here, not at the top: a machine without NVML gets a reason in the result, not an error

            pynvml.nvmlInit()
            self._nvml = pynvml
            indices = self.gpus if self.gpus is not None else range(self._nvml.nvmlDeviceGetCount())
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except Exception as err:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self._nvml_reason = f"NVML unavailable: {type(err).__name__}: {err}"
            return
        if not self._handles:
            self._nvml_reason = "NVML found no GPU"
            return
        try:
            self._energy_start = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]  # mJ
        except Exception as err:  # NotSupported before Volta
            self._counter_reason = f"NVML total-energy counter unsupported: {type(err).__name__}: {err}"
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _utilization(self) -> float:
        return float(sum(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles))

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._utilization())

    # ---------------------------------------------------------------- RAPL
    def _rapl_domains(self) -> dict[str, Path]:
        domains = {}
        for path in sorted(self.rapl_root.glob("intel-rapl:*")):
            if path.name.count(":") == 1 and (path / "energy_uj").exists():  # packages, not their sub-domains
                domains[path.name] = path
        return domains

    def _rapl_read(self) -> dict[str, int]:
        return {name: int((path / "energy_uj").read_text()) for name, path in self._domains.items()}

    def _rapl_start(self) -> None:
        self._rapl_reason = None
        if not self.rapl_root.exists():
            self._rapl_reason = f"no {self.rapl_root} on this machine"
            return
        self._domains = self._rapl_domains()
        try:
            self._rapl_begin = self._rapl_read()
            self._rapl_max = {n: int((p / "max_energy_range_uj").read_text()) for n, p in self._domains.items()}
        except OSError as err:  # energy_uj is root-only on recent kernels
            self._rapl_reason = f"RAPL not readable: {err}"
            return
        if not self._domains:
            self._rapl_reason = f"no RAPL package domain under {self.rapl_root}"

    # ---------------------------------------------------------------- the context
    def __enter__(self) -> EnergyMeter:
        self._start = time.monotonic()
        self._nvml_start()
        self._rapl_start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self._start
        self._stop.set()
        self._energy_end = None
        if self._nvml_reason is None:
            self._thread.join()
            if self._counter_reason is None:
                self._energy_end = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
        if self._rapl_reason is None:
            self._rapl_end = self._rapl_read()

    def result(self) -> dict:
        """Energy per source in kWh (or why it was not measured), the wall time and the sampling settings."""
        out: dict = {"seconds": self.seconds, "interval_s": self.interval_s, "p0_kw": self.p0_kw}
        if self._nvml_reason is not None:
            out["nvml_counter"] = out["paper_eq4"] = {"kwh": None, "reason": self._nvml_reason}
        else:
            if self._counter_reason is not None:
                out["nvml_counter"] = {"kwh": None, "reason": self._counter_reason}
            else:
                used = sum(e - s for s, e in zip(self._energy_start, self._energy_end, strict=True))
                out["nvml_counter"] = {"kwh": used / 3.6e9}  # mJ -> kWh
            out["paper_eq4"] = {"kwh": paper_energy_kwh(self.samples, self.interval_s, self.p0_kw),
                                "samples": len(self.samples)}
            if not self.samples:
                out["paper_eq4"]["note"] = f"run shorter than one sampling interval ({self.interval_s} s): 0 samples"
        if self._rapl_reason is not None:
            out["rapl"] = {"kwh": None, "reason": self._rapl_reason}
        else:
            out["rapl"] = {"kwh": rapl_kwh(self._rapl_begin, self._rapl_end, self._rapl_max)}
        return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: two moments per trained parameter, and step counters)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


def training_memory(model: nn.Module, optimizer: torch.optim.Optimizer, activation_bytes: int, micro_batch: int,
                    device: torch.device) -> dict:
    """A run's training memory in bytes: the CUDA peak of allocated memory (GPU runs; reset when training starts)
    and, on any device, the accounted breakdown of the selective fine-tuning paper's Table 1 — weights, the
    activations autograd stored for one micro-batch, gradients (one per trained parameter) and optimizer state."""
    parts = {"weights": parameter_bytes(model), "activations": activation_bytes,
             "gradients": parameter_bytes(model, trainable_only=True), "optimizer": optimizer_state_bytes(optimizer)}
    out = {"accounted": parts, "accounted_total": sum(parts.values()), "activations_micro_batch": micro_batch}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        out["cuda_peak_bytes"] = None
        out["cuda_reason"] = f"not measured: the run was on {device.type}"
    return out


def _count_cpu_sdpa() -> None:
    """Give the CPU flash-attention kernels of SDPA their FLOP formulas (PyTorch counts them as 0 otherwise)."""
    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, sdpa_backward_flop)):
        if op not in flop_registry:
            register_flop_formula(op, get_raw=True)(formula)  # the formulas are already shape-wrapped


def count_flops(fn) -> int:
    """Floating-point operations of ``fn()`` (a forward, or forward and backward), counted by
    ``torch.utils.flop_counter`` (matmuls and attention; 2 per multiply-add), SDPA on CPU included."""
    _count_cpu_sdpa()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def latency(fn, warmup: int = 2, repeats: int = 10) -> dict:
    """Wall time of ``fn()`` in seconds: ``warmup`` untimed calls, then the median (and all) of ``repeats``
    timed ones; CUDA work is synchronised before each clock read."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": sorted(times)[len(times) // 2], "times_s": times, "warmup": warmup, "repeats": repeats}


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, while the mode is active: every storage an operator
    returns is counted until it is freed (a weak reference's callback), as are the ``existing`` tensors'.

    Written here because PyTorch's own ``MemTracker`` (``torch.distributed._tools``, private) installs gradient
    hooks on every parameter and so fails on frozen ones — every parameter-efficient method has them.
    """

    def __init__(self, existing: list[torch.Tensor] = ()):
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        for tensor in existing:
            self._count(tensor)

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int, size: int) -> None:
        self.live.pop(key, None)
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        return out


PHASES = ("weights", "forward_no_grad", "forward", "backward", "optimizer")


def phase_memory(model: nn.Module, forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Memory of one training step, phase by phase, in bytes — the rows of the selective fine-tuning paper's
    Table 1: the weights, a forward pass without gradients (= inference), the forward pass with gradients (its
    stored activations), backward (gradients) and the optimizer step (AdamW creates its state here).

    ``forward()`` returns the loss. Per phase: ``peak`` (reset when the phase starts) and ``after`` (allocated
    when it ends); ``cumulative`` is the running maximum of the peaks, the paper's presentation (less its CUDA
    context). On CUDA the numbers are ``torch.cuda`` allocator statistics; on any other device, the meta device
    included, ``LiveBytes`` counts the storages that are alive — the same allocations without the CUDA caching
    allocator's rounding.
    """
    device = next(model.parameters()).device
    loss = []
    steps = {"forward_no_grad": lambda: _no_grad(forward), "forward": lambda: loss.append(forward()),
             "backward": lambda: loss.pop().backward(), "optimizer": optimizer.step}
    peak, after = {}, {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak["weights"] = after["weights"] = torch.cuda.memory_allocated(device)
        for phase, step in steps.items():
            torch.cuda.reset_peak_memory_stats(device)
            with _gc_paused():
                step()
            torch.cuda.synchronize(device)
            peak[phase], after[phase] = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        source = "torch.cuda.max_memory_allocated"
    else:
        tracker = LiveBytes([*model.parameters(), *model.buffers()])
        peak["weights"] = after["weights"] = tracker.current
        for phase, step in steps.items():
            tracker.peak = tracker.current
            with tracker, _gc_paused():
                step()
            peak[phase], after[phase] = tracker.peak, tracker.current
        source = f"readlib.costs.LiveBytes (storages alive on {device.type})"
    running = list(itertools.accumulate((peak[p] for p in PHASES), max))
    return {"peak": peak, "after": after, "cumulative": dict(zip(PHASES, running, strict=True)),
            "device": device.type, "source": source}


@contextlib.contextmanager
def _gc_paused():
    """Python's cycle collector off during a phase and run after it: storages held only by reference cycles
    are then freed at the phase's end on every run, not whenever the collector happens to start."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def _no_grad(forward: Callable[[], torch.Tensor]) -> None:
    with torch.no_grad():
        forward()
