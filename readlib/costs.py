"""Cost accounting that works on any device.

``EnergyMeter`` records a run's energy from every source the machine has, side by side, and says why a
source is missing instead of inventing a number: NVIDIA's total-energy counter (NVML, Volta and newer),
READ's estimate from sampled GPU utilisation (eq. 3/4), and Intel RAPL package energy (Linux powercap).
Written here because no maintained library reports these three together with per-source reasons
(codecarbon estimates from TDP when sensors are missing; we never estimate what was not measured).
A process of a multi-process run meters only its own GPU (``nvml_indices``); ``sum_energy`` joins the
processes' results without counting a GPU or a machine twice.

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
import socket
import statistics
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

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

from readlib import quantize
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


def nvml_indices(device: torch.device | str, nvml: ModuleType) -> list[int]:
    """NVML indices of the GPU a process computes on as torch ``device``; [] for a device that is no GPU.

    NVML numbers every GPU of the machine and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers only the GPUs that
    variable lists, in its order: ``cuda:1`` under ``CUDA_VISIBLE_DEVICES=2,3`` is NVML GPU 3. Entries are
    indices or UUIDs ("GPU-…", or a prefix naming one GPU, as CUDA accepts them). ``cuda`` without an index is
    CUDA's current device, or before CUDA starts ``LOCAL_RANK``'s (torchrun and accelerate give process
    ``LOCAL_RANK`` the GPU of that number). ``nvml`` is the initialised ``pynvml`` module.

    Raises ValueError saying why the GPU cannot be named: a MIG instance (NVML's counters cover the whole GPU,
    shared with the other instances), a UUID no GPU or several GPUs have, an index NVML does not have, or GPU
    models mixed under CUDA's default fastest-first numbering (it matches NVML's PCI order only among equals).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return []
    if device.index is not None:
        ordinal = device.index
    elif torch.cuda.is_initialized():
        ordinal = torch.cuda.current_device()
    else:
        ordinal = int(os.environ.get("LOCAL_RANK", "0"))
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible is not None else [str(i) for i in range(len(handles))]
    if ordinal >= len(entries):
        raise ValueError(f"{device} is CUDA GPU {ordinal}, but only {len(entries)} are visible "
                         f"(CUDA_VISIBLE_DEVICES={visible!r}, NVML sees {len(handles)})")
    entry = entries[ordinal]
    if entry.startswith("MIG-"):
        raise ValueError(f"{device} is MIG instance {entry}: NVML's energy counter and utilisation cover its whole "
                         "GPU, shared with the other instances")
    if entry.startswith("GPU-"):
        uuids = [nvml.nvmlDeviceGetUUID(h) for h in handles]
        matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
        if len(matches) != 1:
            raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry} names {len(matches)} of NVML's GPUs {uuids}")
        return matches
    if not entry.isdigit() or int(entry) >= len(handles):
        raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r} is none of NVML's {len(handles)} GPUs")
    names = sorted({nvml.nvmlDeviceGetName(h) for h in handles})
    if len(names) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        raise ValueError(f"GPU models mixed ({', '.join(names)}) and CUDA numbers them fastest first: set "
                         "CUDA_DEVICE_ORDER=PCI_BUS_ID (NVML's order) or name the GPU by UUID in CUDA_VISIBLE_DEVICES")
    return [int(entry)]


class EnergyMeter:
    """Context manager: ``meter.result()`` has one entry per source, each ``{"kwh": float}`` or
    ``{"kwh": None, "reason": str}``, plus the sampling settings. The GPU sources say which GPUs they cover
    (``gpus``: NVML UUIDs), RAPL which machine (``host``), so that ``sum_energy`` can join several processes.

    ``interval_s`` is the utilisation sampling period (the paper samples once a minute); ``p0_kw`` the power
    at full utilisation for eq. (4); ``device`` the torch device this process computes on, whose GPU alone is
    metered (``nvml_indices``; a CPU device meters no GPU), or ``gpus`` the NVML device indices (default, with
    neither: every GPU NVML sees); ``rapl_root`` the powercap folder (default: the environment variable
    ``READLIB_RAPL_ROOT``, else the Linux kernel's sysfs location).
    """

    def __init__(self, interval_s: float = 60.0, p0_kw: float = V100_P0_KW, gpus: list[int] | None = None,
                 rapl_root: str | Path | None = None, device: torch.device | str | None = None):
        if gpus is not None and device is not None:
            raise ValueError(f"meter either the GPUs {gpus} or device {device}'s, not both")
        self.interval_s, self.p0_kw, self.gpus = interval_s, p0_kw, gpus
        self.device = torch.device(device) if device is not None else None
        self.rapl_root = Path(rapl_root or os.environ.get("READLIB_RAPL_ROOT") or Path("/sys", "class", "powercap"))
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._handles: list = []
        self._nvml_reason: str | None = None
        self._counter_reason: str | None = None

    # ---------------------------------------------------------------- NVML
    def _nvml_start(self) -> None:
        if self.device is not None and self.device.type != "cuda":
            self._nvml_reason = f"no GPU metered: the run is on {self.device.type}"
            return
        try:
            import pynvml  # here, not at the top: a machine without NVML gets a reason in the result, not an error

            pynvml.nvmlInit()
            self._nvml = pynvml
            if self.device is not None:
                indices = nvml_indices(self.device, pynvml)
            else:
                indices = self.gpus if self.gpus is not None else range(pynvml.nvmlDeviceGetCount())
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            self._uuids = [pynvml.nvmlDeviceGetUUID(h) for h in self._handles]
        except ValueError as err:  # from nvml_indices: the device's GPU has no NVML number of its own
            self._nvml_reason = f"{self.device} not metered: {err}"
            return
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
                out["nvml_counter"] = {"kwh": used / 3.6e9, "gpus": self._uuids}  # mJ -> kWh
            out["paper_eq4"] = {"kwh": paper_energy_kwh(self.samples, self.interval_s, self.p0_kw),
                                "samples": len(self.samples), "gpus": self._uuids}
            if not self.samples:
                out["paper_eq4"]["note"] = f"run shorter than one sampling interval ({self.interval_s} s): 0 samples"
        if self._rapl_reason is not None:
            out["rapl"] = {"kwh": None, "reason": self._rapl_reason}
        else:
            out["rapl"] = {"kwh": rapl_kwh(self._rapl_begin, self._rapl_end, self._rapl_max),
                           "host": socket.gethostname()}
        return out


def sum_energy(results: list[dict]) -> dict:
    """One energy record from the ``EnergyMeter.result()`` of every process of a run (rank order), in kWh.

    Per source: the sum when every rank measured it, else None and each rank's reason; ``ranks`` keeps every
    rank's own entry. What the ranks metered must not overlap, or the sum would count it twice: the GPU sources
    need disjoint GPUs (else None, naming the GPU). RAPL reads the CPU packages of a whole machine, so the ranks
    of one host count once — the largest of their readings, taken over nearly the same window as they train in
    lockstep — and the hosts are summed. ``seconds`` is the longest rank's.
    """
    if not results:
        raise ValueError("sum_energy needs the result of at least one process")
    settings = {(r["interval_s"], r["p0_kw"]) for r in results}
    if len(settings) > 1:
        raise ValueError(f"the processes metered with different (interval_s, p0_kw): {sorted(settings)}")
    out: dict = {"seconds": max(r["seconds"] for r in results), "interval_s": results[0]["interval_s"],
                 "p0_kw": results[0]["p0_kw"]}
    for source in ("nvml_counter", "paper_eq4", "rapl"):
        entries = [r[source] for r in results]
        reason = _not_measured(entries) or (_shared_gpu(entries) if source != "rapl" else None)
        if reason is not None:
            out[source] = {"kwh": None, "reason": reason, "ranks": entries}
        elif source == "rapl":
            per_host: dict[str, float] = {}
            for entry in entries:
                per_host[entry["host"]] = max(per_host.get(entry["host"], 0.0), entry["kwh"])
            out[source] = {"kwh": sum(per_host.values()), "hosts": sorted(per_host), "ranks": entries}
        else:
            out[source] = {"kwh": sum(entry["kwh"] for entry in entries), "ranks": entries}
    return out


def _not_measured(entries: list[dict]) -> str | None:
    """Why some ranks have no number for a source ("ranks 0, 1: reason; rank 2: other reason"), or None."""
    ranks_by_reason: dict[str, list[str]] = {}
    for rank, entry in enumerate(entries):
        if entry["kwh"] is None:
            ranks_by_reason.setdefault(entry["reason"], []).append(str(rank))
    return "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {reason}"
                     for reason, ranks in ranks_by_reason.items()) or None


def _shared_gpu(entries: list[dict]) -> str | None:
    """Why the ranks' GPU readings cannot be summed (two ranks metered one GPU), or None."""
    metered_by: dict[str, int] = {}
    for rank, entry in enumerate(entries):
        for uuid in entry["gpus"]:
            if uuid in metered_by:
                return f"ranks {metered_by[uuid]} and {rank} both metered {uuid}: a sum would count it twice"
            metered_by[uuid] = rank
    return None


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: two moments per trained parameter, and step counters)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t))


def training_memory(model: nn.Module, optimizer: torch.optim.Optimizer, activation_bytes: int, micro_batch: int,
                    device: torch.device) -> dict:
    """A run's training memory in bytes: on a GPU the CUDA peaks since training started, of memory allocated to
    tensors (``cuda_peak_bytes``) and of memory the caching allocator reserved (``cuda_peak_reserved_bytes``:
    tensors plus cached free blocks, what the process holds of the GPU less the CUDA context); on any device the
    accounted breakdown of the selective fine-tuning paper's Table 1 — weights, the activations autograd stored
    for one micro-batch, gradients (one per trained parameter) and optimizer state."""
    parts = {"weights": quantize.weight_bytes(model), "activations": activation_bytes,
             "gradients": parameter_bytes(model, trainable_only=True), "optimizer": optimizer_state_bytes(optimizer)}
    out = {"accounted": parts, "accounted_total": sum(parts.values()), "activations_micro_batch": micro_batch}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    else:
        out["cuda_peak_bytes"] = out["cuda_peak_reserved_bytes"] = None
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
    return counted(fn)[1]


def counted(fn, *args, **kwargs) -> tuple[Any, int]:
    """``fn(*args, **kwargs)`` and its floating-point operations (``count_flops``)."""
    _count_cpu_sdpa()
    with FlopCounterMode(display=False) as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


def interleaved_latency(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 10,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Wall time in seconds of each ``fns[name]()``, measured so that they compare: ``warmup`` untimed calls of
    each, then ``repeats`` rounds timing every function once in turn (A, B, C, A, B, C, ...), so that the
    machine's drift (other processes, clock boost, heat) falls on all of them alike, not on whichever ran last.
    Per name: the median (and all) of its timed calls. CUDA work is synchronised before each ``clock()`` read."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            times[name].append(clock() - start)
    return {name: {"median_s": statistics.median(t), "times_s": t, "warmup": warmup, "repeats": repeats}
            for name, t in times.items()}


def latency(fn: Callable[[], object], warmup: int = 2, repeats: int = 10) -> dict:
    """Wall time of ``fn()`` in seconds: ``warmup`` untimed calls, then the median (and all) of ``repeats``
    timed ones; CUDA work is synchronised before each clock read."""
    return interleaved_latency({"fn": fn}, warmup, repeats)["fn"]


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
    context). On CUDA the numbers are ``torch.cuda`` allocator statistics, and ``peak_reserved`` is the peak the
    caching allocator reserved per phase (allocated plus cached free blocks). On any other device, the meta device
    included, ``LiveBytes`` counts the storages that are alive — the same allocations without the CUDA caching
    allocator's rounding — and ``peak_reserved`` is None with ``reserved_reason``: no allocator reserves memory.
    """
    device = next(model.parameters()).device
    loss = []
    steps = {"forward_no_grad": lambda: _no_grad(forward), "forward": lambda: loss.append(forward()),
             "backward": lambda: loss.pop().backward(), "optimizer": optimizer.step}
    peak, after, reserved = {}, {}, {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak["weights"] = after["weights"] = torch.cuda.memory_allocated(device)
        reserved["weights"] = torch.cuda.memory_reserved(device)
        for phase, step in steps.items():
            torch.cuda.reset_peak_memory_stats(device)
            with _gc_paused():
                step()
            torch.cuda.synchronize(device)
            peak[phase], after[phase] = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
            reserved[phase] = torch.cuda.max_memory_reserved(device)
        extra = {"source": "torch.cuda.max_memory_allocated", "peak_reserved": reserved}
    else:
        tracker = LiveBytes([*model.parameters(), *model.buffers()])
        peak["weights"] = after["weights"] = tracker.current
        for phase, step in steps.items():
            tracker.peak = tracker.current
            with tracker, _gc_paused():
                step()
            peak[phase], after[phase] = tracker.peak, tracker.current
        extra = {"source": f"readlib.costs.LiveBytes (storages alive on {device.type})", "peak_reserved": None,
                 "reserved_reason": f"not measured: no caching allocator on {device.type}"}
    running = list(itertools.accumulate((peak[p] for p in PHASES), max))
    return {"peak": peak, "after": after, "cumulative": dict(zip(PHASES, running, strict=True)),
            "device": device.type, **extra}


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
