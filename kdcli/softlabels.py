"""The soft-label cache file format. No other module opens cache files.

One file per split, `<split>.kdsl`:

    0   8 bytes   magic b"KDSOFTLB"
    8   uint32    format version (VERSION)
    12  uint64    header length H
    20  H bytes   JSON header: arrays (name, dtype, shape, offset), sha256 of the data region,
                  num_samples, num_classes, views, storage, topk, and the producer's fingerprint
    ..  padding   so the data region starts at a 64-byte boundary
        data      arrays back to back, each readable in place by np.memmap

Storage is float16 logits (float32 if a logit exceeds float16's range). With few classes
(`storage=full`) every logit is kept: (N, V, C). With many (`storage=topk`) the top-k values
and their class indices are kept, (N, V, k), plus each row's float32 logsumexp so the
probability mass outside the top-k is known exactly at T=1 and spread evenly over the
remaining classes when the row is densified.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.checkpoint import atomic_write
from kdcli.device import to_device
from kdcli.errors import ConfigError, CorruptArtifact

log = logging.getLogger(__name__)

MAGIC = b"KDSOFTLB"
VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_ALIGN = 64


# `storage=auto` keeps every logit up to this many classes, top-k beyond. The cache key holds
# the setting (`auto`), not what it resolves to: a change here must change the key too.
AUTO_FULL_MAX_CLASSES = 100


def choose_storage(num_classes: int, storage: str, topk: int) -> str:
    """`auto` keeps full logits up to AUTO_FULL_MAX_CLASSES classes and top-k beyond (top-k
    targets are approximate, see `densify`; `full` is exact at any size)."""
    if storage == "auto":
        return "full" if num_classes <= AUTO_FULL_MAX_CLASSES or topk >= num_classes else "topk"
    if storage not in ("full", "topk"):
        raise ConfigError(f"cache.storage={storage!r}; choose auto, full or topk")
    return storage


def encode(logits: torch.Tensor, storage: str, topk: int) -> dict[str, np.ndarray]:
    """Turns float logits (N, V, C) into the arrays stored for `storage`.

    Values are float16, unless some logit lies beyond float16's range (|x| > 65504, a sign of
    a badly scaled teacher): then float32, rather than caching inf.
    """
    logits = logits.float()
    dtype = np.float16 if logits.abs().max() <= np.finfo(np.float16).max else np.float32
    if dtype == np.float32:
        log.warning("teacher logits reach %.3g, beyond float16: caching them as float32",
                    float(logits.abs().max()))
    if storage == "full":
        return {"logits": logits.numpy().astype(dtype)}
    values, indices = logits.topk(topk, dim=-1)
    idx_dtype = np.int16 if logits.shape[-1] <= np.iinfo(np.int16).max else np.int32
    return {
        "values": values.numpy().astype(dtype),
        "indices": indices.numpy().astype(idx_dtype),
        "logsumexp": logits.logsumexp(-1).numpy().astype(np.float32),
    }


def write(path: Path, logits: torch.Tensor, *, storage: str = "auto", topk: int = 20,
          info: dict[str, Any] | None = None, extras: dict[str, np.ndarray] | None = None
          ) -> dict[str, Any]:
    """Writes a cache file atomically. `logits` is (N, C) or (N, V, C). Returns its header.

    `extras` are per-sample arrays stored as given (e.g. the augmentation parameters of each
    cached view), covered by the same checksum.
    """
    if logits.dim() == 2:
        logits = logits[:, None]
    if not torch.isfinite(logits).all():
        raise CorruptArtifact(f"refusing to cache non-finite teacher logits into {path}")
    n, views, c = logits.shape
    storage = choose_storage(c, storage, topk)
    arrays = encode(logits, storage, min(topk, c))
    for name, arr in (extras or {}).items():
        if name in arrays or len(arr) != n:
            raise ValueError(f"extra array {name!r} must be new and have {n} rows")
        arrays[name] = arr
    layout, offset, digest = [], 0, hashlib.sha256()
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        arrays[name] = arr
        layout.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                       "offset": offset})
        offset += arr.nbytes
        offset += -offset % _ALIGN
    header = {
        "num_samples": n, "num_classes": c, "views": views, "storage": storage,
        "topk": min(topk, c) if storage == "topk" else None, "arrays": layout,
        "data_bytes": offset, "info": info or {},
    }
    # The checksum covers the data region exactly as laid out (arrays plus alignment padding).
    chunks = []
    for entry in layout:
        arr = arrays[entry["name"]]
        chunk = arr.tobytes() + b"\0" * (-arr.nbytes % _ALIGN)
        chunks.append(chunk)
        digest.update(chunk)
    header["sha256"] = digest.hexdigest()
    blob = json.dumps(header).encode()
    head_len = _PREFIX.size + len(blob)
    pad = -head_len % _ALIGN

    def _write(fh) -> None:
        fh.write(_PREFIX.pack(MAGIC, VERSION, len(blob) + pad))
        fh.write(blob + b" " * pad)
        for chunk in chunks:
            fh.write(chunk)

    atomic_write(path, _write)
    return header


@dataclass
class SoftLabels:
    """A cache file opened by memory-map."""

    path: Path
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def num_samples(self) -> int:
        return self.header["num_samples"]

    @property
    def num_classes(self) -> int:
        return self.header["num_classes"]

    @property
    def bytes_per_sample(self) -> float:
        return self.header["data_bytes"] / self.num_samples

    def logits(self, index: np.ndarray | torch.Tensor | slice = slice(None), view: int = 0
               ) -> torch.Tensor:
        """Dense float32 logits (B, C) for the given rows and view."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index).cpu()
        return self._on_cpu(index, view)

    @functools.cached_property
    def _on_cpu(self) -> Lookup:
        return self.lookup(torch.device("cpu"))

    def all_logits(self, view: int = 0) -> torch.Tensor:
        return self.logits(slice(None), view)

    @property
    def views(self) -> int:
        return self.header["views"]

    def all_views(self) -> torch.Tensor:
        """Dense float32 logits of every sample and view: (N, V, C)."""
        return torch.stack([self.all_logits(v) for v in range(self.views)], dim=1)

    def lookup(self, device: torch.device, resident: bool = True) -> Lookup:
        """The stored arrays as tensors for per-batch lookups while training: copied to `device`
        once (`resident`), or left in the memory-mapped file with each batch's rows copied."""
        return Lookup(self, torch.device(device), resident)

    @property
    def data_nbytes(self) -> int:
        return self.header["data_bytes"]


class Lookup:
    """Per-batch teacher logits from a cache file, in its stored form until the batch is drawn.

    Nothing is widened up front: the float16 logits (or top-k values, indices and logsumexp)
    stay as stored, a batch's rows are gathered and turned into dense float32 logits then. On
    the CPU the tensors are views of the memory-mapped file (copy-on-write, so torch may hold
    them; the pages are the page cache's, shared by every process reading the file). On a GPU
    the stored arrays are copied there once, at their stored width (`resident`), or, for a
    cache too big to sit beside the model, stay in the file: each batch's rows are gathered
    on the host (the caller passes host indices then) and copied from pinned memory without
    waiting.
    """

    def __init__(self, labels: SoftLabels, device: torch.device, resident: bool = True) -> None:
        self.num_classes = labels.num_classes
        self.storage = labels.header["storage"]
        self.device = device
        self.resident = resident
        self.k = labels.header["topk"]  # None for full logits
        names = ("logits",) if self.storage == "full" else ("values", "indices", "logsumexp")
        arrays = {name: torch.from_numpy(labels.arrays[name]) for name in names}
        self.tensors = {n: t.to(device) for n, t in arrays.items()} if self.resident else arrays

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def __call__(self, index: torch.Tensor | slice, view: torch.Tensor | int = 0
                 ) -> torch.Tensor:
        """Dense float32 logits (B, C) of samples `index`, each at its `view` (on the host
        when the lookup is not resident), on the lookup's device."""
        rows = {name: self._rows(t[index, view]) for name, t in self.tensors.items()}
        if self.storage == "full":
            return rows["logits"].float()
        return densify(rows["values"].float(), rows["indices"].long(), rows["logsumexp"],
                       self.num_classes)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.resident else to_device(t, self.device)


def densify(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, num_classes: int
            ) -> torch.Tensor:
    """Rebuilds (B, C) logits from top-k: the leftover mass is spread over the other classes.

    At T=1 the teacher's probabilities come back exactly for the kept classes and in total for
    the rest, whose own spread is lost (all get one logit): a KL over 1000 classes read 15 % off
    at T=1 and 44 % at T=4 in one case (the student stage warns)."""
    k = values.shape[-1]
    kept = (values - lse[:, None]).exp().sum(-1).clamp(max=1 - 1e-6)
    rest = ((1 - kept) / max(num_classes - k, 1)).log() + lse
    out = rest[:, None].expand(-1, num_classes).clone()
    return out.scatter_(1, indices, values)


def open(path: Path, verify: bool = True) -> SoftLabels:
    """Opens a cache file; checks magic, version and (with `verify`) the data checksum."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            magic, version, head_len = _PREFIX.unpack(fh.read(_PREFIX.size))
            if magic != MAGIC:
                raise CorruptArtifact(f"{path} is not a kd soft-label cache (bad magic)")
            if version != VERSION:
                raise CorruptArtifact(f"{path} has cache format {version}; this kd reads {VERSION}")
            header = json.loads(fh.read(head_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifact(f"soft-label cache {path} is unreadable: {exc}") from exc
    data_start = _PREFIX.size + head_len
    if path.stat().st_size != data_start + header["data_bytes"]:
        raise CorruptArtifact(f"soft-label cache {path} is truncated or padded "
                              f"({path.stat().st_size} bytes, expected "
                              f"{data_start + header['data_bytes']})")
    if verify:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            fh.seek(data_start)
            while block := fh.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != header["sha256"]:
            raise CorruptArtifact(f"soft-label cache {path} fails its checksum (corrupted)")
    # Copy-on-write maps: writable, so torch can wrap them without a copy (`Lookup`); nothing
    # is ever written back to the file.
    arrays = {
        a["name"]: np.memmap(path, dtype=np.dtype(a["dtype"]), mode="c",
                             offset=data_start + a["offset"], shape=tuple(a["shape"]))
        for a in header["arrays"]
    }
    return SoftLabels(path, header, arrays)
