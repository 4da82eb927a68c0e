"""Dataset loaders. Each returns a `Dataset`: decoded uint8 images held once in memory.

Images are decoded a single time at load (JPEG -> uint8 NCHW) and never again: every epoch,
augmentation and the soft-label cache read the same tensor. The full CIFAR-10 pack is decoded
once per pack into the decoded-image cache (`kdcli.data.decoded`) and memory-mapped from there
by later runs and by every torchrun rank. A dataset config points at one of the loaders here
(or `kdcli.data.imagefolder.image_folder`) by `_target_`; a user's own loader only has to return
a `Dataset`.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import math
import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from kdcli.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# Bump when decoding the JPEG pack changes: old decoded caches go stale.
PACK_DECODE_VERSION = 1


# Rows per chunk when a split is hashed, written or gathered onto a device piece by piece: a
# 224 px chunk is 600 MB, and a view's rows are never gathered whole.
CHUNK_ROWS = 4096


class Split:
    """One split: `len(split)` uint8 (C, H, W) images and their int64 `labels`.

    Its images are `base`, or with `rows` (int64, one per label) the rows `base[rows]`: a view.
    `subsample` and `hold_out` select rows that way instead of copying pixels: an image folder
    at 224 px is ~190 GB memory-mapped from the decoded-image cache, and a copy would exhaust
    memory or give every torchrun rank its own instead of sharing the page cache. kd reads a
    split through `take`, `chunks`, `gather_to`, `nbytes` and `image_shape`, which touch only
    its rows. `images` is the whole split as one tensor: `base` itself, or for a view its rows
    gathered into a new one, so a reader that does not know views (a test, a script) still
    gets the split's pixels, never the base's other rows, at the cost of a copy.

    Args:
        images: uint8 (N, C, H, W); left untouched (e.g. a memory-mapped file).
        labels: int64, one per image of the split (per row of `rows` for a view).
        rows: None for all of `images`, else the split's rows of it, in the split's order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 rows: torch.Tensor | None = None) -> None:
        if rows is not None and (rows.dtype != torch.int64 or rows.shape != labels.shape):
            raise ValueError(f"Split rows must be int64 with one per label, got {rows.dtype} "
                             f"{tuple(rows.shape)} for {tuple(labels.shape)} labels")
        self.base = images
        self.labels = labels
        self.rows = rows
        # Computed once by `fingerprint` (the tensors are never written in place).
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        view = f", view of {len(self.base)} rows" if self.rows is not None else ""
        return f"Split({len(self)} x {self.image_shape} {self.base.dtype}{view})"

    @property
    def images(self) -> torch.Tensor:
        """The split's images as one tensor: `base`, or a view's rows gathered (a copy)."""
        return self.base if self.rows is None else self.base[self.rows]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.base.shape[1:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes of the split's images (its rows only, not the base's)."""
        return len(self) * math.prod(self.image_shape) * self.base.element_size()

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at positions `index` of the split (a new tensor of just those)."""
        return self.base[index if self.rows is None else self.rows[index]]

    def select(self, index: torch.Tensor) -> Split:
        """The split of the images at positions `index`: a view of the same base, rows of rows
        for a view, so no pixel is copied however often a split is cut."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return Split(self.base, self.labels[index].contiguous(),
                     index if self.rows is None else self.rows[index])

    def chunks(self, size: int | None = None) -> Iterator[np.ndarray]:
        """The split's images in order, `size` (default CHUNK_ROWS) rows at a time, each a
        C-contiguous array: for a base, its own memory where it is contiguous already."""
        size = size or CHUNK_ROWS
        for start in range(0, len(self), size):
            part = (self.base[start:start + size] if self.rows is None
                    else self.base[self.rows[start:start + size]])
            yield np.ascontiguousarray(part.numpy())

    def gather_to(self, device: torch.device) -> torch.Tensor:
        """The split's images on `device`, a view's gathered a chunk at a time straight into
        the device tensor, so they are never copied whole in host memory."""
        if self.rows is None:
            return self.base.to(device)
        out = torch.empty((len(self), *self.image_shape), dtype=self.base.dtype, device=device)
        for start in range(0, len(self), CHUNK_ROWS):
            out[start:start + CHUNK_ROWS] = self.base[self.rows[start:start + CHUNK_ROWS]]
        return out

    def fingerprint(self) -> str:
        """sha256 of this split's shape, pixels and labels, computed once (then cached: the
        tensors are never written in place). report.json records the test split's, so `kd
        export` can tell the images a run evaluated from others of the same number; an
        ImageNet-size test split takes seconds. What it hashes must not change: every earlier
        report's fingerprint would stop matching (a view hashes as the copy it replaced)."""
        if self._fingerprint is None:
            dtype = self.base[:0].numpy().dtype
            shape = (len(self), *self.image_shape)
            labels = np.ascontiguousarray(self.labels.numpy(), dtype=np.int64)
            h = hashlib.sha256(f"kd-split\0{dtype}\0{shape}\n".encode())
            # A chunk at a time: a test split can be gigabytes, and a view is never copied whole.
            for chunk in self.chunks():
                h.update(chunk.data)
            h.update(labels.data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


@dataclass
class Dataset:
    """A classification dataset with a train and a test split, decoded in memory, and with
    `dataset.val_size` a validation split held out of train (`hold_out`; None without)."""

    name: str
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    val: Split | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    def fingerprint(self) -> str:
        """Content hash of both splits' pixels and labels and the class names: a changed
        dataset gives new store keys. (`Split.fingerprint` is one split's, for the report.)"""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            for split in (self.train, self.test):
                # A chunk at a time, each the split's own memory where it can be: an image
                # folder can be gigabytes, and a view is never copied whole.
                for chunk in split.chunks():
                    h.update(chunk.data)
                h.update(np.ascontiguousarray(split.labels.numpy()).data)
            h.update("\n".join(self.classes).encode())
            if self.val is not None:  # after the rest: without one the hash is what it was
                h.update(b"\0val\0")
                for chunk in self.val.chunks():
                    h.update(chunk.data)
                h.update(np.ascontiguousarray(self.val.labels.numpy()).data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    from PIL import Image

    n = len(offsets) - 1
    first = np.asarray(Image.open(io.BytesIO(blob[offsets[0]:offsets[1]].tobytes())).convert("RGB"))
    out = np.empty((n, *first.shape), dtype=np.uint8)
    for i in range(n):
        raw = blob[offsets[i]:offsets[i + 1]].tobytes()
        out[i] = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _split_from_pack(arrays: dict, prefix: str = "") -> Split:
    images = _decode_jpegs(arrays[f"{prefix}jpeg"], arrays[f"{prefix}offsets"])
    labels = torch.from_numpy(np.asarray(arrays[f"{prefix}labels"], dtype=np.int64))
    return Split(images, labels)


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found: {path}")


def cifar10_subset(name: str = "cifar10_subset", **_: object) -> Dataset:
    """The 5,000/1,000-image CIFAR-10 subset shipped inside the package (no download)."""
    asset = resources.files("kdcli.data") / "assets" / "cifar10_subset.npz"
    with resources.as_file(asset) as path:
        _require(path, "embedded CIFAR-10 subset")
        with np.load(path) as z:
            arrays = dict(z)
    return Dataset(name, _split_from_pack(arrays, "train_"), _split_from_pack(arrays, "test_"),
                   [str(c) for c in arrays["classes"]])


def cifar10(root: str, name: str = "cifar10", cache_dir: str | None = None, **_: object
            ) -> Dataset:
    """Full CIFAR-10 from `root`, in either layout found there.

    - the JPEG pack: `root/train.npz`, `root/test.npz` (arrays jpeg, offsets, labels, classes),
      decoded once into `cache_dir` (None = decode on every run; see `kdcli.data.decoded`);
    - torchvision's `cifar-10-batches-py` folder (as `root` or inside it), raw pixels already.
    """
    base = Path(root).expanduser()
    if (base / "train.npz").exists():
        return _cifar_pack(base, name, cache_dir)
    for folder in (base, base / "cifar-10-batches-py"):
        if (folder / "data_batch_1").exists():
            return _cifar_batches(folder, name)
    raise DataError(
        f"no CIFAR-10 data at {base}: expected train.npz/test.npz (JPEG pack) or a "
        "cifar-10-batches-py folder; set dataset.loader.root"
    )


def _cifar_pack(base: Path, name: str, cache_dir: str | None) -> Dataset:
    # decoded imports Split from here, so it is imported when first needed.
    from kdcli.data import decoded

    packs = {split: base / f"{split}.npz" for split in ("train", "test")}
    for path in packs.values():
        _require(path, "CIFAR-10 pack file")
    cached = decoded.folder(cache_dir, "cifar10", pack_key(packs.values()))
    hit = decoded.load(cached) if cached is not None else None
    if hit is not None:
        splits, meta = hit
        return Dataset(name, splits["train"], splits["test"], [str(c) for c in meta["classes"]])
    t0 = time.perf_counter()
    splits = {}
    for split, path in packs.items():
        with np.load(path) as z:
            arrays = dict(z)
        splits[split] = _split_from_pack(arrays)
    classes = [str(c) for c in arrays["classes"]]
    log.info("cifar10: decoded %d JPEGs from %s in %.1fs", sum(map(len, splits.values())), base,
             time.perf_counter() - t0)
    if cached is not None:
        decoded.write(cached, splits, {"root": str(base), "classes": classes,
                                       "version": PACK_DECODE_VERSION})
    return Dataset(name, splits["train"], splits["test"], classes)


def pack_key(paths: Iterable[Path]) -> str:
    """Hash of the decode version and each pack file's name, size and mtime: cheap (no read),
    and a rewritten pack gets a new key."""
    h = hashlib.sha256(f"cifar10-pack\0{PACK_DECODE_VERSION}\n".encode())
    for path in paths:
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _cifar_batches(folder: Path, name: str) -> Dataset:
    # torchvision's python-pickle layout; like torchvision we unpickle it, so only point
    # dataset.loader.root at data you trust (see README, trust model).
    def read(files: list[str]) -> Split:
        xs, ys = [], []
        for f in files:
            _require(folder / f, "CIFAR-10 batch file")
            with open(folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
        return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    with open(folder / "batches.meta", "rb") as fh:
        classes = pickle.load(fh, encoding="latin1")["label_names"]
    train = read([f"data_batch_{i}" for i in range(1, 6)])
    return Dataset(name, train, read(["test_batch"]), list(classes))


def subsample(ds: Dataset, train_size: int | None, test_size: int | None, seed: int = 0) -> Dataset:
    """Class-balanced-ish random subset (used by the smoke preset to shrink any dataset): views
    of the splits' rows (`Split.select`), no pixel copied."""
    g = torch.Generator().manual_seed(seed)

    def cut(split: Split, n: int | None) -> Split:
        if n is None or n >= len(split):
            return split
        idx = torch.randperm(len(split), generator=g)[:n].sort().values
        return split.select(idx)

    return Dataset(ds.name, cut(ds.train, train_size), cut(ds.test, test_size), ds.classes,
                   ds.mean, ds.std)


def hold_out(ds: Dataset, val_size: int, seed: int = 0) -> Dataset:
    """`ds` with `val_size` of its train images moved into a validation split (`ds.val`).

    Stratified: each class gives its share of `val_size` (largest remainders round it), but
    always keeps one training image, the classes with more to spare giving the difference.
    Which images go is drawn per class from `seed`, so the split is the same in every run and
    on every torchrun rank with that seed. Both splits keep the train split's order, so a
    training sample's index is its row in the reduced train split (what the soft-label cache
    is indexed by). Both are views of the train split's images (`Split.select`): no pixel is
    copied, so memory-mapped images stay shared between torchrun ranks. Raises ConfigError
    when `val_size` would leave a class (present in train) without a training image; 0 holds
    out nothing and returns `ds`.
    """
    if val_size <= 0:
        return ds
    labels = ds.train.labels
    n = len(labels)
    counts = torch.bincount(labels, minlength=ds.num_classes).tolist()
    present = sum(1 for c in counts if c)
    if val_size >= n:
        raise ConfigError(f"dataset.val_size={val_size} would hold out the whole train split "
                          f"({n} images); choose at most {n - present}, so every class keeps "
                          "a training image")
    if val_size > n - present:
        raise ConfigError(f"dataset.val_size={val_size} leaves {n - val_size} training images "
                          f"for {present} classes; choose at most {n - present}, so every "
                          "class keeps a training image")
    quota = _stratified_quota(counts, val_size)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for cls, k in enumerate(quota):
        if k:
            rows = torch.nonzero(labels == cls).flatten()
            chosen.append(rows[torch.randperm(len(rows), generator=g)[:k]])
    val_rows = torch.cat(chosen).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_rows] = False
    train_rows = torch.nonzero(keep).flatten()
    return Dataset(ds.name, ds.train.select(train_rows), ds.test, ds.classes, ds.mean, ds.std,
                   val=ds.train.select(val_rows))


def _stratified_quota(counts: list[int], total: int) -> list[int]:
    """How many of each class's `counts[c]` images go to a split of `total`: the floor of the
    class's proportional share, capped so it keeps one image, then one more at a time to the
    class furthest below its share that can still spare one."""
    n = sum(counts)
    share = [total * c / n for c in counts]
    quota = [min(int(s), max(c - 1, 0)) for s, c in zip(share, counts, strict=True)]
    heap = [(quota[k] - share[k], k) for k, c in enumerate(counts) if quota[k] < c - 1]
    heapq.heapify(heap)
    for _ in range(total - sum(quota)):
        _, k = heapq.heappop(heap)  # never empty: total <= n - (classes present)
        quota[k] += 1
        if quota[k] < counts[k] - 1:
            heapq.heappush(heap, (quota[k] - share[k], k))
    return quota
