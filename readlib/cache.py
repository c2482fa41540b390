"""Hidden-state cache: run the frozen backbone once per split, train the side network from the cache.

READ never changes the backbone and runs it in eval mode, so what it consumes — the per-layer
states φ_1..φ_N of every non-padding token — is a fixed function of the input. The first pass over
a split stores them; every later epoch (and every learning-rate trial on the same data) reads them
back instead of running the backbone. Written here because no library caches per-layer states of a
frozen model for side-network training.

Layout: one array [total tokens, N, d], examples stored back to back (token-major), so an example's
states are one contiguous slice. Kept in memory, or memory-mapped under ``outputs/cache/<key>/``
where a later run with the same key reuses it. The key hashes everything the states depend on:
backbone (name, source, random-weight seed, layers kept), tokenizer, task, split, data selection
(split and subsample seeds, sizes, the data files' content hash, and a hash of the split's token ids) and max
length — a stale cache is never used.

Integrity: when a disk cache is complete, its marker file ``complete`` records the array's shape, dtype, file size
and an xxh3 checksum per 64 MiB block of ``states.npy``; opening it re-reads the file and compares. A missing,
truncated, changed or unverifiable (older, checksum-less) cache is reported in one warning line and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import xxhash
from tqdm.auto import tqdm

from readlib.costs import counted
from readlib.errors import ConfigError

MODES = ("off", "memory", "disk")
DTYPES = {"float32": np.float32, "float16": np.float16}
BLOCK_BYTES = 64 * 2**20  # bytes per checksummed block of a disk cache
MARKER = "complete"  # a disk cache's marker: written last, with the checksums (JSON)
log = logging.getLogger(__name__)


def cache_key(**fields) -> str:
    """A short stable hash of the JSON of ``fields`` (sorted keys)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def fingerprint(*sequences: list[list[int]] | None) -> str:
    """A hash of token id lists (each list of examples in order, lengths included): what the backbone will see."""
    digest = hashlib.sha256()
    for seqs in sequences:
        if seqs is None:
            digest.update(b"none")
            continue
        digest.update(np.asarray([len(s) for s in seqs], dtype=np.int64).tobytes())
        digest.update(np.fromiter((t for s in seqs for t in s), dtype=np.int64).tobytes())
    return digest.hexdigest()[:20]


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class HiddenStateCache:
    """The states of one split: ``gather(idx)`` returns them as [N, tokens, d] float32, in idx order."""

    def __init__(self, lengths: list[int], n_layers: int, d_model: int, dtype: str = "float32",
                 path: Path | None = None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        shape = (int(self.offsets[-1]), n_layers, d_model)
        self.nbytes = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
        self.path = path
        self.complete = False
        self.fill_flops: float | None = None  # FLOPs of the pass that filled it (build_set)
        if path is not None and (path / MARKER).exists():
            problem = verify(path, shape, DTYPES[dtype])
            if problem is None:
                self.complete = True
                self.fill_flops = json.loads((path / MARKER).read_text()).get("fill_flops")
                self.states = np.lib.format.open_memmap(path / "states.npy", mode="r")
                return
            log.warning("hidden-state cache %s %s: rebuilding it", path, problem)
            (path / MARKER).unlink()
        check_fits(self.nbytes, "memory" if path is None else "disk", path)
        if path is None:
            self.states = np.empty(shape, dtype=DTYPES[dtype])
            return
        path.mkdir(parents=True, exist_ok=True)
        (path / "states.npy").unlink(missing_ok=True)  # a fresh file: never write through a damaged one
        self.states = np.lib.format.open_memmap(path / "states.npy", mode="w+", dtype=DTYPES[dtype], shape=shape)

    def store(self, idx: list[int], phi: torch.Tensor) -> None:
        """Write the states of examples ``idx`` from ``phi`` [N, tokens, d] (their tokens in order)."""
        rows = phi.detach().transpose(0, 1).cpu().numpy()
        start = 0
        for i in idx:
            n = int(self.lengths[i])
            self.states[self.offsets[i] : self.offsets[i] + n] = rows[start : start + n]
            start += n

    def gather(self, idx, device: torch.device) -> torch.Tensor:
        rows = np.concatenate([self.states[self.offsets[i] : self.offsets[i + 1]] for i in idx])
        return torch.from_numpy(rows.astype(np.float32, copy=False)).to(device).transpose(0, 1)

    def finish(self, fill_flops: float | None = None) -> None:
        """Mark a disk cache as complete, with its checksums and ``fill_flops`` (what the pass that filled it cost),
        so later runs with the same key read it instead of rebuilding; the marker is written last and atomically (an
        interrupted run leaves none)."""
        self.fill_flops = fill_flops
        if self.path is not None:
            self.states.flush()
            file = self.path / "states.npy"
            marker = {"shape": list(self.states.shape), "dtype": self.states.dtype.name, "fill_flops": fill_flops,
                      "bytes": file.stat().st_size, "block_bytes": BLOCK_BYTES, "xxh3_64": checksums(file, BLOCK_BYTES)}
            partial = self.path / f".{MARKER}.{os.getpid()}"
            partial.write_text(json.dumps(marker))
            partial.replace(self.path / MARKER)
            self.complete = True


def checksums(file: Path, block_bytes: int) -> list[str]:
    """xxh3-64 of each ``block_bytes`` block of ``file`` (hex), in order."""
    out = []
    with open(file, "rb") as f:
        while block := f.read(block_bytes):
            out.append(xxhash.xxh3_64_hexdigest(block))
    return out


def verify(path: Path, shape: tuple[int, ...], dtype: type) -> str | None:
    """What is wrong with the complete-marked disk cache at ``path`` for an array of ``shape`` and ``dtype``, or None
    when its file is whole: present, of the recorded size, shape and dtype, every block's checksum as recorded."""
    try:
        marker = json.loads((path / MARKER).read_text())
        expected = (marker["shape"], marker["dtype"], marker["bytes"], marker["block_bytes"], marker["xxh3_64"])
    except (ValueError, KeyError, TypeError):
        return "has no checksums (written by an older readlib, or its marker is damaged)"
    recorded_shape, recorded_dtype, size, block_bytes, sums = expected
    if not isinstance(sums, list) or len(sums) != -(-size // max(int(block_bytes), 1)):
        return "has a damaged marker (checksums do not cover the file)"
    if recorded_shape != list(shape) or recorded_dtype != np.dtype(dtype).name:
        return f"holds {recorded_dtype} {recorded_shape}, not {np.dtype(dtype).name} {list(shape)}"
    file = path / "states.npy"
    if not file.is_file():
        return "has lost its states.npy"
    if (actual := file.stat().st_size) != size:
        return f"states.npy has {actual:,} bytes, not the {size:,} it was written with (truncated or replaced)"
    for i, (got, want) in enumerate(zip(checksums(file, block_bytes), sums, strict=True)):
        if got != want:
            return f"states.npy changed after it was written (checksum of bytes {i * block_bytes:,}+ differs)"
    return None


def check_fits(nbytes: int, mode: str, path: Path | None) -> None:
    """Raise ConfigError before any work when ``nbytes`` of cache will not fit in memory (80 % of what is
    available) or on disk at ``path``."""
    need = f"hidden-state cache needs {nbytes / 2**30:.2f} GiB"
    if mode == "memory" and nbytes > 0.8 * available_memory() > 0:
        raise ConfigError(f"{need} but only {available_memory() / 2**30:.2f} GiB of memory is available; use "
                          "cache=disk, cache_dtype=float16, a smaller max_train, or cache=off")
    if mode == "disk" and nbytes > (free := shutil.disk_usage(_existing(path)).free):
        raise ConfigError(f"{need} on disk at {path} but only {free / 2**30:.2f} GiB is free; use "
                          "cache_dtype=float16, a smaller max_train, or cache=off")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


class CacheSet(dict):
    """Several caches of one split, by name (e.g. encoder states, decoder states, cross-attention)."""

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.values())

    @property
    def fill_flops(self) -> float | None:
        """FLOPs of the one pass that filled them all."""
        return next(iter(self.values())).fill_flops

    def gather(self, idx, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: c.gather(idx, device) for name, c in self.items()}


def layout_bytes(layout: dict[str, tuple[list[int], int, int]], dtype: str) -> int:
    """Bytes a layout {name: (rows per example, layers, width)} takes."""
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    return sum(sum(rows) * layers * width * itemsize for rows, layers, width in layout.values())


def build_set(model, split, layout: dict[str, tuple[list[int], int, int]], batch_size: int, device: torch.device,
              mode: str = "memory", dtype: str = "float32", path: Path | None = None,
              progress: bool = True) -> CacheSet:
    """Fill one cache per layout entry with ``model.features`` (a dict of [layers, rows, width]) — one pass.

    ``mode`` "disk" keeps each array under ``path`` (``path/<name>`` when there are several) and reuses
    complete ones.
    """
    if mode not in MODES[1:]:
        raise ConfigError(f"unknown cache mode '{mode}'; choose one of: {', '.join(MODES)}")
    caches = CacheSet()
    for name, (rows, layers, width) in layout.items():
        where = None if mode == "memory" else (path if len(layout) == 1 else path / name)
        caches[name] = HiddenStateCache(rows, layers, width, dtype, where)
    if all(c.complete for c in caches.values()):
        return caches
    batches = [list(range(s, min(s + batch_size, len(split)))) for s in range(0, len(split), batch_size)]
    todo = {name: c for name, c in caches.items() if not c.complete}
    per_token, tokens = None, 0
    for idx in tqdm(batches, desc="caching hidden states", leave=False, disable=not progress):
        inputs, _ = split.batch(idx, device)
        positions = sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids"))  # padded, all inputs
        if per_token is None:  # the first batch's FLOPs counted, per padded token: the pass's cost, estimated
            features, flops = counted(model.features, **inputs)
            per_token = flops / positions
        else:
            features = model.features(**inputs)
        tokens += positions
        for name, values in (features if isinstance(features, dict) else {"phi": features}).items():
            if name in todo:
                todo[name].store(idx, values)
    for c in todo.values():
        c.finish(per_token * tokens)
    return caches


def build(model, split, n_layers: int, d_model: int, batch_size: int, device: torch.device,
          mode: str = "memory", dtype: str = "float32", path: Path | None = None,
          progress: bool = True) -> HiddenStateCache:
    """The one-array case of ``build_set``: per-token states [N, tokens, d] of every non-padding token."""
    layout = {"phi": ([len(ids) for ids in split.input_ids], n_layers, d_model)}
    return build_set(model, split, layout, batch_size, device, mode, dtype, path, progress)["phi"]
