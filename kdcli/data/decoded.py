"""The on-disk cache of decoded images, for the loaders that decode (CIFAR-10's JPEG pack, image
folders): decoding takes seconds to hours, reading the result back takes no time at all.

Layout, one folder per dataset and decode (`prefix` names the loader, `key` is the loader's hash
of its inputs and decode settings, so changed inputs get a new folder):

    <cache_dir>/<prefix>-<key>/train_images.npy   uint8 (N, C, H, W)
                               train_labels.npy   int64 (N,)
                               test_images.npy, test_labels.npy
                               meta.json          the loader's own fields (root, classes, ...)
                                                  and the row count of each split

A cache is written into a temp folder beside its place, each file fsynced, then renamed into
place, so a killed run never leaves half a cache behind and a reader sees all of it or none.

Images are loaded memory-mapped copy-on-write (`np.load(mmap_mode="c")`): nothing is read until
touched, the pages live in the OS page cache and are shared by every process and torchrun rank
on the machine that maps the same file (one copy in memory, not one per rank), and a write to a
tensor stays private to its process instead of reaching the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from kdcli.data.datasets import Split
from kdcli.store import mark_used

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
# Set by `read_only()`: `write` caches nothing (`kd export` writes only into OUT and the run).
_read_only = False


@contextlib.contextmanager
def read_only() -> Iterator[None]:
    """Within the block, caches are read but none is written: a command that must not write
    outside its own folders (`kd export`, whose recorded store may be gone or another
    machine's path) decodes instead of creating a cache folder there."""
    global _read_only
    before, _read_only = _read_only, True
    try:
        yield
    finally:
        _read_only = before


def folder(cache_dir: str | None, prefix: str, key: str) -> Path | None:
    """`<cache_dir>/<prefix>-<key>`, or None when caching is off (`cache_dir` None or empty)."""
    if cache_dir is None or str(cache_dir).strip() == "":
        return None
    return Path(cache_dir).expanduser() / f"{prefix}-{key}"


def load(path: Path, expected_labels: dict[str, np.ndarray] | None = None
         ) -> tuple[dict[str, Split], dict] | None:
    """The cached splits and meta.json, or None when absent or unusable (then the caller
    decodes again). A damaged cache is moved aside and removed, so it gets rewritten.

    Args:
        path: The cache folder (`folder(...)`).
        expected_labels: Per split, the labels the inputs give; a cache that disagrees is stale.
    """
    if not (path / "meta.json").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        splits = {}
        for split in SPLITS:
            images = np.load(path / f"{split}_images.npy", mmap_mode="c")
            labels = np.load(path / f"{split}_labels.npy")
            if (images.ndim != 4 or images.dtype != np.uint8
                    or not images.shape[0] == len(labels) == meta["counts"][split]):
                raise ValueError(f"{split} split does not match meta.json")
            if expected_labels is not None and not np.array_equal(labels,
                                                                  expected_labels[split]):
                raise ValueError(f"{split} split does not match the file list")
            splits[split] = Split(torch.from_numpy(images), torch.from_numpy(labels))
    except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
        log.warning("%s: decoded cache %s is unreadable (%s); decoding again", _what(path), path,
                    exc)
        aside = path.with_name(f".{path.name}.{os.getpid()}.damaged")
        with contextlib.suppress(OSError):
            os.rename(path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        return None
    if not _read_only:  # `kd store prune --older-than` goes by last use
        mark_used(path / "meta.json")
    log.info("%s: loaded decoded images from %s", _what(path), path)
    return splits, meta


def write(path: Path, splits: dict[str, Split], meta: dict) -> None:
    """Writes `splits` and `meta` (plus each split's row count) into a temp folder beside
    `path`, then renames it into place. Another process that got there first wins; a disk that
    refuses (full, read-only) costs a warning, not the run. Within `read_only()`, nothing."""
    if _read_only:
        log.info("%s: decoded images not cached in %s (this command writes no caches)",
                 _what(path), path)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared store's cache from other users
    except OSError as exc:
        log.warning("%s: cannot cache decoded images in %s (%s)", _what(path), path.parent, exc)
        return
    try:
        for split, data in splits.items():
            for part in ("images", "labels"):
                with open(tmp / f"{split}_{part}.npy", "wb") as fh:
                    if part == "images":
                        _save_images(fh, data)
                    else:
                        np.save(fh, data.labels.numpy())
                    fh.flush()
                    os.fsync(fh.fileno())
        counts = {split: len(data) for split, data in splits.items()}
        meta = {**meta, "counts": counts, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():  # not another run's finished copy
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another run got there first
        log.info("%s: cached decoded images in %s", _what(path), path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s: cannot cache decoded images in %s (%s)", _what(path), path, exc)


def _save_images(fh, split: Split) -> None:
    """`np.save` of the split's images, the same bytes, written a chunk of rows at a time: a
    view (`Split.rows`) is never gathered whole."""
    dtype = split.base[:0].numpy().dtype
    np.lib.format.write_array_header_1_0(fh, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": (len(split), *split.image_shape)})
    for chunk in split.chunks():
        fh.write(chunk.data)


def _what(path: Path) -> str:
    """The dataset a cache folder belongs to, for log lines: its prefix."""
    return path.name.rsplit("-", 1)[0]
